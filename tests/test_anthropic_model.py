"""The anthropic SDK, unchanged, against a real host on the embedded model: a message, a
stream, a tool round trip (tool_choice any and a named tool), count_tokens against the usage
of the same prompt, the KV cache showing on a second turn, and its typed exceptions."""

from __future__ import annotations

from typing import Iterator

import pytest

from llm_magic.supervisor.host import ApiHost

anthropic = pytest.importorskip("anthropic")

WEATHER = {"name": "get_weather", "description": "The current weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}
TIME = {"name": "get_time", "description": "The time in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}
GREEDY = {"temperature": 0}  # sent as a body field: the newest SDKs no longer take it as an argument
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture
def client(host: ApiHost) -> Iterator:
    with anthropic.Anthropic(base_url=host.url, api_key=host.token, max_retries=0, timeout=120) as c:
        yield c


def test_create_and_stream_answer_text(client) -> None:
    message = client.messages.create(model="claude-sonnet-4-5", max_tokens=24, extra_body=GREEDY,
                                     system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
                                     messages=[{"role": "user", "content": "Name a colour."}])
    assert message.type == "message" and message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens > 0
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=24, extra_body=GREEDY,
                                messages=[{"role": "user", "content": "Name a colour."}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text and final.usage.output_tokens > 0


def test_a_tool_round_trip_with_any_and_a_named_tool(client) -> None:
    with client.messages.stream(model="m", max_tokens=60, extra_body=GREEDY, messages=ASK, tools=[WEATHER, TIME],
                                tool_choice={"type": "any"}) as stream:
        called = stream.get_final_message()
    call = called.content[-1]
    assert called.stop_reason == "tool_use" and call.type == "tool_use" and isinstance(call.input, dict)
    assert call.name in ("get_weather", "get_time") and isinstance(call.input.get("city"), str)
    follow = client.messages.create(model="m", max_tokens=30, extra_body=GREEDY, tools=[WEATHER, TIME], messages=[
        *ASK, {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in called.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "-3 C and snowing"}]}])
    assert follow.content and follow.stop_reason in ("end_turn", "max_tokens", "tool_use")
    named = client.messages.create(model="m", max_tokens=60, extra_body=GREEDY, messages=ASK, tools=[WEATHER, TIME],
                                   tool_choice={"type": "tool", "name": "get_time"})
    assert [b.name for b in named.content if b.type == "tool_use"] == ["get_time"]


def test_count_tokens_matches_the_prompt_and_a_second_turn_reads_the_cache(client) -> None:
    system = "You answer questions about the weather. " * 20
    counted = client.messages.count_tokens(model="m", system=system, messages=ASK).input_tokens
    first = client.messages.create(model="m", max_tokens=8, extra_body=GREEDY, system=system, messages=ASK)
    assert counted == first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0)
    second = client.messages.create(model="m", max_tokens=8, extra_body=GREEDY, system=system, messages=[
        *ASK, {"role": "assistant", "content": first.content[0].text or "I do not know."},
        {"role": "user", "content": "And in Bergen?"}])
    assert (second.usage.cache_read_input_tokens or 0) >= counted // 2


def test_an_answer_cut_at_a_stop_sequence_says_which(client) -> None:
    ask = {"model": "m", "max_tokens": 24, "extra_body": GREEDY, "messages": [{"role": "user", "content": "Name a colour."}]}
    whole = client.messages.create(**ask).content[0].text
    words = whole.split()
    assert len(words) >= 3, whole
    stop = " " + words[2]  # greedy: the same answer again, cut before its third word
    cut = client.messages.create(**ask, stop_sequences=["no such text", stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == whole[: whole.index(stop)]
    with client.messages.stream(**ask, stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_the_sdk_raises_its_typed_exceptions(host: ApiHost, client) -> None:
    with anthropic.Anthropic(base_url=host.url, api_key="wrong", max_retries=0) as wrong, \
            pytest.raises(anthropic.AuthenticationError):
        wrong.messages.create(model="m", max_tokens=5, messages=ASK)
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model="m", max_tokens=0, messages=ASK)
