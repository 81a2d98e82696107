"""An adversarial pass against real server processes, in bounded time: slow clients, oversized
headers and bodies, lone surrogates, path tricks, protocol junk, a request that asks for a huge
context, and a SIGKILL of ``serve`` with its cloudflared."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from llm_magic import ApiHost

from .test_tunnel import cloudflared  # noqa: F401  (a fixture)

TOKEN = "adversarial-token-" + "x" * 16


@pytest.fixture(scope="module")
def small_host() -> Iterator[ApiHost]:
    """A host with a token, a short line (--max-queue 2 and 4 slots: 6 + 16 workers) and room to grow its
    context to 6144 tokens on request."""
    h = ApiHost(port=0, token=TOKEN, max_queue=2, extra_args=["--max-ctx", "6144"]).start()
    yield h
    h.stop()


def address(host: ApiHost) -> tuple[str, int]:
    return "127.0.0.1", int((host.url or "").rsplit(":", 1)[1])


def exchange(host: ApiHost, data: bytes, timeout: float = 20) -> tuple[int, dict, bytes]:
    """Send raw bytes; read the answer until the server closes or the body is complete."""
    with socket.create_connection(address(host), timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        if not chunk:
            break
        raw += chunk
    if not raw:
        return 0, {}, b""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", -1))
    while length < 0 or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def assert_json_error(status: int, headers: dict, body: bytes, code: int, match: str = "") -> dict:
    assert status == code, (status, body)
    assert headers["content-type"].startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert error["code"] == code and match in error["message"], error
    return error


def health(host: ApiHost, timeout: float = 10) -> dict:
    return requests.get(f"{host.url}/health", timeout=timeout).json()


def api(host: ApiHost, **fields) -> requests.Response:
    return requests.post(f"{host.url}/api", timeout=60, json={"token": TOKEN, "inputs": "Hi", **fields})


def loads(host: ApiHost) -> int:
    return len(re.findall(r"llm_magic.engine: (?:\[[^\]]*\] )?loaded ", host.logs(10_000)))  # [request id]


# -- 1. the context a request may ask for ------------------------------------------------------


def test_a_huge_context_is_refused_before_any_memory_is_taken(small_host: ApiHost) -> None:
    before = loads(small_host)
    r = api(small_host, options={"ctx_length": 1_048_576})
    assert r.status_code == 400 and "more than this host allows (6144" in r.json()["error"]["message"]
    assert loads(small_host) == before and health(small_host)["status"] == "ok"


def test_alternating_contexts_do_not_reload_the_model(small_host: ApiHost) -> None:
    ask = lambda ctx: api(small_host, parameters={"max_tokens": 1}, options={"ctx_length": ctx})  # noqa: E731
    before = loads(small_host)
    assert ask(4097).status_code == 200  # larger than the resident 4096: one reload, for a token holder
    for ctx in (4096, 4097, 1024, 4097, 4096):  # each fits in the resident context now
        assert ask(ctx).status_code == 200
    assert loads(small_host) == before + 1


def test_a_context_beyond_what_the_model_was_trained_for_is_refused(tmp_path: Path) -> None:
    with ApiHost(port=0, token=TOKEN, extra_args=["--max-ctx", "65536"]) as host:
        r = api(host, options={"ctx_length": 9000})  # SmolLM2-135M was trained for 8192
        assert r.status_code == 400 and "trained for (8192)" in r.json()["error"]["message"]


def test_a_host_without_token_never_reloads_for_a_request(open_host: ApiHost) -> None:
    before = loads(open_host)
    r = requests.post(f"{open_host.url}/api", timeout=60, json={"inputs": "x", "options": {"ctx_length": 8192}})
    assert r.status_code == 400 and "more than this host allows (4096" in r.json()["error"]["message"]
    r = requests.post(f"{open_host.url}/api", timeout=60,
                      json={"inputs": "x", "parameters": {"max_tokens": 1}, "options": {"ctx_length": 512, "use_gpu": False}})
    assert r.status_code == 200  # fits in the resident model; GPU off changes nothing on a CPU build
    assert loads(open_host) == before


# -- 2. slow clients ------------------------------------------------------------------------------


def trickle(host: ApiHost, head: bytes, drip: bytes, every: float, answers: list) -> None:
    """Send ``head``, then one byte of ``drip`` every ``every`` s until the server answers;
    record the answer (status 0: closed without one, -1: reset) and how long it took."""
    started = time.monotonic()
    try:
        with socket.create_connection(address(host), timeout=every) as sock:
            sock.sendall(head)
            for byte in drip:
                try:
                    sock.recv(1, socket.MSG_PEEK)  # returns once the server answers or closes
                    break
                except TimeoutError:
                    sock.sendall(bytes([byte]))
            sock.settimeout(30)
            answer = read_response(sock)
    except ConnectionResetError:  # it closed while a byte was under way
        answer = (-1, {}, b"")
    answers.append((*answer, time.monotonic() - started))


def test_slow_clients_are_cut_and_health_keeps_answering(small_host: ApiHost) -> None:
    workers = 2 + 4 + 16  # --max-queue 2 plus the 4 running (--parallel), plus the spare workers
    answers: list = []
    slow_head = (b"POST /api HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"a" * 100)  # 100 bytes: 50 s
    slow_body = (b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n",
                 b" " * 100)
    threads = [threading.Thread(target=trickle, args=(small_host, *(slow_head if i % 2 else slow_body), 0.5, answers))
               for i in range(workers + 6)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # every worker is taken by now
    started = time.monotonic()
    assert health(small_host, timeout=10)["status"] == "ok"
    waited = time.monotonic() - started
    r = api(small_host, parameters={"max_tokens": 2})
    assert r.status_code == 200
    for t in threads:
        t.join(60)
    assert len(answers) == len(threads)
    assert max(a[3] for a in answers) < 25, "slow clients held their workers until they gave up"
    cut = [a for a in answers if a[0] == 408]
    assert len(cut) >= len(threads) // 2 and {a[0] for a in answers} <= {408, -1}, [a[0] for a in answers]
    assert all(json.loads(a[2])["error"]["code"] == 408 for a in cut)
    print(f"/health answered after {waited:.2f} s beside {len(threads)} slow clients; "
          f"the slowest was cut after {max(a[3] for a in answers):.1f} s")


# -- 3. lone surrogates ---------------------------------------------------------------------------


@pytest.mark.parametrize("path, body", [
    ("/api", b'{"inputs": "\\ud800"}'),
    ("/api", b'{"token": "\\udfff", "inputs": "hi"}'),
    ("/api", b'{"inputs": [{"role": "user", "content": "a\\ud800b"}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "\\ud800": 1}'),
    ("/v1/completions", b'{"prompt": ["\\ud83d"], "max_tokens": 1}'),
])
def test_lone_surrogates_are_a_400_without_token(small_host: ApiHost, path: str, body: bytes) -> None:
    r = requests.post(small_host.url + path, data=body, timeout=30, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "lone UTF-16 surrogate" in r.json()["error"]["message"]


def test_paired_surrogates_are_text(small_host: ApiHost) -> None:
    body = b'{"token": "%s", "inputs": "\\ud83d\\ude00", "parameters": {"max_tokens": 1}}' % TOKEN.encode()
    assert requests.post(small_host.url + "/api", data=body, timeout=30,
                         headers={"Content-Type": "application/json"}).status_code == 200


# -- 4. listen backlog ----------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_the_listen_backlog_absorbs_bursts(small_host: ApiHost) -> None:
    port = address(small_host)[1]
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    assert out.split()[2] == "128", out  # Send-Q of a listening socket: its backlog


# -- 5. cloudflared dies with its server ----------------------------------------------------------


def gone(pid: int, within: float = 10.0) -> bool:
    """Whether ``pid`` has ended (a zombie counts as ended)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_sigkill_of_serve_takes_cloudflared_along(cloudflared) -> None:  # noqa: F811
    from .test_cli import Serve

    s = Serve("--tunnel", "cloudflared", "--no-token")
    (tunnel_pid, _), = cloudflared.starts()
    assert not gone(tunnel_pid, within=0.5)
    s.stop(signal.SIGKILL)  # no handler runs: like the out-of-memory killer
    assert gone(tunnel_pid)


