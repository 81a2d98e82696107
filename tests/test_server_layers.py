"""The server and wire layers over a scripted backend (tests/fake_backend.py): every route's
shapes, streams, tool calls, keep-alives, errors before and after the answer starts, and the
openai SDK through the real HTTP server — in seconds, without a model. What a real model does
through the same server is tested in test_server.py, test_openai_surface.py and the rest."""

from __future__ import annotations

import json
from typing import Iterator

import pytest

from llm_magic.engine.backend import Backend
from llm_magic.errors import HostBusy, InvalidRequest
from llm_magic.server.app import create_app
from tests.fake_backend import Reply, ScriptedBackend

TOKEN = "fake-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHAT = [{"role": "user", "content": "Say hello"}]
WEATHER = ("get_weather", '{"city": "Paris"}')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def serve(*replies: Reply, keepalive: float = 15.0, **kwargs):
    backend = ScriptedBackend(list(replies) or [Reply()], **kwargs)
    return backend, create_app(backend, token=TOKEN, keepalive=keepalive).test_client()


def sse_data(response) -> list:
    assert response.mimetype == "text/event-stream", response.data
    blocks = response.get_data(as_text=True).split("\n\n")
    data = [line[6:] for block in blocks for line in block.split("\n") if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def test_the_scripted_backend_is_a_backend() -> None:
    assert isinstance(ScriptedBackend(), Backend)


def test_health_merges_the_backend_status_with_the_host_facts() -> None:
    _, client = serve()
    body = client.get("/health").get_json()
    assert body["status"] == "ok" and body["model"] == "scripted-model" and body["engine"] == {"kind": "scripted"}
    assert body["auth"] is True and "version" in body and TOKEN not in json.dumps(body)


def test_api_answers_and_streams_what_the_backend_wrote() -> None:
    backend, client = serve(Reply("Paris is lovely."))
    body = client.post("/api", json={"token": TOKEN, "inputs": "Paris is"}).get_json()
    assert body["answer"] == {"role": "assistant", "content": "Paris is lovely."} and body["finish_reason"] == "stop"
    assert backend.requests[-1].prompt == "Paris is" and backend.requests[-1].sampling.max_tokens == 512
    events = sse_data(client.post("/api", json={"token": TOKEN, "inputs": CHAT, "options": {"stream": True}}))
    assert [e["delta"] for e in events[:-2]] == ["Paris ", "is ", "lovely."]
    assert events[-2]["answer"]["content"] == "Paris is lovely." and events[-1] == "[DONE]"


def test_chat_completions_whole_and_streamed() -> None:
    _, client = serve(Reply("Hi there."))
    body = client.post("/v1/chat/completions", json={"messages": CHAT}, headers=AUTH).get_json()
    assert body["object"] == "chat.completion" and body["model"] == "scripted-model"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi there.", "refusal": None}
    chunks = sse_data(client.post("/v1/chat/completions", headers=AUTH, json={
        "messages": CHAT, "stream": True, "stream_options": {"include_usage": True}}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2]) == "Hi there."
    assert chunks[-3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 2 and chunks[-1] == "[DONE]"


def test_tool_call_events_become_openai_tool_calls() -> None:
    _, client = serve(Reply("", tool_calls=[WEATHER]))
    body = client.post("/v1/chat/completions", json={"messages": CHAT, "tools": TOOLS}, headers=AUTH).get_json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    chunks = sse_data(client.post("/v1/chat/completions", json={"messages": CHAT, "tools": TOOLS, "stream": True},
                                  headers=AUTH))
    pieces = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[1:-1] if "tool_calls" in c["choices"][0]["delta"]]
    assert pieces[0]["id"].startswith("call_") and pieces[0]["function"]["name"] == "get_weather"
    assert "".join(p["function"]["arguments"] for p in pieces) == '{"city": "Paris"}'
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_responses_render_text_and_function_calls_whole_and_streamed() -> None:
    _, client = serve(Reply("Let me look.", tool_calls=[WEATHER]))
    tools = [{"type": "function", **TOOLS[0]["function"]}]
    body = client.post("/v1/responses", json={"input": "Weather?", "tools": tools}, headers=AUTH).get_json()
    assert [item["type"] for item in body["output"]] == ["message", "function_call"]
    assert body["output"][1]["arguments"] == '{"city": "Paris"}' and body["status"] == "completed"
    response = client.post("/v1/responses", json={"input": "Weather?", "tools": tools, "stream": True}, headers=AUTH)
    events = sse_data(response)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(1, len(events) + 1))
    assert kinds.index("response.output_item.done") < kinds.index("response.function_call_arguments.delta")
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [a["output_index"] for a in added] == [0, 1]
    args = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert args == '{"city": "Paris"}'
    def without_ids(items: list) -> list:
        return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in items]

    assert without_ids(events[-1]["response"]["output"]) == without_ids(body["output"])  # streamed as answered


