"""``ApiHost``: the server process's life — spawn, wait until ready, status, logs, stop.

The server runs as ``python -m llm_magic serve ...`` in its own process: the notebook kernel
stays responsive, a llama.cpp abort cannot kill it, and stopping frees all GPU memory.
"""

from __future__ import annotations

import argparse
import atexit
import enum
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Sequence

import requests

from .errors import HostError
from .files import write_atomically

TOKEN_ENV = "LLM_MAGIC_TOKEN"
HF_TOKEN_ENV = "HF_TOKEN"
TUNNELS = ("cloudflared", "none")
LOG_LINES_KEPT = 1000  # of a stopped server's log, for logs()


def new_token() -> str:
    """A fresh access token (from ``secrets``: unguessable). Never one that starts with '-',
    which a command line (``--token -x…``) would read as an option."""
    while True:
        token = secrets.token_urlsafe(24)
        if token[0].isalnum():
            return token


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` flags (shared with ``%llm_host start``)."""
    parser.add_argument("--model", metavar="SPEC",
                        help="a .gguf path, OWNER/REPO:QUANT, OWNER/REPO:FILENAME (glob allowed); "
                             "default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5000, help="port to bind; 0 picks a free one (default: %(default)s)")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--token", metavar="T", help=f"access token (default: ${TOKEN_ENV}, else a new random one)")
    auth.add_argument("--no-token", action="store_true", help="serve without a token (only the default model)")
    parser.add_argument("--tunnel", choices=TUNNELS, default=None,
                        help="public tunnel (default: none on the terminal)")
    parser.add_argument("--ctx", type=int, default=4096, metavar="N", help="context length in tokens (default: %(default)s)")
    parser.add_argument("--max-ctx", type=int, default=None, metavar="N",
                        help="the largest context a token holder's request may ask for with /api's "
                             "options.ctx_length, reloading the model (default: --ctx, no reloads)")
    parser.add_argument("--gpu-layers", type=int, default=-1, metavar="N",
                        help="layers to offload to the GPU; -1 all, 0 CPU only (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: every core)")
    parser.add_argument("--chat-format", default=None, metavar="NAME",
                        help="chat template name (default: the template inside the GGUF)")
    parser.add_argument("--allow-model", action="append", default=[], metavar="PATTERN",
                        help="let requests load models matching PATTERN (repeatable), e.g. 'bartowski/*'")
    parser.add_argument("--parallel", type=_at_least_one, default=4, metavar="N",
                        help="answers written at once, decoded together in one batch; each slot keeps "
                             "its own KV cache of --ctx tokens, so memory for the cache grows with N "
                             "(default: %(default)s, as llama-server's; 1 serves one request at a time)")
    parser.add_argument("--max-queue", type=int, default=16, metavar="N",
                        help="requests that may wait for a free slot before 503 (default: %(default)s)")
    parser.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                        help="llama.cpp's flash attention: faster, and llama-server's default "
                             "(default: %(default)s; 'off' gives llama-cpp-python's default numerics)")
    parser.add_argument("--embedding-model", metavar="SPEC", default=None,
                        help="a model for /v1/embeddings (default: the served model, in an embedding "
                             "context sharing its weights)")
    parser.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                        help="let browser pages from ORIGIN call the host (repeatable; '*' for any); "
                             "default: none")
    parser.add_argument("--keepalive", type=float, default=15.0, metavar="S",
                        help="while the model is busy, send a keep-alive every S seconds so that "
                             "proxies and tunnels do not cut the answer (default: %(default)s)")


def notebook_secret(name: str) -> str | None:
    """A secret from the notebook service's own store: Colab's key panel (🔑, with notebook
    access granted) or Kaggle's Add-ons → Secrets (attached to the notebook). None elsewhere,
    or when it is not set or not granted."""
    if "google.colab" in sys.modules:
        try:
            from google.colab import userdata

            return userdata.get(name) or None
        except Exception:  # not granted, not set: Colab raises its own error types for each
            return None
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        try:
            from kaggle_secrets import UserSecretsClient

            return UserSecretsClient().get_secret(name) or None
        except Exception:  # not attached, or no kaggle_secrets here: Kaggle raises its own types
            return None
    return None


class HostState(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"


class ApiHost:
    """A model server in a child process, as in the seed: ``ApiHost().run()``.

    >>> host = ApiHost(use_token=False, port=0).start()   # returns once /health answers
    >>> host.url
    'http://127.0.0.1:43127'
    >>> host.stop()
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        use_token: bool = True,
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 5000,
        tunnel: str | None = None,
        ctx_length: int | None = None,
        gpu_layers: int | None = None,
        allow_models: Sequence[str] = (),
        max_queue: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 600.0,
    ) -> None:
        self.model = model
        self.token = (token or os.environ.get(TOKEN_ENV) or notebook_secret(TOKEN_ENV) or new_token()) if use_token else None
        # A notebook host opens the public tunnel by default, a terminal one does not.
        self.tunnel = tunnel or ("cloudflared" if "ipykernel" in sys.modules else "none")
        self.host, self.port = host, port
        self.startup_timeout = startup_timeout
        self._args = self._serve_args(ctx_length, gpu_layers, allow_models, max_queue, extra_args)
        self.state = HostState.STOPPED
        self.url: str | None = None
        self.public_url: str | None = None
        self.model_name: str | None = None
        self.tunnel_note: str | None = None  # what the server says of its tunnel
        self.tunnel_streams = True  # False when the tunnel delivers streams all at once
        self.device: dict[str, str] = {}  # device, gpu_layers, memory: where the model runs
        self.warnings: list[str] = []  # what the server warned of at start (a GPU it cannot use)
        self._process: subprocess.Popen | None = None
        self._run_dir: Path | None = None  # a temporary folder for the log, from start to stop
        self.log_path: Path | None = None
        self._last_log = ""  # the log's tail, kept when the folder is removed at stop
        self._started_at: float | None = None
        self._tunnel: Any = None  # the cloudflared tunnel, kept here so that it outlives a restart

    def __repr__(self) -> str:
        where = f" {self.url}" if self.url else ""
        return f"<ApiHost {self.state.value}{where}>"

    def __enter__(self) -> "ApiHost":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _serve_args(self, ctx_length: int | None, gpu_layers: int | None, allow_models: Sequence[str],
                    max_queue: int | None, extra: Sequence[str]) -> list[str]:
        args = ["--no-token"] if self.token is None else []
        for flag, value in (("--ctx", ctx_length), ("--gpu-layers", gpu_layers), ("--max-queue", max_queue)):
            if value is not None:
                args += [flag, str(value)]
        for pattern in allow_models:
            args += ["--allow-model", pattern]
        return args + list(extra)

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> "ApiHost":
        """Start the server in the background; return once it answers ``/health``."""
        if self.state in (HostState.STARTING, HostState.RUNNING) and self.running:
            raise HostError(f"the host is already running at {self.url}; stop it first")
        if not os.environ.get(HF_TOKEN_ENV) and (hf_token := notebook_secret(HF_TOKEN_ENV)):
            # for private and gated hub models, downloaded here and (on request) by the server
            os.environ[HF_TOKEN_ENV] = hf_token
        model_args = self._prepare_model()
        self._remove_run_dir()
        self._run_dir = Path(tempfile.mkdtemp(prefix="llm-magic-"))
        self.log_path = self._run_dir / "server.log"
        ready_file = self._run_dir / "ready.json"
        # The tunnel is opened here, not by the server: it then outlives a restart (same URL).
        command = [sys.executable, "-m", "llm_magic", "serve", "--host", self.host, "--port", str(self.port),
                   "--tunnel", "none", *self._args, *model_args,
                   "--ready-file", str(ready_file), "--exit-with-parent", str(os.getpid())]
        if self.tunnel == "cloudflared":
            command += ["--tunnel-status", str(self._tunnel_status_file)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop(TOKEN_ENV, None)
        if self.token:
            env[TOKEN_ENV] = self.token  # not on the command line, where `ps` would show it
        self.state = HostState.STARTING
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env)
        atexit.register(self.stop)
        try:
            self._wait_ready(ready_file)
            if self.tunnel == "cloudflared":
                self._open_tunnel()
        except BaseException:
            self.stop()
            self.state = HostState.FAILED
            raise
        self.state = HostState.RUNNING
        self._started_at = time.time()
        return self

    def restart(self) -> "ApiHost":
        """Stop and start again with the same token on the same port; a public tunnel stays
        open, so the public URL stays too: clients carry on."""
        port = urllib.parse.urlsplit(self.url).port if self.url else None
        self.port = port or self.port
        self.stop(keep_tunnel=True)
        return self.start()

    def take_tunnel(self, other: "ApiHost") -> None:
        """Before ``start()``: reuse the tunnel of ``other`` (stopped with ``keep_tunnel=True``),
        so that its public URL stays. It is used if the port and the token are the same."""
        self._tunnel, other._tunnel = other._tunnel, None

    @property
    def _tunnel_status_file(self) -> Path:
        assert self._run_dir is not None
        return self._run_dir / "tunnel.json"

    def _open_tunnel(self) -> None:
        from .tunnel import Tunnel, open_tunnel, tunnel_note

        port = urllib.parse.urlsplit(self.url).port if self.url else None
        tunnel = self._tunnel
        if tunnel is not None and tunnel.open and tunnel.port == port and tunnel.token == self.token:
            tunnel.check()  # the new server answers through the old tunnel
            note = tunnel_note(tunnel)
        else:
            if tunnel is not None:
                tunnel.stop()
            tunnel = self._tunnel = Tunnel(port, token=self.token, on_change=self._tunnel_moved)
            _, note = open_tunnel(tunnel)
        self.public_url, self.tunnel_note = tunnel.public_url, note
        self.tunnel_streams = tunnel.streams is not False
        self._write_tunnel_status()

    def _tunnel_moved(self, url: str) -> None:
        """cloudflared restarted (it died): a new public URL."""
        if self._tunnel is not None and self._tunnel.restarts and self.state == HostState.RUNNING:
            self.public_url = url
            self._write_tunnel_status()
            print(f"llm_magic: the tunnel restarted; new public URL: {url}", flush=True)

    def _write_tunnel_status(self) -> None:
        """For the server's /health (the chat page reads whether the tunnel streams)."""
        if self._tunnel is None or self._run_dir is None:
            return
        write_atomically(self._tunnel_status_file, json.dumps(self._tunnel.status()))

    def _prepare_model(self) -> list[str]:
        """Download a hub model here, in the caller's process, so its progress bar shows in the
        notebook; the server then loads the cached file."""
        if not self.model:
            return []
        from .models import ModelSpec, resolve_model

        spec = ModelSpec.parse(self.model)
        if not spec.repo_id:
            return ["--model", self.model]
        return ["--model", str(resolve_model(spec)), "--model-name", str(spec)]

    def _wait_ready(self, ready_file: Path) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise HostError(f"the server stopped during start-up: {self._failure_reason()}")
            if ready_file.exists():
                info = json.loads(ready_file.read_text())
                self.url, self.model_name = info["url"], info["model"]
                self.public_url, self.tunnel_note = info.get("public_url"), info.get("tunnel")
                self.tunnel_streams = info.get("streams", True) is not False
                self.device, self.warnings = info.get("device") or {}, info.get("warnings") or []
                if self._health(timeout=2).get("status") == "ok":
                    return
            time.sleep(0.05)
        raise HostError(f"the server did not become ready within {self.startup_timeout:.0f} s; "
                        f"its last log line: {self._failure_reason()}")

    def _failure_reason(self) -> str:
        lines = [line.strip() for line in self.logs(200).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        return (errors or lines or ["no output"])[-1]

    def _remove_run_dir(self) -> None:
        """Keep the log's tail in memory (for ``logs()``), then remove the temporary folder."""
        if self._run_dir is None:
            return
        self._last_log = self._read_log(LOG_LINES_KEPT)
        shutil.rmtree(self._run_dir, ignore_errors=True)
        self._run_dir = self.log_path = None

    def stop(self, timeout: float = 10.0, keep_tunnel: bool = False) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` s) and the tunnel, unless
        ``keep_tunnel`` (for a restart). Safe to call twice."""
        if self._tunnel is not None and not keep_tunnel:
            self._tunnel.stop()
            self._tunnel = None
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if process is None:
            self._remove_run_dir()
            self.state = HostState.STOPPED
            return
        self.state = HostState.STOPPING
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self._remove_run_dir()
        self.state = HostState.STOPPED
        self._started_at = None

    def connection_text(self) -> str:
        """The block to show once the host is ready: URLs, token and client snippets."""
        from .snippets import connection_text

        return connection_text(self.url or "", self.token, self.model_name or "", self.public_url, self.tunnel_note,
                               streams=self.tunnel_streams, device=self.device, warnings=self.warnings)

    def run(self) -> None:
        """Start, print the connection details, and block until Ctrl-C (the seed's call)."""
        self.start()
        print(self.connection_text(), flush=True)
        try:
            while self.running:
                time.sleep(0.5)
            print(f"the server stopped: {self._failure_reason()}", file=sys.stderr)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    # -- inspection --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _health(self, timeout: float = 5.0) -> dict[str, Any]:
        try:
            response = requests.get(f"{self.url}/health", timeout=timeout)
            return response.json() if response.ok else {}
        except (requests.RequestException, ValueError):
            return {}

    def status(self) -> dict[str, Any]:
        """State, URLs, model, uptime, and the server's own counters when it answers: among
        them ``device`` ("CPU", "CUDA0 Tesla T4"), ``gpu_layers`` ("0 (CPU only)", "29 of 29")
        and ``memory`` (weights and KV cache; on a GPU, its memory in use)."""
        if self.state == HostState.RUNNING and not self.running:
            self.state = HostState.FAILED
        info: dict[str, Any] = {"state": self.state.value, "url": self.url, "public_url": self.public_url,
                                "tunnel": self.tunnel_note, "model": self.model_name, "pid": self.pid}
        if self._started_at and self.running:
            info["uptime_s"] = round(time.time() - self._started_at, 1)
            health = self._health()
            tunnel = self._tunnel.status() if self._tunnel is not None else {}
            if tunnel.get("public_url"):  # cloudflared may have restarted with a new URL
                self.public_url = info["public_url"] = tunnel["public_url"]
                info["tunnel"] = f"cloudflared ({tunnel.get('state')}, {tunnel.get('restarts', 0)} restarts)"
            info.update({k: v for k, v in health.items() if k not in info or info[k] is None})
        return info

    def logs(self, n: int = 50) -> str:
        """The last ``n`` lines the server wrote (after ``stop()``: of its last run)."""
        return self._read_log(n) if self.log_path is not None else "\n".join(self._last_log.splitlines()[-n:])

    def _read_log(self, n: int) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path else []
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])
