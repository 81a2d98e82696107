"""The real server process on 127.0.0.1 with the real model, used as clients would use it:
the seed README's own code, the official openai SDK, and llm_magic.Client."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from llm_magic import ApiHost, Client
from llm_magic.errors import AuthenticationError, HostUnreachable, InvalidRequest, ModelNotAllowed

from .conftest import free_port


def test_seed_readme_client_code_gets_answers(host: ApiHost) -> None:
    # The seed README's payload, verbatim apart from the token and url.
    payload = {
        "token": host.token,
        "task": "text_generation",
        "repo_id": None,
        "file_name": None,
        "inputs": "Hello ! Today I can do these activities:",
        "parameters": {},
        "options": {},
    }
    anwser = requests.post(f"{host.url}/api", json=payload, timeout=60)
    generated_text = anwser.json()["answer"]["content"]
    assert anwser.status_code == 200 and generated_text.strip()

    payload["inputs"] = [
        {"role": "system", "content": "You are an assistant specialized in story writing"},
        {"role": "user", "content": "Write a story about a cat stealing food from its owner."},
    ]
    payload["parameters"] = {"max_tokens": 30}
    payload["options"] = {"ctx_lenght": 4096}
    anwser = requests.post(f"{host.url}/api", json=payload, timeout=60)
    assert anwser.status_code == 200 and anwser.json()["answer"]["content"].strip()


def test_bad_requests_to_the_process_are_json_4xx_and_it_keeps_serving(host: ApiHost) -> None:
    for body in ('{"inputs": ', '{"token": "%s", "inputs": 5}' % host.token, "[]"):
        r = requests.post(f"{host.url}/api", data=body, timeout=30, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500 and r.json()["error"]["message"]
    r = requests.get(f"{host.url}/missing", timeout=30)
    assert r.status_code == 404 and r.headers["Content-Type"] == "application/json"
    assert requests.get(f"{host.url}/health", timeout=30).json()["status"] == "ok"


def test_client_leaving_mid_stream_frees_the_model_at_once(open_host: ApiHost) -> None:
    before = requests.get(f"{open_host.url}/health", timeout=10).json()["completion_tokens"]
    r = requests.post(f"{open_host.url}/v1/completions", stream=True, timeout=60,
                      json={"prompt": "word " * 100, "max_tokens": 3000, "stream": True, "temperature": 0})
    chunks = 0
    for line in r.iter_lines():
        chunks += line.startswith(b"data:")
        if chunks == 10:
            break
    r.close()
    left = time.monotonic()
    while (health := requests.get(f"{open_host.url}/health", timeout=10).json())["slots_busy"]:
        assert time.monotonic() - left < 3, "the abandoned stream still holds its slot"
        time.sleep(0.05)
    assert 10 <= health["completion_tokens"] - before < 60  # it stopped within a few tokens, not at 3000
    started = time.monotonic()
    answer = requests.post(f"{open_host.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60)
    assert answer.status_code == 200 and time.monotonic() - started < 5


def test_openai_sdk_chats_streams_and_completes(host: ApiHost) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=host.url + "/v1", api_key=host.token)
    chat = client.chat.completions.create(model="default", max_tokens=12,
                                          messages=[{"role": "user", "content": "Say hi."}])
    assert chat.choices[0].message.content.strip() and chat.usage.completion_tokens <= 12

    stream = client.chat.completions.create(model="default", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Say hi."}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-1].usage.completion_tokens <= 12

    completion = client.completions.create(model="default", prompt="The sky is", max_tokens=5, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens == 5
    assert [m.id for m in client.models.list()] == [host.model_name]
    client.close()


def test_openai_sdk_sees_a_wrong_token_as_authentication_error(host: ApiHost) -> None:
    import openai

    client = openai.OpenAI(base_url=host.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}])
    client.close()


def test_llm_magic_client(host: ApiHost) -> None:
    with Client(host.url, host.token) as client:
        answer = client.chat("Say hi.", max_tokens=8, temperature=0)
        assert answer.text.strip() and answer.usage["completion_tokens"] <= 8
        assert answer.model == host.model_name and answer.timings["predicted_n"] == answer.usage["completion_tokens"]
        stream = client.chat_stream([{"role": "user", "content": "Say hi."}], system="Be brief.",
                                    max_tokens=8, temperature=0)
        deltas = list(stream)
        assert "".join(deltas) == stream.answer.text and stream.answer.usage["completion_tokens"] <= 8
        completion = client.complete("1, 2, 3,", max_tokens=4, temperature=0)
        streamed = client.complete_stream("1, 2, 3,", max_tokens=4, temperature=0)
        assert "".join(streamed) == completion.text and streamed.answer.finish_reason == "length"
        assert client.models() == [host.model_name]
        assert client.health()["status"] == "ok"


def test_client_errors_say_what_to_do(host: ApiHost, open_host: ApiHost) -> None:
    with pytest.raises(AuthenticationError, match="wrong token.*--token"):
        Client(host.url, "wrong").chat("x")
    with pytest.raises(AuthenticationError, match="needs its access token"):
        Client(host.url).chat("x")
    with pytest.raises(ModelNotAllowed, match="--allow-model"):
        Client(open_host.url).chat("x", model="org/other-GGUF:Q4_K_M")
    with pytest.raises(InvalidRequest, match="'temperature' must be between"):
        Client(open_host.url).chat("x", temperature=9)
    with pytest.raises(HostUnreachable, match=r"cannot reach .* is the host running and the URL right\? \(connection refused\)"):
        Client(f"http://127.0.0.1:{free_port()}", retries=0).chat("x")


def test_client_accepts_a_v1_base_url(open_host: ApiHost) -> None:
    assert Client(open_host.url + "/v1/").complete("x", max_tokens=1).usage["completion_tokens"] == 1


def test_hub_model_requested_through_api_is_downloaded_and_served(hub, model_path: Path) -> None:
    with ApiHost(port=0, token="t" * 24) as h:
        r = requests.post(f"{h.url}/api", timeout=120, json={
            "token": h.token, "repo_id": "test-org/SmolLM2-GGUF", "file_name": "SmolLM2.Q8_0.gguf",
            "inputs": "Hi", "parameters": {"max_tokens": 3}})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "test-org/SmolLM2-GGUF:SmolLM2.Q8_0.gguf"
        r = requests.post(f"{h.url}/api", timeout=120, json={"token": h.token, "repo_id": "test-org/nope",
                                                             "inputs": "Hi"})
        assert r.status_code == 404 and "no model repository 'test-org/nope'" in r.json()["error"]["message"]
        assert requests.get(f"{h.url}/health", timeout=10).json()["model"] == "test-org/SmolLM2-GGUF:SmolLM2.Q8_0.gguf"


def test_client_works_against_llama_cpp_server(llama_cpp_server: str) -> None:
    with Client(llama_cpp_server + "/v1") as client:
        assert client.models()
        answer = client.chat("Say hi.", max_tokens=8, temperature=0)
        assert answer.text.strip() and answer.usage["completion_tokens"] <= 8
        stream = client.chat_stream("Say hi.", max_tokens=8, temperature=0)
        assert "".join(stream).strip() == stream.answer.text.strip()
        assert client.complete("1, 2, 3,", max_tokens=3, temperature=0).text
        assert client.health()["status"] == "ok"


def test_one_connection_carries_many_requests(open_host: ApiHost) -> None:
    """Keep-alive: answers, a stream and an error on one TCP connection, each complete, so
    clients (and cloudflared) do not pay for a new connection per request; a body over the limit
    still gets its JSON 413."""
    import http.client
    import json
    from urllib.parse import urlsplit

    conn = http.client.HTTPConnection(urlsplit(open_host.url).netloc, timeout=60)
    headers = {"Content-Type": "application/json"}
    sockets = []  # the connection's socket after each answer (None once the server closed it)

    def call(method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        sockets.append(conn.sock)
        return response.status, data

    try:
        status, body = call("GET", "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, body = call("POST", "/v1/completions", b'{"prompt": "Hi", "max_tokens": 3, "stream": true}')
        assert status == 200 and body.endswith(b"data: [DONE]\n\n")
        status, body = call("POST", "/api", b'{"inputs": "Hi", "parameters": {"max_tokens": 2}}')
        assert status == 200 and json.loads(body)["answer"]["content"]
        status, body = call("POST", "/api", b'{"inputs": 5}')
        assert status == 400 and json.loads(body)["error"]["code"] == 400
        assert sockets[0] is not None and all(s is sockets[0] for s in sockets)  # one connection
    finally:
        conn.close()
    # A body over the limit is refused before it is read (and that connection is closed).
    r = requests.post(f"{open_host.url}/api", data=b'{"inputs": "' + b"x" * (5 * 1024 * 1024) + b'"}',
                      headers=headers, timeout=60)
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
