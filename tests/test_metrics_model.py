"""/metrics and /slots through the real HTTP server with the real engine and model: a streamed
answer's tokens and its time to first token in the metrics, its slot idle afterwards holding
its cache, two streams writing side by side under their ids, the request followed by its id."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from llm_magic.engine.llama_cpp.backend import LlamaCppBackend
from llm_magic.models import ModelPolicy
from llm_magic.server.app import create_app
from llm_magic.server.httpserver import HttpServer

TOKEN = "model-metrics-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(model_path: Path) -> Iterator[str]:
    engine = LlamaCppBackend(model_path, policy=ModelPolicy(has_token=True), parallel=2)
    engine.load_default()
    server = HttpServer(create_app(engine, token=TOKEN), "127.0.0.1", 0, held=4).start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        engine.close()


def metrics(url: str) -> dict[str, float]:
    text = requests.get(url + "/metrics", headers=AUTH, timeout=30).text
    return {s.name + json.dumps(s.labels, sort_keys=True) * bool(s.labels): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def stream(url: str, rid: str, max_tokens: int, content: str = "Tell me a long story about a cat.") -> requests.Response:
    response = requests.post(url + "/v1/chat/completions", headers={**AUTH, "X-Request-Id": rid}, stream=True,
                             timeout=60, json={"messages": [{"role": "user", "content": content}], "stream": True,
                                               "max_tokens": max_tokens, "temperature": 0,
                                               "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["X-Request-Id"] == rid
    return response


def test_a_streamed_answer_shows_in_metrics_and_slots(served: str, caplog: pytest.LogCaptureFixture) -> None:
    before = metrics(served)
    assert before["llm_magic_model_loads_total"] == 1 and before["llm_magic_model_load_seconds_total"] > 0
    with caplog.at_level(logging.INFO, logger="llm_magic"):
        response = stream(served, "real-1", 12)
        events = [json.loads(line[6:]) for line in response.iter_lines(decode_unicode=True)
                  if line.startswith("data: ") and line != "data: [DONE]"]
    usage = events[-1]["usage"]
    after = metrics(served)
    assert after["llm_magic_generated_tokens_total"] - before.get("llm_magic_generated_tokens_total", 0) == \
        usage["completion_tokens"]
    assert after["llm_magic_prompt_tokens_total"] - before.get("llm_magic_prompt_tokens_total", 0) == \
        usage["prompt_tokens"]
    assert after["llm_magic_time_to_first_token_seconds_count"] == before["llm_magic_time_to_first_token_seconds_count"] + 1
    assert after["llm_magic_kv_cache_cells_used"] >= usage["prompt_tokens"]
    assert after["llm_magic_kv_cache_cells_total"] >= 2 * 4096 and after["llm_magic_slots_total"] == 2
    slots = requests.get(served + "/slots", headers=AUTH, timeout=30).json()
    assert slots["slots_busy"] == 0 and all(s["state"] == "idle" for s in slots["slots"])
    assert max(s["cache_tokens"] for s in slots["slots"]) >= usage["prompt_tokens"] + usage["completion_tokens"] - 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[real-1] ")]
    assert any("POST /v1/chat/completions 200 prompt=" in line and " ttft=" in line for line in lines), lines
    assert not any(TOKEN in r.getMessage() for r in caplog.records)


def test_two_streams_write_side_by_side_under_their_ids(served: str) -> None:
    responses = []
    for rid in ("side-a", "side-b"):  # a count goes on and on: both are still writing when asked
        response = requests.post(served + "/v1/completions", headers={**AUTH, "X-Request-Id": rid}, stream=True,
                                 timeout=60, json={"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "stream": True,
                                                   "max_tokens": 400, "temperature": 0})
        assert response.headers["X-Request-Id"] == rid
        responses.append(response)
    try:
        for response in responses:  # until each answer's first text came
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0].get("text"):
                    break
        slots = requests.get(served + "/slots", headers=AUTH, timeout=30).json()
        busy = {s["request"]["id"]: s for s in slots["slots"] if s["state"] != "idle"}
        assert set(busy) == {"side-a", "side-b"}, slots
        assert all(s["state"] == "writing" and s["request"]["route"] == "/v1/completions"
                   and s["request"]["tokens"] >= 1 for s in busy.values()), slots
    finally:
        for response in responses:
            response.close()
