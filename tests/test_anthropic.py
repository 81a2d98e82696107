"""Anthropic's Messages API over the scripted backend (tests/fake_backend.py): requests as
Claude Code and the anthropic SDK send them, the message and its named events, tool_use round
trips, thinking blocks, errors in Anthropic's shape, x-api-key, count_tokens, pings; and the
anthropic SDK itself through the real HTTP server. In seconds, without a model."""

from __future__ import annotations

import json
from typing import Iterator

import pytest

from llm_magic.errors import HostBusy, InvalidRequest
from llm_magic.server.app import create_app
from llm_magic.wire.anthropic import parse_anthropic
from llm_magic.wire.events import Completion, ReasoningDelta, Started, TextDelta
from tests.fake_backend import Reply, ScriptedBackend

TOKEN = "fake-token"
KEY = {"x-api-key": TOKEN, "anthropic-version": "2023-06-01"}
HI = [{"role": "user", "content": "Say hello"}]
WEATHER = ("get_weather", '{"city": "Paris"}')
TOOLS = [{"name": "get_weather", "description": "The weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def serve(*replies: Reply, keepalive: float = 15.0):
    backend = ScriptedBackend(list(replies) or [Reply()])
    return backend, create_app(backend, token=TOKEN, keepalive=keepalive).test_client()


def named_events(response) -> list[tuple[str, dict]]:
    assert response.mimetype == "text/event-stream", response.data
    events = []
    for block in response.get_data(as_text=True).split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line and not line.startswith(":"))
        if "event" in lines:
            data = json.loads(lines["data"])
            assert data["type"] == lines["event"]
            events.append((lines["event"], data))
    return events


CLAUDE_CODE = {
    "model": "claude-sonnet-4-5-20250929", "max_tokens": 32000, "stream": True,
    "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.3; cc_entrypoint=cli; cch=9f3a;"},
               {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
               {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "system", "content": "Mind the repository."},
                 {"role": "user", "content": [{"type": "text", "text": "List files",
                                               "cache_control": {"type": "ephemeral"}}]}],
    "tools": [{**TOOLS[0], "cache_control": {"type": "ephemeral"}},
              {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
              {"type": "bash_20250124", "name": "bash"}],
    "thinking": {"type": "adaptive"}, "context_management": {"edits": []}, "output_config": {"effort": "high"},
    "metadata": {"user_id": "user_abc_session_1"}, "temperature": 1,
}


def test_claude_codes_request_becomes_a_chat_request() -> None:
    request = parse_anthropic(CLAUDE_CODE)
    assert request.model is None and request.stream and request.sampling.max_tokens == 32000
    system = request.messages[0]
    assert system["role"] == "system" and "billing" not in system["content"]
    assert system["content"] == "You are Claude Code.\n\nBe brief.\n\nMind the repository."
    assert request.messages[1] == {"role": "user", "content": "List files"}
    assert [t.name for t in request.tools.tools] == ["get_weather"]  # hosted tools left out
    assert request.reasoning_effort == "high" and request.reasoning_budget is None


def test_the_billing_line_does_not_change_the_prompt() -> None:
    other = json.loads(json.dumps(CLAUDE_CODE))
    other["system"][0]["text"] = "x-anthropic-billing-header: cc_version=2.1.3; cc_entrypoint=cli; cch=0b1c;"
    assert parse_anthropic(other).messages == parse_anthropic(CLAUDE_CODE).messages


def test_tool_use_and_tool_result_blocks_become_openai_tool_messages() -> None:
    request = parse_anthropic({"model": "m", "max_tokens": 50, "system": "Use tools.", "tools": TOOLS,
                               "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
                               "messages": [HI[0], {"role": "assistant", "content": [
                                   {"type": "thinking", "thinking": "The user wants weather.", "signature": "abc"},
                                   {"type": "redacted_thinking", "data": "xyz"},
                                   {"type": "text", "text": "Looking."},
                                   {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                                   {"role": "user", "content": [
                                       {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "Sunny"}]},
                                       {"type": "text", "text": "And tomorrow?"}]}]})
    assert request.messages[2] == {"role": "assistant", "content": "Looking.", "reasoning_content": "The user wants weather.",
                                   "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
                                       "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert request.messages[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"}
    assert request.messages[4] == {"role": "user", "content": "And tomorrow?"}
    assert request.tools.named == "get_weather" and request.tools.choice == "required" and not request.tools.parallel


@pytest.mark.parametrize("choice, expected", [({"type": "any"}, "required"), ({"type": "auto"}, "auto")])
def test_tool_choice_any_and_auto(choice: dict, expected: str) -> None:
    assert parse_anthropic({"model": "m", "max_tokens": 5, "messages": HI, "tools": TOOLS,
                            "tool_choice": choice}).tools.choice == expected
    assert parse_anthropic({"model": "m", "max_tokens": 5, "messages": HI, "tools": TOOLS,
                            "tool_choice": {"type": "none"}}).tools is None


def test_thinking_maps_onto_the_reasoning_budget_and_sampling_fields_carry_over() -> None:
    request = parse_anthropic({"model": "m", "max_tokens": 64, "messages": HI, "top_k": 5, "top_p": 0.5,
                               "temperature": 0.2, "stop_sequences": ["END"],
                               "thinking": {"type": "enabled", "budget_tokens": 2048}})
    assert request.reasoning_budget == 2048
    assert (request.sampling.top_k, request.sampling.top_p, request.sampling.temperature) == (5, 0.5, 0.2)
    assert request.sampling.stop == ("END",)
    assert parse_anthropic({"model": "m", "max_tokens": 5, "messages": HI,
                            "thinking": {"type": "disabled"}}).reasoning_budget == 0


@pytest.mark.parametrize("change, named", [
    ({"max_tokens": None}, "'max_tokens' is required"),
    ({"frequency_penalty": 1}, "unknown field 'frequency_penalty'"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "'messages[0].content[0]' is an image"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "'messages[0].role' must be user or assistant"),
    ({"tools": [{"name": "f"}]}, "'tools[0].input_schema'"),
    ({"tool_choice": {"type": "tool"}, "tools": TOOLS}, "'tool_choice.name' is required"),
    ({"thinking": {"type": "enabled"}}, "'thinking.budget_tokens' is required"),
    ({"temperature": "hot"}, "'temperature' must be a number"),
])
def test_bad_fields_are_a_400_that_names_them(change: dict, named: str) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": HI, **change}
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(InvalidRequest, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_anthropic(body)


def test_an_answer_is_a_message_with_text_and_tool_use_blocks() -> None:
    _, client = serve(Reply("Let me check.", tool_calls=[WEATHER]))
    r = client.post("/v1/messages?beta=true", json={"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": HI,
                                                   "tools": TOOLS}, headers=KEY)
    body = r.get_json()
    assert r.status_code == 200 and body["type"] == "message" and body["role"] == "assistant"
    assert body["stop_reason"] == "tool_use" and body["stop_sequence"] is None
    assert body["content"][0] == {"type": "text", "text": "Let me check."}
    call = body["content"][1]
    assert call["type"] == "tool_use" and call["id"].startswith("toolu_") and call["input"] == {"city": "Paris"}
    assert set(body["usage"]) >= {"input_tokens", "output_tokens", "cache_read_input_tokens"}


def test_the_stream_sends_anthropics_named_events_in_order() -> None:
    _, client = serve(Reply("Let me check.", tool_calls=[WEATHER]))
    events = named_events(client.post("/v1/messages", headers=KEY, json={
        "model": "m", "max_tokens": 100, "messages": HI, "tools": TOOLS, "stream": True}))
    kinds = [k for k, _ in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    starts = [e for k, e in events if k == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["text", "tool_use"] and [s["index"] for s in starts] == [0, 1]
    text = "".join(e["delta"]["text"] for k, e in events if k == "content_block_delta" and e["index"] == 0)
    args = "".join(e["delta"]["partial_json"] for k, e in events if k == "content_block_delta" and e["index"] == 1)
    assert text == "Let me check." and json.loads(args) == {"city": "Paris"}
    assert kinds.index("content_block_stop") < kinds.index("content_block_start", kinds.index("content_block_stop"))
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_reasoning_becomes_a_thinking_block_first() -> None:
    from llm_magic.wire.anthropic import AnthropicRenderer

    result = Completion("Four.", "m", "stop", 10, 5, reasoning="2 + 2 is 4.")
    events = [Started("m"), ReasoningDelta("2 + 2 "), ReasoningDelta("is 4."), TextDelta("Four."), result]
    chunks = "".join(AnthropicRenderer(model="m").stream(events))
    assert '"thinking_delta"' in chunks and chunks.index('"thinking_delta"') < chunks.index('"text_delta"')
    assert '"signature_delta"' in chunks
    answer = AnthropicRenderer(model="m").answer(result)
    assert answer["content"] == [{"type": "thinking", "thinking": "2 + 2 is 4.", "signature": ""},
                                 {"type": "text", "text": "Four."}]


def test_errors_are_in_anthropics_shape_and_busy_is_529() -> None:
    _, client = serve(Reply(error=HostBusy("the host is busy", retry_after=7)))
    r = client.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": HI}, headers=KEY)
    assert r.status_code == 529 and r.headers["Retry-After"] == "7"
    assert r.get_json() == {"type": "error", "error": {"type": "overloaded_error", "message": "the host is busy"}}
    r = client.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": HI, "bogus": 1}, headers=KEY)
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "invalid_request_error"
    assert "'bogus'" in r.get_json()["error"]["message"] and "max_tokens" in r.get_json()["error"]["message"]
    r = client.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": HI})
    assert r.status_code == 401 and r.get_json()["error"]["type"] == "authentication_error"
    assert "x-api-key" in r.get_json()["error"]["message"]


def test_an_error_after_the_stream_began_is_an_error_event() -> None:
    _, client = serve(Reply("a b c d", fail_after=2))
    events = named_events(client.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": HI,
                                                            "stream": True}, headers=KEY))
    assert events[-1] == ("error", {"type": "error", "error": {"type": "invalid_request_error",
                                                               "message": "the script fails here"}})


def test_a_slow_answer_pings_and_a_slow_json_answer_keeps_its_error_shape() -> None:
    _, client = serve(Reply("late", wait=0.5), keepalive=0.1)
    events = named_events(client.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": HI,
                                                            "stream": True}, headers=KEY))
    kinds = [k for k, _ in events]
    assert "ping" in kinds and kinds[-1] == "message_stop" and ": keep-alive" not in json.dumps(events)
    _, client = serve(Reply(wait=0.3, error=InvalidRequest("too long for the context")), keepalive=0.1)
    r = client.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": HI}, headers=KEY)
    assert r.status_code == 200 and json.loads(r.get_data(as_text=True))["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("first, kinds", [
    (TextDelta("Hi."), ["text"]),  # the text continues the block the keep-alives went into
    (ReasoningDelta("Hmm."), ["text", "thinking", "text"]),
])
def test_keep_alives_are_events_claude_codes_watchdog_counts(first, kinds: list[str]) -> None:
    """Claude Code skips pings when it times a silent stream (300 s): while a long prompt is
    read, each keep-alive is a ping and an empty text_delta, in a text block the answer's text
    continues, so nothing but empty blocks is added."""
    from llm_magic.wire.anthropic import AnthropicRenderer
    from llm_magic.wire.events import Signal

    result = Completion("Hi.", "m", "stop", 10, 2, reasoning="Hmm." if isinstance(first, ReasoningDelta) else "")
    events = [Started("m"), Signal.KEEPALIVE, Signal.KEEPALIVE, first, *([TextDelta("Hi.")] * (len(kinds) > 1)),
              result]
    chunks = "".join(AnthropicRenderer(model="m").stream(events))
    parsed = [json.loads(line[6:]) for line in chunks.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in parsed[:5]] == ["message_start", "ping", "content_block_start",
                                              "content_block_delta", "ping"]
    assert parsed[3]["delta"] == {"type": "text_delta", "text": ""}
    assert [e["content_block"]["type"] for e in parsed if e["type"] == "content_block_start"] == kinds
    texts = [e["delta"].get("text") for e in parsed if e["type"] == "content_block_delta"
             and e["delta"]["type"] == "text_delta"]
    assert "".join(texts) == "Hi." and parsed[-1]["type"] == "message_stop"


