"""The OpenAI wire format: lenient where OpenAI is, a 400 naming the field otherwise, and the
exact shapes the openai SDK and frameworks read."""

from __future__ import annotations

import json

import pytest

from llm_magic.errors import InvalidRequest
from llm_magic.wire.openai import OpenAIRenderer, parse_chat as parse_openai_chat
from llm_magic.wire.openai import parse_completion as parse_openai_completion
from llm_magic.engine.llama_cpp.tool_events import split_tool_calls
from llm_magic.wire.events import Completion, Started, TextDelta
from llm_magic.wire.tool_calls import FORMATS
from llm_magic.wire.types import ResponseFormat, TokenLogprob

USER = [{"role": "user", "content": "x"}]


def test_openai_chat_defaults_and_aliases() -> None:
    req = parse_openai_chat({"model": "default", "messages": [{"role": "developer", "content": "be brief"},
                                                              {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                             "max_completion_tokens": 9, "stream": True, "stream_options": {"include_usage": True},
                             "n": 1, "user": "me"})
    assert req.model is None and req.stream and req.include_usage
    assert req.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
    assert req.sampling.max_tokens == 9


def test_openai_model_listed_id_means_default_and_other_names_are_specs() -> None:
    assert parse_openai_chat({"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
                             model_ids=["tiny"]).model is None
    assert parse_openai_chat({"model": "org/repo:Q4_K_M", "messages": [{"role": "user", "content": "x"}]},
                             model_ids=["tiny"]).model == "org/repo:Q4_K_M"


@pytest.mark.parametrize("body, message", [
    ({}, "'messages' is required"),
    ({"messages": "hi"}, "'messages' must be a list"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "'n' must be between 1 and 128"),
    ({"messages": USER, "response_format": {"type": "yaml"}}, "'response_format.type' must be"),
    ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"schema": []}}}, "JSON Schema object"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "'top_logprobs' must be between 0 and 20"),
    ({"messages": USER, "top_logprobs": 2}, "needs 'logprobs'"),
    ({"messages": USER, "modalities": ["text", "audio"]}, "text only"),
    ({"messages": USER, "audio": {"voice": "x"}}, "text only"),
    ({"messages": [{"role": "user", "content": "x", "colour": 1}]}, "unknown field 'messages\\[0\\].colour'"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}, {"role": "user", "tool_calls": [{}]}]},
     "belongs to assistant"),
    ({"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, "unknown field 'frobnicate'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text only"),
    ({"messages": [{"role": "system", "content": "x"}]}, "must not end with a system message"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"x": 1}}, "stream_options.x"),
])
def test_bad_openai_chat_bodies(body: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_openai_chat(body)


def test_openai_completion() -> None:
    req = parse_openai_completion({"prompt": ["Once upon"], "max_tokens": 3})
    assert req.prompt == "Once upon" and req.sampling.max_tokens == 3
    assert parse_openai_completion({"prompt": "x"}).sampling.max_tokens == 16  # OpenAI's default
    both = parse_openai_completion({"prompt": ["a", "b"], "n": 2})
    assert (both.prompt, both.prompts, both.n) == ("a", ("a", "b"), 2)  # the server runs one generation each
    assert parse_openai_completion({"prompt": ["a"]}).prompts == ()
    for prompt, message in (([], "'prompt' is required"), ([1, 2], "token ids are not supported"),
                            (["a", 5], "'prompt\\[1\\]' must be a string"), (["a"] * 129, "more than 128 prompts")):
        with pytest.raises(InvalidRequest, match=message):
            parse_openai_completion({"prompt": prompt})
    with pytest.raises(InvalidRequest, match="'echo'"):
        parse_openai_completion({"prompt": "x", "echo": True})


def test_names_that_are_no_model_spec_mean_the_hosts_model() -> None:
    for name in ("gpt-4o", "gpt-3.5-turbo", "my-model", "text-davinci-003", "llama3"):
        assert parse_openai_chat({"model": name, "messages": USER}).model is None
    assert parse_openai_chat({"model": "/models/x.gguf", "messages": USER}).model == "/models/x.gguf"
    assert parse_openai_completion({"model": "o/r", "prompt": "x"}).model == "o/r"


def test_valid_openai_fields_that_do_not_apply_are_accepted() -> None:
    body = {"messages": USER, "reasoning_effort": "low", "audio": None, "modalities": ["text"],
            "prediction": {"type": "content", "content": "x"}, "verbosity": "low", "prompt_cache_key": "k",
            "safety_identifier": "s", "store": False, "metadata": {"a": "b"}, "user": "u", "service_tier": "auto",
            "parallel_tool_calls": True, "stream_options": {"include_obfuscation": False}, "tool_choice": "auto",
            "web_search_options": {}, "prompt_cache_retention": "24h"}
    assert parse_openai_chat(body).messages == ({"role": "user", "content": "x"},)


def test_messages_as_frameworks_send_them() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}]
    messages = parse_openai_chat({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
        {"role": "user", "content": "add 1", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": calls, "refusal": None, "annotations": []},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"},
    ]}).messages
    assert messages == (
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "add 1", "name": "ann"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "2", "tool_call_id": "call_1"})


