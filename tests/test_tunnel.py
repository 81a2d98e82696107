"""The public tunnel with a fake cloudflared, and long answers through a proxy that
cuts idle connections the way Cloudflare's edge does."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Iterator

import pytest
import requests

from llm_magic import ApiHost, Client
from llm_magic.errors import HostUnreachable
from llm_magic.supervisor.tunnel import Tunnel, TunnelError

from .local_http import serving
from .test_cli import Serve
from .test_host import gone

FAKE = Path(__file__).parent / "fake_cloudflared.py"


class FakeCloudflared:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log = tmp_path / "cloudflared.log"
        self.monkeypatch = monkeypatch
        wrapper = tmp_path / "cloudflared"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
        wrapper.chmod(0o755)
        monkeypatch.setenv("LLM_MAGIC_CLOUDFLARED", str(wrapper))
        monkeypatch.setenv("FAKE_CLOUDFLARED_LOG", str(self.log))
        self.settings_file = tmp_path / "cloudflared-settings.json"
        monkeypatch.setenv("FAKE_CLOUDFLARED_SETTINGS", str(self.settings_file))
        self.mode("proxy")

    def mode(self, mode: str, idle: float = 100) -> None:
        self.monkeypatch.setenv("FAKE_CLOUDFLARED_MODE", mode)
        self.monkeypatch.setenv("FAKE_CLOUDFLARED_IDLE", str(idle))

    def next_starts(self, **settings: object) -> None:
        """How the cloudflared started next behaves (``warmup``, ``mode``, ``idle``), even when a
        running server starts it."""
        self.settings_file.write_text(json.dumps(settings))

    def starts(self) -> list[tuple[int, str]]:
        if not self.log.exists():
            return []
        return [(int(pid), url) for pid, url in (line.split() for line in self.log.read_text().splitlines())]

    def wait_starts(self, n: int, within: float = 30) -> list[tuple[int, str]]:
        deadline = time.monotonic() + within
        while len(self.starts()) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(self.starts()) >= n, self.starts()
        return self.starts()


@pytest.fixture
def cloudflared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCloudflared:
    return FakeCloudflared(tmp_path, monkeypatch)


def test_tunnel_url_points_at_the_right_port_and_is_verified(cloudflared, open_host: ApiHost) -> None:
    port = int(open_host.url.rsplit(":", 1)[1])
    tunnel = Tunnel(port)
    try:
        url = tunnel.start()
        assert tunnel.state == "ready" and url == cloudflared.starts()[0][1]
        assert requests.get(url + "/health", timeout=10).json()["model"] == open_host.model_name
    finally:
        tunnel.stop()
    assert tunnel.state == "stopped" and gone(cloudflared.starts()[0][0])


def test_a_url_that_does_not_answer_yet_is_shown_with_a_warning(cloudflared, open_host: ApiHost, caplog) -> None:
    cloudflared.mode("named")
    tunnel = Tunnel(int(open_host.url.rsplit(":", 1)[1]), verify_timeout=1)
    try:
        url = tunnel.start()
        assert re.fullmatch(r"https://[0-9a-f]{8}-fake-tunnel\.trycloudflare\.com", url)
        assert tunnel.state == "unverified"
        assert "Cloudflare may need a moment" in caplog.text
    finally:
        tunnel.stop()


def test_a_tunnel_that_cannot_start_is_retried_then_reported(cloudflared) -> None:
    cloudflared.mode("fail")
    tunnel = Tunnel(9, attempts=2)
    with pytest.raises(TunnelError, match=r"after 2 attempts: cloudflared exited \(1\): ERR failed to request quick Tunnel"):
        tunnel.start()
    assert tunnel.state == "failed" and tunnel.public_url is None
    cloudflared.mode("silent")
    with pytest.raises(TunnelError, match="showed no URL within 1 s"):
        Tunnel(9, attempts=1, url_timeout=1).start()


def test_serve_shows_the_public_url_survives_a_killed_cloudflared_and_leaves_nothing(cloudflared) -> None:
    s = Serve("--tunnel", "cloudflared", "--no-token")
    try:
        (pid, url), = cloudflared.starts()
        assert f"Public URL: {url}" in s.output and "cloudflared (verified; streams)" in s.output
        os.kill(pid, signal.SIGKILL)
        (_, _), (new_pid, new_url) = cloudflared.wait_starts(2)
        assert new_url != url
        line = s.proc.stdout.readline()
        assert line.strip() == f"The tunnel restarted; new public URL: {new_url}"
        # the URL is shown once it answers; that it streams is checked just after
        expected = {"state": "ready", "public_url": new_url, "restarts": 1, "streams": True}
        deadline = time.monotonic() + 20
        while requests.get(s.url + "/health", timeout=5).json()["tunnel"] != expected:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert requests.get(new_url + "/health", timeout=10).json()["tunnel"] == expected
    finally:
        assert s.stop() == 0
    assert all(gone(pid) for pid, _ in cloudflared.starts())


def test_serve_keeps_serving_locally_when_the_tunnel_fails(cloudflared) -> None:
    cloudflared.mode("fail")
    s = Serve("--tunnel", "cloudflared", "--no-token")
    try:
        assert "Tunnel:     none: cloudflared could not open a tunnel after 3 attempts" in s.output
        assert "serving locally only" in s.output
        assert requests.get(s.url + "/health", timeout=10).json()["status"] == "ok"
    finally:
        assert s.stop() == 0


def test_notebook_host_defaults_to_the_tunnel_and_stops_it(cloudflared, fresh_magics, capsys) -> None:
    sh, magics = fresh_magics
    assert sh.run_cell("%llm_host start --port 0").success
    (pid, url), = cloudflared.starts()
    out = capsys.readouterr().out
    assert f"Public URL: {url}" in out and f"%llm connect {url} --token" in out
    assert magics.client.url == magics.host.url  # the notebook itself talks locally
    sh.run_cell("%llm_host status")
    assert re.search(rf"public url\s+{re.escape(url)}", capsys.readouterr().out)
    assert sh.run_cell("%llm_host stop").success
    assert gone(pid)


def test_a_restart_keeps_the_public_url_token_and_port(cloudflared, fresh_magics, capsys) -> None:
    sh, magics = fresh_magics
    assert sh.run_cell("%llm_host start --port 0").success
    (pid, url), = cloudflared.starts()
    local, token, server = magics.host.url, magics.host.token, magics.host.pid
    for restart in ("%llm_host restart", "%llm_host restart --ctx 2048"):  # the same flags, then new ones
        assert sh.run_cell(restart).success
        host = magics.host
        assert (host.url, host.token, host.public_url) == (local, token, url) and host.pid != server
        assert f"Public URL: {url}" in capsys.readouterr().out
        server = host.pid
    assert cloudflared.starts() == [(pid, url)]  # one cloudflared all along: the URL never changed
    # a remote client holding the old URL and token carries on, through the tunnel
    assert Client(url, token).chat("hi", max_tokens=2).model == host.model_name
    # the server learns how the tunnel is from its parent (the chat page reads it)
    assert requests.get(local + "/health", timeout=10).json()["tunnel"]["public_url"] == url
    assert sh.run_cell("%llm_host stop").success
    assert gone(pid)

    with ApiHost(port=0, tunnel="cloudflared") as api_host:  # the same from Python
        public = api_host.public_url
        api_host.restart()
        assert api_host.public_url == public and len(cloudflared.starts()) == 2
    assert gone(cloudflared.starts()[1][0])


# -- streaming through the tunnel ------------------------------------------------------------------


def test_a_tunnel_that_buffers_streams_is_noticed_and_the_snippets_ask_for_whole_answers(cloudflared) -> None:
    cloudflared.mode("buffer")
    s = Serve("--tunnel", "cloudflared", "--token", "probe-token-" + "x" * 20)
    try:
        (_, url), = cloudflared.starts()
        assert "Tunnel:     cloudflared (verified; it buffers streams: answers arrive whole)" in s.output
        assert "%config LLMMagics.stream = False" in s.output and "--no-stream" in s.output
        health = requests.get(s.url + "/health", timeout=10).json()
        assert health["tunnel"]["streams"] is False
        # what the probe saw is what a streamed answer meets: through the edge it comes whole
        served = health["requests"]
        stream = requests.post(url + "/v1/completions", stream=True, timeout=60,
                               headers={"Authorization": "Bearer probe-token-" + "x" * 20},
                               json={"prompt": "Once upon a time", "max_tokens": 40, "stream": True})
        first = next(stream.iter_content(chunk_size=1))
        # its first byte came only once the whole answer was written (the host counts a request
        # as served when its answer is complete, before sending the end of it)
        assert first and requests.get(s.url + "/health", timeout=10).json()["requests"] == served + 1
        assert stream.raw.read().rstrip().endswith(b"data: [DONE]")
    finally:
        assert s.stop() == 0


def test_a_tunnel_that_streams_is_said_to_stream_and_the_probe_needs_the_token(cloudflared) -> None:
    s = Serve("--tunnel", "cloudflared", "--token", "probe-token-" + "x" * 20)
    try:
        (_, url), = cloudflared.starts()
        assert "Tunnel:     cloudflared (verified; streams)" in s.output
        assert "LLMMagics.stream" not in s.output
        assert requests.get(s.url + "/health", timeout=10).json()["tunnel"]["streams"] is True
        assert requests.post(url + "/health/stream", timeout=10).status_code == 401
        tunnel = Tunnel(1, token="probe-token-" + "x" * 20)
        assert tunnel.probe_streaming(url) is True and Tunnel(1, token="wrong").probe_streaming(url) is None
    finally:
        assert s.stop() == 0


def test_api_host_shows_a_buffering_tunnel_and_a_notebook_connecting_through_it_does_not_stream(
        cloudflared, fresh_magics, capsys) -> None:
    cloudflared.mode("buffer")
    sh, magics = fresh_magics
    with ApiHost(port=0, tunnel="cloudflared") as host:
        assert host.tunnel_streams is False
        block = host.connection_text()
        assert sh.run_cell(f"%llm connect {host.url} --token {host.token}").success  # locally: streams
        assert magics.stream is True
        assert sh.run_cell(f"%llm connect {host.public_url} --token {host.token}").success
        assert "answers will show when complete" in capsys.readouterr().out and magics.stream is False
        assert sh.run_cell("%%llm --max-tokens 3\nhi").success
    assert "it buffers streams" in block and "%config LLMMagics.stream = False" in block


# -- long answers through an edge that cuts idle connections ------------------------------------


@pytest.fixture
def edge(cloudflared) -> Iterator:
    """Start serve behind a fake Cloudflare edge that cuts after 1 s of silence."""
    started: list[Serve] = []

    def start(keepalive: float) -> str:
        cloudflared.mode("proxy", idle=1.0)
        s = Serve("--tunnel", "cloudflared", "--no-token", "--keepalive", str(keepalive))
        started.append(s)
        return cloudflared.starts()[-1][1]

    yield start
    for s in started:
        s.stop()


def test_without_keepalive_a_long_answer_is_cut_by_the_edge(edge) -> None:
    url = edge(keepalive=100)
    r = requests.post(url + "/v1/completions", timeout=60,
                      json={"prompt": "word " * 100, "max_tokens": 600, "temperature": 0})
    assert r.status_code == 524  # what Cloudflare answers: the reason for the keep-alive


def test_long_non_streaming_answer_completes_through_the_edge(edge) -> None:
    url = edge(keepalive=0.3)
    started = time.monotonic()
    r = requests.post(url + "/v1/completions", timeout=60,
                      json={"prompt": "word " * 100, "max_tokens": 600, "temperature": 0})
    assert time.monotonic() - started > 2  # several times the edge's idle limit
    assert r.status_code == 200 and r.text.startswith(" ")
    assert json.loads(r.text)["usage"]["completion_tokens"] == 600
    answer = Client(url).complete("word " * 100, max_tokens=600, temperature=0)
    assert answer.usage["completion_tokens"] == 600


def test_stream_with_a_long_silent_prompt_survives_through_the_edge(edge) -> None:
    url = edge(keepalive=0.3)
    r = requests.post(url + "/api", stream=True, timeout=60, json={
        "inputs": "word " * 2500, "parameters": {"max_tokens": 3}, "options": {"stream": True}})
    lines = [line for line in r.iter_lines() if line]
    assert b": keep-alive" in lines  # sent while the 2,500-token prompt was evaluated
    assert lines[-1] == b"data: [DONE]"
    assert json.loads(lines[-2][len(b"data: "):])["usage"]["completion_tokens"] == 3


# -- the client against what tunnels answer ------------------------------------------------------


class _Flaky(BaseHTTPRequestHandler):
    failures = 0
    statuses: list[int] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status = self.statuses.pop(0) if self.statuses else 200
        body = (b"error code: %d" % status if status != 200 else json.dumps({
            "model": "m", "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "usage": {}}).encode())
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def flaky() -> Iterator[str]:
    with serving(_Flaky) as url:
        yield url


def test_client_retries_edge_errors_then_says_the_host_is_gone(flaky: str) -> None:
    _Flaky.statuses = [530, 502]
    assert Client(flaky, retries=2).chat("x").text == "hi"
    _Flaky.statuses = [530, 530, 530]
    with pytest.raises(HostUnreachable, match="HTTP 530: the host behind the tunnel is gone or restarting"):
        Client(flaky, retries=2).chat("x")


def test_kernel_death_leaves_neither_server_nor_cloudflared(cloudflared) -> None:
    code = ("import sys; from llm_magic import ApiHost; "
            "h = ApiHost(use_token=False, port=0, tunnel='cloudflared').start(); "
            "print(h.pid, flush=True); sys.stdin.read()")
    kernel = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(kernel.stdout.readline())
        (tunnel_pid, _), = cloudflared.starts()
        kernel.kill()  # no atexit, no cleanup: like a kernel restart
        kernel.wait()
        assert gone(server_pid) and gone(tunnel_pid)
    finally:
        kernel.stdin.close()
        kernel.stdout.close()


# -- restarts: of a server that died, of a cloudflared that died under load ------------------------


def test_one_restart_brings_a_dead_host_back_behind_the_same_public_url(cloudflared, fresh_magics, capsys) -> None:
    sh, magics = fresh_magics
    assert sh.run_cell("%llm_host start --port 0").success
    (tunnel_pid, url), = cloudflared.starts()
    local, token = magics.host.url, magics.host.token
    os.kill(magics.host.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while magics.host.status()["state"] != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    capsys.readouterr()
    sh.run_cell("%llm_host status")
    out = capsys.readouterr().out
    assert "failed: the server died; it was killed by SIGKILL" in out and re.search(rf"public url\s+{url}", out)
    assert sh.run_cell("%llm_host restart").success
    host = magics.host
    assert (host.url, host.token, host.public_url) == (local, token, url) and host.running
    assert f"Public URL: {url}" in capsys.readouterr().out
    assert cloudflared.starts() == [(tunnel_pid, url)]  # the same cloudflared: the URL never changed
    assert Client(url, token).chat("hi", max_tokens=2).model == host.model_name  # a remote client carries on
    # the tunnel is watched for the new host: a cloudflared that dies now gets a new URL, shown
    os.kill(tunnel_pid, signal.SIGKILL)
    (_, _), (new_pid, new_url) = cloudflared.wait_starts(2)
    out, deadline = "", time.monotonic() + 30
    while "new public URL" not in out:
        assert time.monotonic() < deadline, out
        time.sleep(0.05)
        out += capsys.readouterr().out
    assert f"llm_magic: the tunnel restarted; new public URL: {new_url}" in out
    assert host.status()["public_url"] == new_url
    assert sh.run_cell("%llm_host stop").success
    assert gone(new_pid)


class CpuBurner:
    """Busy loops at normal priority, three per core: a machine as loaded as one that runs a
    build or a test suite besides (load average about 3 per core)."""

    def __init__(self) -> None:
        self.loops = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(3 * (os.cpu_count() or 2))]

    def stop(self) -> None:
        for loop in self.loops:
            loop.kill()
        for loop in self.loops:
            loop.wait(10)


@pytest.mark.slow
def test_a_restarted_tunnels_new_url_is_shown_at_once_under_load_while_cloudflare_gets_ready(
        cloudflared, capsys) -> None:
    with ApiHost(port=0, tunnel="cloudflared") as host:
        (old_pid, old_url), = cloudflared.starts()
        # The next quick tunnel's hostname needs 20 s before it answers (DNS); the host must not
        # wait for that (nor for its streaming check) before it shows the new URL.
        cloudflared.next_starts(mode="proxy", warmup=20)
        capsys.readouterr()
        burner = CpuBurner()
        try:
            killed = time.monotonic()
            os.kill(old_pid, signal.SIGKILL)
            out = ""
            while "new public URL" not in out:
                assert time.monotonic() - killed < 40, out
                time.sleep(0.05)
                out += capsys.readouterr().out
            shown = time.monotonic() - killed
        finally:
            burner.stop()
        (_, _), (new_pid, new_url) = cloudflared.starts()
        assert out.strip() == (f"llm_magic: the tunnel restarted; new public URL: {new_url} "
                               "(not answering yet: Cloudflare may need a moment)")
        assert shown < 12, shown  # it was shown after the URL answered, 20 s on
        status = host.status()
        assert status["public_url"] == new_url and status["tunnel"] == "cloudflared (unverified, 1 restarts)"
        # once it answers, the host says so, and so does the server's /health (for the chat page)
        expected = {"state": "ready", "public_url": new_url, "restarts": 1, "streams": True}
        deadline = time.monotonic() + 40
        while requests.get(host.url + "/health", timeout=5).json()["tunnel"] != expected:
            assert time.monotonic() < deadline, host.status()
            time.sleep(0.2)
        assert host.status()["tunnel"] == "cloudflared (ready, 1 restarts)"
        assert Client(new_url, host.token).chat("hi", max_tokens=2).model == host.model_name
    assert gone(new_pid)
