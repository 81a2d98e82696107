"""``--engine vllm`` and ``--engine llama-server``: the host starts the engine itself, as a child
of the serving process, and fronts it. Its output goes to the host's log (so ``%llm_host logs``
shows vLLM's start-up), it is ready when its ``/health`` answers, it dies with the host (Linux's
parent-death signal, then SIGTERM and SIGKILL at stop, which frees its GPU memory), and a crash
is reported with its last lines.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import requests

from llm_magic.engine.llama_cpp.cpu import NO_AMX_CMAKE_ARGS, advertises_amx  # stdlib alone
from llm_magic.errors import EngineUnavailable, InvalidRequest

log = logging.getLogger("llm_magic.engine")

KINDS = ("vllm", "llama-server")
LLAMA_SERVER_ENV = "LLAMA_SERVER_BIN"
VLLM_ENV = "LLM_MAGIC_VLLM"  # a vllm executable, else `vllm` on PATH, else `python -m vllm...`
LINES_KEPT = 60  # of the engine's output, for the report of a crash
STOP_SECONDS = 7.0  # SIGTERM's grace, then SIGKILL: both within the 10 s a host's stop waits for the host
KEY_ENV = {"vllm": "VLLM_API_KEY", "llama-server": "LLAMA_API_KEY"}  # where each engine reads its key
# vLLM answers tool_choice "required" only with a parser for the model's own format (DESIGN §7);
# the family is read from the model's name, and --vllm-arg overrides it.
VLLM_TOOL_PARSERS = (("qwen", "hermes"), ("hermes", "hermes"), ("llama-3", "llama3_json"), ("llama3", "llama3_json"),
                     ("mistral", "mistral"), ("granite", "granite"), ("deepseek", "deepseek_v3"))
VLLM_REASONING_PARSERS = (("qwq", "deepseek_r1"), ("deepseek-r1", "deepseek_r1"), ("qwen3", "qwen3"),
                          ("gpt-oss", "openai_gptoss"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command(model: str, port: int, *, tensor_parallel: int | None = None, pipeline_parallel: int | None = None,
                 max_model_len: int | None = None, gpu_memory_utilization: float | None = None,
                 extra: Sequence[str] = ()) -> list[str]:
    """``vllm serve MODEL`` on 127.0.0.1:``port`` with the host's settings."""
    binary = os.environ.get(VLLM_ENV) or shutil.which("vllm")
    command = [binary, "serve", model] if binary else [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                                                       "--model", model]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    for flag, value in (("--tensor-parallel-size", tensor_parallel), ("--pipeline-parallel-size", pipeline_parallel),
                        ("--max-model-len", max_model_len), ("--gpu-memory-utilization", gpu_memory_utilization)):
        if value is not None:
            command += [flag, str(value)]
    name = model.lower()
    if "--tool-call-parser" not in extra:
        parser = next((p for key, p in VLLM_TOOL_PARSERS if key in name), None)
        if parser:
            command += ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    if "--reasoning-parser" not in extra:
        parser = next((p for key, p in VLLM_REASONING_PARSERS if key in name), None)
        if parser:
            command += ["--reasoning-parser", parser]
    return command + list(extra)


def llama_server_command(model_path: str, port: int, *, ctx: int, parallel: int, gpu_layers: int,
                         threads: int | None = None, extra: Sequence[str] = ()) -> list[str]:
    """llama.cpp's own ``llama-server`` for a GGUF file, its templates on (``--jinja``: tools)."""
    binary = os.environ.get(LLAMA_SERVER_ENV) or shutil.which("llama-server")
    if not binary:
        raise InvalidRequest(f"'--engine llama-server' needs the llama-server binary: put it on PATH or set "
                             f"${LLAMA_SERVER_ENV} (build one with benchmarks/llama_server.py)")
    command = [binary, "--model", model_path, "--host", "127.0.0.1", "--port", str(port), "-c", str(ctx * parallel),
               "-np", str(parallel), "-ngl", str(999 if gpu_layers < 0 else gpu_layers), "--jinja"]
    if threads:
        command += ["-t", str(threads)]
    return command + list(extra)


