"""``--engine vllm`` and ``--engine llama-server``: the host starts the engine itself, shows its
output in the host's log, fronts it once its /health answers, reports a crash with its last
lines, and stops it with the host. vLLM is played by tests/fake_vllm.py (a real llama.cpp engine
under vLLM's command line); llama-server is the real binary, built as the benchmark builds it."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import requests

from llm_magic.engine.upstream.launcher import EngineProcess, free_port, vllm_command
from llm_magic.errors import EngineUnavailable
from llm_magic.supervisor.host import ApiHost

FAKE_VLLM = Path(__file__).parent / "fake_vllm.py"
CHAT = [{"role": "user", "content": "Say hello"}]


def test_vllm_gets_the_hosts_settings_and_the_parsers_for_the_model_family(monkeypatch) -> None:
    monkeypatch.setenv("LLM_MAGIC_VLLM", "/opt/vllm/bin/vllm")
    command = vllm_command("Qwen/Qwen2.5-7B-Instruct", 8123, tensor_parallel=2, max_model_len=8192,
                           extra=["--distributed-executor-backend", "ray"])
    assert command[:3] == ["/opt/vllm/bin/vllm", "serve", "Qwen/Qwen2.5-7B-Instruct"]
    assert command[command.index("--tensor-parallel-size") + 1] == "2"
    assert command[command.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in command
    assert command[-2:] == ["--distributed-executor-backend", "ray"]
    given = vllm_command("my/llama-3-model", 1, extra=["--tool-call-parser", "pythonic"])
    assert given.count("--tool-call-parser") == 1  # the owner's own choice wins


@pytest.mark.parametrize("amx", [True, False])
def test_a_llama_server_that_segfaults_on_an_amx_cpu_is_told_the_likely_cause(tmp_path: Path, monkeypatch, amx) -> None:
    from llm_magic.engine.upstream import launcher

    monkeypatch.setattr(launcher, "advertises_amx", lambda: amx)
    crashing = tmp_path / "llama-server"
    crashing.write_text("#!/bin/sh\necho 'load_tensors: AMX model buffer size = 92.10 MiB'\nkill -SEGV $$\n")
    crashing.chmod(0o755)
    process = EngineProcess("llama-server", [str(crashing)], 0)
    process.start()
    with pytest.raises(EngineUnavailable, match="(?s)llama-server was killed by signal 11.*AMX model buffer") as failed:
        process.wait_ready(30)
    process.stop()
    assert ("--no-repack" in str(failed.value) and "-mno-amx-int8" in str(failed.value)) is amx


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("LLM_MAGIC_VLLM", str(FAKE_VLLM))
    args = tmp_path / "vllm-args.json"
    monkeypatch.setenv("FAKE_VLLM_ARGS", str(args))
    return args


def test_a_vllm_that_fails_to_start_is_reported_with_its_last_lines(fake_vllm, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_FAIL", "1")
    process = EngineProcess("vllm", vllm_command("some/model", free_port()), 0)
    process.start()
    with pytest.raises(EngineUnavailable, match="(?s)vllm exited with code 3.*Failed to infer device type"):
        process.wait_ready(30)
    process.stop()


def test_llm_magic_starts_vllm_fronts_it_and_stops_it(fake_vllm: Path) -> None:
    host = ApiHost(model="Qwen/Qwen2.5-0.5B-Instruct", use_token=True, port=0, tunnel="none",
                   extra_args=["--engine", "vllm", "--tensor-parallel-size", "2", "--vllm-arg=--enforce-eager"])
    host.start()
    try:
        seen = json.loads(fake_vllm.read_text())
        args, key = seen["args"], seen["key"]
        assert args[:2] == ["serve", "Qwen/Qwen2.5-0.5B-Instruct"]  # the hub id, for vLLM to fetch
        assert args[args.index("--tensor-parallel-size") + 1] == "2" and "--enforce-eager" in args
        answer = requests.post(host.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {host.token}"},
                               json={"messages": CHAT, "max_tokens": 5, "temperature": 0}, timeout=60).json()
        assert answer["choices"][0]["message"]["content"]
        health = requests.get(host.url + "/health", timeout=10).json()
        assert health["engine"]["process"] == "vllm" and health["engine"]["state"] == "ok"
        log_text = host.logs(400)
        assert "fake vllm: starting" in log_text  # the engine's output is in the host's log
        # a key of its own, so that only the host may use its port: in its environment, not on its
        # command line (which anyone on the machine may read), and never in the host's log
        assert len(key) >= 32 and "--api-key" not in args
        assert key not in log_text and "api_key: <key>" in log_text
        pid = health["engine"]["pid"]
    finally:
        host.stop()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists()  # the engine went with the host


@pytest.fixture(scope="module")
def llama_server_bin() -> str:
    binary = os.environ.get("LLAMA_SERVER_BIN")
    if not binary and shutil.which("cmake") is None:
        pytest.skip("building llama-server needs cmake and a C++ compiler (or set LLAMA_SERVER_BIN)")
    if not binary:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        from llama_server import build  # cached under ~/.cache/llm_magic after the first build (~5 min)

        binary = str(build(quiet=True))
    return binary


def test_llm_magic_in_front_of_its_own_llama_server(llama_server_bin: str, monkeypatch) -> None:
    monkeypatch.setenv("LLAMA_SERVER_BIN", llama_server_bin)
    host = ApiHost(use_token=False, port=0, tunnel="none", extra_args=["--engine", "llama-server", "--parallel", "2"])
    host.start()
    try:
        body = requests.post(host.url + "/api", timeout=60, json={
            "inputs": CHAT, "parameters": {"max_tokens": 6, "temperature": 0}}).json()
        assert body["answer"]["content"] and body["usage"]["completion_tokens"] <= 6
        schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        shaped = requests.post(host.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "A city as JSON"}], "max_tokens": 40, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}).json()
        assert isinstance(json.loads(shaped["choices"][0]["message"]["content"])["city"], str)  # its grammar
        assert shaped["model"] == "SmolLM2-135M-Instruct.Q4_1"  # named as our own host names it
        health = requests.get(host.url + "/health", timeout=10).json()
        assert health["engine"]["process"] == "llama-server" and health["engine"]["state"] == "ok"
        refused = requests.get(health["engine"]["url"] + "/v1/models", timeout=10)
        assert refused.status_code == 401  # the engine's port wants the key only the host holds
    finally:
        host.stop()


def test_a_started_engines_key_is_the_owners_if_given_else_a_fresh_one_in_its_environment(monkeypatch) -> None:
    from llm_magic.engine.factory import build_backend
    from llm_magic.settings import ServeSettings

    monkeypatch.delenv("VLLM_API_KEY", raising=False)

    def launched(**settings):
        backend = build_backend(ServeSettings(engine="vllm", model="some/model", **settings), has_token=False).backend
        return backend._key, backend.process._env, backend.process.command

    key, env, command = launched()
    assert len(key) >= 32 and env == {"VLLM_API_KEY": key} and key not in command  # off the command line
    assert launched()[0] != key  # fresh each time
    assert launched(engine_key="mine")[:2] == ("mine", {"VLLM_API_KEY": "mine"})
    assert launched(vllm_arg=["--api-key=theirs,other"])[:2] == ("theirs", {})  # passed through as given
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert launched()[:2] == ("from-env", {})  # the engine reads it where the owner put it
