"""Structured output that no request can turn against the host, against a real server process
(2 slots, held to a 6 GB address space as a GPU notebook's would be): each reproduction that
once crashed it, flooded its log, kept its memory or slipped past the schema."""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from pathlib import Path
from typing import Iterator

import jsonschema
import pytest
import requests

from llm_magic import ApiHost

TOKEN = "structured-token-" + "x" * 16
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def host() -> Iterator[ApiHost]:
    h = ApiHost(port=0, token=TOKEN, extra_args=["--parallel", "2"]).start()
    assert h.pid is not None
    resource.prlimit(h.pid, resource.RLIMIT_AS, (6 << 30, 6 << 30))
    yield h
    h.stop()


def chat(host: ApiHost, schema: dict, prompt: str = "Answer in JSON.", **fields) -> requests.Response:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 60, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, **fields}
    return requests.post(f"{host.url}/v1/chat/completions", json=body, headers=HEADERS, timeout=120)


def log_size(host: ApiHost) -> int:
    """Bytes in the host's log files (a rotated log's old parts too)."""
    assert host.log_path is not None
    return sum(p.stat().st_size for p in host.log_path.parent.glob(host.log_path.name + "*"))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def assert_alive(host: ApiHost) -> None:
    assert host.running, host.logs(30)
    assert requests.get(f"{host.url}/health", timeout=10).json()["status"] == "ok"


TOOL = {"type": "function", "function": {"name": "save", "parameters": {
    "type": "object", "properties": {"s": {"type": "string", "maxLength": 20000}}, "required": ["s"]}}}


@pytest.mark.parametrize("path, body, named", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": 20000}}}},
     "'maxLength' of 20000"),
    ("/api", {"inputs": "x", "parameters": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "^[a-z]{0,30000}$"}}}}}, "a repetition of 30000"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "array", "items": {"type": "integer"}, "maxItems": 20000}}}}, "20000"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a\"b": {"type": "array", "items": {"type": "integer"},
                                                      "minItems": 200000}}}}}}, "200000"),
])
def test_schemas_that_crashed_or_flooded_the_host_are_400s(host: ApiHost, path: str, body: dict, named: str) -> None:
    before = log_size(host)
    r = requests.post(f"{host.url}{path}", json=body, headers=HEADERS, timeout=60)
    assert r.status_code == 400, r.text
    assert named in r.text
    assert_alive(host)
    assert log_size(host) - before < 4096  # one log line, never the grammar


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_a_tool_with_a_bound_past_the_limits_is_served_unbounded(host: ApiHost, choice: str) -> None:
    """A tool's schema describes the client's function (agents send maxLength 524288): the bound
    no grammar holds is left out, so the call is served and nothing floods (a response format
    with it stays a 400, above)."""
    before = log_size(host)
    r = requests.post(f"{host.url}/v1/chat/completions", headers=HEADERS, timeout=120, json={
        "messages": [{"role": "user", "content": "Save the word hello."}], "tools": [TOOL], "tool_choice": choice,
        "max_tokens": 30})
    assert r.status_code == 200, r.text
    if choice == "required":
        assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "save"
    assert_alive(host)
    assert log_size(host) - before < 4096


def test_huge_repetitions_are_refused_before_costing_memory(host: ApiHost) -> None:
    assert host.pid is not None
    before = rss_mib(host.pid)
    for i in range(12):
        r = chat(host, {"type": "array", "items": {"type": "integer"}, "minItems": 1_000_000 + i})
        assert r.status_code == 400 and f"'minItems' of {1_000_000 + i}" in r.text
    r = chat(host, {"type": "array", "items": {"type": "integer"}, "minItems": 60_000_000})
    assert r.status_code == 400
    assert rss_mib(host.pid) - before < 50
    assert_alive(host)


def test_keys_that_broke_the_grammar_come_back_exact(host: ApiHost) -> None:
    keys = ["nul\u0000x", "a\\b", "a\\q", "end\\", "line\nbreak", "tab\there", "😀", "", 'a"b']
    schema = {"type": "object", "properties": {k: {"type": "integer", "minimum": 0, "maximum": 9} for k in keys},
              "required": keys}
    r = chat(host, schema, "Give each key a digit.", max_tokens=200)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    value = json.loads(choice["message"]["content"])
    assert list(value) == keys
    jsonschema.validate(value, schema)


