"""``ApiHost``: the server process's life — spawn, wait until ready, status, logs, stop.

The server runs as ``python -m llm_magic serve ...`` in its own process: the notebook kernel
stays responsive, a llama.cpp abort cannot kill it, and stopping frees all GPU memory.
"""

from __future__ import annotations

import atexit
import enum
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Sequence

import requests

from llm_magic.errors import HostError
from llm_magic.settings import DEFAULTS, TOKEN_ENV, TUNNELS, ServeSettings, add_serve_arguments
from llm_magic.supervisor.host_tunnel import HostTunnel
from llm_magic.supervisor.logfile import ServerLog

__all__ = ["ApiHost", "HostState", "TOKEN_ENV", "TUNNELS", "add_serve_arguments", "new_token"]

HF_TOKEN_ENV = "HF_TOKEN"
LOG_LINES_KEPT = 1000  # of a stopped server's log, for logs()
DEATH_LOG_LINES = 15  # of a dead server's log, in status()


def new_token() -> str:
    """A fresh access token (from ``secrets``: unguessable). Never one that starts with '-',
    which a command line (``--token -x…``) would read as an option."""
    while True:
        token = secrets.token_urlsafe(24)
        if token[0].isalnum():
            return token


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
    FAILED = "failed"  # it could not start, or its process died (then ``ApiHost.death`` says why)


_SIGNAL_HINTS = {
    "SIGKILL": "sent by the system's out-of-memory killer when memory runs out, or by kill -9",
    "SIGSEGV": "a crash: a segmentation fault, in llama.cpp or the GPU driver",
    "SIGABRT": "llama.cpp aborts this way when one of its checks fails",
    "SIGBUS": "a crash: a bus error, often a model file changed or removed while in use",
    "SIGILL": "an instruction this CPU lacks: llama-cpp-python was built for another CPU",
    "SIGFPE": "a crash: an arithmetic error",
    "SIGTERM": "something else asked it to stop",
}


def describe_exit(returncode: int) -> tuple[str, str | None]:
    """Why a process ended, in words, and the name of the signal that ended it (if one did)."""
    if returncode >= 0:
        return f"it exited with code {returncode}", None
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    hint = _SIGNAL_HINTS.get(name)
    return f"it was killed by {name}" + (f" ({hint})" if hint else ""), name


def last_error(log_text: str) -> str:
    """The line of a log that best says what went wrong: its last ``error:`` line, else its last."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def free_port(host: str) -> int:
    """A port free on ``host`` now. A server asked for port 0 is started on one of these instead:
    cheroot lets a listener on a port it was given reuse the address (SO_REUSEADDR), not one on
    port 0, and without that, the connections a server had when it died (their ends linger on
    the port for up to a minute) would keep its restart from binding the port again."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.bind(address)
        return sock.getsockname()[1]


def get_health(url: str, timeout: float = 5.0) -> dict[str, Any]:
    try:
        response = requests.get(f"{url}/health", timeout=timeout)
        return response.json() if response.ok else {}
    except (requests.RequestException, ValueError):
        return {}


def prepare_model(model: str | None, fronted: bool = False) -> list[str]:
    """The ``serve`` arguments for ``model``. A hub model is downloaded here, in the caller's
    process, so that its progress bar shows in the notebook; the server then loads the file.
    ``fronted``: the server fronts another engine, and ``model`` is one of that engine's names."""
    if not model:
        return []
    if fronted:
        return ["--model", model]
    from llm_magic.models import ModelSpec, resolve_model

    spec = ModelSpec.parse(model)
    if not spec.repo_id:
        return ["--model", model]
    return ["--model", str(resolve_model(spec)), "--model-name", str(spec)]


