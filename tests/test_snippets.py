"""The connection block's snippets work when pasted as printed, whatever the token looks like."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llm_magic.supervisor.snippets import client_snippets, connection_text

from .test_cli import Serve

AWKWARD = "-starts-like-an-option-and has 'quotes' $HOME"


def snippet(block: str, name: str) -> str:
    line, = [line for line in block.splitlines() if line.strip().startswith(name + ":")]
    return line.split(":", 1)[1].strip()


def test_snippets_with_an_awkward_token_work_when_pasted(fresh_magics, tmp_path: Path, capsys) -> None:
    s = Serve("--token", AWKWARD)
    try:
        block = connection_text(s.url, AWKWARD, "m")
        # the terminal line, through a real shell, with llm-magic on PATH as after an install
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "llm-magic").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m llm_magic "$@"\n')
        (bin_dir / "llm-magic").chmod(0o755)
        ask = snippet(block, "terminal").replace("'Hello!'", "--max-tokens 3 'Hello!'")
        result = subprocess.run(ask, shell=True, capture_output=True, text=True, timeout=60,
                                env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)})
        assert result.returncode == 0 and result.stdout.strip(), result.stderr
        curl = snippet(block, "curl")
        result = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=60)
        assert '"choices"' in result.stdout, result.stdout
        # the Jupyter line, in a real IPython shell
        shell, _ = fresh_magics
        load, connect = snippet(block, "Jupyter").split("  then  ")
        assert shell.run_cell(connect).success
        assert f"Connected to {s.url}" in capsys.readouterr().out
        # the Python lines are Python literals
        namespace: dict = {}
        exec("import llm_magic; client = " + snippet(block, "python"), namespace)
        assert namespace["client"].chat("Hi", max_tokens=2).text
    finally:
        s.stop()


def test_a_buffering_tunnel_makes_the_snippets_ask_for_whole_answers() -> None:
    streaming = connection_text("http://h", "t", "m", streams=True)
    buffered = connection_text("http://h", "t", "m", streams=False)
    assert "all at once" not in streaming and "--no-stream" not in streaming
    assert "Streaming:  the tunnel delivers a streamed answer all at once" in buffered
    assert "%config LLMMagics.stream = False" in snippet(buffered, "Jupyter")
    assert "--no-stream" in snippet(buffered, "terminal")


def test_the_block_shows_the_device_and_warnings() -> None:
    block = connection_text("http://h", None, "m", device={"device": "CUDA0 Tesla T4", "gpu_layers": "29 of 29",
                                                          "memory": "4.4 GiB model + 1.8 GiB KV cache"},
                            warnings=["the GPU is not used"])
    assert "  Device:     CUDA0 Tesla T4; layers on the GPU: 29 of 29; 4.4 GiB model + 1.8 GiB KV cache" in block
    assert "warning: the GPU is not used" in block
    assert "Token:      none" in block and "--token" not in client_snippets("http://h", None)


def test_the_coding_agent_lines_are_shell_words_and_toml_codex_reads() -> None:
    tomllib = __import__("pytest").importorskip("tomllib")
    import shlex

    block = client_snippets("https://h.example", AWKWARD)
    assert shlex.split(snippet(block, "claude")) == ["ANTHROPIC_BASE_URL=https://h.example",  # no /v1
                                                     f"ANTHROPIC_API_KEY={AWKWARD}", "claude"]
    words = shlex.split(snippet(block, "codex"))
    assert words[:5] == [f"LLM_MAGIC_TOKEN={AWKWARD}", "codex", "-c", "model_provider=llm_magic", "-c"]
    name, value = words[5].split("=", 1)
    provider = tomllib.loads(f"{name} = {value}")["model_providers"]["llm_magic"]
    assert provider == {"name": "llm_magic", "base_url": "https://h.example/v1", "wire_api": "responses",
                        "env_key": "LLM_MAGIC_TOKEN"}
    open_host = client_snippets("http://127.0.0.1:5000", None)
    assert "ANTHROPIC_API_KEY=none claude" in snippet(open_host, "claude")  # Claude Code wants one
    assert "env_key" not in snippet(open_host, "codex") and "LLM_MAGIC_TOKEN" not in snippet(open_host, "codex")