def test_an_answer_ended_by_a_stop_sequence_names_it() -> None:
    from llm_magic.wire.anthropic import AnthropicRenderer

    result = Completion("Paris", "m", "stop", 10, 2, stop_sequence="\n\n")
    answer = AnthropicRenderer(model="m").answer(result)
    assert answer["stop_reason"] == "stop_sequence" and answer["stop_sequence"] == "\n\n"
    chunks = "".join(AnthropicRenderer(model="m").stream([Started("m"), TextDelta("Paris"), result]))
    delta = next(json.loads(line[6:]) for line in chunks.splitlines() if '"message_delta"' in line)
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "\n\n"}
    plain = AnthropicRenderer(model="m").answer(Completion("Paris", "m", "stop", 10, 2))
    assert plain["stop_reason"] == "end_turn" and plain["stop_sequence"] is None


def test_x_api_key_opens_every_route_and_one_good_token_of_two_is_enough() -> None:
    _, client = serve()
    assert client.get("/v1/models", headers={"x-api-key": TOKEN}).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": HI}, headers={"x-api-key": TOKEN}).status_code == 200
    both = {"x-api-key": TOKEN, "Authorization": "Bearer placeholder"}
    assert client.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": HI}, headers=both).status_code == 200
    assert client.get("/v1/models", headers={"x-api-key": "wrong"}).status_code == 401


