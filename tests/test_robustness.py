"""Load, disconnects and faults against real server processes."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from llm_magic import ApiHost, Client
from llm_magic.errors import HostUnreachable

LONG = {"prompt": "word " * 100, "max_tokens": 3000, "temperature": 0}


def health(host: ApiHost) -> dict:
    return requests.get(f"{host.url}/health", timeout=10).json()


def raw_post(host: ApiHost, path: str, body: bytes) -> socket.socket:
    """Send a request on a raw socket (so the test can hang up without reading the answer)."""
    port = int((host.url or "").rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), len(body), body))
    return sock


def wait_for(predicate, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_many_concurrent_clients_all_get_answers_or_clean_503s() -> None:
    with ApiHost(use_token=False, port=0, max_queue=4) as host:
        def ask(i: int) -> requests.Response:
            return requests.post(f"{host.url}/api", timeout=120,
                                 json={"inputs": f"Count to {i}:", "parameters": {"max_tokens": 24, "temperature": 0}})

        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(ask, range(24)))
        ok = [r for r in responses if r.status_code == 200]
        busy = [r for r in responses if r.status_code == 503]
        assert len(ok) + len(busy) == 24, [r.status_code for r in responses]
        assert len(ok) >= 8  # four running (--parallel 4) and four waiting at any time, at least
        assert all(r.json()["usage"]["completion_tokens"] > 0 for r in ok)
        assert all(int(r.headers["Retry-After"]) > 0 and "busy" in r.json()["error"]["message"] for r in busy)
        status = health(host)
        assert status["queue"] == 0 and not status["busy"] and status["requests"] == len(ok)


def test_a_client_leaving_a_non_streaming_answer_frees_the_model_at_once() -> None:
    with ApiHost(use_token=False, port=0) as host:
        sock = raw_post(host, "/v1/completions", b'{"prompt": "%s", "max_tokens": 3000, "temperature": 0}'
                        % (b"word " * 100))
        assert wait_for(lambda: health(host)["busy"])
        sock.close()
        assert wait_for(lambda: not health(host)["busy"], within=3)
        spent = health(host)["completion_tokens"]
        assert spent < 1000  # stopped long before its 3,000 tokens
        started = time.monotonic()
        assert Client(host.url).complete("x", max_tokens=1).usage["completion_tokens"] == 1
        assert time.monotonic() - started < 2
        assert "the client left; generation stopped" in host.logs()
        assert "POST /v1/completions 499" in host.logs()  # not logged as answered


def test_a_client_leaving_a_list_of_prompts_stops_them_all() -> None:
    with ApiHost(use_token=False, port=0) as host:
        body = b'{"prompt": ["%s", "%s"], "max_tokens": 3000, "temperature": 0}' % (b"word " * 100, b"story " * 100)
        sock = raw_post(host, "/v1/completions", body)
        assert wait_for(lambda: health(host)["slots_busy"] == 2)  # side by side
        sock.close()
        assert wait_for(lambda: not health(host)["busy"], within=3)
        assert health(host)["completion_tokens"] < 2000
        assert "POST /v1/completions 499" in host.logs()


def test_a_client_leaving_the_queue_is_never_run() -> None:
    with ApiHost(use_token=False, port=0, extra_args=["--parallel", "1"]) as host:  # one slot: a line
        runner = requests.post(f"{host.url}/v1/completions", json={**LONG, "stream": True}, stream=True, timeout=60)
        lines = runner.iter_lines()  # kept: a dropped iterator closes the connection when collected
        next(lines)
        waiting = raw_post(host, "/api", b'{"inputs": "never run", "parameters": {"max_tokens": 5}}')
        assert wait_for(lambda: health(host)["queue"] == 1)
        waiting.close()
        assert wait_for(lambda: health(host)["queue"] == 0, within=3)
        runner.close()
        assert wait_for(lambda: not health(host)["busy"])
        assert health(host)["requests"] == 1  # only the runner's generation ever ran
        assert "POST /api 499" in host.logs()


def test_server_killed_while_a_client_waits(tmp_path: Path) -> None:
    host = ApiHost(use_token=False, port=0).start()
    client = Client(host.url, retries=0)
    errors: list[Exception] = []

    def wait_for_answer() -> None:
        try:
            client.complete("word " * 100, max_tokens=3000, temperature=0)
        except Exception as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_for_answer)
    waiter.start()
    assert wait_for(lambda: health(host)["busy"])
    os.kill(host.pid, signal.SIGKILL)
    waiter.join(30)
    assert len(errors) == 1 and isinstance(errors[0], HostUnreachable)
    # the connection drops as the process dies, a moment before its exit can be collected
    assert wait_for(lambda: host.status()["state"] == "failed", within=5)
    host.stop()


def test_a_broken_model_requested_later_is_refused_and_the_host_recovers(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with ApiHost(use_token=False, port=0, allow_models=[str(broken)]) as host:
        r = requests.post(f"{host.url}/v1/completions", json={"prompt": "x", "model": str(broken)}, timeout=60)
        assert r.status_code == 502 and "could not load broken.gguf" in r.json()["error"]["message"]
        r = requests.post(f"{host.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "SmolLM2-135M-Instruct.Q4_1"
        broken.unlink()  # a model deleted from under the host
        r = requests.post(f"{host.url}/v1/completions", json={"prompt": "x", "model": str(broken)}, timeout=60)
        assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