def _dies_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux end the child when this process dies, however it dies."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return arm


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (on Linux, not counting zombies, which a
    PID 1 that never reaps would keep forever)."""
    if sys.platform.startswith("linux"):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp
                if int(fields[2]) == pgid and fields[0] != "Z":
                    return True
        return False
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class EngineProcess:
    """One engine child: started, watched, its output logged and its last lines kept."""

    def __init__(self, kind: str, command: list[str], port: int, *, secret: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.kind, self.command, self.port = kind, command, port
        self._secret = secret  # the engine's key: never logged, even where the engine echoes it
        self._env = env or {}  # beside the host's environment (the key goes here, not on its command line)
        self.url = f"http://127.0.0.1:{port}"
        self.lines: collections.deque[str] = collections.deque(maxlen=LINES_KEPT)
        self.process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._engine_log = logging.getLogger(f"llm_magic.engine.{kind}")

    def start(self) -> None:
        log.info("starting %s: %s", self.kind, self._hidden(" ".join(self.command)))
        try:
            # its own process group (start_new_session): stopping it stops its workers too
            self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env={**os.environ, **self._env},
                                            start_new_session=True, preexec_fn=_dies_with_this_process())
        except OSError as exc:
            raise EngineUnavailable(f"cannot start {self.kind} ({exc.strerror or exc}): is it installed?") from None
        self._reader = threading.Thread(target=self._read, name=f"llm-magic-{self.kind}-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            line = self._hidden(raw.decode("utf-8", "replace").rstrip())
            if line:
                self.lines.append(line)
                self._engine_log.info("%s", line)

    def _running(self) -> bool:
        """Whether the engine or anything it started (its process group) still runs."""
        assert self.process is not None
        return self.process.poll() is None or _group_alive(self.process.pid)

    def _hidden(self, text: str) -> str:
        return text.replace(self._secret, "<key>") if self._secret else text

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def failure(self) -> str:
        code = self.process.returncode if self.process is not None else None
        if self._reader is not None:
            self._reader.join(2.0)  # the dead child's last lines may still be in the pipe
        how = f"exited with code {code}" if code is None or code >= 0 else f"was killed by signal {-code}"
        tail = "\n".join(list(self.lines)[-15:]) or "(no output)"
        hint = ""
        if self.kind == "llama-server" and code == -signal.SIGSEGV and advertises_amx():
            hint = (" (on a CPU with AMX, a llama.cpp built with GCC 12 crashes at its first decode: start it with "
                    f"--no-repack, or build it with CMAKE_ARGS=\"{NO_AMX_CMAKE_ARGS}\")")
        return f"{self.kind} {how}{hint}; its last lines:\n{tail}"

    def wait_ready(self, timeout: float) -> None:
        """Until its ``/health`` answers 200; its death or the deadline is an error with its log."""
        deadline = time.monotonic() + timeout
        shown = 0.0
        while time.monotonic() < deadline:
            if not self.alive:
                raise EngineUnavailable(self.failure())
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    log.info("%s is ready at %s", self.kind, self.url)
                    return
            except requests.RequestException:
                pass
            if time.monotonic() - shown > 15 and self.lines:
                shown = time.monotonic()
                log.info("waiting for %s: %s", self.kind, self.lines[-1][:200])
            time.sleep(0.5)
        self.stop()
        raise EngineUnavailable(f"{self.kind} did not become ready within {timeout:.0f} s; its last lines:\n"
                                + "\n".join(list(self.lines)[-15:]))

    def status(self) -> dict[str, Any]:
        info: dict[str, Any] = {"process": self.kind, "pid": self.process.pid if self.process else None}
        if self.process is not None and not self.alive:
            info["died"] = self.failure()
        return info

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL if any of it lingers: its GPU memory is freed.
        The group, not the process: vLLM's engine core may outlive its API server."""
        process = self.process
        if process is None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_SECONDS), (signal.SIGKILL, 2.0)):
            if not self._running():
                break
            try:
                os.killpg(process.pid, sig)
            except (ProcessLookupError, PermissionError):  # its group is gone or not ours: the process itself
                if process.poll() is None:
                    process.send_signal(sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self._running():
                time.sleep(0.1)
        if self._reader is not None:
            self._reader.join(5.0)
        # closing under a reader still blocked in a read would wait for it (something outside the
        # group may hold the pipe): then the reader, a daemon, ends when the pipe does
        if process.stdout is not None and (self._reader is None or not self._reader.is_alive()):
            process.stdout.close()


def _upstream_class() -> type:
    from llm_magic.engine.upstream.backend import UpstreamBackend

    return UpstreamBackend


class LaunchedEngine(_upstream_class()):  # type: ignore[misc]
    """An ``UpstreamBackend`` whose engine this host started: it starts with ``load_default``
    (the server already answers ``/health`` with "loading"), and stops with ``close``."""

    def __init__(self, process: EngineProcess, *, start_timeout: float, **kwargs: Any) -> None:
        super().__init__(process.url, **kwargs)
        self.process = process
        self.start_timeout = start_timeout
        self.starting = True

    def load_default(self) -> None:
        self.process.start()
        try:
            self.process.wait_ready(self.start_timeout)
            super().load_default()
        finally:
            self.starting = False

    def status(self) -> dict[str, Any]:
        status = super().status()
        engine = status["engine"] = {**status["engine"], **self.process.status()}  # not the cached one
        if self.starting:
            status["status"], engine["state"] = "loading", "starting"
        elif not self.process.alive:
            status["status"], engine["state"] = "degraded", "down"
        return status

    def close(self) -> None:
        super().close()
        self.process.stop()
