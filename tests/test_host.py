"""ApiHost: the server process's life as the seed's Python API exposes it."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import requests

from llm_magic import ApiHost
from llm_magic.errors import HostError


def gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_start_status_logs_stop() -> None:
    host = ApiHost(port=0)
    assert host.status()["state"] == "stopped"
    host.start()
    try:
        status = host.status()
        assert status["state"] == "running" and status["status"] == "ok"
        assert status["model"] == "SmolLM2-135M-Instruct.Q4_1" and status["uptime_s"] >= 0
        assert requests.post(f"{host.url}/api", json={"token": host.token, "inputs": "x",
                                                      "parameters": {"max_tokens": 2}}, timeout=30).ok
        assert host.status()["requests"] == 1 and host.status()["completion_tokens"] == 2
        assert "POST /api 200" in host.logs()
        with pytest.raises(HostError, match="already running"):
            host.start()
    finally:
        pid = host.pid
        host.stop()
    assert host.status()["state"] == "stopped" and gone(pid)
    host.stop()  # twice is fine


def test_token_is_never_written_to_the_log_or_command_line() -> None:
    with ApiHost(port=0) as host:
        requests.post(f"{host.url}/api", json={"token": host.token, "inputs": "x", "parameters": {"max_tokens": 1}}, timeout=30)
        requests.post(f"{host.url}/api", json={"token": "wrong-" + host.token, "inputs": "x"}, timeout=30)
        cmdline = Path(f"/proc/{host.pid}/cmdline").read_bytes().decode()
        log = host.logs(1000)
    assert host.token not in log and host.token not in cmdline
    assert "POST /api 401" in log


def test_start_failure_reports_the_servers_own_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but truncated")
    host = ApiHost(model=str(bad), port=0)
    with pytest.raises(HostError, match="stopped during start-up: error: llama.cpp could not load broken.gguf"):
        host.start()
    assert host.status()["state"] == "failed" and not host.running


def test_run_blocks_like_the_seed_until_interrupted() -> None:
    code = "from llm_magic import ApiHost; ApiHost(use_token=False, port=0).run()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "Local URL:" not in line:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
        url = line.split()[-1]
        health = requests.get(url + "/health", timeout=10).json()
        assert health["status"] == "ok" and health["auth"] is False
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/health", timeout=5)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_server_ends_when_its_parent_dies() -> None:
    code = ("import sys; from llm_magic import ApiHost; h = ApiHost(use_token=False, port=0).start(); "
            "print(h.pid, flush=True); sys.stdin.read()")
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(parent.stdout.readline())
        parent.kill()  # like a kernel that crashes: no atexit, no cleanup
        parent.wait()
        assert gone(server_pid)
    finally:
        parent.stdin.close()
        parent.stdout.close()


def test_base_install_has_a_clear_word_for_host_commands(tmp_path: Path) -> None:
    # Hide the host extra's packages, as on a machine with only `pip install llm_magic`.
    for name in ("flask", "werkzeug", "llama_cpp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('not installed', name=__name__)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "llm_magic", "serve", "--port", "0"], capture_output=True,
                            text=True, timeout=30, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "serving needs the host extra" in result.stderr and "pip install 'llm_magic[host]'" in result.stderr


def test_import_stays_light() -> None:
    code = ("import sys, llm_magic; from llm_magic import Client; "
            "print(sorted(m for m in ('flask', 'llama_cpp', 'huggingface_hub', 'werkzeug') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stdout
    assert out.strip() == "[]"


def test_token_from_colab_secrets(monkeypatch) -> None:
    import types

    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=lambda name: "colab-secret-token" if name == "LLM_MAGIC_TOKEN" else None)
    google = types.ModuleType("google")
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert ApiHost().token == "colab-secret-token"
    monkeypatch.setenv("LLM_MAGIC_TOKEN", "env-wins")
    assert ApiHost().token == "env-wins"
    colab.userdata = types.SimpleNamespace(get=lambda name: (_ for _ in ()).throw(RuntimeError("not granted")))
    monkeypatch.delenv("LLM_MAGIC_TOKEN")
    assert len(ApiHost().token) >= 24  # falls back to a new random token


def test_token_and_hf_token_from_kaggle_secrets(monkeypatch) -> None:
    import types

    from llm_magic.supervisor.host import notebook_secret

    secrets = {"LLM_MAGIC_TOKEN": "kaggle-secret-token", "HF_TOKEN": "hf_kaggle"}

    class UserSecretsClient:  # Kaggle's: raises when the secret is not attached to the notebook
        def get_secret(self, name: str) -> str:
            if name not in secrets:
                raise ConnectionError(f"secret {name} not found")
            return secrets[name]

    monkeypatch.setitem(sys.modules, "kaggle_secrets", types.SimpleNamespace(UserSecretsClient=UserSecretsClient))
    assert notebook_secret("LLM_MAGIC_TOKEN") is None  # not on Kaggle: not asked
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert ApiHost().token == "kaggle-secret-token"
    assert notebook_secret("HF_TOKEN") == "hf_kaggle" and notebook_secret("OTHER") is None
    monkeypatch.setenv("HF_TOKEN", "")  # so that the test's end restores it, whatever start() sets
    monkeypatch.delenv("HF_TOKEN")
    with ApiHost(use_token=False, port=0, tunnel="none") as host:
        environ = Path(f"/proc/{host.pid}/environ").read_bytes().split(b"\0")
        assert b"HF_TOKEN=hf_kaggle" in environ  # the server may download gated models too


def test_new_tokens_never_start_like_an_option() -> None:
    from llm_magic.supervisor.host import new_token

    tokens = {new_token() for _ in range(3000)}  # about 1 in 32 raw tokens starts with '-' or '_'
    assert len(tokens) == 3000 and all(t[0].isalnum() and len(t) == 32 for t in tokens)


# -- the log: bounded whatever the server writes, read from its end ---------------------------------


def log_files(host: ApiHost) -> list[Path]:
    assert host.log_path is not None
    return sorted(host.log_path.parent.glob(host.log_path.name + "*"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="writes into the child's stderr through /proc")
def test_a_flood_on_the_servers_stderr_leaves_the_log_within_its_cap_and_logs_correct() -> None:
    from llm_magic.supervisor import logfile

    with ApiHost(use_token=False, port=0) as host:
        # Into the very pipe that is the child's fd 2, where llama.cpp's C code writes: 40 MB of
        # lines as fast as they go (a grammar failure once wrote 3.6 MB in 0.05 s).
        line = b"llama_grammar_parser: " + b"x" * 77 + b"\n"
        with open(f"/proc/{host.pid}/fd/2", "wb", buffering=0) as stderr:
            for _ in range(40):
                stderr.write(line * 10_000)
            stderr.write(b"error: the last line of the flood\n")
        r = requests.post(f"{host.url}/api", json={"inputs": "x", "parameters": {"max_tokens": 2}}, timeout=30)
        assert r.ok  # the server never waited on its log
        tail = host.logs(4).splitlines()
        assert "POST /api 200 " in tail[-1] and "error: the last line of the flood" in tail  # the access line
        assert sum(p.stat().st_size for p in log_files(host)) <= (logfile.BACKUPS + 1) * logfile.MAX_BYTES
        text = host.logs(100_000)
        # the flood is summarised, and what came before it (start-up) is still there to read
        assert re.search(r"\[llm_magic: [\d.]+ MB of the server's output left out here", text), text[-2000:]
        assert "Press Ctrl-C to stop." in text and "loaded SmolLM2-135M-Instruct" in text


def test_the_log_rotates_within_its_cap_and_its_tail_spans_the_files(tmp_path: Path) -> None:
    from llm_magic.supervisor.logfile import BoundedLog, tail

    path = tmp_path / "server.log"
    log = BoundedLog(path, max_bytes=64 * 1024, backups=2, burst=10**9, rate=10**9)  # no flood limit here
    for i in range(20_000):
        log.write(b"line %05d\n" % i)
    log.close()
    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files] == ["server.log", "server.log.1", "server.log.2"]
    assert all(p.stat().st_size <= 64 * 1024 for p in files)
    current = path.read_text().splitlines()
    assert current[-1] == "line 19999" and len(current) < 7000
    lines = tail(path, 7000).splitlines()  # more lines than the current file holds
    assert lines == [f"line {i:05d}" for i in range(20_000 - 7000, 20_000)]


def test_reading_the_logs_tail_never_reads_the_whole_file(tmp_path: Path) -> None:
    import tracemalloc

    from llm_magic.supervisor.logfile import tail

    path = tmp_path / "server.log"
    with path.open("wb") as f:
        for _ in range(64):
            f.write(b"an old line\n" * 10_000 + b"z" * 1_000_000 + b"\n")  # ~1 MB each
        f.write(b"".join(b"line %d\n" % i for i in range(50)))
        f.write(b"w" * 100_000 + b"\n")  # one line too long to show whole
    assert path.stat().st_size > 64_000_000
    tracemalloc.start()
    try:
        lines = tail(path, 51).splitlines()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # a 64 MB file read whole would take over 64 MB
    assert lines[:50] == [f"line {i}" for i in range(50)]
    assert lines[50] == "w" * 2000 + "… (100000 characters)"


# -- a server that dies ---------------------------------------------------------------------


def wait_state(host: ApiHost, state: str, within: float = 10.0) -> dict:
    deadline = time.monotonic() + within
    while (status := host.status())["state"] != state:
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return status


@pytest.mark.parametrize("sig, why", [
    (signal.SIGKILL, "it was killed by SIGKILL (sent by the system's out-of-memory killer when memory runs out"),
    (signal.SIGSEGV, "it was killed by SIGSEGV (a crash: a segmentation fault, in llama.cpp"),
])
def test_a_server_that_dies_is_reported_with_why_and_restarts_on_the_same_port_and_token(sig, why) -> None:
    host = ApiHost(port=0).start()
    try:
        url, token, pid = host.url, host.token, host.pid
        assert requests.post(f"{url}/api", json={"token": token, "inputs": "x", "parameters": {"max_tokens": 2}},
                             timeout=30).ok
        # a client's idle keep-alive connection, as a notebook's Client holds: when the server dies,
        # its end lingers on the port (FIN_WAIT2, up to a minute), and the restart must bind anyway
        idle = http.client.HTTPConnection("127.0.0.1", urllib.parse.urlsplit(url).port, timeout=10)
        idle.request("GET", "/health")
        assert idle.getresponse().read()
        os.kill(pid, sig)
        status = wait_state(host, "failed")
        assert status["died"].startswith(why) and status["signal"] == sig.name and status["exit_code"] == -sig
        assert not host.running and "uptime_s" not in status  # it does not claim to run
        assert any("POST /api 200" in line for line in status["log"])  # its last lines, to see what it did
        if sig == signal.SIGSEGV:  # the stack of each thread, written as it crashed
            assert "Fatal Python error: Segmentation fault" in host.logs(200)
        host.restart()
        idle.close()
        assert (host.url, host.token) == (url, token) and host.pid != pid and host.running
        assert host.status()["state"] == "running" and "died" not in host.status()
        r = requests.post(f"{url}/api", json={"token": token, "inputs": "x", "parameters": {"max_tokens": 2}},
                          timeout=30)
        assert r.ok and r.json()["usage"]["completion_tokens"] == 2
    finally:
        host.stop()
    assert host.status()["state"] == "stopped" and "died" not in host.status()
