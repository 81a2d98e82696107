"""The Flask app around the real engine and model, through Flask's test client: every route,
both token modes, streaming, and every error class as JSON."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterator

import pytest

from llm_magic.engine import Engine
from llm_magic.models import ModelPolicy
from llm_magic.server import create_app

TOKEN = "s3cret-token-for-tests"
CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[Engine]:
    e = Engine(model_path, policy=ModelPolicy(has_token=True))
    e.load_default()
    yield e
    e.close()


@pytest.fixture
def client(engine: Engine):
    return create_app(engine, token=TOKEN).test_client()


@pytest.fixture
def open_client(model_path: Path):
    e = Engine(model_path, policy=ModelPolicy(has_token=False))
    yield create_app(e, token=None).test_client()
    e.close()


def assert_error(response, status: int, match: str) -> dict:
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == status
    assert match in body["error"]["message"], body["error"]["message"]
    return body["error"]


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


def test_bearer_token_works_on_api_too(client) -> None:
    r = client.post("/api", json={"inputs": "x", "parameters": {"max_tokens": 1}},
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200


@pytest.mark.parametrize("kwargs, match", [
    ({"json": {"inputs": "x"}}, "needs its access token"),
    ({"json": {"inputs": "x", "token": "wrong"}}, "wrong token"),
    ({"json": {"inputs": "x", "token": 12345}}, "wrong token"),
    ({"json": {"inputs": "x"}, "headers": {"Authorization": "Bearer nope"}}, "wrong token"),
])
def test_missing_or_wrong_token_is_401(client, kwargs: dict, match: str) -> None:
    assert_error(client.post("/api", **kwargs), 401, match)


def test_v1_routes_need_the_bearer_token(client) -> None:
    assert_error(client.get("/v1/models"), 401, "needs its access token")
    assert_error(client.post("/v1/chat/completions", json={"messages": CHAT}), 401, "needs its access token")


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
def test_bad_bodies_are_400_json(client, data: bytes, match: str) -> None:
    r = client.post("/api", data=data, headers={"Authorization": f"Bearer {TOKEN}",
                                                "Content-Type": "application/json"})
    assert_error(r, 400, match)


def test_unknown_route_wrong_method_and_big_body_are_json(client, engine: Engine) -> None:
    assert_error(client.get("/nope"), 404, "no route GET /nope")
    assert_error(client.get("/api"), 405, "GET is not allowed on /api")
    big = create_app(engine, token=None, max_body=1000).test_client()
    assert_error(big.post("/api", data=b'{"inputs": "' + b"x" * 5000 + b'"}'), 413, "larger than 1000 bytes")


def test_prompt_longer_than_context_is_400(client) -> None:
    r = client.post("/api", json={"token": TOKEN, "inputs": "word " * 5000})
    assert_error(r, 400, "context holds 4096")


def test_busy_host_answers_503_with_retry_after(model_path: Path) -> None:
    e = Engine(model_path, max_queue=0)
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
    assert_error(r, 400, "'temperature' must be a number, not a string")


def test_the_response_tells_the_generation_when_its_first_text_has_gone_out() -> None:
    """The next token's decode would compete for the cores with sending the first one, so a
    generation running alone waits for the response to pass its first text on (the engine's
    side, and that later tokens do not wait, are tested in test_engine)."""
    import time

    from llm_magic.protocol import Completion, Started
    from llm_magic.server import _Pump

    log: list[str] = []

    class ScriptedEngine:  # stands in for Engine.generate: only the hand-over is under test
        def generate(self, request: object, cancel: threading.Event,
                     first_text_passed: threading.Event, tick: float) -> Iterator[object]:
            yield Started("scripted", 1)
            for piece in ("a", "b", "c"):
                log.append(f"made {piece}")
                yield piece
                if piece == "a":
                    first_text_passed.wait(5)
            yield Completion("abc", "scripted", "length", 1, 3, {})

    for _ in range(2):
        log.clear()
        pump = _Pump(ScriptedEngine(), None)  # type: ignore[arg-type]
        assert isinstance(pump.get(5), Started)
        for event in pump.events(keepalive=60, gone=lambda: False):
            if isinstance(event, str):
                time.sleep(0.05)  # sending takes a while; a generation that did not wait runs ahead
                log.append(f"sent {event}")
        assert log.index("sent a") < log.index("made b")


def test_cors_is_off_by_default_and_answers_preflights_for_allowed_origins(engine: Engine) -> None:
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
