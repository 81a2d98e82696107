"""IPython glue: ``%llm_host``, ``%llm`` and ``%%llm``. Parsing, display and the notebook's
conversation live here; the work is done by ``ApiHost`` and ``Client``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import sys
import time
from typing import Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from IPython.display import display
from traitlets import Bool, CaselessStrEnum, Float, Int, Unicode

from .client import Answer, Client, Stream
from .errors import LLMMagicError
from .host import ApiHost, add_serve_arguments

UPDATE_INTERVAL = 0.05  # seconds between in-place updates of a streaming answer
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\}")


def interpolate(text: str, namespace: dict[str, Any]) -> str:
    """Replace ``{name}`` (or ``{obj.attr}``) with its value from ``namespace``, in one pass:
    ``{{``/``}}`` give literal braces, and braces inside a value are never expanded again.
    A ``{name}`` that is not defined stays as it is (the text may be code)."""

    def replace(match: re.Match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        head, *attrs = match.group(1).split(".")
        if head not in namespace:
            return token
        value = namespace[head]
        try:
            for attr in attrs:
                value = getattr(value, attr)
        except AttributeError:
            return token
        return str(value)

    return _PLACEHOLDER.sub(replace, text)


class _Parser(MagicArgumentParser):
    """argparse that raises IPython's ``UsageError`` (one line, no traceback) instead of exiting."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        super().__init__(prog=prog, add_help=False, **kwargs)


def _serve_parser() -> _Parser:
    parser = _Parser("llm_host", description="Run a model server in the background of this notebook.")
    parser.add_argument("command", choices=("start", "stop", "restart", "status", "logs"))
    parser.add_argument("-n", type=int, default=40, help="logs: how many lines (default: %(default)s)")
    add_serve_arguments(parser)
    return parser


def _chat_parser() -> _Parser:
    parser = _Parser("%llm", description="The cell is the next user turn of the notebook's conversation.")
    parser.add_argument("--new", action="store_true", help="start a new conversation")
    parser.add_argument("--system", metavar="S", help="system prompt for this conversation")
    parser.add_argument("--complete", action="store_true", help="raw text completion of the cell, no chat")
    parser.add_argument("--model", metavar="SPEC", help="model to use (default: the host's)")
    parser.add_argument("--max-tokens", type=int, metavar="N")
    parser.add_argument("--temperature", type=float, metavar="T")
    parser.add_argument("--top-p", type=float, metavar="P")
    parser.add_argument("--top-k", type=int, metavar="K")
    parser.add_argument("--stop", action="append", metavar="S", help="stop sequence (repeatable)")
    parser.add_argument("--seed", type=int, metavar="N")
    parser.add_argument("-o", "--output", metavar="NAME", help="also keep the answer in variable NAME")
    parser.add_argument("--format", choices=("markdown", "text", "code"), help="how to show the answer")
    parser.add_argument("--no-stream", action="store_true", help="show the answer when it is complete")
    return parser


def _line_parser() -> _Parser:
    parser = _Parser("llm", description="Connect to a host and manage the conversation.")
    parser.add_argument("command", choices=("connect", "reset", "history", "status", "models"))
    parser.add_argument("url", nargs="?", help="connect: the host URL (default: $LLM_MAGIC_URL)")
    parser.add_argument("--token", help="connect: the access token (default: $LLM_MAGIC_TOKEN)")
    return parser


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot read the arguments: {exc}") from None


def _with_help(parser_factory: Callable[[], _Parser], intro: str) -> Callable:
    """Give a magic a docstring built from its real parser, so that ``%magic?`` is true help."""

    def decorate(func: Callable) -> Callable:
        func.__doc__ = intro + "\n\n" + parser_factory().format_help()
        return func

    return decorate


class _Shown:
    """An answer as Jupyter shows it (Markdown, text or a code block) and a terminal prints it."""

    def __init__(self, text: str, fmt: str) -> None:
        self.text, self.fmt = text, fmt

    def _repr_markdown_(self) -> str | None:
        if self.fmt == "text":
            return None
        if self.fmt == "code":
            body = re.sub(r"^```[\w+-]*\n|\n?```\s*$", "", self.text.strip())
            return f"```\n{body}\n```"
        return self.text

    def __repr__(self) -> str:
        return self.text


