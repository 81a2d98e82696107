"""The llm-magic command as a person runs it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from .conftest import free_port

LLM_MAGIC = [sys.executable, "-m", "llm_magic"]


def run_cli(*args: str, env: dict | None = None, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*LLM_MAGIC, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, input=input)


class Serve:
    """``llm-magic serve`` in the background, read until it says it is ready."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([*LLM_MAGIC, "serve", "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.output = ""
        deadline = time.monotonic() + 60
        while "Press Ctrl-C" not in self.output and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output += line
        assert "Press Ctrl-C" in self.output, self.output + self.proc.stderr.read()
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(15)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code


@pytest.fixture
def served() -> Iterator[Serve]:
    s = Serve()
    yield s
    if s.proc.poll() is None:
        s.stop()


def test_help_lists_the_design_flags() -> None:
    out = run_cli("serve", "--help").stdout
    for flag in ("--model", "--host", "--port", "--token", "--no-token", "--tunnel", "--ctx", "--gpu-layers",
                 "--allow-model", "--max-queue", "--max-ctx", "--cors", "--parallel", "--flash-attn",
                 "--split-mode", "--tensor-split", "--main-gpu"):
        assert flag in out
    assert "--ready-file" not in out  # plumbing stays hidden
    out = run_cli("ask", "--help").stdout
    for flag in ("--url", "--token", "--model", "--system"):
        assert flag in out
    assert run_cli("--version").stdout.startswith("llm_magic ")


def test_serve_prints_url_and_a_working_token_and_stops_on_sigterm(served: Serve) -> None:
    assert f"Local URL:  {served.url}" in served.output
    token = re.search(r"Token:\s+(\S+)", served.output).group(1)
    assert len(token) >= 24
    assert "Tunnel:     none" in served.output
    r = requests.post(served.url + "/api", json={"token": token, "inputs": "Hi", "parameters": {"max_tokens": 2}}, timeout=30)
    assert r.status_code == 200
    assert served.stop() == 0


def test_token_from_environment_is_used_and_not_printed() -> None:
    s = Serve(env={"LLM_MAGIC_TOKEN": "env-token-abcdefghijklmnop"})
    try:
        assert "env-token-abcdefghijklmnop" not in s.output
        assert "(set by $LLM_MAGIC_TOKEN)" in s.output
        r = requests.get(s.url + "/v1/models", headers={"Authorization": "Bearer env-token-abcdefghijklmnop"}, timeout=10)
        assert r.status_code == 200
    finally:
        assert s.stop(signal.SIGINT) == 0


def test_ask_streams_an_answer_to_stdout(served: Serve) -> None:
    token = re.search(r"Token:\s+(\S+)", served.output).group(1)
    result = run_cli("ask", "--url", served.url, "--token", token, "--max-tokens", "8", "Say hi.")
    assert result.returncode == 0 and result.stdout.strip()
    piped = run_cli("ask", "--url", served.url, "--complete", "--max-tokens", "3", env={"LLM_MAGIC_TOKEN": token},
                    input="1, 2, 3,")
    assert piped.returncode == 0 and piped.stdout.strip()


def test_ask_errors_are_one_line() -> None:
    result = run_cli("ask", "--url", f"http://127.0.0.1:{free_port()}", "hello")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach") and "Traceback" not in result.stderr


def test_ask_with_wrong_token(served: Serve) -> None:
    result = run_cli("ask", "--url", served.url, "--token", "nope", "hello")
    assert result.returncode == 1 and "wrong token" in result.stderr and "Traceback" not in result.stderr


def test_serve_on_a_port_in_use_says_so() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--port", str(port))
    assert result.returncode == 1
    assert f"Port {port} is in use by another program" in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a model")
    result = run_cli("serve", "--port", "0", "--model", str(bad))
    assert result.returncode == 1 and "bad.gguf is not a GGUF file" in result.stderr
    result = run_cli("serve", "--token", "a", "--no-token")
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