def test_response_formats() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    parse = lambda rf: parse_openai_chat({"messages": USER, "response_format": rf}).response_format  # noqa: E731
    assert parse({"type": "text"}) is None
    assert parse({"type": "json_object"}) == ResponseFormat()
    assert parse({"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}) == \
        ResponseFormat(schema=schema, name="t", strict=True)
    assert parse_openai_completion({"prompt": "x", "response_format": {"type": "json_object"}}).response_format


def test_logprobs_fields() -> None:
    assert parse_openai_chat({"messages": USER}).logprobs is None
    assert parse_openai_chat({"messages": USER, "logprobs": True}).logprobs == 0
    assert parse_openai_chat({"messages": USER, "logprobs": True, "top_logprobs": 5}).logprobs == 5
    assert parse_openai_completion({"prompt": "x", "logprobs": 3}).logprobs == 3
    assert parse_openai_completion({"prompt": "x", "logprobs": 0}).logprobs == 0
    with pytest.raises(InvalidRequest, match="'logprobs' must be between 0 and 5"):
        parse_openai_completion({"prompt": "x", "logprobs": 6})


def test_tools_are_parsed_and_none_means_no_tools() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    req = parse_openai_chat({"messages": USER, "tools": tools, "parallel_tool_calls": False})
    assert req.tools is not None and req.tools.choice == "auto" and not req.tools.parallel
    assert parse_openai_chat({"messages": USER, "tools": tools, "tool_choice": "none"}).tools is None
    legacy = parse_openai_chat({"messages": USER, "functions": [{"name": "g"}], "function_call": {"name": "g"}})
    assert legacy.tools.named == "g" and legacy.tools.choice == "required"
    with pytest.raises(InvalidRequest, match="not both"):
        parse_openai_chat({"messages": USER, "tools": tools, "response_format": {"type": "json_object"}})


def generic(events: list) -> list:
    """Events as the llama.cpp backend sends them for a model that writes the generic format."""
    return list(split_tool_calls([TextDelta(e) if isinstance(e, str) else e for e in events], FORMATS["generic"]))


def test_tool_calls_render_whole_and_streamed() -> None:
    text = '{"tool_calls": [{"name": "f", "arguments": {"x": 1}}]}'
    result = Completion(text, "m", "stop", 3, 9)
    message = OpenAIRenderer(chat=True).answer(generic([result])[-1])["choices"][0]
    assert message["finish_reason"] == "tool_calls" and message["message"]["content"] is None
    assert message["message"]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert OpenAIRenderer(chat=True).answer(result)["choices"][0]["message"]["content"] == text  # no tools offered
    chunks = _decode(list(OpenAIRenderer(chat=True).stream(generic([text[:7], text[7:], result]))))
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    assert deltas[1]["tool_calls"][0] == {"index": 0, "function": {"arguments": '{"x": 1}'}}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(d.get("content") for d in deltas)


def _events() -> list:
    return [Started("m"), TextDelta("Hel"), TextDelta("lo"),
            Completion("Hello", "m", "stop", 3, 2, {"predicted_n": 2}, cached_tokens=1)]


def _decode(chunks: list[str]) -> list:
    assert all(c.startswith("data: ") and c.endswith("\n\n") for c in chunks)
    return [c[6:-2] if c[6:-2] == "[DONE]" else json.loads(c[6:-2]) for c in chunks]


def test_openai_chat_stream_chunks_with_usage() -> None:
    chunks = _decode(list(OpenAIRenderer(chat=True, model="m", include_usage=True).stream(_events())))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2] if c["choices"]) == "Hello"
    assert chunks[-3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["total_tokens"] == 5
    assert chunks[-1] == "[DONE]"
    assert len({c["id"] for c in chunks[:-1]}) == 1


def test_openai_stream_without_usage_has_no_usage_chunk() -> None:
    chunks = _decode(list(OpenAIRenderer(chat=False, model="m").stream(_events())))
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["Hel", "lo", ""]
    assert all("usage" not in c for c in chunks[:-1])


def test_answer_has_fingerprint_and_cached_tokens() -> None:
    body = OpenAIRenderer(chat=True, fingerprint="llm_magic-1").answer(_events()[-1])
    assert body["system_fingerprint"] == "llm_magic-1"
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 1}
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello", "refusal": None}