class ServerProcess:
    """One run of ``python -m llm_magic serve`` as a child process: its temporary folder (the
    ready file, the tunnel's state), its log, its exit."""

    def __init__(self) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="llm-magic-"))
        self.ready_file = self.run_dir / "ready.json"
        self.tunnel_file = self.run_dir / "tunnel.json"
        self.log = ServerLog(self.run_dir / "server.log")
        self.process: subprocess.Popen | None = None

    def spawn(self, command: list[str], env: dict[str, str]) -> None:
        # stdout and stderr go through a pipe to the log's writer (see logfile.py): llama.cpp
        # writes to fd 2 itself, and the writer keeps the file within its cap whatever comes
        out = self.log.pipe()
        try:
            self.process = subprocess.Popen([*command, "--ready-file", str(self.ready_file)], stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            self.log.settle(1)
            raise
        finally:
            self.log.release()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """The ready file's contents once ``/health`` says ok; ``HostError`` if the process ends
        first or ``timeout`` s pass."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HostError(f"the server stopped during start-up: {self.failure_reason()}")
            if self.ready_file.exists():
                info = json.loads(self.ready_file.read_text())
                if get_health(info["url"], timeout=2).get("status") == "ok":
                    return info
            time.sleep(0.05)
        raise HostError(f"the server did not become ready within {timeout:.0f} s; "
                        f"its last log line: {self.failure_reason()}")

    def failure_reason(self) -> str:
        if not self.alive:
            self.log.settle(2)  # its last words are written before they are read
        return last_error(self.log.tail(200))

    def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s; then the log's writer finishes."""
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.log.settle()

    def remove(self) -> str:
        """Remove the folder; return the log's tail, kept for ``logs()``."""
        self.log.settle()
        kept = self.log.tail(LOG_LINES_KEPT)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return kept


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
        settings: ServeSettings | None = None,
    ) -> None:
        self.model = model
        self.token = (token or os.environ.get(TOKEN_ENV) or notebook_secret(TOKEN_ENV) or new_token()) if use_token else None
        # A notebook host opens the public tunnel by default, a terminal one does not.
        self.tunnel = tunnel or ("cloudflared" if "ipykernel" in sys.modules else "none")
        self.host, self.port = host, port
        self.startup_timeout = startup_timeout
        # the serve flags: ``settings`` (as ``%llm_host start`` reads them), else the keywords
        self.settings = settings or ServeSettings(
            ctx=ctx_length or DEFAULTS.ctx, gpu_layers=DEFAULTS.gpu_layers if gpu_layers is None else gpu_layers,
            allow_model=list(allow_models), max_queue=DEFAULTS.max_queue if max_queue is None else max_queue)
        self._args = (["--no-token"] if self.token is None else []) + self.settings.to_argv(
            skip=("model", "host", "port", "token", "no_token", "tunnel")) + list(extra_args)
        self._state = HostState.STOPPED
        self.url: str | None = None
        self.public_url: str | None = None
        self.model_name: str | None = None
        self.tunnel_note: str | None = None  # what the server says of its tunnel
        self.tunnel_streams = True  # False when the tunnel delivers streams all at once
        self.device: dict[str, str] = {}  # device, gpu_layers, memory: where the model runs
        self.warnings: list[str] = []  # what the server warned of at start (a GPU it cannot use)
        self.death: str | None = None  # why the server died ("it was killed by SIGKILL (…)"), once it has
        self.exit_code: int | None = None
        self._server: ServerProcess | None = None
        self._last_log = ""  # the log's tail, kept when the folder is removed at stop
        self._started_at: float | None = None
        self._tunnel = HostTunnel()  # opened here, not by the server: it outlives a restart (same URL)

    def __repr__(self) -> str:
        where = f" {self.url}" if self.url else ""
        return f"<ApiHost {self.state.value}{where}>"

    def __enter__(self) -> "ApiHost":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def state(self) -> HostState:
        """The host's state; a running server whose process has ended is noticed here."""
        server = self._server
        if self._state == HostState.RUNNING and server is not None and not server.alive:
            assert server.process is not None
            self.exit_code = server.process.returncode
            self.death = describe_exit(self.exit_code)[0]
            server.log.settle(2)  # so that its last lines are in the log
            self._state = HostState.FAILED
        return self._state

    @state.setter
    def state(self, value: HostState) -> None:
        self._state = value

    @property
    def log_path(self) -> Path | None:
        """The server's log file, from start to stop (older parts rotate to ``.1``, ``.2``)."""
        return self._server.log.path if self._server is not None else None

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> "ApiHost":
        """Start the server in the background; return once it answers ``/health``."""
        if self.state in (HostState.STARTING, HostState.RUNNING) and self.running:
            raise HostError(f"the host is already running at {self.url}; stop it first")
        if not os.environ.get(HF_TOKEN_ENV) and (hf_token := notebook_secret(HF_TOKEN_ENV)):
            # for private and gated hub models, downloaded here and (on request) by the server
            os.environ[HF_TOKEN_ENV] = hf_token
        model_args = prepare_model(self.model, fronted=self.settings.engine is not None or "--engine" in self._args)
        self._remove_run_dir()
        self.death = self.exit_code = None
        server = self._server = ServerProcess()
        # The tunnel is opened here, not by the server: it then outlives a restart (same URL).
        port = self.port or free_port(self.host)
        command = [sys.executable, "-m", "llm_magic", "serve", "--host", self.host, "--port", str(port),
                   "--tunnel", "none", *self._args, *model_args, "--exit-with-parent", str(os.getpid())]
        if self.tunnel == "cloudflared":
            command += ["--tunnel-status", str(server.tunnel_file)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop(TOKEN_ENV, None)
        if self.token:
            env[TOKEN_ENV] = self.token  # not on the command line, where `ps` would show it
        self.state = HostState.STARTING
        atexit.register(self.stop)
        try:
            server.spawn(command, env)
            info = server.wait_ready(self.startup_timeout)
            self.url, self.model_name = info["url"], info["model"]
            self.public_url, self.tunnel_note = info.get("public_url"), info.get("tunnel")
            self.tunnel_streams = info.get("streams", True) is not False
            self.device, self.warnings = info.get("device") or {}, info.get("warnings") or []
            if self.tunnel == "cloudflared":
                port = urllib.parse.urlsplit(self.url).port
                self.public_url, self.tunnel_note, self.tunnel_streams = self._tunnel.open(
                    port, self.token, server.tunnel_file, self._tunnel_moved)
        except BaseException:
            self.stop()
            self.state = HostState.FAILED
            raise
        self.state = HostState.RUNNING
        self._started_at = time.time()
        return self

    def restart(self, **settings: Any) -> "ApiHost":
        """Stop (or clear away a server that died) and start again with the same token on the
        same port; a public tunnel stays open, so the public URL stays too: clients carry on.
        With ``settings`` (the constructor's keywords) it comes back configured as
        ``ApiHost(**settings)`` would be, still on its port and with its token unless given."""
        port = urllib.parse.urlsplit(self.url).port if self.url else None
        self.port = port or self.port
        fresh = self._configured(settings) if settings else None  # a bad keyword fails before the stop
        self.stop(keep_tunnel=True)
        if fresh is not None:
            self.model, self.token, self.tunnel, self.host, self.port = (fresh.model, fresh.token, fresh.tunnel,
                                                                         fresh.host, fresh.port)
            self.startup_timeout, self._args, self.settings = fresh.startup_timeout, fresh._args, fresh.settings
            if self.tunnel != "cloudflared":
                self._tunnel.stop()  # a tunnel no longer wanted
        return self.start()

    def _configured(self, settings: dict[str, Any]) -> "ApiHost":
        """An unstarted host holding ``settings``, with this one's port, startup timeout and
        token (or none) where they are not given."""
        settings = {"port": self.port, "startup_timeout": self.startup_timeout,
                    "use_token": self.token is not None, **settings}
        if settings.get("token") is None and settings["use_token"]:
            settings["token"] = self.token
        return ApiHost(**settings)

    def _tunnel_moved(self, url: str, state: str) -> None:
        """cloudflared restarted (it died): a new public URL."""
        if self.state == HostState.RUNNING:
            self.public_url = url
            note = "" if state == "ready" else " (not answering yet: Cloudflare may need a moment)"
            print(f"llm_magic: the tunnel restarted; new public URL: {url}{note}", flush=True)

    def _remove_run_dir(self) -> None:
        """Keep the log's tail in memory (for ``logs()``), then remove the temporary folder."""
        if self._server is not None:
            self._last_log = self._server.remove()
            self._server = None

    def stop(self, timeout: float = 10.0, keep_tunnel: bool = False) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` s) and the tunnel, unless
        ``keep_tunnel`` (for a restart). Safe to call twice, and after the server died."""
        if not keep_tunnel:
            self._tunnel.stop()
        atexit.unregister(self.stop)
        if self._server is not None:
            self.state = HostState.STOPPING
            self._server.stop(timeout)
        self._remove_run_dir()
        self.state = HostState.STOPPED
        self._started_at = None
        self.death = self.exit_code = None

    def connection_text(self) -> str:
        """The block to show once the host is ready: URLs, token and client snippets."""
        from llm_magic.supervisor.snippets import connection_text

        return connection_text(self.url or "", self.token, self.model_name or "", self.public_url, self.tunnel_note,
                               streams=self.tunnel_streams, device=self.device, warnings=self.warnings)

    def run(self) -> None:
        """Start, print the connection details, and block until Ctrl-C (the seed's call)."""
        self.start()
        interrupted = threading.Event()
        catching = threading.current_thread() is threading.main_thread()  # where a handler can be set
        if catching:
            # Ctrl-C sets a flag instead of raising wherever the loop is: a KeyboardInterrupt
            # inside a subprocess poll can leave its lock held, and the stop below then hangs
            previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
        try:
            print(self.connection_text(), flush=True)
            while self.running and not interrupted.wait(0.5):
                pass
            if not interrupted.is_set():
                why = f": {self.death}" if self.state == HostState.FAILED and self.death else ""
                print(f"the server stopped{why}; its last log line: {last_error(self.logs(200))}", file=sys.stderr)
        except KeyboardInterrupt:  # outside the main thread no handler could be set
            pass
        finally:
            self.stop()
            if catching:  # (None: a handler set outside Python, which the default stands for)
                signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

    # -- inspection --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.alive

    @property
    def pid(self) -> int | None:
        return self._server.process.pid if self._server is not None and self._server.process else None

    def status(self) -> dict[str, Any]:
        """State, URLs, model, uptime, and the server's own counters when it answers: among
        them ``device`` ("CPU", "CUDA0 Tesla T4"), ``gpu_layers`` ("0 (CPU only)", "29 of 29")
        and ``memory`` (weights and KV cache; on a GPU, its memory in use). A server whose process
        died (state ``failed``) adds ``died`` (why, in words), ``exit_code`` (negative: killed by
        ``signal``) and ``log`` (its last lines); ``restart()`` brings it back."""
        state = self.state
        info: dict[str, Any] = {"state": state.value, "url": self.url, "public_url": self.public_url,
                                "tunnel": self.tunnel_note, "model": self.model_name, "pid": self.pid}
        if self.death and self.exit_code is not None:
            info.update(died=self.death, exit_code=self.exit_code, signal=describe_exit(self.exit_code)[1],
                        log=self.logs(DEATH_LOG_LINES).splitlines())
        if self._started_at and self.running and self.url:
            info["uptime_s"] = round(time.time() - self._started_at, 1)
            health = get_health(self.url)
            tunnel = self._tunnel.status()
            if tunnel.get("public_url"):  # cloudflared may have restarted with a new URL
                self.public_url = info["public_url"] = tunnel["public_url"]
                info["tunnel"] = f"cloudflared ({tunnel.get('state')}, {tunnel.get('restarts', 0)} restarts)"
            info.update({k: v for k, v in health.items() if k not in info or info[k] is None})
        return info

    def logs(self, n: int = 50) -> str:
        """The last ``n`` lines the server wrote (after ``stop()``: of its last run), read from
        the log's end."""
        if self._server is not None:
            return self._server.log.tail(n)
        return "\n".join(self._last_log.splitlines()[-n:]) if n > 0 else ""
