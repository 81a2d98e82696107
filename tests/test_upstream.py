"""The host in front of another engine (``--engine URL``): every route through an
OpenAI-compatible engine, its structured tool calls passed through, its refusals and failures as
JSON errors naming it, a client that leaves closing the engine's request. A scripted engine for
the shapes; the real model behind llama-cpp-python's own server for the real thing."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Iterator

import pytest
import requests

from llm_magic.engine.upstream.backend import UpstreamBackend
from llm_magic.server.app import create_app
from tests.local_http import serving

CHAT = [{"role": "user", "content": "Say hello"}]
KEY = "engine-secret"


class Engine:
    """What the scripted engine does; tests change it."""

    reply = ["Hello", " from", " upstream."]
    tool_call: tuple[str, str] | None = None
    status = 200
    error = ""
    delay = 0.0
    tokenizer: str | None = None  # whose /tokenize it has: "vllm", "llama-server" or none
    stop_reason: str | None = None  # vLLM's: the stop string the answer ended on
    seen: list[dict] = []
    gone = threading.Event()


def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, **more: object) -> bytes:
    body: dict = {"id": "x", "object": "chat.completion.chunk", "model": "upstream-model",
                  "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **more}]}
    if usage is not None:
        body = {**body, "choices": [], "usage": usage}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "upstream-model"}, {"id": "embedder"}]})
        else:
            self._json(404, {"error": {"message": "no such route"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Engine.seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if Engine.status != 200:
            return self._json(Engine.status, {"error": {"message": Engine.error}})
        if self.path in ("/tokenize", "/apply-template"):
            return self._tokenizer(body)
        if self.path == "/v1/embeddings":
            return self._json(200, {"data": [{"index": i, "embedding": [0.6, 0.8]} for i, _ in enumerate(body["input"])],
                                    "model": "embedder", "usage": {"prompt_tokens": 3}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            time.sleep(Engine.delay)
            for piece in Engine.reply:
                self.wfile.write(chunk({"content": piece}))
                self.wfile.flush()
                time.sleep(0.02)
            if Engine.tool_call:
                name, args = Engine.tool_call
                self.wfile.write(chunk({"tool_calls": [{"index": 0, "id": "call_up", "type": "function",
                                                        "function": {"name": name, "arguments": ""}}]}))
                self.wfile.write(chunk({"tool_calls": [{"index": 0, "function": {"arguments": args}}]}))
            self.wfile.write(chunk({}, "tool_calls" if Engine.tool_call else "stop", stop_reason=Engine.stop_reason))
            self.wfile.write(chunk({}, usage={"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            Engine.gone.set()

    def _tokenizer(self, body: dict) -> None:
        """vLLM's /tokenize counts a chat; llama-server's renders it (/apply-template), then
        tokenizes text (and answers an empty list for a chat)."""
        prompt = "".join(m["content"] for m in body.get("messages") or ())
        if Engine.tokenizer == "vllm" and self.path == "/tokenize":
            return self._json(200, {"count": len(prompt.split()) + 3, "tokens": [], "max_model_len": 2048})
        if Engine.tokenizer == "llama-server" and self.path == "/apply-template":
            return self._json(200, {"prompt": "<|user|>" + prompt})
        if Engine.tokenizer == "llama-server":
            return self._json(200, {"tokens": list(range(len(body.get("content", "").split())))})
        self._json(404, {"error": {"message": "File Not Found"}})


@pytest.fixture
def engine_url() -> Iterator[str]:
    Engine.reply, Engine.tool_call, Engine.status, Engine.delay = ["Hello", " from", " upstream."], None, 200, 0.0
    Engine.seen, Engine.tokenizer, Engine.stop_reason = [], None, None
    Engine.gone = threading.Event()
    with serving(Handler) as url:
        yield url


@pytest.fixture
def client(engine_url: str):
    backend = UpstreamBackend(engine_url + "/v1", key=KEY)
    backend.load_default()
    yield create_app(backend, token="t", keepalive=0.2).test_client()
    backend.close()


AUTH = {"Authorization": "Bearer t"}


def test_chat_goes_through_the_engine_with_its_key_and_model(client) -> None:
    body = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 20, "top_k": 5},
                       headers=AUTH).get_json()
    assert body["choices"][0]["message"]["content"] == "Hello from upstream."
    assert body["model"] == "upstream-model" and body["usage"]["prompt_tokens"] == 7
    sent = Engine.seen[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == f"Bearer {KEY}"
    assert sent["body"]["messages"] == CHAT and sent["body"]["max_tokens"] == 20 and sent["body"]["top_k"] == 5
    assert "min_p" not in sent["body"]  # llama.cpp's own fields go only when asked for


def test_the_seed_api_and_responses_are_translated_onto_chat(client) -> None:
    answer = client.post("/api", json={"token": "t", "inputs": CHAT}).get_json()
    assert answer["answer"]["content"] == "Hello from upstream." and answer["finish_reason"] == "stop"
    response = client.post("/v1/responses", json={"input": "Say hello"}, headers=AUTH).get_json()
    assert response["output"][0]["content"][0]["text"] == "Hello from upstream."
    assert [s["path"] for s in Engine.seen] == ["/v1/chat/completions"] * 2


def test_the_engines_tool_calls_pass_through_whole_and_streamed(client) -> None:
    Engine.reply, Engine.tool_call = [], ("get_weather", '{"city": "Paris"}')
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = client.post("/v1/chat/completions", json={"messages": CHAT, "tools": tools, "tool_choice": "required"},
                       headers=AUTH).get_json()
    call = body["choices"][0]["message"]["tool_calls"][0]
    assert call["id"] == "call_up" and call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert Engine.seen[-1]["body"]["tools"][0]["function"]["name"] == "get_weather"
    assert Engine.seen[-1]["body"]["tool_choice"] == "required"
    text = client.post("/v1/chat/completions", json={"messages": CHAT, "tools": tools, "stream": True},
                       headers=AUTH).get_data(as_text=True)
    assert '"id":"call_up"' in text and "get_weather" in text and text.rstrip().endswith("[DONE]")


@pytest.mark.parametrize("tokenizer, expected", [("vllm", 5), ("llama-server", 2)])
def test_count_tokens_asks_the_engines_tokenizer(client, tokenizer: str, expected: int) -> None:
    Engine.tokenizer = tokenizer
    r = client.post("/v1/messages/count_tokens", headers={"x-api-key": "t"},
                    json={"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "Say hello"}]})
    assert r.status_code == 200 and r.get_json() == {"input_tokens": expected}
    first = Engine.seen[0]["body"]
    assert first["messages"] == CHAT and first["add_generation_prompt"] is True and "stream" not in first
    if tokenizer == "llama-server":
        assert Engine.seen[-1] == {"path": "/tokenize", "auth": f"Bearer {KEY}",
                                   "body": {"content": "<|user|>Say hello", "add_special": True}}


def test_count_tokens_without_a_tokenizer_is_a_clear_error_and_stop_sequences_pass_through(client) -> None:
    r = client.post("/v1/messages/count_tokens", headers={"x-api-key": "t"},
                    json={"model": "m", "messages": [{"role": "user", "content": "Say hello"}]})
    assert r.status_code == 501 and "/tokenize" in r.get_json()["error"]["message"]
    assert r.get_json()["type"] == "error"
    Engine.stop_reason = "###"
    body = client.post("/v1/messages", headers={"x-api-key": "t"}, json={
        "model": "m", "max_tokens": 20, "stop_sequences": ["###"], "messages": [{"role": "user", "content": "Hi"}]})
    assert body.get_json()["stop_reason"] == "stop_sequence" and body.get_json()["stop_sequence"] == "###"


def test_embeddings_and_models_come_from_the_engine(client) -> None:
    body = client.post("/v1/embeddings", json={"input": ["a", "b"]}, headers=AUTH).get_json()
    assert [d["embedding"] for d in body["data"]] == [[0.6, 0.8], [0.6, 0.8]]
    listed = {m["id"] for m in client.get("/v1/models", headers=AUTH).get_json()["data"]}
    assert {"upstream-model", "embedder"} <= listed


def test_health_shows_the_engine_never_its_key(client, engine_url: str) -> None:
    health = client.get("/health").get_json()
    assert health["engine"]["url"] == engine_url and health["engine"]["state"] == "ok"
    assert KEY not in json.dumps(health)


@pytest.mark.parametrize("status, expected", [(400, 400), (503, 503), (500, 502), (401, 502)])
def test_the_engines_refusals_are_json_errors(client, status: int, expected: int) -> None:
    Engine.status, Engine.error = status, "the engine's own words"
    r = client.post("/v1/chat/completions", json={"messages": CHAT}, headers=AUTH)
    assert r.status_code == expected and r.mimetype == "application/json"
    message = r.get_json()["error"]["message"]
    assert ("the engine's own words" in message) or "--engine-key" in message
    if expected == 503:
        assert r.headers["Retry-After"]


def test_an_engine_that_is_down_is_a_502_naming_it() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = UpstreamBackend(f"http://127.0.0.1:{port}")
    client = create_app(backend, token=None).test_client()
    r = client.post("/v1/chat/completions", json={"messages": CHAT})
    assert r.status_code == 502 and f"127.0.0.1:{port}" in r.get_json()["error"]["message"]
    assert r.get_json()["error"]["code"] == "engine_unavailable"
    assert client.get("/health").get_json()["engine"]["state"] == "down"


def test_a_slow_engine_is_kept_alive_and_a_client_that_leaves_closes_the_engines_request(engine_url: str) -> None:
    from llm_magic.server.httpserver import HttpServer

    Engine.delay, Engine.reply = 0.6, ["slow"] * 200
    backend = UpstreamBackend(engine_url)
    backend.load_default()
    server = HttpServer(create_app(backend, token=None, keepalive=0.2), "127.0.0.1", 0).start()
    try:
        with requests.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", stream=True, timeout=10,
                           json={"messages": CHAT, "stream": True}) as r:
            lines = r.iter_lines()
            assert b'"role":"assistant"' in next(lines)  # the answer began: the engine took it
            assert next(line for line in lines if line) == b": keep-alive"  # while it reads the prompt
        assert Engine.gone.wait(10)  # the engine saw its request end
    finally:
        server.stop()
        backend.close()


def test_llm_magic_serve_in_front_of_a_real_engine(llama_cpp_server: str, closing) -> None:
    """``llm-magic serve --engine URL`` before llama-cpp-python's own server with the real
    model: the openai SDK, the seed /api and a stream, all answered by the engine."""
    from openai import OpenAI

    from llm_magic.supervisor.host import ApiHost

    host = ApiHost(use_token=True, port=0, tunnel="none", extra_args=["--engine", llama_cpp_server]).start()
    try:
        sdk = closing(OpenAI(base_url=host.url + "/v1", api_key=host.token, max_retries=0, timeout=60))
        answer = sdk.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content and answer.model == "smollm2"
        assert answer.usage.completion_tokens <= 8
        seed = requests.post(host.url + "/api", json={"token": host.token, "inputs": "Paris is the capital of",
                                                       "parameters": {"max_tokens": 5, "temperature": 0}}, timeout=60)
        assert seed.status_code == 200 and seed.json()["answer"]["content"]
        streamed = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
            model="smollm2", messages=CHAT, max_tokens=8, temperature=0, stream=True) if c.choices)
        assert streamed == answer.choices[0].message.content
        health = requests.get(host.url + "/health", timeout=10).json()
        assert health["engine"]["kind"] == "upstream" and health["engine"]["url"] == llama_cpp_server
    finally:
        host.stop()


def test_llm_host_status_names_the_engine_and_whether_it_answers() -> None:
    from llm_magic.notebook.host_commands import engine_line

    assert engine_line({"kind": "llama.cpp", "device": "CPU"}) is None  # the device rows say it
    assert engine_line({"kind": "upstream", "url": "http://h:8000", "state": "ok", "models": ["m"],
                        "process": "vllm"}) == "vllm at http://h:8000: ok (serving m)"
    down = engine_line({"kind": "upstream", "url": "http://h:8000", "state": "down",
                        "error": "the engine at http://h:8000 does not answer (connection refused)"})
    assert down == "the engine at http://h:8000: down; the engine at http://h:8000 does not answer (connection refused)"


def _llama_cpp_server(model_path, port: int):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--model_alias", "smollm2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).ok:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait(10)
    pytest.fail("llama_cpp.server did not start")


def test_a_real_engine_killed_mid_stream_is_an_error_event_and_the_host_recovers_when_it_returns(model_path) -> None:
    """llama-cpp-python's own server killed while it streams: the client gets an error event
    (not a cut connection), the host stays up and says its engine is down, and once the engine
    is back on its port the next request is answered, with no restart of the host."""
    from llm_magic.supervisor.host import ApiHost

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = _llama_cpp_server(model_path, port)
    host = ApiHost(use_token=False, port=0, tunnel="none", extra_args=["--engine", f"http://127.0.0.1:{port}"])
    try:
        host.start()
        with requests.post(host.url + "/v1/chat/completions", stream=True, timeout=60, json={
                "messages": [{"role": "user", "content": "Count from 1 to 500, one number per line."}],
                "max_tokens": 1000, "temperature": 0, "stream": True}) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if b'"content"' in line)  # it writes
            engine.kill()
            rest = [line for line in lines if line.startswith(b"data:")]
        errors = [json.loads(line[5:])["error"] for line in rest if b'"error"' in line]
        assert errors and f"127.0.0.1:{port}" in errors[0]["message"]  # named, in the stream
        assert b'"error"' in rest[-1]  # the stream's last word: no answer passed off as whole
        health = engine_state(host.url, "down")  # asked again once its cached state is old
        assert health["status"] == "degraded" and health["engine"]["state"] == "down"
        refused = requests.post(host.url + "/v1/chat/completions", timeout=30, json={"messages": CHAT, "max_tokens": 4})
        assert refused.status_code == 502 and refused.json()["error"]["code"] == "engine_unavailable"
        engine.wait(10)
        engine = _llama_cpp_server(model_path, port)  # back
        answer = requests.post(host.url + "/v1/chat/completions", timeout=60,
                               json={"messages": CHAT, "max_tokens": 4, "temperature": 0})
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
        assert engine_state(host.url, "ok")["engine"]["state"] == "ok"
    finally:
        host.stop()
        engine.kill()
        engine.wait(10)


def engine_state(url: str, state: str, within: float = 20.0) -> dict:
    """The host's /health once it says the engine is ``state`` (or at the deadline)."""
    deadline = time.monotonic() + within
    while True:
        health = requests.get(url + "/health", timeout=10).json()
        if health["engine"]["state"] == state or time.monotonic() > deadline:
            return health
        time.sleep(0.5)