LP = [TokenLogprob("Hel", -0.5, b"Hel", (("Hel", -0.5, b"Hel"), ("He", -1.5, b"He"))),
      TokenLogprob("lo", -float("inf"), b"lo", ())]


def test_chat_logprobs_in_openai_shape() -> None:
    result = Completion("Hello", "m", "stop", 3, 2, logprobs=LP)
    logprobs = OpenAIRenderer(chat=True).answer(result)["choices"][0]["logprobs"]
    assert logprobs["refusal"] is None
    assert logprobs["content"][0] == {"token": "Hel", "logprob": -0.5, "bytes": [72, 101, 108], "top_logprobs": [
        {"token": "Hel", "logprob": -0.5, "bytes": [72, 101, 108]}, {"token": "He", "logprob": -1.5, "bytes": [72, 101]}]}
    assert logprobs["content"][1]["logprob"] == -9999.0  # JSON has no -Infinity
    chunks = _decode(list(OpenAIRenderer(chat=True).stream([Started("m"), TextDelta("Hello", logprobs=tuple(LP)), result])))
    assert [e["token"] for e in chunks[1]["choices"][0]["logprobs"]["content"]] == ["Hel", "lo"]


def test_completion_logprobs_in_legacy_shape() -> None:
    result = Completion("Hello", "m", "stop", 3, 2, logprobs=LP)
    logprobs = OpenAIRenderer(chat=False).answer(result)["choices"][0]["logprobs"]
    assert logprobs == {"tokens": ["Hel", "lo"], "token_logprobs": [-0.5, -9999.0],
                        "top_logprobs": [{"Hel": -0.5, "He": -1.5}, {}], "text_offset": [0, 3]}


CUT = '{"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}, {"name": "add", "arguments": {"a": 4, "b'


def test_calls_cut_by_max_tokens_are_tool_calls_never_text() -> None:
    """As OpenAI: the calls so far, the last with its arguments cut, finish_reason length."""
    result = Completion(CUT, "m", "length", 3, 40)
    choice = OpenAIRenderer(chat=True).answer(generic([result])[-1])["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] is None
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "add", "arguments": '{"a": 2, "b": 3}'}, {"name": "add", "arguments": '{"a": 4, "b'}]
    chunks = _decode(list(OpenAIRenderer(chat=True).stream(generic([Started("m"), CUT[:20], CUT[20:], result]))))
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert not any(d.get("content") for d in deltas)  # the host's format never shows
    streamed: dict[int, str] = {}
    for d in deltas:
        for call in d.get("tool_calls", []):
            streamed[call["index"]] = streamed.get(call["index"], "") + call["function"]["arguments"]
    assert streamed == {0: '{"a": 2, "b": 3}', 1: '{"a": 4, "b'}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    # cut before a name is written: no call to report, and still no format text
    early = Completion('{ "tool_calls": [{"', "m", "length", 3, 8)
    message = OpenAIRenderer(chat=True).answer(generic([early])[-1])["choices"][0]["message"]
    assert message["content"] == "" and "tool_calls" not in message


def test_a_cut_plain_answer_stays_text() -> None:
    result = Completion("The weather is", "m", "length", 3, 3)
    choice = OpenAIRenderer(chat=True).answer(generic([result])[-1])["choices"][0]
    assert choice["message"]["content"] == "The weather is" and choice["finish_reason"] == "length"


def test_logit_bias_is_parsed_and_checked() -> None:
    req = parse_openai_chat({"messages": USER, "logit_bias": {"42": -100, "7": 5.5}})
    assert req.sampling.logit_bias == ((42, -100.0), (7, 5.5))
    assert parse_openai_completion({"prompt": "x", "logit_bias": {}}).sampling.logit_bias == ()
    for bias, message in (({"a": 1}, "is not a token id"), ({"-1": 1}, "is not a token id"),
                          ({"5": 101}, "'logit_bias.5' must be a number from -100 to 100"),
                          ({"5": "x"}, "must be a number"), ([1], "must be an object")):
        with pytest.raises(InvalidRequest, match=message):
            parse_openai_chat({"messages": USER, "logit_bias": bias})
