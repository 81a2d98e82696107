"""The magics in a real IPython shell against a real server process and the real model."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from IPython.core.interactiveshell import InteractiveShell

from llm_magic import ApiHost
from llm_magic.notebook.magics import interpolate

from .conftest import free_port
from .shell_fixtures import run


def test_interpolation_is_one_pass() -> None:
    ns = {"x": "{y}", "y": "never", "n": 3, "obj": type("O", (), {"name": "Ada"})()}
    assert interpolate("a {x} b {{x}} {n} {obj.name} {missing} {obj.nope} {1+1}", ns) == \
        "a {y} b {x} 3 Ada {missing} {obj.nope} {1+1}"
    assert interpolate('json: {"k": 1}', ns) == 'json: {"k": 1}'


def test_magics_have_real_help(shell: InteractiveShell) -> None:
    host_doc = shell.find_line_magic("llm_host").__doc__
    cell_doc = shell.find_cell_magic("llm").__doc__
    assert "--model SPEC" in host_doc and "{start,stop,restart,status,logs,top}" in host_doc
    assert "--max-tokens" in cell_doc and "-o NAME" in cell_doc and "%llm connect URL" in cell_doc


def test_start_status_chat_memory_and_stop(shell, magics, hosted, capsys) -> None:
    out, err = run(shell, "%llm_host status", capsys)
    assert not err and "state             running" in out and "requests served" in out
    out, err = run(shell, "%%llm --max-tokens 12\nMy name is Ada. Say hello.", capsys)
    assert not err and out.strip() and "tokens/s" in out
    first = magics.last_answer
    out, err = run(shell, "%%llm --max-tokens 12\nWhat is my name?", capsys)
    assert not err
    assert [m["role"] for m in magics.history] == ["user", "assistant", "user", "assistant"]
    assert magics.history[0]["content"] == "My name is Ada. Say hello."
    assert magics.last_answer.usage["prompt_tokens"] > first.usage["prompt_tokens"] + first.usage["completion_tokens"]
    assert shell.user_ns["_llm"] == magics.history[-1]["content"]


def test_new_system_output_and_interpolation(shell, magics, hosted, capsys) -> None:
    shell.user_ns["snippet"] = "def f(): return {1: 2}"
    run(shell, "%%llm --max-tokens 5\nhello", capsys)
    out, err = run(shell, "%%llm --new --system 'Be terse.' --max-tokens 8 -o review\n"
                          "Review {snippet} {{literally}} {undefined_name}", capsys)
    assert not err
    assert magics.history[0] == {"role": "system", "content": "Be terse."}
    assert magics.history[1]["content"] == "Review def f(): return {1: 2} {literally} {undefined_name}"
    assert len(magics.history) == 3  # --new dropped the earlier turn
    assert shell.user_ns["review"] == shell.user_ns["_llm"] == magics.history[2]["content"]


def test_complete_is_not_a_chat_turn(shell, magics, hosted, capsys) -> None:
    out, err = run(shell, "%%llm --complete --max-tokens 4 --temperature 0\n1, 2, 3,", capsys)
    assert not err and "4 tokens" in out and "stopped at max tokens" in out
    assert magics.history == [] and shell.user_ns["_llm"].strip()


def test_reset_history_status_models(shell, magics, hosted, capsys) -> None:
    run(shell, "%%llm --max-tokens 3\nhi", capsys)
    out, _ = run(shell, "%llm history", capsys)
    assert "**user**: hi" in out
    out, _ = run(shell, "%llm status", capsys)
    assert "host status  ok" in out and "conversation 1 turn(s)" in out
    out, _ = run(shell, "%llm models", capsys)
    assert "SmolLM2-135M-Instruct.Q4_1" in out
    run(shell, "%llm reset", capsys)
    assert magics.history == []
    assert "empty" in run(shell, "%llm history", capsys)[0]


def test_config_sets_defaults(shell, magics, hosted, capsys) -> None:
    run(shell, "%config LLMMagics.max_tokens = 3", capsys)
    run(shell, "%%llm --complete --temperature 0\nOnce upon a time", capsys)
    assert magics.last_answer.usage["completion_tokens"] == 3


def test_logs_and_starting_twice(shell, magics, hosted, capsys) -> None:
    out, err = run(shell, "%llm_host logs -n 5", capsys)
    assert not err and "llm_magic.server" in out
    _, err = run(shell, "%llm_host start --tunnel none --port 0", capsys)
    assert "already running" in err


def test_top_and_status_show_the_slots_and_the_pace(shell, magics, hosted, capsys) -> None:
    out, err = run(shell, "%%llm --max-tokens 8\nSay hi.", capsys)
    assert not err
    out, err = run(shell, "%llm_host top --once", capsys)
    assert not err and "slots 0 of 4 busy" in out and "tokens/s" in out and "busy slots" in out
    assert re.search(r"idle\s+cache\s+[1-9]", out), out  # the answer's slot keeps its cache
    out, err = run(shell, "%llm_host top -n 3 --interval 0.2", capsys)
    assert not err and out.count("slots 0 of 4 busy") == 3  # refreshed in place, three times
    out, err = run(shell, "%llm_host status", capsys)
    assert not err and "tokens/s now" in out and "slots 0 of 4 busy" in out
    out, err = run(shell, "%llm status", capsys)  # the client's view, through the token
    assert not err and "slots 0 of 4 busy" in out and hosted.host.token not in out
    logs = hosted.host.logs(200)
    assert re.search(r"\[[0-9a-f]{32}\] POST /v1/chat/completions 200 prompt=\d+ completion=\d+ ", logs), logs[-2000:]
    assert hosted.host.token not in logs


@pytest.mark.parametrize("cell, message", [
    ("%%llm --bogus\nhi", "unrecognized arguments: --bogus"),
    ("%llm_host frobnicate", "invalid choice: 'frobnicate'"),
    ("%%llm --max-tokens many\nhi", "argument --max-tokens: invalid int value"),
    ("%%llm\n   ", "the cell is empty"),
    ("%%llm --temperature 9\nhi", "'temperature' must be between"),
    ('%%llm --system "unclosed\nhi', "cannot read the arguments"),
])
def test_mistakes_are_one_clear_line(shell, magics, hosted, capsys, cell: str, message: str) -> None:
    _, err = run(shell, cell, capsys)
    assert message in err


def test_remote_failures_are_one_clear_line(shell, magics, capsys, monkeypatch) -> None:
    saved = magics.client
    try:
        magics.client = None
        _, err = run(shell, "%%llm\nhi", capsys)
        assert "not connected: %llm connect URL --token TOKEN" in err
        _, err = run(shell, f"%llm connect http://127.0.0.1:{free_port()}", capsys)
        assert "cannot reach" in err and "is the host running" in err
        with ApiHost(use_token=False, port=0) as open_host:
            _, err = run(shell, f"%llm connect {open_host.url} --token wrong", capsys)
            assert err == ""  # a host without a token accepts any
            _, err = run(shell, "%%llm --model someone/else-GGUF:Q4_K_M\nhi", capsys)
            assert "not allowed" in err and "--allow-model" in err
    finally:
        magics.client = saved


def test_wrong_token_and_env_connection(shell, magics, hosted, capsys, monkeypatch) -> None:
    saved = magics.client
    try:
        _, err = run(shell, f"%llm connect {hosted.host.url} --token wrong", capsys)
        assert "wrong token" in err
        magics.client = None
        monkeypatch.setenv("LLM_MAGIC_URL", hosted.host.url)
        monkeypatch.setenv("LLM_MAGIC_TOKEN", hosted.host.token)
        out, err = run(shell, "%llm connect", capsys)
        assert not err and f"Connected to {hosted.host.url}" in out
        magics.client = None
        out, err = run(shell, "%%llm --max-tokens 2\nhi", capsys)  # connects from the environment
        assert not err
    finally:
        magics.client = saved


def test_busy_host_is_one_clear_line(shell, magics, capsys) -> None:
    with ApiHost(use_token=False, port=0, max_queue=0, extra_args=["--parallel", "1"]) as host:
        saved = magics.client
        assert run(shell, f"%llm connect {host.url}", capsys)[1] == ""
        long = requests.post(f"{host.url}/v1/completions", stream=True, timeout=60,
                             json={"prompt": "word " * 100, "max_tokens": 3000, "stream": True, "temperature": 0})
        lines = long.iter_lines()  # kept: a dropped iterator closes the connection when collected
        try:
            next(lines)  # the host is now generating
            _, err = run(shell, "%%llm\nhi", capsys)
            assert "the host is busy" in err, (err, host.logs(), host.status())
        finally:
            long.close()
            magics.client = saved


def test_host_down_after_stop(shell, magics, capsys) -> None:
    host = ApiHost(use_token=False, port=0).start()
    saved = magics.client
    try:
        run(shell, f"%llm connect {host.url}", capsys)
        host.stop()
        _, err = run(shell, "%%llm\nhi", capsys)
        assert "cannot reach" in err and "is the host running" in err
    finally:
        magics.client = saved


def test_stop_without_host_port_in_use_and_bad_model(fresh_magics, tmp_path: Path, capsys) -> None:
    sh, _ = fresh_magics
    _, err = run(sh, "%llm_host stop", capsys)
    assert "no host was started in this notebook" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        _, err = run(sh, f"%llm_host start --tunnel none --port {busy.getsockname()[1]}", capsys)
    assert "is in use by another program" in err
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF and nothing else")
    _, err = run(sh, f"%llm_host start --tunnel none --port 0 --model {broken}", capsys)
    assert "could not load broken.gguf" in err


def test_base_install_loads_the_extension(tmp_path: Path) -> None:
    for name in ("flask", "werkzeug", "llama_cpp", "huggingface_hub"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('not installed', name=__name__)")
    code = """
