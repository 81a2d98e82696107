"""The ``llm-magic`` command: ``serve`` a model over HTTP, ``ask`` a host a question."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from llm_magic.version import __version__
from llm_magic.errors import LLMMagicError
from llm_magic.files import write_atomically
from llm_magic.settings import TOKEN_ENV, ServeSettings, add_serve_arguments
from llm_magic.supervisor.host import new_token

URL_ENV = "LLM_MAGIC_URL"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-magic", description="Serve an open LLM over HTTP and talk to it.")
    parser.add_argument("--version", action="version", version=f"llm_magic {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve a GGUF model over HTTP (/api, /v1, /health)",
                                description="Serve a GGUF model over HTTP until Ctrl-C or SIGTERM.")
    add_serve_arguments(serve)
    # Plumbing for ApiHost, which runs this command as its child process.
    serve.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    serve.add_argument("--exit-with-parent", type=int, metavar="PID", help=argparse.SUPPRESS)
    serve.add_argument("--model-name", help=argparse.SUPPRESS)
    # a tunnel opened by the parent (ApiHost), whose state it keeps in this file for /health
    serve.add_argument("--tunnel-status", type=Path, help=argparse.SUPPRESS)

    gpu = commands.add_parser("gpu",
                              help="show the GPU and whether llama-cpp-python can use it; --install one that can",
                              description="Show the NVIDIA GPU, its CUDA, and whether the installed llama-cpp-python "
                                          "can use it. With --install, install one that can: llama-cpp-python's "
                                          "prebuilt CUDA wheel for this CUDA (about 1-2 minutes), else a source "
                                          "build for this GPU's architecture alone (10-20 minutes on 2 cores).")
    gpu.add_argument("--install", action="store_true", help="install a llama-cpp-python that uses the GPU")
    gpu.add_argument("--dry-run", action="store_true", help="with --install: print the commands, run nothing")
    gpu.add_argument("--log", type=Path, default=None, metavar="PATH",
                     help="with --install: where the build's output goes (default: a temporary file)")

    ask = commands.add_parser("ask", help="ask a host and stream the answer to stdout",
                              description="Ask a host (or any OpenAI-compatible server) and stream the answer.")
    ask.add_argument("prompt", nargs="?", help="the question; '-' or nothing reads standard input")
    ask.add_argument("--url", default=None, help=f"host URL (default: ${URL_ENV}, else http://127.0.0.1:5000)")
    ask.add_argument("--token", default=None, help=f"access token (default: ${TOKEN_ENV})")
    ask.add_argument("--model", default=None, metavar="SPEC", help="model to use (default: the host's)")
    ask.add_argument("--system", default=None, help="system prompt")
    ask.add_argument("--complete", action="store_true", help="raw text completion instead of chat")
    ask.add_argument("--max-tokens", type=int, default=None, metavar="N")
    ask.add_argument("--temperature", type=float, default=None, metavar="T")
    ask.add_argument("--no-stream", action="store_true", help="print the answer when it is complete")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"serve": serve, "gpu": gpu, "ask": ask}[args.command](args)
    except LLMMagicError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except _Stop:  # a signal between start-up steps: serve() has already cleaned up
        return 0


# ---------------------------------------------------------------------------------------------
# serve


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # A crash (SIGSEGV in llama.cpp, SIGABRT from a failed check) then leaves the Python stack of the
    # thread that crashed in the log: with the exit signal, that says what the server was doing.
    try:
        faulthandler.enable(sys.stderr, all_threads=False)
    except (RuntimeError, ValueError, AttributeError):  # a stderr without a file descriptor: no dump
        pass
    logging.getLogger("huggingface_hub").propagate = False  # it has its own handler: one line per warning
    try:
        from llm_magic.server.httpserver import HttpServer
        from llm_magic.server.app import create_app
    except ImportError as exc:
        raise LLMMagicError(f"serving needs the host extra ({exc.name} is missing): "
                            "pip install 'llm_magic[host]'") from None
    from llm_magic.engine.factory import build_backend
    from llm_magic.supervisor.snippets import connection_text

    settings = ServeSettings.from_args(args)
    tunnel_note = "none" if args.tunnel else "none (the terminal default; a public URL needs --tunnel cloudflared)"

    token_from_env = not args.token and not args.no_token and bool(os.environ.get(TOKEN_ENV))
    token = None if args.no_token else (args.token or os.environ.get(TOKEN_ENV) or new_token())
    built = build_backend(settings, has_token=token is not None, model_name=args.model_name)
    engine = built.backend
    tunnel = None
    app = create_app(engine, token=token, keepalive=args.keepalive, cors=args.cors, log_prompts=settings.log_prompts,
                     extra_status=lambda: {"tunnel": tunnel.status() if tunnel else _read_status(args.tunnel_status)})
    try:
        server = HttpServer(app, args.host, args.port, held=args.max_queue + settings.slots)
    except OSError as exc:  # a port in use, an address not on this machine
        raise LLMMagicError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None

    stop = threading.Event()
    if args.exit_with_parent:
        threading.Thread(target=_watch_parent, args=(args.exit_with_parent, stop), daemon=True).start()

    server.start()
    # The handler raises rather than calling stop.set(): it runs in the main thread, which may
    # be inside stop.wait() holding the event's lock, and set() would then deadlock.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)
    try:
        engine.load_default()  # /health says "loading" meanwhile
        built.describe()
        warnings, name = built.warnings, built.name
        for warning in warnings:
            logging.getLogger("llm_magic.serve").warning("%s", warning)
        url = f"http://{_display_host(args.host)}:{server.port}"
        public_url = None
        if args.tunnel == "cloudflared":
            tunnel = _new_tunnel(server.port, token)
            from llm_magic.supervisor.tunnel import open_tunnel

            public_url, tunnel_note = open_tunnel(tunnel)
        streams = tunnel is None or tunnel.streams is not False
        shown_token = "(set by $LLM_MAGIC_TOKEN)" if token_from_env and token else token
        device = built.device
        print(connection_text(url, shown_token, name, public_url=public_url, tunnel=tunnel_note, streams=streams,
                              device=device, warnings=warnings), flush=True)
        print("\nPress Ctrl-C to stop.", flush=True)
        if args.ready_file:  # read by ApiHost in the parent
            write_atomically(args.ready_file, json.dumps({
                "url": url, "pid": os.getpid(), "model": name, "public_url": public_url, "tunnel": tunnel_note,
                "streams": streams, "device": device, "warnings": warnings}))
        stop.wait()
    except _Stop:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)  # (an engine child would outlive it, holding its GPU)
        print("stopping", flush=True)
        if tunnel is not None:
            tunnel.stop()
        server.stop()
        engine.close()
    return 0


def _new_tunnel(port: int, token: str | None) -> Any:
    from llm_magic.supervisor.tunnel import Tunnel

    def announce(new_url: str) -> None:
        if tunnel.restarts:  # the first URL is in the banner
            print(f"The tunnel restarted; new public URL: {new_url}", flush=True)

    tunnel = Tunnel(port, on_change=announce, token=token)
    return tunnel


class _Stop(Exception):
    """SIGINT or SIGTERM: stop serving."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop()


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host


