"""/metrics, /slots, request ids and the access log, over the scripted backend (no model): the
metrics text read with prometheus-client's own parser, counters moving by exactly a known
request's tokens, one histogram observation per request, the token asked for and never written
anywhere."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_magic.errors import HostBusy
from llm_magic.server.app import create_app
from llm_magic.server.metrics import request_id_from
from tests.fake_backend import Reply, ScriptedBackend

TOKEN = "metrics-secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET_PROMPT = "purple elephant recipe"


def serve(*replies: Reply, **kwargs):
    backend = ScriptedBackend(list(replies) or [Reply("One two three four.")])
    app_kwargs = {k: kwargs.pop(k) for k in ("log_prompts", "extra_status", "token") if k in kwargs}
    app_kwargs.setdefault("token", TOKEN)
    return backend, create_app(backend, **app_kwargs).test_client()


def samples(client, headers=AUTH) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200 and response.mimetype == "text/plain"
    found = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def chat(client, text: str = SECRET_PROMPT, stream: bool = False, headers=AUTH):
    response = client.post("/v1/chat/completions", headers=headers,
                           json={"messages": [{"role": "user", "content": text}], "stream": stream})
    if stream:
        response.get_data()
        response.close()
    return response


def test_metrics_need_the_token_and_are_prometheus_text() -> None:
    _, client = serve()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    found = samples(client)
    assert value(found, "llm_magic_slots_total") == 4 and value(found, "llm_magic_queue_length") == 0
    assert value(found, "llm_magic_kv_cache_cells_total") == 4096 and value(found, "llm_magic_model_loads_total") == 1
    assert TOKEN not in client.get("/metrics", headers=AUTH).get_data(as_text=True)
    _, open_client = serve(token=None)
    assert open_client.get("/metrics").status_code == 200  # a host without a token serves it openly


def test_counters_move_by_exactly_the_tokens_of_a_request_and_histograms_by_one() -> None:
    _, client = serve(Reply("One two three four."))
    before = samples(client)
    chat(client, "three words here")  # the scripted backend: 3 prompt tokens, 4 pieces
    chat(client, "three words here", stream=True)
    after = samples(client)
    assert value(after, "llm_magic_prompt_tokens_total") - value(before, "llm_magic_prompt_tokens_total") == 6
    assert value(after, "llm_magic_generated_tokens_total") - value(before, "llm_magic_generated_tokens_total") == 8
    route = "/v1/chat/completions"
    assert value(after, "llm_magic_requests_total", route=route, status="200") == 2
    assert value(after, "llm_magic_time_to_first_token_seconds_count") == 2
    assert value(after, "llm_magic_request_duration_seconds_count", route=route) == 2
    assert value(after, "llm_magic_requests_total", route="/metrics", status="200") == 1  # the first scrape


def test_refusals_clients_that_left_and_the_tunnel_are_counted() -> None:
    tunnel = {"state": "ready", "restarts": 2, "public_url": "https://x.trycloudflare.com"}
    backend, client = serve(Reply(error=HostBusy("the line is full", retry_after=3)), extra_status=lambda: {"tunnel": tunnel})
    assert chat(client).status_code == 503
    found = samples(client)
    assert value(found, "llm_magic_busy_refusals_total") == 1
    assert value(found, "llm_magic_tunnel_up") == 1 and value(found, "llm_magic_tunnel_restarts_total") == 2
    tunnel["state"] = "restarting"
    assert value(samples(client), "llm_magic_tunnel_up") == 0

    backend.replies = [Reply("a b c d e f g h", piece_delay=0.05)]
    response = client.post("/v1/chat/completions", headers=AUTH, buffered=False,
                           json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
    chunks = iter(response.response)
    next(chunks), next(chunks)  # the answer began ...
    response.close()  # ... and its client left
    assert value(samples(client), "llm_magic_clients_left_total") == 1


def test_request_ids_are_kept_or_made_and_on_every_response() -> None:
    _, client = serve()
    assert chat(client, headers={**AUTH, "X-Request-Id": "job-42/step.1"}).headers["X-Request-Id"] == "job-42/step.1"
    made = chat(client).headers["X-Request-Id"]
    assert len(made) == 32 and made != chat(client).headers["X-Request-Id"]
    for response in (client.get("/nowhere"), client.get("/metrics"), client.post("/api", data="x"),
                     client.get("/health")):
        assert len(response.headers["X-Request-Id"]) == 32, response.status_code
    for bad in ("a" * 129, "has space", "tab\there", "ünïcode", f"x{TOKEN}x"):
        assert request_id_from(bad, TOKEN) != bad
    assert request_id_from("a" * 128, TOKEN) == "a" * 128


def test_one_access_log_line_per_request_without_token_or_prompt(caplog: pytest.LogCaptureFixture) -> None:
    _, client = serve()
    with caplog.at_level(logging.INFO, logger="llm_magic"):
        chat(client, headers={**AUTH, "X-Request-Id": "follow-me"})
        chat(client, stream=True)
        client.post("/api", json={"token": TOKEN, "inputs": SECRET_PROMPT})
        client.post("/api", json={"token": "not-" + TOKEN, "inputs": SECRET_PROMPT})  # a wrong token
        client.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}x"})
        client.get("/slots", headers=AUTH)
        client.get("/metrics", headers={"X-Request-Id": TOKEN})  # the token as an id: not kept
    lines = [r.getMessage() for r in caplog.records]
    access = [line for line in lines if " client=" in line]
    assert len(access) == 7, lines
    assert all(TOKEN not in line and SECRET_PROMPT not in line for line in lines)
    first = access[0]
    assert first.startswith("[follow-me] POST /v1/chat/completions 200 prompt=3 completion=4 ")
    assert "client=127.0.0.1" in first and " ttft=" in first
    assert " 401 " in access[3] and " 401 " in access[4]


def test_log_prompts_writes_the_start_of_the_prompt(caplog: pytest.LogCaptureFixture) -> None:
    _, client = serve(log_prompts=True)
    with caplog.at_level(logging.INFO, logger="llm_magic"):
        chat(client)
    line = next(r.getMessage() for r in caplog.records if " client=" in r.getMessage())
    assert f'prompt_text="{SECRET_PROMPT}"' in line and TOKEN not in line


def test_slots_shows_two_concurrent_streams_writing_with_their_ids() -> None:
    backend, client = serve(Reply("a b c d e f g h i j", piece_delay=0.05))
    assert client.get("/slots").status_code == 401
    idle = client.get("/slots", headers=AUTH).get_json()
    assert idle["slots_busy"] == 0 and idle["slots_total"] == 4 and {s["state"] for s in idle["slots"]} == {"idle"}
    streams = []
    for rid in ("stream-one", "stream-two"):
        response = client.post("/v1/chat/completions", headers={**AUTH, "X-Request-Id": rid}, buffered=False,
                               json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
        chunks = iter(response.response)
        next(chunks), next(chunks)  # its first piece went out
        streams.append((response, chunks))
    body = client.get("/slots", headers=AUTH).get_json()
    writing = [s for s in body["slots"] if s["state"] == "writing"]
    assert body["slots_busy"] == 2 and len(writing) == 2
    assert {s["request"]["id"] for s in writing} == {"stream-one", "stream-two"}
    assert all(s["request"]["route"] == "/v1/chat/completions" and s["request"]["tokens"] >= 1 for s in writing)
    assert TOKEN not in json.dumps(body)
    for response, chunks in streams:
        list(chunks)
        response.close()
    assert client.get("/slots", headers=AUTH).get_json()["slots_busy"] == 0
    assert "decode_tokens_per_second" in client.get("/health").get_json()