# -- 6. headers -----------------------------------------------------------------------------------


def test_oversized_headers_get_431_and_cost_no_memory(small_host: ApiHost) -> None:
    huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
    status, headers, body = exchange(small_host, huge[:200_000])  # the server stops reading at 64 KiB
    assert_json_error(status, headers, body, 431, "headers are larger than 65536 bytes")
    many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(20_000)) + b"\r\n"
    status, headers, body = exchange(small_host, many)
    assert_json_error(status, headers, body, 431)


# -- 7. log forging -------------------------------------------------------------------------------


def test_request_paths_are_logged_escaped(small_host: ApiHost) -> None:
    requests.get(f"{small_host.url}/x%0a2026-01-01 INFO forged line%00%1b[31m", timeout=10)
    time.sleep(0.2)
    log = small_host.logs(10_000)
    assert "\x00" not in log and "\x1b" not in log
    assert not any(line.startswith("2026-01-01 INFO forged") for line in log.splitlines())
    assert "GET /x\\n2026-01-01 INFO forged line\\x00\\x1b[31m 404" in log


# -- 8. every answer is JSON ----------------------------------------------------------------------


@pytest.mark.parametrize("raw, code, match", [
    (b"GET /v1//models HTTP/1.1\r\nHost: evil.example\r\n\r\n", 404, "no route GET /v1//models"),
    (b"GARBAGE\r\n\r\n", 400, ""),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, "HTTP/1.0 and HTTP/1.1"),
    (b"POST /api HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "not implemented"),
    (b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", 400, ""),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request line"),
])
def test_protocol_errors_are_json(small_host: ApiHost, raw: bytes, code: int, match: str) -> None:
    status, headers, body = exchange(small_host, raw)
    if raw.startswith(b"GET /v1/"):  # OpenAI's shape under /v1: a string code
        error = json.loads(body)["error"]
        assert status == code and error["code"] == "unknown_url" and match in error["message"], error
    else:
        assert_json_error(status, headers, body, code, match)
    assert "location" not in headers