import importlib.util, sys
from IPython.core.interactiveshell import InteractiveShell
real_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name in ('flask', 'llama_cpp') else real_find_spec(name, *a)
sh = InteractiveShell.instance()
assert sh.run_cell('%load_ext llm_magic').success
r = sh.run_cell('%llm_host start --tunnel none')
print('ERROR:', r.error_in_exec)
r = sh.run_cell('%%llm --max-tokens 2\\nhi')
print('ERROR:', r.error_in_exec)
print('host modules:', sorted(m for m in ('flask', 'llama_cpp', 'huggingface_hub') if m in sys.modules))
"""
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("LLM_MAGIC_URL", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env).stdout
    assert "ERROR: hosting needs the host extra (flask, llama_cpp missing): pip install 'llm_magic[host]'" in out
    assert "ERROR: not connected" in out
    assert "host modules: []" in out


def test_start_with_a_hub_model_downloads_in_the_notebook_process(hub, fresh_magics, capsys) -> None:
    sh, _ = fresh_magics
    out, err = run(sh, "%llm_host start --tunnel none --port 0 --model test-org/SmolLM2-GGUF:Q4_1", capsys)
    assert not err and "serving test-org/SmolLM2-GGUF:Q4_1" in out
    # the file came down in this process (so its progress bar shows in the notebook)
    assert ("GET", "/test-org/SmolLM2-GGUF/resolve/main/SmolLM2.Q4_1.gguf", None) in hub.requests
    out, err = run(sh, "%%llm --max-tokens 3\nhi", capsys)
    assert not err and "test-org/SmolLM2-GGUF:Q4_1 · 3 tokens" in out


def test_every_serve_flag_given_to_llm_host_reaches_the_server(fresh_magics, capsys, model_path) -> None:
    sh, magics = fresh_magics
    out, err = run(sh, "%llm_host start --tunnel none --port 0 --keepalive 7 --threads 1 --max-queue 3 --parallel 2 "
                       "--flash-attn off "
                       f"--ctx 2048 --chat-format chatml --allow-model 'org/*' --max-ctx 3000 "
                       f"--cors https://a.example --embedding-model {model_path}", capsys)
    assert not err
    argv = Path(f"/proc/{magics.host.pid}/cmdline").read_bytes().decode().split("\0")
    for flag, value in (("--keepalive", "7.0"), ("--threads", "1"), ("--max-queue", "3"), ("--ctx", "2048"),
                        ("--parallel", "2"), ("--flash-attn", "off"),
                        ("--chat-format", "chatml"), ("--allow-model", "org/*"), ("--max-ctx", "3000"),
                        ("--cors", "https://a.example"), ("--embedding-model", str(model_path))):
        assert argv[argv.index(flag) + 1] == value, (flag, argv)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_host_that_died_says_so_and_one_restart_brings_it_back(fresh_magics, capsys, sig) -> None:
    sh, magics = fresh_magics
    _, err = run(sh, "%llm_host start --tunnel none --port 0", capsys)
    assert not err
    url, token, pid = magics.host.url, magics.host.token, magics.host.pid
    out, err = run(sh, "%%llm --max-tokens 2\nhi", capsys)
    assert not err
    # A streamed answer's access line is written as its response closes, a moment after the
    # client read its end: the server has logged the request before it is killed.
    deadline = time.monotonic() + 10
    while "POST /v1/chat/completions 200" not in magics.host.logs(50) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(pid, sig)  # the OOM killer, a crash in llama.cpp
    _, err = run(sh, "%%llm --max-tokens 2\nhi", capsys)
    assert err.startswith(f"the host this notebook started has died: it was killed by {sig.name} ("), err
    assert "%llm_host restart brings it back on the same URL with the same token" in err
    out, err = run(sh, "%llm_host status", capsys)
    assert not err and re.search(rf"state\s+failed: the server died; it was killed by {sig.name} \(", out), out
    assert "uptime" not in out and "Its log's last lines:" in out  # it does not claim to run
    if sig == signal.SIGKILL:  # the last lines: what it did before it died
        assert "POST /v1/chat/completions 200" in out
    else:  # or, after a crash, the stacks faulthandler wrote (as many lines as the server has threads)
        assert any(mark in out for mark in ("Fatal Python error", "most recent call first", "Extension modules"))
    assert "%llm_host restart brings it back on the same URL, with the same token." in out
    out, err = run(sh, "%llm_host logs -n 400", capsys)
    assert "POST /v1/chat/completions 200" in out
    out, err = run(sh, "%llm_host restart", capsys)
    assert not err and f"Local URL:  {url}" in out
    assert (magics.host.url, magics.host.token) == (url, token) and magics.host.pid != pid
    out, err = run(sh, "%%llm --max-tokens 2\nhi", capsys)
    assert not err and "tokens" in out
    out, _ = run(sh, "%llm_host status", capsys)
    assert re.search(r"state\s+running", out) and "uptime" in out


def test_stopping_a_host_that_died_clears_it_away(fresh_magics, capsys) -> None:
    sh, magics = fresh_magics
    assert not run(sh, "%llm_host start --tunnel none --port 0", capsys)[1]
    folder = magics.host.log_path.parent
    os.kill(magics.host.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while magics.host.running:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    out, err = run(sh, "%llm_host stop", capsys)
    assert not err and out.startswith("The host had died: it was killed by SIGKILL (") and not folder.exists()
    _, err = run(sh, "%llm_host stop", capsys)
    assert "the host is not running" in err


def test_restart_with_new_flags_keeps_the_url_and_the_token(fresh_magics, capsys) -> None:
    sh, magics = fresh_magics
    assert not run(sh, "%llm_host start --tunnel none --port 0 --ctx 2048 --keepalive 7", capsys)[1]
    host, url, token, pid = magics.host, magics.host.url, magics.host.token, magics.host.pid
    out, err = run(sh, "%llm_host restart --tunnel none --ctx 1024", capsys)
    assert not err and f"Local URL:  {url}" in out
    assert magics.host is host and (host.url, host.token) == (url, token) and host.pid != pid
    argv = Path(f"/proc/{host.pid}/cmdline").read_bytes().decode().split("\0")
    # the new flags: the context given, the keep-alive back to its default (defaults are not passed)
    assert argv[argv.index("--ctx") + 1] == "1024" and "--keepalive" not in argv
    out, err = run(sh, "%%llm --max-tokens 2\nhi", capsys)
    assert not err and "tokens" in out  # the notebook's client follows
    out, err = run(sh, "%llm_host restart", capsys)  # no flags: the last ones again
    argv = Path(f"/proc/{host.pid}/cmdline").read_bytes().decode().split("\0")
    assert not err and argv[argv.index("--ctx") + 1] == "1024" and host.url == url