def _read_status(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or being replaced
        return None


def _watch_parent(pid: int, stop: threading.Event) -> None:
    """End the server when the process that started it (a notebook kernel) is gone."""
    while not stop.wait(1.0):
        if os.getppid() != pid:
            stop.set()


# ---------------------------------------------------------------------------------------------
# gpu


def gpu(args: argparse.Namespace) -> int:
    import tempfile

    from llm_magic.engine.llama_cpp import gpu as nvidia
    from llm_magic.engine.llama_cpp.backend import gpu_offload_supported

    offload = gpu_offload_supported()
    print(nvidia.describe(offload, _llama_version()), flush=True)
    if not args.install:
        if warning := nvidia.offload_warning(offload):
            print(f"warning: {warning}")
        return 0
    if not nvidia.has_nvidia_gpu():
        raise LLMMagicError("no NVIDIA GPU here (no nvidia-smi, no /proc/driver/nvidia): on Colab choose a GPU "
                            "runtime (Runtime > Change runtime type), on Kaggle a GPU accelerator")
    if offload:
        print("llama-cpp-python already uses the GPU: nothing to install.")
        return 0
    log_path = args.log or Path(tempfile.mkdtemp(prefix="llm-magic-gpu-")) / "install.log"
    for step in nvidia.install_plan():
        if args.dry_run:
            env = " ".join(f"{k}={json.dumps(v)}" for k, v in step.env.items())
            print(f"# {step.what} ({step.expected})\n{env + ' ' if env else ''}{' '.join(step.argv)}")
            continue
        if nvidia.run_step(step, log_path) and _offloads_now():
            # the wheel went in alone (--no-deps, so that nothing else is replaced): now what it needs
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", nvidia.LLAMA_REQUIREMENT], check=False)
            print(f"llama-cpp-python {_llama_version(fresh=True)} uses the GPU now. Start the host "
                  "(a running one: %llm_host restart).")
            return 0
        print("  that did not give a llama-cpp-python with GPU offload; trying the next way", flush=True)
    if args.dry_run:
        return 0
    raise LLMMagicError(f"could not install a llama-cpp-python that uses the GPU; see {log_path}")


def _llama_version(fresh: bool = False) -> str | None:
    if fresh:
        out = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip() or None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def _offloads_now() -> bool:
    """Whether the llama-cpp-python just installed offloads (asked in a fresh process)."""
    code = "import llama_cpp; print(bool(llama_cpp.llama_supports_gpu_offload()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return out.stdout.strip() == "True"


# ---------------------------------------------------------------------------------------------
# ask


def ask(args: argparse.Namespace) -> int:
    from llm_magic.client.client import Client

    prompt = args.prompt
    if prompt in (None, "-"):
        if sys.stdin is None or sys.stdin.isatty():
            raise LLMMagicError("give a prompt: llm-magic ask \"your question\" (or pipe it in)")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise LLMMagicError("the prompt is empty")
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    with Client(args.url, args.token) as client:
        if args.complete:
            call = client.complete if args.no_stream else client.complete_stream
            result = call(prompt, model=args.model, **params)
        else:
            call = client.chat if args.no_stream else client.chat_stream
            result = call(prompt, model=args.model, system=args.system, **params)
        if args.no_stream:
            print(result.text)
            return 0
        for delta in result:
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0