@magics_class
class LLMMagics(Magics):
    """The llm_magic magics. Defaults are settable with ``%config LLMMagics.<name> = value``."""

    max_tokens = Int(512, help="%%llm: default --max-tokens").tag(config=True)
    temperature = Float(None, allow_none=True, help="%%llm: default --temperature (None: the host's)").tag(config=True)
    system = Unicode("", help="%%llm: system prompt of new conversations").tag(config=True)
    format = CaselessStrEnum(("markdown", "text", "code"), "markdown", help="%%llm: how answers show").tag(config=True)
    stream = Bool(True, help="%%llm: stream answers into the cell").tag(config=True)
    tunnel = CaselessStrEnum(("cloudflared", "none"), "cloudflared",
                             help="%llm_host start: default --tunnel").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.host: ApiHost | None = None
        self._host_argv: list[str] = []
        self.client: Client | None = None
        self.history: list[dict[str, str]] = []
        self.last_answer: Answer | None = None

    # -- %llm_host ---------------------------------------------------------------------------

    @line_magic
    @_with_help(_serve_parser, "Host a model from this notebook: %llm_host start|stop|restart|status|logs.\n\n"
                "Examples::\n\n  %llm_host start --model bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M\n"
                "  %llm_host start --tunnel none        # the embedded tiny model, local only\n"
                "  %llm_host status\n  %llm_host logs -n 20\n  %llm_host stop")
    def llm_host(self, line: str) -> None:
        argv = _split(line)
        args = _serve_parser().parse_args(argv)
        handlers = {"start": self._host_start, "stop": self._host_stop, "restart": self._host_restart,
                    "status": self._host_status, "logs": self._host_logs}
        try:
            handlers[args.command](args, argv)
        except LLMMagicError as exc:
            raise UsageError(exc.message) from None

    def _host_start(self, args: argparse.Namespace, argv: list[str]) -> None:
        if self.host is not None and self.host.running:
            raise UsageError(f"a host is already running at {self.host.url}; "
                             "%llm_host stop (or restart) first")
        missing = [m for m in ("flask", "llama_cpp") if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(f"hosting needs the host extra ({', '.join(missing)} missing): "
                             "pip install 'llm_magic[host]'")
        token = None if args.no_token else args.token
        host = ApiHost(
            args.model, use_token=not args.no_token, token=token, host=args.host, port=args.port,
            tunnel=args.tunnel or self.tunnel, ctx_length=args.ctx, gpu_layers=args.gpu_layers,
            allow_models=args.allow_model, max_queue=args.max_queue,
            extra_args=["--keepalive", str(args.keepalive),
                        "--parallel", str(args.parallel), "--flash-attn", args.flash_attn,
                        *(["--threads", str(args.threads)] if args.threads else []),
                        *(["--chat-format", args.chat_format] if args.chat_format else []),
                        *(["--max-ctx", str(args.max_ctx)] if args.max_ctx else []),
                        *(["--embedding-model", args.embedding_model] if args.embedding_model else []),
                        *[arg for origin in args.cors for arg in ("--cors", origin)]])
        host.start()
        self.host, self._host_argv = host, argv
        self.client = Client(host.url, host.token)
        display({"text/plain": host.connection_text() + "\n\nThis notebook is connected: write a %%llm cell."}, raw=True)

    def _require_host(self) -> ApiHost:
        if self.host is None:
            raise UsageError("no host was started in this notebook: %llm_host start")
        return self.host

    def _host_stop(self, args: argparse.Namespace, argv: list[str]) -> None:
        host = self._require_host()
        if not host.running:
            raise UsageError("the host is not running (it was stopped or it failed: %llm_host logs)")
        host.stop()
        print("The host stopped.")

    def _host_restart(self, args: argparse.Namespace, argv: list[str]) -> None:
        host = self._require_host()
        host.stop()
        self._host_start(_serve_parser().parse_args(self._host_argv), self._host_argv)

    def _host_status(self, args: argparse.Namespace, argv: list[str]) -> None:
        status = self._require_host().status()
        rows = [("state", status["state"]), ("url", status.get("url")), ("public url", status.get("public_url")),
                ("tunnel", status.get("tunnel")), ("model", status.get("model"))]
        if "uptime_s" in status:
            rows += [("uptime", _duration(status["uptime_s"])), ("requests served", status.get("requests")),
                     ("waiting", status.get("queue")),
                     ("slots busy", f"{status['slots_busy']} of {status['slots']}" if "slots" in status
                      else status.get("busy")),
                     ("tokens generated", status.get("completion_tokens")),
                     ("tokens/s", status.get("tokens_per_second"))]
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows if v is not None))

    def _host_logs(self, args: argparse.Namespace, argv: list[str]) -> None:
        print(self._require_host().logs(args.n) or "(no output yet)")

    # -- %llm and %%llm --------------------------------------------------------------------

    @line_cell_magic
    @_with_help(_chat_parser, "Chat with the connected host.\n\n"
                "As a cell magic, the cell is the next user turn (``{name}`` inserts a variable,\n"
                "``{{`` a literal brace); the answer streams into the output and is kept in ``_llm``::\n\n"
                "  %%llm --system 'You are terse.'\n  Summarise {text} in one line.\n\n"
                "As a line magic: %llm connect URL [--token T] | reset | history | status | models\n")
    def llm(self, line: str, cell: str | None = None) -> None:
        try:
            if cell is None:
                self._line(line)
            else:
                self._cell(line, cell)
        except LLMMagicError as exc:
            raise UsageError(exc.message) from None

    def _connected(self) -> Client:
        if self.client is None and os.environ.get("LLM_MAGIC_URL"):
            self.client = Client()
        if self.client is None:
            raise UsageError("not connected: %llm connect URL --token TOKEN (or %llm_host start)")
        return self.client

    def _line(self, line: str) -> None:
        args = _line_parser().parse_args(_split(line))
        if args.command == "connect":
            url = args.url or os.environ.get("LLM_MAGIC_URL")
            if not url:
                raise UsageError("give the host's URL: %llm connect URL --token TOKEN")
            client = Client(url, args.token)
            health = client.health()
            client.models()  # checks the token: /health answers anyone
            self.client = client
            model = health.get("model") or ", ".join(health.get("models", []))
            print(f"Connected to {client.url} ({model}).")
        elif args.command == "reset":
            self.history.clear()
            print("New conversation.")
        elif args.command == "history":
            self._show_history()
        elif args.command == "status":
            client = self._connected()
            health = client.health()
            turns = sum(m["role"] == "user" for m in self.history)
            print(f"connected to {client.url}\nmodel        {health.get('model', '?')}\n"
                  f"host status  {health.get('status', '?')} (waiting: {health.get('queue', '?')})\n"
                  f"conversation {turns} turn(s)")
        elif args.command == "models":
            print("\n".join(self._connected().models()))

    def _show_history(self) -> None:
        if not self.history:
            print("The conversation is empty.")
            return
        text = "\n\n".join(f"**{m['role']}**: {m['content']}" for m in self.history)
        display(_Shown(text, "markdown"))

    def _cell(self, line: str, cell: str) -> None:
        args = _chat_parser().parse_args(_split(line))
        client = self._connected()
        prompt = interpolate(cell, self.shell.user_ns).strip() if self.shell else cell.strip()
        if not prompt:
            raise UsageError("the cell is empty: write your message below %%llm")
        if args.new:
            self.history.clear()
        system = args.system if args.system is not None else (self.system or None)
        if system is not None:
            self.history = [m for m in self.history if m["role"] != "system"]
            self.history.insert(0, {"role": "system", "content": system})
        params = {"max_tokens": args.max_tokens or self.max_tokens,
                  "temperature": args.temperature if args.temperature is not None else self.temperature,
                  "top_p": args.top_p, "top_k": args.top_k, "stop": args.stop, "seed": args.seed,
                  "model": args.model}
        turn = [*self.history, {"role": "user", "content": prompt}]
        stream = client.complete_stream(prompt, **params) if args.complete else client.chat_stream(turn, **params)
        text, finished = self._show_stream(stream, args.format or self.format, live=self.stream and not args.no_stream)
        if finished and not args.complete:
            self.history = [*turn, {"role": "assistant", "content": text}]
        if self.shell is not None:
            self.shell.user_ns["_llm"] = text
            if args.output:
                self.shell.user_ns[args.output] = text
        if stream.answer is not None:
            self.last_answer = stream.answer
            self._footer(stream)

    def _rich(self) -> bool:
        return getattr(self.shell, "kernel", None) is not None  # a Jupyter kernel, not a terminal

    def _show_stream(self, stream: Stream, fmt: str, live: bool) -> tuple[str, bool]:
        """Show the answer as it arrives; return its text and whether it finished."""
        rich = self._rich()
        handle = display(_Shown("", fmt), display_id=True) if rich and live else None
        last = 0.0
        try:
            for delta in stream:
                if handle is not None and time.monotonic() - last >= UPDATE_INTERVAL:
                    handle.update(_Shown(stream.text, fmt))
                    last = time.monotonic()
                elif not rich and live:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()  # the host stops generating
            print("\n(interrupted: the answer is not added to the conversation)")
            return stream.text, False
        if handle is not None:
            handle.update(_Shown(stream.text, fmt))
        elif rich:
            display(_Shown(stream.text, fmt))
        elif live:
            sys.stdout.write("\n")
        else:
            print(stream.text)
        return stream.text, True

    def _footer(self, stream: Stream) -> None:
        answer = stream.answer
        assert answer is not None
        tokens = answer.usage.get("completion_tokens")
        rate = answer.timings.get("predicted_per_second")
        parts = [answer.model or "?", f"{tokens} tokens" if tokens is not None else None,
                 f"{rate:.1f} tokens/s" if rate else None,
                 "stopped at max tokens" if answer.finish_reason == "length" else None]
        footer = " · ".join(p for p in parts if p)
        if self._rich():
            display({"text/plain": footer, "text/markdown": f"<sub>{footer}</sub>"}, raw=True)
        else:
            print(f"[{footer}]")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext llm_magic``."""
    magics = LLMMagics(shell=ipython)
    ipython.register_magics(magics)
    if magics not in ipython.configurables:
        ipython.configurables.append(magics)  # so that %config LLMMagics shows and sets it


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext llm_magic``: stop a host this notebook started."""
    for magics in [m for m in ipython.configurables if isinstance(m, LLMMagics)]:
        if magics.host is not None:
            magics.host.stop()
        ipython.configurables.remove(magics)