def test_options_is_answered_in_json(small_host: ApiHost) -> None:
    r = requests.options(f"{small_host.url}/api", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    assert r.json() == {"methods": ["OPTIONS", "POST"]} and r.headers["Allow"] == "OPTIONS, POST"
    r = requests.options(f"{small_host.url}/nowhere", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


# -- 9. chunked bodies ----------------------------------------------------------------------------


def test_an_oversized_chunked_body_is_a_413(small_host: ApiHost) -> None:
    chunk = b'{"inputs": "' + b"a" * (1 << 20)
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] + [b"%x\r\n%s\r\n" % (1 << 20, b"a" * (1 << 20))] * 4
    raw = (b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"".join(parts) + b"0\r\n\r\n")
    status, headers, body = exchange(small_host, raw)
    assert_json_error(status, headers, body, 413, "larger than 4194304 bytes")


def test_a_chunked_body_within_the_limit_is_read_whole(small_host: ApiHost) -> None:
    payload = json.dumps({"token": TOKEN, "inputs": "Hi", "parameters": {"max_tokens": 1}}).encode()
    parts = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (payload[:10], payload[10:]))
    raw = (b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
           b"Connection: close\r\n\r\n" + parts + b"0\r\n\r\n")
    status, _, body = exchange(small_host, raw)
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 1


# -- 10. a huge prompt is refused before it is tokenised ------------------------------------------


def test_a_prompt_that_cannot_fit_is_refused_without_tokenising_it(small_host: ApiHost) -> None:
    r = requests.post(f"{small_host.url}/v1/completions", timeout=60, headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"prompt": "word " * 800_000, "max_tokens": 1})
    error = r.json()["error"]
    assert r.status_code == 400 and re.search(r"the prompt is at least \d+ tokens", error["message"]), error
    assert "ctx_length" not in error["message"]  # /v1 has no such field


# -- 11. small leaks ------------------------------------------------------------------------------


def test_v1_auth_error_does_not_suggest_a_body_token(small_host: ApiHost) -> None:
    r = requests.post(f"{small_host.url}/v1/chat/completions", json={"messages": []}, timeout=10)
    message = r.json()["error"]["message"]
    assert r.status_code == 401 and "Authorization: Bearer" in message and "JSON body" not in message
    r = requests.post(f"{small_host.url}/api", json={"inputs": "x"}, timeout=10)
    assert "'token' in the JSON body" in r.json()["error"]["message"]


def test_health_names_a_local_model_without_its_path(tmp_path: Path, model_path: Path) -> None:
    private = tmp_path / "private-folder"
    private.mkdir()
    other = Path(shutil.copy(model_path, private / "other.Q4_1.gguf"))
    with ApiHost(use_token=False, port=0, allow_models=[str(other)]) as host:
        r = requests.post(f"{host.url}/v1/completions", timeout=60,
                          json={"prompt": "x", "max_tokens": 1, "model": str(other)})
        assert r.status_code == 200 and r.json()["model"] == "other.Q4_1"
        assert "private-folder" not in json.dumps(health(host))


def test_api_host_removes_its_run_folder_and_keeps_the_log() -> None:
    host = ApiHost(use_token=False, port=0)
    assert host.log_path is None  # nothing on disk before start
    host.start()
    folder = host.log_path.parent
    assert folder.is_dir()
    host.stop()
    assert not folder.exists()
    assert "Press Ctrl-C to stop." in host.logs()
