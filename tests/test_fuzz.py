"""Property-based fuzzing of /api and /v1 bodies through the real app and engine: whatever is
sent, the answer is JSON (or SSE), never a 5xx, and the server keeps serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llm_magic.engine.llama_cpp.backend import LlamaCppBackend
from llm_magic.models import ModelPolicy
from llm_magic.server.app import create_app

# Any code point, with lone surrogates often: JSON can carry "\ud800", which is not text.
any_char = st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(any_char, max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(any_char, max_size=8), inner, max_size=4),
    max_leaves=12,
)
text = st.text(max_size=40) | st.text(any_char, max_size=10)
roles = st.sampled_from(["system", "user", "assistant", "developer", "tool", "bot", ""])
message = st.fixed_dictionaries({"role": roles, "content": text | junk}) | junk
messages = st.lists(message, max_size=5) | junk
small = st.integers(min_value=-2, max_value=8)
number = st.floats(min_value=-3, max_value=3, allow_nan=False) | st.integers(-10, 10) | junk
sampling = {
    "max_tokens": small | junk, "temperature": number, "top_p": number, "top_k": small | junk,
    "min_p": number, "repeat_penalty": number, "presence_penalty": number, "frequency_penalty": number,
    "stop": text | st.lists(text, max_size=3) | junk, "seed": st.integers(-5, 2**66) | junk,
}


def maybe(fields: dict) -> st.SearchStrategy:
    """A dict holding any subset of ``fields`` (each a valid-looking or junk value), plus junk keys."""
    return st.fixed_dictionaries({}, optional=fields).flatmap(
        lambda d: st.dictionaries(st.text(max_size=6), junk, max_size=1).map(lambda extra: {**extra, **d})
        | st.just(d))


api_bodies = maybe({
    "token": st.just("t") | st.just("\ud800") | junk, "task": st.just("text_generation") | junk,
    "repo_id": st.just("org/x-GGUF") | junk, "file_name": text | junk,
    "inputs": text | messages,
    "parameters": maybe({**sampling, "max_tokens": small}) | junk,
    "options": maybe({"use_gpu": st.booleans() | junk, "ctx_length": st.integers(-1, 1 << 21) | junk,
                      "ctx_lenght": st.integers(-1, 1 << 21) | junk,
                      "chat_format": st.sampled_from(["chatml", "nope"]) | junk,
                      "stream": st.booleans() | junk}) | junk,
}) | junk
chat_bodies = maybe({
    "model": st.sampled_from(["default", "org/x:Q4_K_M", "/etc/passwd.gguf"]) | junk, "messages": messages,
    "stream": st.booleans() | junk, "stream_options": maybe({"include_usage": st.booleans() | junk}) | junk,
    "n": small | junk, "max_completion_tokens": small | junk, "tools": junk, "response_format": junk,
    **{**sampling, "max_tokens": small},
}) | junk
completion_bodies = maybe({
    "model": st.just("default") | junk, "prompt": text | st.lists(text, max_size=2) | junk,
    "stream": st.booleans() | junk, "echo": junk, "suffix": junk, **{**sampling, "max_tokens": small},
}) | junk


@pytest.fixture(scope="module")
def client(model_path: Path) -> Iterator:
    # ctx 512: ctx_length in fuzzed options rarely matches it, so model reloads are exercised too
    engine = LlamaCppBackend(model_path, ctx_length=512, policy=ModelPolicy(has_token=False))
    engine.load_default()
    yield create_app(engine, token=None).test_client()
    engine.close()


def check(response) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    if response.mimetype == "text/event-stream":
        events = [b for b in response.get_data(as_text=True).split("\n\n") if b.startswith("data: ")]
        assert events[-1] == "data: [DONE]" or "error" in json.loads(events[-1][6:])
        return
    assert response.mimetype == "application/json"
    body = json.loads(response.get_data(as_text=True))  # leading keep-alive spaces are fine
    if response.status_code >= 400:
        assert set(body) == {"error"} and body["error"]["message"]
        if response.request.path.startswith("/v1/"):  # OpenAI's shape: param, and a string code or null
            assert "param" in body["error"] and not isinstance(body["error"]["code"], int)
        else:
            assert body["error"]["code"] == response.status_code


FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=api_bodies)
@example(body={"inputs": "\ud800"})
@example(body={"token": "\udfff", "inputs": "x"})
def test_fuzz_api(client, body) -> None:
    check(client.post("/api", json=body))


@FUZZ
@given(body=chat_bodies)
@example(body={"messages": [{"role": "user", "content": "\ud83d"}]})
def test_fuzz_chat(client, body) -> None:
    check(client.post("/v1/chat/completions", json=body))


@FUZZ
@given(body=completion_bodies)
def test_fuzz_completions(client, body) -> None:
    check(client.post("/v1/completions", json=body))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_fuzz_raw_bytes(client, raw: bytes) -> None:
    for path in ("/api", "/v1/chat/completions", "/v1/completions"):
        check(client.post(path, data=raw, content_type="application/json"))


def test_server_still_answers_after_fuzzing(client) -> None:
    r = client.post("/api", json={"inputs": "Hello", "parameters": {"max_tokens": 2}})
    assert r.status_code == 200 and r.get_json()["usage"]["completion_tokens"] == 2
