"""A cloudflared quick tunnel to the server's port: started with retries, its URL read from
cloudflared's metrics page, verified by asking the public URL for ``/health``, watched, and
restarted with a new URL when cloudflared dies."""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import requests

from llm_magic.errors import TunnelError

log = logging.getLogger("llm_magic.tunnel")

BINARY_ENV = "LLM_MAGIC_CLOUDFLARED"
PROBE_PATH = "/health/stream"  # the server's timed probe stream (server.PROBE_EVENTS, PROBE_INTERVAL)
PROBE_ATTEMPTS = 2  # a stream that seems buffered is asked again before the host says so
PROBE_LIMIT = 10.0  # s one probe may take in all (its events span under a second)
ANNOUNCE_WITHIN = 2.0  # s a restarted tunnel's new URL is asked before it is shown; asking goes on after
WATCH_INTERVAL = 0.25  # s between looks at whether cloudflared still runs
VERIFY_INTERVAL = 0.5  # s between asks of a new public URL
URL_POLL = 0.1  # s between looks for the URL cloudflared names
_HOSTNAME = re.compile(r'userHostname="(https?://[^"]+)"')
_STDERR_URL = re.compile(r"(https://[-a-z0-9]+\.trycloudflare\.com)")


def find_cloudflared() -> str:
    """The cloudflared to run: ``$LLM_MAGIC_CLOUDFLARED``, one on PATH, else flask-cloudflared's
    download of the official binary."""
    named = os.environ.get(BINARY_ENV)
    if named:
        if not os.access(named, os.X_OK):
            raise TunnelError(f"{BINARY_ENV}={named} is not an executable file")
        return named
    on_path = shutil.which("cloudflared")
    if on_path:
        return on_path
    try:
        import flask_cloudflared as fc
    except ImportError:
        raise TunnelError("the tunnel needs flask-cloudflared: pip install 'llm_magic[host]'") from None
    system, machine = platform.system(), platform.machine()
    folder = Path(tempfile.gettempdir())
    try:
        command = fc._get_command(system, machine)
        if system == "Darwin":
            archive = f"cloudflared-darwin-{'arm64' if machine == 'arm64' else 'amd64'}.tgz"
            fc._download_cloudflared(str(folder), archive)
            fc._extract_tarball(str(folder), archive)
        else:
            fc._download_cloudflared(str(folder), command)
    except Exception as exc:  # no network, unsupported platform: flask-cloudflared raises plain Exception
        raise TunnelError(f"cannot get cloudflared ({exc}); install it, or name one with {BINARY_ENV}") from None
    binary = folder / command
    binary.chmod(0o755)
    return str(binary)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _dies_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when this process dies, even
    by SIGKILL (say, the kernel's out-of-memory killer), so that no cloudflared outlives its
    server. Linux only; elsewhere ``stop()`` and the server's exit handling are all there is.

    The signal comes when the *thread* that started the child ends: cloudflared is started from
    the main thread or the tunnel's watcher thread, and both live as long as the tunnel."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the call took effect
            os._exit(1)

    return set_parent_death_signal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tunnel:
    """cloudflared in front of ``http://127.0.0.1:{port}``. ``on_change(url)`` is called with
    each new public URL (after a restart too), ``on_status()`` when ``status()`` changes later
    (a restart begins, its new URL answers, its streaming is checked)."""

    def __init__(
        self,
        port: int,
        *,
        on_change: Callable[[str], None] | None = None,
        on_status: Callable[[], None] | None = None,
        token: str | None = None,
        attempts: int = 3,
        url_timeout: float = 30.0,
        verify_timeout: float = 30.0,
        max_restarts: int = 10,
    ) -> None:
        self.port = port
        self.on_change = on_change
        self.on_status = on_status
        self._token = token  # for the streaming probe; never logged
        self.attempts = attempts
        self.url_timeout = url_timeout
        self.verify_timeout = verify_timeout
        self.max_restarts = max_restarts
        self.state = "stopped"  # starting, ready, unverified, restarting, failed, stopped
        self.public_url: str | None = None
        self.streams: bool | None = None  # whether a stream through the tunnel arrives as sent; None: unknown
        self.restarts = 0
        self._binary: str | None = None
        self._process: subprocess.Popen | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=40)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._opened_at = 0.0  # when cloudflared named the current URL

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def token(self) -> str | None:
        """The token the streaming probe sends (the host's)."""
        return self._token

    @property
    def open(self) -> bool:
        return self.state not in ("stopped", "failed")

    def check(self) -> bool:
        """Ask the public URL for ``/health`` again: after the server behind the tunnel was
        restarted on the same port, the tunnel (and its URL) carries on."""
        ok = self.public_url is not None and self._verify(self.public_url, self.verify_timeout)
        self.state = "ready" if ok else "unverified"
        return ok

    def status(self) -> dict:
        return {"state": self.state, "public_url": self.public_url, "restarts": self.restarts,
                "streams": self.streams}

    def start(self) -> str:
        """Open the tunnel; return its public URL (verified, or with a warning logged)."""
        self._binary = self._binary or find_cloudflared()
        self.state = "starting"
        url = self._open()
        self._watcher = threading.Thread(target=self._watch, name="llm-magic-tunnel", daemon=True)
        self._watcher.start()
        return url

    def _open(self, announce_within: float | None = None) -> str:
        """Launch cloudflared (with retries) and ask its URL for ``/health``. The first start
        asks for up to ``verify_timeout`` s, and checks streaming, before it returns; a restart
        (``announce_within``) shows the new URL after at most that long, and ``_settle`` goes on."""
        last_error = "no output"
        for attempt in range(1, self.attempts + 1):
            try:
                url = self._launch()
            except TunnelError as exc:
                last_error = exc.message
                log.warning("cloudflared attempt %d of %d failed: %s", attempt, self.attempts, last_error)
                self._kill()
                if attempt < self.attempts and self._stopping.wait(min(2.0 * attempt, 5.0)):
                    break
                continue
            self.public_url, self.streams, self._opened_at = url, None, time.monotonic()
            verified = self._verify(url, self.verify_timeout if announce_within is None else announce_within)
            self.state = "ready" if verified else "unverified"
            if self.state == "unverified":
                log.warning("%s does not answer yet; Cloudflare may need a moment", url)
            if announce_within is None:
                self._check_streaming(url)
            if self.on_change:
                self.on_change(url)
            return url
        self.state = "failed"
        raise TunnelError(f"cloudflared could not open a tunnel after {self.attempts} attempts: {last_error}")

    def _launch(self) -> str:
        metrics = f"127.0.0.1:{_free_port()}"
        command = [self._binary or "cloudflared", "tunnel", "--no-autoupdate", "--metrics", metrics,
                   "--url", f"http://127.0.0.1:{self.port}"]
        self._output.clear()
        with self._lock:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True, errors="replace",
                                             preexec_fn=_dies_with_this_process())
        process = self._process
        threading.Thread(target=self._drain, args=(process,), daemon=True).start()
        deadline = time.monotonic() + self.url_timeout
        while time.monotonic() < deadline and not self._stopping.is_set():
            if process.poll() is not None:
                raise TunnelError(f"cloudflared exited ({process.returncode}): {self._last_output()}")
            url = self._url_from_output() or self._url_from_metrics(metrics)  # its output costs no request
            if url:
                return url
            self._stopping.wait(URL_POLL)
        raise TunnelError(f"cloudflared showed no URL within {self.url_timeout:.0f} s: {self._last_output()}")

    def _drain(self, process: subprocess.Popen) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self._output.append(line.rstrip())
        process.stderr.close()

    def _last_output(self) -> str:
        lines = [line for line in self._output if line.strip()]
        errors = [line for line in lines if "ERR" in line or "error" in line.lower()]
        return (errors or lines or ["no output"])[-1][-300:]

    @staticmethod
    def _url_from_metrics(metrics: str) -> str | None:
        try:
            text = requests.get(f"http://{metrics}/metrics", timeout=1).text
        except requests.RequestException:
            return None
        match = _HOSTNAME.search(text)
        return match.group(1) if match else None

    def _url_from_output(self) -> str | None:
        for line in list(self._output):
            match = _STDERR_URL.search(line)
            if match:
                return match.group(1)
        return None

    def _verify(self, url: str, within: float) -> bool:
        """Whether ``url/health`` answers through the tunnel within ``within`` s (DNS and routing
        take a moment). Each ask is bounded by the time left; a cloudflared that exits ends it."""
        deadline = time.monotonic() + within
        process = self._process
        while not self._stopping.is_set() and (process is None or process.poll() is None):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                if requests.get(f"{url}/health", timeout=min(5.0, max(left, 0.5))).ok:
                    return True
            except requests.RequestException:
                pass
            self._stopping.wait(min(VERIFY_INTERVAL, max(deadline - time.monotonic(), 0.0)))
        return False

    def probe_streaming(self, url: str) -> bool | None:
        """``probe_streaming(url)`` with this tunnel's token."""
        return probe_streaming(url, self._token)

    def _check_streaming(self, url: str) -> None:
        self.streams = probe_streaming(url, self._token, self._stopping) if self.state == "ready" else None
        if self.streams is False:
            log.warning("the tunnel delivers a streamed answer all at once (it buffers): answers will "
                        "not appear word by word through %s", url)

    def _settle(self) -> None:
        """After a restart's new URL was shown: go on asking it (until ``verify_timeout`` s after
        cloudflared named it), then check streaming; ``on_status`` hears of each change."""
        url = self.public_url
        if url is None:
            return
        if self.state == "unverified":
            left = self.verify_timeout - (time.monotonic() - self._opened_at)
            if left > 0 and self._verify(url, left):
                self.state = "ready"
                log.info("%s answers now", url)
                self._notify()
        if self.state == "ready" and self.streams is None and not self._stopping.is_set():
            self._check_streaming(url)
            self._notify()

    def _notify(self) -> None:
        if self.on_status is not None:
            self.on_status()

    def _watch(self) -> None:
        """Restart cloudflared whenever it dies, until stopped."""
        while not self._stopping.is_set():
            process = self._process
            if process is not None and process.poll() is None:
                self._stopping.wait(WATCH_INTERVAL)
                continue
            if self._stopping.is_set():
                return
            if self.restarts >= self.max_restarts:
                self.state = "failed"
                log.error("cloudflared died %d times; giving up — the host still serves locally", self.restarts)
                self._notify()
                return
            self.restarts += 1
            self.state = "restarting"
            self._notify()
            code = process.returncode if process is not None else None
            log.warning("cloudflared exited (%s): %s; restarting", code, self._last_output())
            try:
                self._open(announce_within=ANNOUNCE_WITHIN)
            except TunnelError as exc:
                log.error("%s; retrying in 10 s — the host still serves locally", exc.message)
                self._notify()
                self._stopping.wait(10.0)
                continue
            self._settle()

    def _kill(self) -> None:
        with self._lock:
            process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def stop(self) -> None:
        """End cloudflared and the watcher."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(15)
        self._kill()
        self.state = "stopped"


def probe_streaming(url: str, token: str | None = None, stopping: threading.Event | None = None) -> bool | None:
    """Whether events streamed through ``url`` arrive as they are sent (True), all at once
    (False, the tunnel buffers), or None when the probe could not run (or ``stopping`` was
    set). The server sends a few events a fixed interval apart; arrivals spread over less than
    a third of that span mean buffering. A buffered-looking result is checked once more."""
    for _ in range(PROBE_ATTEMPTS):
        arrivals, span = _probe(url, token, stopping or threading.Event())
        if arrivals is None or len(arrivals) < 2:
            return None
        if arrivals[-1] - arrivals[0] >= span / 3:
            return True
    return False


def _probe(url: str, token: str | None, stopping: threading.Event) -> tuple[list[float] | None, float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    arrivals: list[float] = []
    span = 0.0
    deadline = time.monotonic() + PROBE_LIMIT
    try:
        with requests.post(url + PROBE_PATH, headers=headers, stream=True, timeout=(5, 5)) as response:
            if response.status_code != 200:
                return None, span
            pending = b""
            # byte by byte: a larger read would wait for more than one event (it is ~60 bytes)
            for byte in response.iter_content(chunk_size=1):
                if time.monotonic() > deadline or stopping.is_set():  # a dribble: no verdict, no long wait
                    return None, span
                pending += byte
                if not pending.endswith(b"\n\n"):
                    continue
                event, pending = pending.strip(), b""
                if event == b"data: [DONE]":
                    break
                arrivals.append(time.monotonic())
                if b'"interval"' in event:
                    fields = json.loads(event[len(b"data: "):])
                    span = fields["interval"] * (fields["of"] - 1)
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return None, span
    return arrivals, span


def open_tunnel(tunnel: Tunnel) -> tuple[str | None, str]:
    """Start cloudflared; a tunnel that cannot start never stops the host, which keeps serving
    locally. Returns the public URL and a line saying how the tunnel is."""
    try:
        public_url = tunnel.start()
    except TunnelError as exc:
        return None, f"none: {exc.message}; serving locally only"
    return public_url, tunnel_note(tunnel)


def tunnel_note(tunnel: Tunnel) -> str:
    """How an open tunnel is, in a few words."""
    if tunnel.state == "unverified":
        return "cloudflared (not answering yet: Cloudflare may need a moment)"
    if tunnel.streams is False:
        return "cloudflared (verified; it buffers streams: answers arrive whole)"
    if tunnel.streams is None:
        return "cloudflared (verified; streaming not checked)"
    return "cloudflared (verified; streams)"