def test_a_list_of_prompts_is_one_answer_with_every_choice() -> None:
    backend, client = serve(Reply("one"), Reply("two"), Reply("three"))
    body = client.post("/v1/completions", json={"prompt": ["a", "b", "c"]}, headers=AUTH).get_json()
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2]
    assert {c["text"] for c in body["choices"]} == {"one", "two", "three"}
    assert sorted(r.prompt for r in backend.requests) == ["a", "b", "c"]


@pytest.mark.parametrize("path, body, shape", [
    ("/api", {"token": TOKEN, "inputs": "x"}, "seed"),
    ("/v1/chat/completions", {"messages": CHAT}, "openai"),
])
def test_a_refusal_before_the_answer_is_an_http_status(path: str, body: dict, shape: str) -> None:
    _, client = serve(Reply(error=HostBusy("the host is busy", retry_after=7)))
    r = client.post(path, json=body, headers=AUTH)
    assert r.status_code == 503 and r.headers["Retry-After"] == "7"
    error = r.get_json()["error"]
    assert error["code"] == ("server_busy" if shape == "openai" else 503)


def test_an_error_after_the_stream_began_travels_as_an_event() -> None:
    _, client = serve(Reply("a b c d", fail_after=2))
    chunks = sse_data(client.post("/v1/chat/completions", json={"messages": CHAT, "stream": True}, headers=AUTH))
    assert chunks[-1]["error"]["message"] == "the script fails here"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if "choices" in c) == "a b "


def test_a_slow_start_keeps_the_line_alive_in_both_shapes() -> None:
    _, client = serve(Reply("late", wait=0.5), keepalive=0.1)
    r = client.post("/v1/chat/completions", json={"messages": CHAT}, headers=AUTH)
    text = r.get_data(as_text=True)
    assert r.status_code == 200 and text.startswith(" ") and json.loads(text)["choices"][0]["message"]["content"] == "late"
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "stream": True}, headers=AUTH)
    assert ": keep-alive\n\n" in r.get_data(as_text=True) and sse_data(r)[-1] == "[DONE]"


def test_an_error_raised_after_a_keepalive_is_a_json_error_body() -> None:
    _, client = serve(Reply(wait=0.3, error=InvalidRequest("too long for the context")), keepalive=0.1)
    r = client.post("/v1/chat/completions", json={"messages": CHAT}, headers=AUTH)
    assert r.status_code == 200  # the 200 went out with the first keep-alive
    assert json.loads(r.get_data(as_text=True))["error"]["message"] == "too long for the context"


def test_n_answers_render_as_choices() -> None:
    _, client = serve(Reply("same"))
    body = client.post("/v1/chat/completions", json={"messages": CHAT, "n": 3}, headers=AUTH).get_json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    chunks = sse_data(client.post("/v1/chat/completions", json={"messages": CHAT, "n": 2, "stream": True}, headers=AUTH))
    assert {c["choices"][0]["index"] for c in chunks[:-1]} == {0, 1}


def test_embeddings_come_from_the_backend() -> None:
    _, client = serve()
    body = client.post("/v1/embeddings", json={"input": ["a", "b"]}, headers=AUTH).get_json()
    assert [d["index"] for d in body["data"]] == [0, 1] and len(body["data"][0]["embedding"]) == 8


def test_the_token_guards_every_generation_route() -> None:
    _, client = serve()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"):
        assert client.post(path, json={}).status_code == 401
    assert client.post("/api", json={"inputs": "x"}).status_code == 401


@pytest.fixture
def http_url() -> Iterator[tuple[ScriptedBackend, str]]:
    from llm_magic.server.httpserver import HttpServer

    backend = ScriptedBackend([Reply("Hello through the SDK.", tool_calls=())])
    server = HttpServer(create_app(backend, token=TOKEN), "127.0.0.1", 0).start()
    try:
        yield backend, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def test_the_openai_sdk_reads_the_scripted_answers_through_the_real_http_server(http_url, closing) -> None:
    from openai import OpenAI

    backend, url = http_url
    client = closing(OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0, timeout=10))
    answer = client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert answer.choices[0].message.content == "Hello through the SDK."
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="gpt-4o", messages=CHAT, stream=True) if chunk.choices)
    assert streamed == "Hello through the SDK."
    backend.replies = [Reply("", tool_calls=[WEATHER])]
    backend.requests.clear()
    called = client.chat.completions.create(model="gpt-4o", messages=CHAT, tools=TOOLS)
    assert called.choices[0].message.tool_calls[0].function.name == "get_weather"
    response = client.responses.create(model="gpt-4o", input="Weather?", tools=[
        {"type": "function", **TOOLS[0]["function"]}])
    assert response.output[0].type == "function_call" and response.output[0].arguments == '{"city": "Paris"}'