def test_count_tokens_asks_the_backend() -> None:
    backend, client = serve()
    r = client.post("/v1/messages/count_tokens?beta=true", headers=KEY, json={
        "model": "claude-sonnet-4-5", "system": "Be brief.", "messages": [{"role": "user", "content": "one two three"}],
        "tools": TOOLS})
    assert r.status_code == 200 and r.get_json() == {"input_tokens": 5}
    assert backend.requests[-1].tools is not None
    r = client.post("/v1/messages/count_tokens", headers=KEY, json={"model": "m", "messages": HI, "max_tokens": 5})
    assert r.status_code == 400 and "'max_tokens'" in r.get_json()["error"]["message"]


def test_head_slash_answers() -> None:
    _, client = serve()
    r = client.head("/")  # Claude Code's first request
    r.close()
    assert r.status_code == 200


@pytest.fixture
def http_url() -> Iterator[tuple[ScriptedBackend, str]]:
    from llm_magic.server.httpserver import HttpServer

    backend = ScriptedBackend([Reply("Hello through the SDK.")])
    server = HttpServer(create_app(backend, token=TOKEN, keepalive=0.2), "127.0.0.1", 0).start()
    try:
        yield backend, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def test_the_anthropic_sdk_reads_the_scripted_answers_through_the_real_http_server(http_url) -> None:
    anthropic = pytest.importorskip("anthropic")
    backend, url = http_url
    with anthropic.Anthropic(base_url=url, api_key=TOKEN, max_retries=0, timeout=10) as client:
        _sdk_flows(anthropic, client, backend, url)


def _sdk_flows(anthropic, client, backend: ScriptedBackend, url: str) -> None:
    message = client.messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=HI)
    assert message.content[0].text == "Hello through the SDK." and message.stop_reason == "end_turn"
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=100, messages=HI) as stream:
        assert "".join(stream.text_stream) == "Hello through the SDK."
        assert stream.get_final_message().usage.output_tokens == 4
    backend.replies = [Reply("", tool_calls=[WEATHER])]
    backend.requests.clear()
    with client.messages.stream(model="m", max_tokens=100, messages=HI, tools=TOOLS,
                                tool_choice={"type": "any"}) as stream:
        final = stream.get_final_message()
    call = final.content[-1]
    assert final.stop_reason == "tool_use" and call.type == "tool_use" and call.input == {"city": "Paris"}
    assert client.messages.count_tokens(model="m", messages=HI).input_tokens == 2
    backend.replies = [Reply(error=HostBusy("busy", retry_after=1))]
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(model="m", max_tokens=5, messages=HI)
    assert caught.value.status_code == 529 and caught.value.body["error"]["type"] == "overloaded_error"
    with anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0) as wrong, \
            pytest.raises(anthropic.AuthenticationError):
        wrong.messages.create(model="m", max_tokens=5, messages=HI)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
