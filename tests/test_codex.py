"""``/v1/responses`` as Codex CLI uses it, over the scripted backend: its request (ids on
items, input_text, namespace and hosted tools, client_metadata, include, store: false,
reasoning.summary) is accepted, namespaced calls come back under their namespace, and a silent
stream stays alive with events (Codex resets its idle timer only on events)."""

from __future__ import annotations

import json

from llm_magic.server.app import create_app
from llm_magic.wire.responses import parse_responses
from tests.fake_backend import Reply, ScriptedBackend

TOKEN = "fake-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCHEMA = {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}},
          "required": ["command"], "additionalProperties": False}

CODEX = {
    "model": "gpt-5.1-codex", "instructions": "You are Codex, a coding agent.", "stream": True, "store": False,
    "input": [
        {"type": "message", "id": "msg_1", "role": "developer",
         "content": [{"type": "input_text", "text": "<permissions>workspace-write</permissions>"}]},
        {"type": "message", "id": "msg_2", "role": "user",
         "content": [{"type": "input_text", "text": "<environment_context>cwd: /repo</environment_context>"}]},
        {"type": "message", "id": "msg_3", "role": "user", "content": [{"type": "input_text", "text": "List the files"}]},
    ],
    "tools": [
        {"type": "function", "name": "shell", "description": "Run a command", "strict": False, "parameters": SCHEMA},
        {"type": "function", "name": "update_plan", "description": "Plan", "strict": False,
         "parameters": {"type": "object", "properties": {}}},
        {"type": "namespace", "name": "mcp__repo", "description": "The repository's server", "tools": [
            {"type": "function", "name": "read", "description": "Read a file", "parameters": {
                "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}},
            {"type": "function", "name": "shell", "description": "Another shell", "parameters": SCHEMA}]},
        {"type": "web_search", "external_web_access": False},
    ],
    "tool_choice": "auto", "parallel_tool_calls": False,
    "reasoning": {"effort": "medium", "summary": "auto"}, "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "0199a-session", "client_metadata": {"originator": "codex_exec"},
    "text": {"verbosity": "low"},
}


def serve(*replies: Reply, keepalive: float = 15.0):
    backend = ScriptedBackend(list(replies) or [Reply()])
    return backend, create_app(backend, token=TOKEN, keepalive=keepalive).test_client()


def events_of(response) -> list[dict]:
    assert response.status_code == 200 and response.mimetype == "text/event-stream", response.data
    return [json.loads(line[6:]) for line in response.get_data(as_text=True).split("\n") if line.startswith("data: ")]


def test_codexs_request_is_accepted_with_namespaces_flattened_and_hosted_tools_left_out() -> None:
    request = parse_responses(CODEX)
    names = [t.name for t in request.tools.tools]
    assert names == ["shell", "update_plan", "read", "mcp__repo__shell"]
    assert request.messages[0]["role"] == "system" and request.messages[0]["content"].startswith("You are Codex")
    assert "<permissions>" in request.messages[0]["content"] and request.messages[1]["role"] == "user"
    assert request.messages[-1] == {"role": "user", "content": "List the files"}
    assert request.reasoning_effort == "medium" and request.tools.parallel is False


def test_only_hosted_tools_means_no_tools() -> None:
    assert parse_responses({"input": "hi", "tools": [{"type": "web_search"}, {"type": "file_search"}]}).tools is None


def test_a_namespaced_call_comes_back_under_its_namespace_and_its_history_reads_back() -> None:
    _, client = serve(Reply("", tool_calls=[("mcp__repo__shell", '{"command": ["ls"]}')]))
    events = events_of(client.post("/v1/responses", json=CODEX, headers=AUTH))
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done[-1]["type"] == "function_call" and done[-1]["name"] == "shell" and done[-1]["namespace"] == "mcp__repo"
    body = {**CODEX, "stream": False}
    whole = client.post("/v1/responses", json=body, headers=AUTH).get_json()
    assert whole["output"][-1]["namespace"] == "mcp__repo" and whole["output"][-1]["name"] == "shell"
    call = {k: done[-1][k] for k in ("type", "id", "call_id", "name", "namespace", "arguments")}
    follow = {**CODEX, "input": [*CODEX["input"], call, {"type": "function_call_output", "call_id": call["call_id"],
                                                         "output": "README.md"}]}
    request = parse_responses(follow)
    assert request.messages[-2]["tool_calls"][0]["function"]["name"] == "mcp__repo__shell"
    assert request.messages[-1] == {"role": "tool", "tool_call_id": call["call_id"], "content": "README.md"}


def test_a_plain_function_keeps_its_name_without_a_namespace() -> None:
    _, client = serve(Reply("", tool_calls=[("read", '{"path": "a"}')]))
    body = client.post("/v1/responses", json={**CODEX, "stream": False}, headers=AUTH).get_json()
    assert body["output"][-1]["name"] == "read" and body["output"][-1]["namespace"] == "mcp__repo"
    _, client = serve(Reply("", tool_calls=[("update_plan", "{}")]))
    body = client.post("/v1/responses", json={**CODEX, "stream": False}, headers=AUTH).get_json()
    assert body["output"][-1]["name"] == "update_plan" and "namespace" not in body["output"][-1]


def test_a_silent_stream_keeps_alive_with_in_progress_events() -> None:
    _, client = serve(Reply("late answer", wait=0.5), keepalive=0.1)
    r = client.post("/v1/responses", json=CODEX, headers=AUTH)
    text = r.get_data(as_text=True)
    assert ": keep-alive" not in text
    events = events_of(r)
    kinds = [e["type"] for e in events]
    assert kinds.count("response.in_progress") >= 2 and kinds[-1] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(1, len(events) + 1))


def test_the_openai_sdk_streams_through_the_keepalive_events() -> None:
    from openai import OpenAI

    from llm_magic.server.httpserver import HttpServer

    backend = ScriptedBackend([Reply("slow hello", wait=0.5)])
    server = HttpServer(create_app(backend, token=TOKEN, keepalive=0.1), "127.0.0.1", 0).start()
    try:
        with OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=TOKEN, max_retries=0, timeout=10) as client:
            with client.responses.stream(model="gpt-5", input="hi", extra_body={"client_metadata": {"a": "b"}}) as stream:
                kinds = [event.type for event in stream]
                final = stream.get_final_response()
        assert kinds.count("response.in_progress") >= 2 and final.output_text == "slow hello"
    finally:
        server.stop()
