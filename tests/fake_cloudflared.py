"""A stand-in for the cloudflared executable, run through $LLM_MAGIC_CLOUDFLARED.

Called as ``fake_cloudflared.py tunnel --no-autoupdate --metrics HOST:PORT --url TARGET`` it
serves a metrics page naming its public URL, like the real one. $FAKE_CLOUDFLARED_MODE:

- ``named`` (default): names a https://….trycloudflare.com URL, which nothing here answers;
- ``proxy``: names http://127.0.0.1:PORT, a proxy to TARGET that behaves like Cloudflare's edge:
  524 when the origin sends no response within $FAKE_CLOUDFLARED_IDLE seconds (default 100),
  and a cut connection when an answer goes quiet for that long;
- ``buffer``: that proxy, but an edge that buffers event streams: a ``text/event-stream`` answer
  reaches the client all at once, when it is complete (as some proxies and tunnels do);
- ``fail``: prints cloudflared's error for an unreachable API and exits 1;
- ``silent``: runs but never shows a URL.

$FAKE_CLOUDFLARED_WARMUP (seconds, default 0): the proxy's URL refuses connections for that long
after it is named, as a new quick tunnel's hostname does until Cloudflare's DNS knows it.
$FAKE_CLOUDFLARED_SETTINGS names a JSON file read at each start whose keys ``mode``, ``idle`` and
``warmup`` override those: a test can change how the *next* cloudflared behaves while a server
that restarts it runs.

Each start appends ``PID URL`` to $FAKE_CLOUDFLARED_LOG when set.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


def main(argv: list[str]) -> int:
    metrics = argv[argv.index("--metrics") + 1]
    target = urlparse(argv[argv.index("--url") + 1])
    settings = {"mode": os.environ.get("FAKE_CLOUDFLARED_MODE", "named"),
                "idle": os.environ.get("FAKE_CLOUDFLARED_IDLE", "100"),
                "warmup": os.environ.get("FAKE_CLOUDFLARED_WARMUP", "0")}
    named = os.environ.get("FAKE_CLOUDFLARED_SETTINGS")
    if named and os.path.exists(named):
        with open(named) as fh:
            settings.update(json.load(fh))
    mode, idle, warmup = settings["mode"], float(settings["idle"]), float(settings["warmup"])
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if mode == "fail":
        print("ERR failed to request quick Tunnel: dial tcp: lookup api.trycloudflare.com: no such host",
              file=sys.stderr, flush=True)
        return 1

    url = f"https://{secrets.token_hex(4)}-fake-tunnel.trycloudflare.com"
    if mode in ("proxy", "buffer"):
        handler = _proxy_handler(target.hostname, target.port, idle, buffer_streams=mode == "buffer")
        proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
        proxy.daemon_threads = True
        proxy.server_bind()  # the port is known (it is in the URL), but until listen() it refuses

        def serve() -> None:
            if warmup:
                time.sleep(warmup)
            proxy.server_activate()
            proxy.serve_forever()

        threading.Thread(target=serve, daemon=True).start()
        url = f"http://127.0.0.1:{proxy.server_port}"
    if os.environ.get("FAKE_CLOUDFLARED_LOG"):
        with open(os.environ["FAKE_CLOUDFLARED_LOG"], "a") as fh:
            fh.write(f"{os.getpid()} {url}\n")

    body = "# cloudflared metrics\ncloudflared_tunnel_ha_connections 4\n"
    if mode != "silent":
        body += f'cloudflared_tunnel_user_hostnames_counts{{userHostname="{url}"}} 1\n'
        print(f"INF |  {url}  |", file=sys.stderr, flush=True)

    class Metrics(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    host, port = metrics.rsplit(":", 1)
    ThreadingHTTPServer((host, int(port)), Metrics).serve_forever()
    return 0


def _proxy_handler(host: str, port: int, idle: float, buffer_streams: bool = False) -> type:
    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            upstream = http.client.HTTPConnection(host, port, timeout=idle)
            try:
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                response = upstream.getresponse()
            except socket.timeout:
                return self._send_524()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Connection", "close")
            self.end_headers()
            held = buffer_streams and "text/event-stream" in (response.getheader("Content-Type") or "")
            kept = []
            try:
                while True:
                    chunk = response.read1(65536)
                    if not chunk:
                        break
                    if held:
                        kept.append(chunk)
                        continue
                    self.wfile.write(chunk)
                    self.wfile.flush()
                if kept:
                    self.wfile.write(b"".join(kept))
            except socket.timeout:
                pass  # the answer went quiet for too long: the edge drops the connection
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                upstream.close()
                self.close_connection = True

        def _send_524(self) -> None:
            data = b"error code: 524"
            self.send_response(524)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True

        do_GET = do_POST = _forward

    return Proxy


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
