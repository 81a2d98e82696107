"""The HTTP server under the app: cheroot, with the limits a public URL needs.

cheroot keeps connections alive, writes each chunk of a stream straight to its socket and hands
a worker thread a connection only once its first bytes arrived. What it lacks for a public host,
added here: a deadline for a request's headers and body to arrive (a client trickling bytes
must not hold a worker for ever), a shorter one when few workers are free (so that ``/health``
and real requests still get one), a cap on header size, a listen backlog that absorbs bursts, and
JSON for the errors the HTTP layer itself answers (bad request line, 408, 413, 431, 501, 505).
"""

from __future__ import annotations

import _pyio
import errno
import json
import logging
import os
import select
import socket
import threading
import time
from typing import Any

from cheroot import errors as cheroot_errors
from cheroot import server as cheroot_server
from cheroot import wsgi as cheroot_wsgi
from cheroot.makefile import MakeFile, StreamReader

log = logging.getLogger("llm_magic.server")

SOCKET_KEY = "llm_magic.socket"  # the WSGI environ key under which the app finds its socket
MAX_BODY_BYTES = 4 * 1024 * 1024
LISTEN_BACKLOG = 128  # a burst of clients must not wait for SYN retries
MAX_HEADER_BYTES = 64 * 1024  # request line and headers together
HEADER_SECONDS = 10.0  # the request line and headers must arrive within this
BODY_SECONDS = 10.0  # the body must arrive within this after the headers, plus
BODY_BYTES_PER_SECOND = 64 * 1024  # ... a second for each this many bytes of it (a slow uplink)
PRESSURE_SECONDS = 2.0  # ... but when few workers are free, a request being read gets this long
SPARE_WORKERS = 16  # workers beyond the requests the engine holds: /health, refusals, readers
PRESSURE_IDLE = SPARE_WORKERS // 2  # fewer idle workers than this: readers get PRESSURE_SECONDS
POLL_SECONDS = 0.25  # how often a waiting read looks again at its deadline

BodyTooLarge = cheroot_errors.MaxSizeExceeded  # raised by the body stream past ``max_body``


class _DeadlineReader(socket.SocketIO):
    """A socket's reading side that gives up (``TimeoutError``, which cheroot answers with 408)
    when its connection's read deadline passes."""

    def __init__(self, sock: socket.socket, conn: "_Connection") -> None:
        super().__init__(sock, "rb")
        self._conn = conn
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN | select.POLLPRI)

    def readinto(self, buffer: Any) -> int | None:
        while True:
            remaining = self._conn.read_time_left()
            if remaining is None:
                break
            if remaining <= 0:
                raise TimeoutError("timed out")
            if self._poll.poll(min(remaining, POLL_SECONDS) * 1000):
                break
        return super().readinto(buffer)


class _Reader(StreamReader):
    """cheroot's buffered socket reader, over a ``_DeadlineReader``."""

    def __init__(self, sock: socket.socket, conn: "_Connection", bufsize: int) -> None:
        _pyio.BufferedReader.__init__(self, _DeadlineReader(sock, conn), bufsize)
        self.bytes_read = 0


class _Request(cheroot_server.HTTPRequest):
    """cheroot's request, with read deadlines and JSON errors."""

    def parse_request(self) -> None:
        self.conn.start_reading(HEADER_SECONDS)
        super().parse_request()
        if self.ready:
            try:
                length = int(self.inheaders.get(b"Content-Length", 0))
            except ValueError:  # cheroot has answered it already
                length = 0
            if self.chunked_read:
                length = self.server.max_request_body_size
            self.conn.start_reading(BODY_SECONDS + length / BODY_BYTES_PER_SECOND)

    def respond(self) -> None:
        try:
            super().respond()
        finally:
            self.conn.stop_reading()

    def send_headers(self) -> None:
        # The app says "Connection: close" when the rest of the body must not be read (it
        # timed out or is too large); cheroot would otherwise try to drain it first.
        if (b"Connection", b"close") in self.outheaders:
            self.close_connection = True
        super().send_headers()

    def simple_response(self, status: Any, msg: str = "") -> None:
        """The HTTP layer's own answers (malformed requests, timeouts, limits), as JSON."""
        status = str(status)
        code = int(status[:3])
        if code == 413 and "header" in msg.lower():
            code, status = 431, "431 Request Header Fields Too Large"
        message = _MESSAGES.get(code) or msg or status
        if code == 413:
            message = f"the request body is larger than {self.server.max_request_body_size} bytes"
        kind = "invalid_request_error" if code < 500 else "server_error"
        body = json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()
        head = [f"{self.server.protocol} {status}", f"Content-Length: {len(body)}",
                "Content-Type: application/json"]
        if code >= 400:  # after a refusal the stream may hold anything: start afresh
            self.close_connection = True
            head.append("Connection: close")
        if code == 503:
            head.append("Retry-After: 5")
        try:
            self.conn.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        except OSError as exc:
            if exc.args and exc.args[0] not in cheroot_errors.socket_errors_to_ignore:
                raise


