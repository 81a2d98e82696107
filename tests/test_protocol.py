"""Validation of /api bodies: every bad field gets a 400 that names it."""

from __future__ import annotations

import json

import pytest

from llm_magic.errors import InvalidRequest
from llm_magic.wire.events import Completion, Started, TextDelta
from llm_magic.wire.seed import api_stream, parse_api_request
from llm_magic.wire.types import ResponseFormat

SEED_CHAT = [
    {"role": "system", "content": "You are an assistant specialized in story writing"},
    {"role": "user", "content": "Write a story about a cat stealing food from its owner."},
]


def test_seed_payload_with_empty_parameters_is_valid_and_gets_defaults() -> None:
    req = parse_api_request({"token": "t", "task": "text_generation", "repo_id": None, "file_name": None,
                             "inputs": "Hello ! Today I can do these activities:", "parameters": {}, "options": {}})
    assert req.prompt == "Hello ! Today I can do these activities:" and not req.is_chat
    assert req.sampling.max_tokens == 512
    assert req.model is None and req.stream is False


def test_seed_chat_list_is_chat() -> None:
    req = parse_api_request({"inputs": SEED_CHAT, "parameters": {"max_tokens": 20, "top_k": 1}})
    assert req.is_chat and req.messages == tuple(SEED_CHAT)
    assert req.sampling.max_tokens == 20 and req.sampling.top_k == 1


def test_seed_readme_spelling_ctx_lenght_is_honoured() -> None:
    assert parse_api_request({"inputs": "x", "options": {"ctx_lenght": 2048}}).ctx_length == 2048
    assert parse_api_request({"inputs": "x", "options": {"ctx_length": 1024}}).ctx_length == 1024


def test_repo_id_and_file_name_become_a_model_spec() -> None:
    req = parse_api_request({"inputs": "x", "repo_id": "TheBloke/Llama-2-7B-Chat-GGUF",
                             "file_name": "llama-2-7b-chat.Q4_K_M.gguf"})
    assert req.model == "TheBloke/Llama-2-7B-Chat-GGUF:llama-2-7b-chat.Q4_K_M.gguf"


def test_every_documented_parameter_and_option_is_accepted() -> None:
    req = parse_api_request({"inputs": "x", "parameters": {
        "max_tokens": 5, "top_k": 3, "top_p": 0.5, "temperature": 0, "stop": ["\n", "END"], "seed": 7,
        "repeat_penalty": 1.1, "min_p": 0.1, "presence_penalty": 0.5, "frequency_penalty": -0.5},
        "options": {"use_gpu": False, "ctx_length": 512, "chat_format": "chatml", "stream": True}})
    s = req.sampling
    assert (s.max_tokens, s.top_k, s.top_p, s.temperature, s.stop, s.seed) == (5, 3, 0.5, 0.0, ("\n", "END"), 7)
    assert (s.repeat_penalty, s.min_p, s.presence_penalty, s.frequency_penalty) == (1.1, 0.1, 0.5, -0.5)
    assert (req.use_gpu, req.ctx_length, req.chat_format, req.stream) == (False, 512, "chatml", True)


@pytest.mark.parametrize("body, message", [
    ([1, 2], "request body must be a JSON object"),
    ("text", "request body must be a JSON object"),
    ({"inputs": "x", "task": "translation"}, "unknown task \"translation\"; valid tasks: text_generation"),
    ({}, "'inputs' must be a string"),
    ({"inputs": 42}, "'inputs' must be a string .* not an integer"),
    ({"inputs": "x", "parameters": []}, "'parameters' must be a JSON object"),
    ({"inputs": "x", "parameters": {"max_tokens": "10"}}, "'parameters.max_tokens' must be an integer, not a string"),
    ({"inputs": "x", "parameters": {"max_tokens": 0}}, "'parameters.max_tokens' must be between 1"),
    ({"inputs": "x", "parameters": {"max_tokens": 10**30}}, "'parameters.max_tokens' must be between"),
    ({"inputs": "x", "parameters": {"max_tokens": True}}, "'parameters.max_tokens' must be an integer, not a boolean"),
    ({"inputs": "x", "parameters": {"temperature": -1}}, "'parameters.temperature' must be between 0"),
    ({"inputs": "x", "parameters": {"top_p": 1.5}}, "'parameters.top_p' must be between"),
    ({"inputs": "x", "parameters": {"temprature": 0.5}}, "unknown field 'parameters.temprature'"),
    ({"inputs": "x", "parameters": {"stop": [1]}}, "'parameters.stop' must be a string or a list of strings"),
    ({"inputs": "x", "parameters": {"stop": [""]}}, "each stop sequence"),
    ({"inputs": "x", "options": {"use_gpu": "yes"}}, "'options.use_gpu' must be true or false"),
    ({"inputs": "x", "options": {"ctx_length": 1}}, "'options.ctx_length' must be between 16"),
    ({"inputs": "x", "options": {"ctx_length": 512, "ctx_lenght": 512}}, "not both"),
    ({"inputs": "x", "options": {"gpu": True}}, "unknown field 'options.gpu'"),
    ({"inputs": "x", "file_name": "a.gguf"}, "'file_name' needs a 'repo_id'"),
    ({"inputs": "x", "repo_id": 5}, "'repo_id' must be a string"),
    ({"inputs": "x", "extra": 1}, "unknown field 'extra'"),
    ({"inputs": []}, "'inputs' must hold at least one message"),
    ({"inputs": ["hi"]}, "'inputs\\[0\\]' must be an object"),
    ({"inputs": [{"role": "bot", "content": "x"}]}, "'inputs\\[0\\]'.role must be one of system, user, assistant"),
    ({"inputs": [{"role": "user", "content": None}]}, "inputs\\[0\\].content must be a string"),
    ({"inputs": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "'inputs\\[1\\]' has role 'user' but 'assistant' was expected"),
    ({"inputs": [{"role": "assistant", "content": "a"}]}, "'inputs\\[0\\]' has role 'assistant' but 'user'"),
    ({"inputs": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "must end with a user message"),
    ({"inputs": [{"role": "user", "content": "a", "extra": 1}]}, "unknown field"),
])
def test_bad_api_bodies_name_the_field(body: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_api_request(body)


def test_nan_and_infinity_are_refused_even_if_parsed() -> None:
    for value in (float("nan"), float("inf")):
        with pytest.raises(InvalidRequest, match="temperature"):
            parse_api_request({"inputs": "x", "parameters": {"temperature": value}})


def _events() -> list:
    return [Started("m"), TextDelta("Hel"), TextDelta("lo"), Completion("Hello", "m", "stop", 3, 2, {"predicted_n": 2})]


def _decode(chunks: list[str]) -> list:
    assert all(c.startswith("data: ") and c.endswith("\n\n") for c in chunks)
    return [c[6:-2] if c[6:-2] == "[DONE]" else json.loads(c[6:-2]) for c in chunks]


def test_api_stream_events() -> None:
    events = _decode(list(api_stream(_events())))
    assert events[:2] == [{"delta": "Hel"}, {"delta": "lo"}]
    assert events[2]["answer"] == {"role": "assistant", "content": "Hello"}
    assert events[2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert events[3] == "[DONE]"


def test_api_takes_response_format_in_parameters() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = parse_api_request({"inputs": "x", "parameters": {"response_format": {
        "type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}}})
    assert req.response_format == ResponseFormat(schema=schema, name="thing", strict=True)
    with pytest.raises(InvalidRequest, match="'parameters.response_format.type' must be text, json_object or json_schema"):
        parse_api_request({"inputs": "x", "parameters": {"response_format": {"type": "xml"}}})