@pytest.mark.parametrize("schema", [
    {"type": "integer", "minimum": 5, "maximum": 7},
    {"type": "number", "exclusiveMaximum": 0},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 100, "exclusiveMaximum": 120},
                                      "x": {"type": "number", "minimum": -2, "maximum": 2}},
     "required": ["n", "x"]},
])
def test_bounds_are_enforced(host: ApiHost, schema: dict) -> None:
    stopped = 0
    for seed in range(3):
        r = chat(host, schema, "Write a big number like 1234.", temperature=1.0, seed=seed)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
            stopped += 1
    assert stopped, "no answer finished, so none was checked"


def test_a_required_name_outside_properties_is_refused(host: ApiHost) -> None:
    r = chat(host, {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]})
    assert r.status_code == 400 and "'b', which is not in 'properties'" in r.json()["error"]["message"]


def test_the_largest_enum_accepted_and_a_larger_one_refused(host: ApiHost) -> None:
    words = [f"option number {i:03d} of the very long list" for i in range(256)]
    r = chat(host, {"enum": words}, "Pick one option.", max_tokens=30)
    assert r.status_code == 200 and json.loads(r.json()["choices"][0]["message"]["content"]) in words
    r = chat(host, {"enum": [*words, "one more"]})
    assert r.status_code == 400 and "'enum' has 257 values" in r.text


def test_a_stream_beside_a_refused_schema_carries_on(host: ApiHost) -> None:
    chunks: list[str] = []

    def stream() -> None:
        with requests.post(f"{host.url}/v1/chat/completions", headers=HEADERS, stream=True, timeout=60, json={
                "messages": [{"role": "user", "content": "Count from one to twenty."}], "max_tokens": 80,
                "stream": True, "temperature": 0}) as r:
            chunks.extend(line.decode() for line in r.iter_lines() if line)

    thread = threading.Thread(target=stream)
    thread.start()
    time.sleep(0.3)
    for _ in range(3):
        assert chat(host, {"type": "string", "maxLength": 50000}).status_code == 400
    thread.join(60)
    assert chunks[-1] == "data: [DONE]" and not any('"error"' in c for c in chunks)
    assert_alive(host)


def test_the_grammar_checker_child_is_ended_with_the_host() -> None:
    h = ApiHost(port=0, use_token=False).start()
    try:
        assert chat_open(h).status_code == 200
        children = child_pids(h.pid)
        assert children, "the grammar checker runs beside the server"
    finally:
        h.stop()
    time.sleep(0.5)
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def chat_open(host: ApiHost) -> requests.Response:
    return requests.post(f"{host.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
        "response_format": {"type": "json_object"}})


def child_pids(pid: int | None) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_text_the_models_vocabulary_cannot_write_is_refused_up_front(host: ApiHost) -> None:
    # SmolLM2's vocabulary has no token holding the byte 0xF2 (nor 0xF1), which U+98013 starts with
    r = chat(host, {"type": "object", "properties": {"N\U00098013": {"type": "integer"}}, "required": ["N\U00098013"]})
    assert r.status_code == 400 and "vocabulary cannot write" in r.json()["error"]["message"]
    r = chat(host, {"enum": ["plain", "tab\tand 😀 and ünï"]}, "Pick one.")
    assert r.status_code == 200
    assert json.loads(r.json()["choices"][0]["message"]["content"]) in ["plain", "tab\tand 😀 and ünï"]


def test_an_embedding_request_whose_client_left_stops(host: ApiHost) -> None:
    counted = requests.get(f"{host.url}/health", timeout=10).json()["requests"]
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{host.url}/v1/embeddings", headers=HEADERS, timeout=(5, 1.5),
                      json={"input": ["hi there, a few words to embed"] * 1000})
    deadline = time.monotonic() + 30
    while requests.get(f"{host.url}/health", timeout=10).json()["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "the client left; its work stopped" in host.logs(200)
    r = requests.post(f"{host.url}/v1/embeddings", headers=HEADERS, timeout=60, json={"input": "after"})
    assert r.status_code == 200
    # the abandoned request never finished, so only the one after it counts
    assert requests.get(f"{host.url}/health", timeout=10).json()["requests"] == counted + 1