_MESSAGES = {
    408: f"the request did not arrive in time (headers within {HEADER_SECONDS:.0f} s, the body within "
         f"{BODY_SECONDS:.0f} s and a second per {BODY_BYTES_PER_SECOND // 1024} KiB, less when the host is "
         "busy); send it at once",
    414: f"the request line is longer than {MAX_HEADER_BYTES} bytes",
    431: f"the request headers are larger than {MAX_HEADER_BYTES} bytes",
    501: "this HTTP feature is not implemented by the host",
    503: "the host is busy; retry in a few seconds",
    505: "only HTTP/1.0 and HTTP/1.1 are supported",
}


class _Connection(cheroot_server.HTTPConnection):
    """cheroot's connection, reading through a deadline that each request part sets."""

    RequestHandlerClass = _Request

    def __init__(self, server: "_Server", sock: socket.socket, makefile: Any = None) -> None:
        self._deadline: float | None = None
        self._reading_since = 0.0

        def make_file(sock: socket.socket, mode: str, bufsize: int) -> Any:
            return _Reader(sock, self, bufsize) if "r" in mode else MakeFile(sock, mode, bufsize)

        super().__init__(server, sock, make_file)

    def start_reading(self, seconds: float) -> None:
        now = time.monotonic()
        self._reading_since, self._deadline = now, now + seconds

    def stop_reading(self) -> None:
        self._deadline = None

    def read_time_left(self) -> float | None:
        """Seconds left for the current read; ``None`` when no deadline applies."""
        if self._deadline is None:
            return None
        deadline = self._deadline
        if self.server.under_pressure():
            deadline = min(deadline, self._reading_since + PRESSURE_SECONDS)
        return deadline - time.monotonic()


class _Gateway(cheroot_wsgi.Gateway_10):
    """cheroot's WSGI gateway, also handing the app its connection's socket (to notice a
    client that left while its answer was being made)."""

    def get_environ(self) -> dict:
        environ = super().get_environ()
        environ[SOCKET_KEY] = self.req.conn.socket
        return environ


class _Server(cheroot_wsgi.Server):
    ConnectionClass = _Connection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gateway = _Gateway

    def under_pressure(self) -> bool:
        """Whether so few workers are idle that requests still arriving must hurry."""
        requests = getattr(self, "requests", None)
        return requests is not None and requests.idle < PRESSURE_IDLE

    def error_log(self, msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
        log.log(level, "%s", loggable(msg.strip()), exc_info=traceback)


def loggable(text: str, limit: int = 300) -> str:
    """``text`` safe to write into a log line: control characters escaped (a newline in a
    request path must not forge a second line), at most ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class HttpServer:
    """A WSGI app served by cheroot in a background thread.

    ``held``: the requests the engine may hold at once (running plus waiting in line); the
    worker pool has ``SPARE_WORKERS`` more, so that ``/health`` and refusals still answer when
    the line is full."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 5000, held: int = 17,
                 max_body: int = MAX_BODY_BYTES) -> None:
        self.threads = held + SPARE_WORKERS
        self._server = _Server((host, port), app, numthreads=self.threads, server_name="llm_magic",
                               request_queue_size=LISTEN_BACKLOG)
        self._server.max_request_header_size = MAX_HEADER_BYTES
        self._server.max_request_body_size = max_body
        try:
            self._server.prepare()  # binds now: a port in use fails here, and port 0 gets its number
        except OSError as exc:  # cheroot keeps only the message of the bind error
            if os.strerror(errno.EADDRINUSE) in str(exc):
                raise OSError(errno.EADDRINUSE, f"Port {port} is in use by another program: stop it, "
                                                "or choose another port") from None
            raise
        self._thread = threading.Thread(target=self._server.serve, name="llm-magic-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.bind_addr[1]

    def start(self) -> "HttpServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.stop()
        self._thread.join(timeout=10)
