"""The Flask app around the real engine and model, through Flask's test client: every route,
both token modes, streaming, and every error class as JSON."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from llm_magic.engine.llama_cpp.backend import LlamaCppBackend
from llm_magic.models import ModelPolicy
from llm_magic.server.app import create_app
from llm_magic.wire.events import TextDelta
from tests.fake_backend import ScriptedBackend

TOKEN = "s3cret-token-for-tests"
CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[LlamaCppBackend]:
    e = LlamaCppBackend(model_path, policy=ModelPolicy(has_token=True))
    e.load_default()
    yield e
    e.close()


@pytest.fixture
def client(engine: LlamaCppBackend):
    return create_app(engine, token=TOKEN).test_client()


@pytest.fixture
def scripted_client():
    """For what the server decides before any backend is asked (auth, bodies, routes, CORS):
    a scripted backend (tests/fake_backend.py) stands in for the model."""
    return create_app(ScriptedBackend(), token=TOKEN).test_client()


@pytest.fixture
def open_client(model_path: Path):
    e = LlamaCppBackend(model_path, policy=ModelPolicy(has_token=False))
    yield create_app(e, token=None).test_client()
    e.close()


OPENAI_CODES = {401: "invalid_api_key", 403: "model_not_allowed", 404: "unknown_url", 405: "method_not_allowed",
                413: "request_too_large", 415: "unsupported_media_type", 503: "server_busy"}


def assert_error(response, status: int, match: str, code: str | None = None) -> dict:
    """A JSON error: on /v1 in OpenAI's shape (``param``, a string ``code``: ``code``, else the
    status's), elsewhere in the seed's (``code``: the status)."""
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    error = body["error"]
    if response.request.path.startswith("/v1/"):
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["code"] == (code or OPENAI_CODES.get(status)), error
    else:
        assert set(error) == {"message", "type", "code"} and error["code"] == status, error
    assert match in error["message"], error["message"]
    return error


def sse_events(response) -> list:
    assert response.mimetype == "text/event-stream"
    text = response.get_data(as_text=True)
    events = [block[len("data: "):] for block in text.split("\n\n") if block.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_health_is_public_and_holds_no_secret(client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok" and body["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert body["auth"] is True and body["queue"] == 0
    assert TOKEN not in response.get_data(as_text=True)


def test_api_completion_and_chat(client) -> None:
    r = client.post("/api", json={"token": TOKEN, "inputs": "Paris is", "parameters": {"max_tokens": 5}})
    body = r.get_json()
    assert r.status_code == 200 and body["answer"]["role"] == "assistant" and body["answer"]["content"]
    assert body["usage"]["completion_tokens"] == 5 and body["finish_reason"] == "length"
    assert {"prompt_n", "predicted_n", "predicted_per_second"} <= set(body["timings"])
    r = client.post("/api", json={"token": TOKEN, "inputs": CHAT, "parameters": {}, "options": {}})
    assert r.status_code == 200 and r.get_json()["answer"]["content"].strip()


def test_api_stream(client) -> None:
    r = client.post("/api", json={"token": TOKEN, "inputs": CHAT, "parameters": {"max_tokens": 8},
                                  "options": {"stream": True}})
    events = sse_events(r)
    deltas = [e["delta"] for e in events if isinstance(e, dict) and "delta" in e]
    final = events[-2]
    assert events[-1] == "[DONE]"
    assert "".join(deltas) == final["answer"]["content"] and len(deltas) >= 2
    assert final["usage"]["completion_tokens"] <= 8


def test_bearer_token_works_on_api_too(scripted_client) -> None:
    r = scripted_client.post("/api", json={"inputs": "x", "parameters": {"max_tokens": 1}},
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200


@pytest.mark.parametrize("kwargs, match", [
    ({"json": {"inputs": "x"}}, "needs its access token"),
    ({"json": {"inputs": "x", "token": "wrong"}}, "wrong token"),
    ({"json": {"inputs": "x", "token": 12345}}, "wrong token"),
    ({"json": {"inputs": "x"}, "headers": {"Authorization": "Bearer nope"}}, "wrong token"),
])
def test_missing_or_wrong_token_is_401(scripted_client, kwargs: dict, match: str) -> None:
    assert_error(scripted_client.post("/api", **kwargs), 401, match)


def test_v1_routes_need_the_bearer_token(scripted_client) -> None:
    assert_error(scripted_client.get("/v1/models"), 401, "needs its access token")
    assert_error(scripted_client.post("/v1/chat/completions", json={"messages": CHAT}), 401, "needs its access token")


def test_host_without_token_serves_anyone_but_only_its_default_model(open_client, model_copy: Path) -> None:
    assert open_client.post("/api", json={"inputs": "x", "parameters": {"max_tokens": 1}}).status_code == 200
    error = assert_error(open_client.post("/api", json={"inputs": "x", "repo_id": "org/other-GGUF"}), 403,
                         "without a token serves only its default model")
    assert error["type"] == "permission_error" and "--allow-model" in error["message"]
    assert_error(open_client.post("/v1/completions", json={"prompt": "x", "model": str(model_copy)}), 403,
                 "not allowed")


@pytest.mark.parametrize("data, match", [
    (b"", "body is empty"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "request body must be a JSON object"),
    (b'{"inputs": "x", "parameters": {"temperature": NaN}}', "NaN"),
    (b'{"inputs": "x", "parameters": {"temperature": Infinity}}', "Infinity"),
    (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b'{"inputs": "x", "parameters": {"max_tokens": 1' + b"0" * 5000 + b"}}", "not valid JSON"),
    (b'{"inputs": "x", "task": "summarize"}', "valid tasks: text_generation"),
    (b'{"inputs": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "'assistant' was expected"),
])
def test_bad_bodies_are_400_json(scripted_client, data: bytes, match: str) -> None:
    r = scripted_client.post("/api", data=data, headers={"Authorization": f"Bearer {TOKEN}",
                                                "Content-Type": "application/json"})
    assert_error(r, 400, match)


def test_unknown_route_wrong_method_and_big_body_are_json(scripted_client) -> None:
    client = scripted_client
    assert_error(client.get("/nope"), 404, "no route GET /nope")
    assert_error(client.get("/api"), 405, "GET is not allowed on /api")
    big = create_app(ScriptedBackend(), token=None, max_body=1000).test_client()
    assert_error(big.post("/api", data=b'{"inputs": "' + b"x" * 5000 + b'"}', content_type="application/json"), 413,
                 "larger than 1000 bytes")
    assert_error(client.get("/v1/nope"), 404, "no route GET /v1/nope")  # OpenAI's unknown_url


def test_prompt_longer_than_context_is_400(client) -> None:
    r = client.post("/api", json={"token": TOKEN, "inputs": "word " * 5000})
    assert_error(r, 400, "context holds 4096")


def test_busy_host_answers_503_with_retry_after(model_path: Path) -> None:
    e = LlamaCppBackend(model_path, max_queue=0)
    app = create_app(e, token=None).test_client()
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with e.turnstile.turn(seats=e.parallel):  # every slot busy
            holding.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    holding.wait(5)
    try:
        r = app.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert_error(r, 503, "the host is busy")
        assert int(r.headers["Retry-After"]) > 0
    finally:
        release.set()
        t.join(10)
    assert app.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
    e.close()


def test_openai_chat_and_completion_shapes(client) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4}, headers=auth).get_json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] <= 4
    body = client.post("/v1/completions", json={"prompt": "1, 2, 3,", "max_tokens": 3, "temperature": 0},
                       headers=auth).get_json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 3
    models = client.get("/v1/models", headers=auth).get_json()
    assert models["object"] == "list" and models["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"


def test_openai_model_field_accepts_default_aliases(client) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for model in ("default", "SmolLM2-135M-Instruct.Q4_1"):
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "model": model}, headers=auth)
        assert r.status_code == 200 and r.get_json()["model"] == "SmolLM2-135M-Instruct.Q4_1"


def test_openai_stream_with_usage(client) -> None:
    r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                    json={"messages": CHAT, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 6
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-2])
    assert text.strip()


def test_errors_in_openai_bodies_are_400(client) -> None:
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "temperature": "hot"},
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert assert_error(r, 400, "'temperature' must be a number, not a string")["param"] == "temperature"


def test_the_response_tells_the_generation_when_its_first_text_has_gone_out() -> None:
    """The next token's decode would compete for the cores with sending the first one, so a
    generation running alone waits for the response to pass its first text on (the engine's
    side, and that later tokens do not wait, are tested in test_engine)."""
    import time

    from llm_magic.server.generation import Pump
    from llm_magic.wire.events import Completion, Started, TextDelta

    log: list[str] = []

    class ScriptedEngine:  # stands in for Engine.generate: only the hand-over is under test
        def generate(self, request: object, cancel: threading.Event,
                     first_text_passed: threading.Event, tick: float) -> Iterator[object]:
            yield Started("scripted")
            for piece in ("a", "b", "c"):
                log.append(f"made {piece}")
                yield TextDelta(piece)
                if piece == "a":
                    first_text_passed.wait(5)
            yield Completion("abc", "scripted", "length", 1, 3, {})

    for _ in range(2):
        log.clear()
        pump = Pump(ScriptedEngine(), None)  # type: ignore[arg-type]
        assert isinstance(pump.get(5), Started)
        for event in pump.events(keepalive=60, gone=lambda: False):
            if isinstance(event, TextDelta):
                time.sleep(0.05)  # sending takes a while; a generation that did not wait runs ahead
                log.append(f"sent {event.text}")
        assert log.index("sent a") < log.index("made b")


def test_cors_is_off_by_default_and_answers_preflights_for_allowed_origins() -> None:
    engine = ScriptedBackend()
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    closed = create_app(engine, token=TOKEN).test_client()
    assert "Access-Control-Allow-Origin" not in closed.options("/v1/chat/completions", headers=preflight).headers
    open_to = create_app(engine, token=TOKEN, cors=["https://app.example"]).test_client()
    r = open_to.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
    r = open_to.post("/v1/chat/completions", json={"messages": CHAT}, headers={"Origin": "https://app.example"})
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    r = open_to.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
    anyone = create_app(engine, token=TOKEN, cors=["*"]).test_client()
    assert anyone.get("/health", headers={"Origin": "https://x.example"}).headers["Access-Control-Allow-Origin"] == "https://x.example"


# -- bodies must be declared JSON -------------------------------------------------------------

BODY_ROUTES = {"/api": {"inputs": "x", "parameters": {"max_tokens": 1}},
               "/v1/chat/completions": {"messages": CHAT, "max_tokens": 1},
               "/v1/completions": {"prompt": "x", "max_tokens": 1},
               "/v1/responses": {"input": "x", "max_output_tokens": 16},
               "/v1/embeddings": {"input": "x"}}


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_body_not_declared_json_is_a_415_and_runs_nothing(path: str, content_type) -> None:
    """What any web page may send a host on the user's machine without the browser asking it
    first (a "simple" cross-site request): refused before it is read."""
    backend = ScriptedBackend()
    client = create_app(backend, token=None).test_client()
    r = client.post(path, data=json.dumps(BODY_ROUTES[path]), content_type=content_type)
    error = assert_error(r, 415, "'Content-Type: application/json'")
    assert "curl: -H 'Content-Type: application/json'" in error["message"]
    assert r.headers["Connection"] == "close"  # the body was never read
    assert backend.requests == []  # nothing reached the backend


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_json_with_parameters_is_read(open_engine_client, content_type: str) -> None:
    _, client = open_engine_client
    r = client.post("/api", data=json.dumps(BODY_ROUTES["/api"]), headers={"Content-Type": content_type})
    assert r.status_code == 200, r.data


@pytest.fixture(scope="module")
def open_engine_client(model_path: Path):
    e = LlamaCppBackend(model_path, policy=ModelPolicy(has_token=False))
    e.load_default()
    yield e, create_app(e, token=None).test_client()
    e.close()


# -- OpenAI's error shape on /v1, the seed's on /api ------------------------------------------


def test_a_prompt_too_long_is_context_length_exceeded_on_v1(client) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    r = client.post("/v1/completions", json={"prompt": "word " * 5000, "max_tokens": 1}, headers=headers)
    assert_error(r, 400, "context holds 4096", code="context_length_exceeded")
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 5000}]},
                    headers=headers)
    assert_error(r, 400, "context holds 4096", code="context_length_exceeded")
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "n": 0}, headers=headers)
    assert assert_error(r, 400, "'n' must be between", code=None)["param"] == "n"  # other 400s have no code
    assert_error(client.get("/v1/models/nope", headers=headers), 404, "GET /v1/models lists them",
                 code="model_not_found")
    r = client.post("/v1/embeddings", json={"input": "word " * 5000}, headers=headers)
    assert assert_error(r, 400, "embedding context", code="context_length_exceeded")["param"] == "input[0]"
    assert_error(client.post("/api", json={"token": TOKEN, "inputs": "word " * 5000}), 400, "context holds 4096")


def test_models_default_is_the_default_model(client) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    listed = client.get("/v1/models", headers=headers).get_json()["data"][0]
    r = client.get("/v1/models/default", headers=headers)
    assert r.status_code == 200 and r.get_json() == listed
    assert_error(client.get("/v1/models/default"), 401, "needs its access token")


# -- a client that leaves ------------------------------------------------------------------------


def test_a_withdrawn_generation_gives_its_seat_back_only_once_its_slot_is_free(model_path: Path) -> None:
    """A decode step under way cannot be stopped: on a busy machine one takes a second or more.
    The seat (what /health calls busy, what the next request waits for) came back at once, while
    the step ran on with the slot, so /health said idle and counted nothing and the next request
    still waited (tests/test_robustness.py, flaky under load). Here every step takes 0.5 s."""
    from llm_magic.wire.types import GenerationRequest, Sampling
    from llm_magic.server.generation import Pump

    e = LlamaCppBackend(model_path, policy=ModelPolicy(has_token=False), parallel=1)
    e.load_default()
    context = e._loaded.context
    decode = context.decode

    def slow_decode() -> int:
        time.sleep(0.5)
        return decode()

    context.decode = slow_decode
    try:
        pump = Pump(e, GenerationRequest(prompt="Once upon a time", sampling=Sampling(max_tokens=100, temperature=0)))
        events = pump.events(keepalive=60, gone=lambda: False)
        assert next(ev for ev in events if isinstance(ev, TextDelta))  # it runs: a step is under way or due
        assert e.turnstile.busy
        events.close()  # the client left
        assert not e.turnstile.busy
        assert e.stats.requests == 1 and 0 < e.stats.completion_tokens < 100  # counted before the seat is back
        assert all(slot.task is None for slot in e.scheduler._slots)  # and its slot free
    finally:
        context.decode = decode
        e.close()


def test_a_list_of_prompts_with_one_too_long_is_a_400_and_leaves_nothing_running(open_engine_client) -> None:
    engine, client = open_engine_client
    r = client.post("/v1/completions", json={"prompt": ["Hi", "Hello", "word " * 5000, "Hey"], "max_tokens": 50})
    assert_error(r, 400, "context holds 4096", code="context_length_exceeded")
    deadline = time.monotonic() + 10
    while engine.turnstile.busy:  # the other prompts, started beside it, are withdrawn
        assert time.monotonic() < deadline, "a prompt of the refused list still runs"
        time.sleep(0.05)
    r = client.post("/v1/completions", json={"prompt": ["Hi", "Hello"], "max_tokens": 2, "n": 2, "logprobs": 1})
    choices = r.get_json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert all("".join(c["logprobs"]["tokens"]) == c["text"] for c in choices)


def test_a_long_embedding_request_is_kept_alive_and_answered_whole(engine: LlamaCppBackend) -> None:
    app = create_app(engine, token=None, keepalive=0.2).test_client()
    r = app.post("/v1/embeddings", json={"input": ["a sentence of some words to embed " * 8] * 40})
    assert r.status_code == 200
    text = r.get_data(as_text=True)
    assert text.startswith(" ")  # a keep-alive went out before the answer was ready
    answer = json.loads(text)
    assert len(answer["data"]) == 40 and answer["usage"]["prompt_tokens"] > 40 * 50
