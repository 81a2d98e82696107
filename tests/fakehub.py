"""A local stand-in for the Hugging Face hub: the real huggingface_hub code runs
against it through HF_ENDPOINT. It answers the file-resolve and repo-tree routes, with the
headers huggingface_hub checks, and can be told to fail a download half-way."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Repos are ``{repo_id: {filename: Path or bytes}}``."""

    def __init__(self, repos: dict[str, dict[str, Path | bytes]]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self.truncate: set[str] = set()  # filenames whose next GET body stops half-way
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, body=False)

            def do_GET(self) -> None:
                hub._handle(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _content(self, repo: str, name: str) -> bytes:
        data = self.repos[repo][name]
        return data.read_bytes() if isinstance(data, Path) else data

    def _handle(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(req.path).path)
        self.requests.append((req.command, path, req.headers.get("Authorization")))
        tree = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)/?(.*)$", path)
        resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if tree:
            repo = tree.group(1)
            if repo not in self.repos:
                return self._error(req, 404, "RepoNotFound")
            files = [{"type": "file", "path": name, "size": len(self._content(repo, name)),
                      "oid": hashlib.sha1(name.encode()).hexdigest()} for name in self.repos[repo]]
            return self._send(req, 200, json.dumps(files).encode(), {"Content-Type": "application/json"}, body)
        if resolve:
            repo, _, name = resolve.groups()
            if repo not in self.repos:
                return self._error(req, 404, "RepoNotFound")
            if name not in self.repos[repo]:
                return self._error(req, 404, "EntryNotFound")
            data = self._content(repo, name)
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Content-Type": "application/octet-stream"}
            if body and name in self.truncate:
                self.truncate.discard(name)
                return self._send(req, 200, data[: len(data) // 2], headers, body, length=len(data))
            ranged = re.match(r"bytes=(\d+)-$", req.headers.get("Range", ""))
            if body and ranged:
                start = int(ranged.group(1))
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return self._send(req, 206, data[start:], headers, body)
            return self._send(req, 200, data, headers, body)
        return self._error(req, 404, "RepoNotFound")

    def _error(self, req: BaseHTTPRequestHandler, status: int, code: str) -> None:
        self._send(req, status, b'{"error": "not found"}', {"X-Error-Code": code,
                                                           "Content-Type": "application/json"}, True)

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str], body: bool,
              length: int | None = None) -> None:
        req.send_response(status)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(length if length is not None else len(data)))
        req.end_headers()
        if body:
            try:
                req.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
        if length is not None:
            req.close_connection = True
