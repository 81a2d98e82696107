"""IPython glue: ``%llm_host``, ``%llm`` and ``%%llm``. Parsing, display and the notebook's
conversation live here; the work is done by ``ApiHost`` and ``Client``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from IPython.core.error import StdinNotImplementedError, UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from IPython.display import display
from traitlets import Bool, CaselessStrEnum, Float, Int, Unicode

from llm_magic.client import conversation
from llm_magic.notebook.cells import CellErrors, interpolate
from llm_magic.client.client import Answer, Client, Stream
from llm_magic.errors import HostUnreachable, LLMMagicError
from llm_magic.supervisor.host import ApiHost, HostState, add_serve_arguments
from llm_magic.client.python_tools import ToolBox
from llm_magic.notebook.rendering import Shown, answer_code, copyable_code, fixed_cell, pretty_json, tool_call_bundle

__all__ = ["LLMMagics", "interpolate", "load_ipython_extension", "unload_ipython_extension"]

UPDATE_INTERVAL = 0.05  # seconds between in-place updates of a streaming answer
ERROR_CHARS = 6000  # of a traceback sent by %llm fix: its end, where the error is
FIX_PROMPT = """Cell [{number}] of my Jupyter notebook failed.

```python
{source}
```

The error:

```
{traceback}
```

Explain the cause in two or three sentences. Then give the whole corrected cell in one ```python code block."""


class _Parser(MagicArgumentParser):
    """argparse that raises IPython's ``UsageError`` (one line, no traceback) instead of exiting."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        super().__init__(prog=prog, add_help=False, **kwargs)


def _serve_parser() -> _Parser:
    parser = _Parser("llm_host", description="Run a model server in the background of this notebook.")
    parser.add_argument("command", choices=("start", "stop", "restart", "status", "logs"))
    parser.add_argument("-n", type=int, default=40, help="logs: how many lines (default: %(default)s)")
    add_serve_arguments(parser)
    for action in parser._actions:
        if action.dest == "tunnel":  # the notebook's default differs from the terminal's
            action.help = ("public tunnel; %%llm_host start defaults to cloudflared (a public URL), in Jupyter "
                           "and in the IPython terminal alike (%%config LLMMagics.tunnel = 'none' changes it); "
                           "`llm-magic serve` defaults to none")
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
    parser.add_argument("--format", choices=("markdown", "text", "code"),
                        help="how to show the answer; code: its code also goes into a new cell below")
    parser.add_argument("--no-stream", action="store_true", help="show the answer when it is complete")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--json", action="store_true",
                      help="answer with a JSON object (constrained on the host); _llm holds it parsed")
    data.add_argument("--schema", metavar="NAME",
                      help="answer with JSON matching NAME, a pydantic model class or a JSON-schema dict; "
                           "_llm holds the validated object")
    parser.add_argument("--tools", metavar="F,G",
                        help="Python functions the model may call: the magic runs each call and feeds "
                             "the result back until the answer is text")
    parser.add_argument("--tool-choice", choices=("auto", "required"), default="auto",
                        help="with --tools, required: the model must call a tool first (later rounds: auto)")
    return parser


def _line_parser() -> _Parser:
    parser = _Parser("llm", description="Connect to a host and manage the conversation.")
    parser.add_argument("command", choices=("connect", "reset", "history", "status", "models", "fix", "save", "load"))
    parser.add_argument("target", nargs="?", metavar="URL|PATH",
                        help="connect: the host URL (default: $LLM_MAGIC_URL); save, load: the file")
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
    confirm_tools = Bool(False, help="%%llm --tools: ask before running each call the model makes").tag(config=True)
    max_tool_rounds = Int(5, help="%%llm --tools: rounds of tool calls before the model must answer in text"
                          ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.host: ApiHost | None = None
        self._host_argv: list[str] = []
        self.client: Client | None = None
        self.history: list[dict[str, Any]] = []
        self.last_answer: Answer | None = None
        self.cell_errors = CellErrors(shell)

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

    def _host_start(self, args: argparse.Namespace, argv: list[str], previous: ApiHost | None = None) -> None:
        if self.host is not None and self.host.running:
            raise UsageError(f"a host is already running at {self.host.url}; "
                             "%llm_host stop (or restart) first")
        if self.host is not None and previous is None:
            self.host.stop()  # one that died or failed: its tunnel and folder go
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
        if previous is not None:
            host.take_tunnel(previous)  # a restart: the same public URL
        host.start()
        self.host, self._host_argv = host, argv
        self.client = Client(host.url, host.token)
        text = host.connection_text() + "\n\nThis notebook is connected: write a %%llm cell."
        display({"text/plain": text}, raw=True)

    def _require_host(self) -> ApiHost:
        if self.host is None:
            raise UsageError("no host was started in this notebook: %llm_host start")
        return self.host

    def _host_stop(self, args: argparse.Namespace, argv: list[str]) -> None:
        host = self._require_host()
        if not host.running:
            if host.state == HostState.FAILED and host.death:
                why = host.death
                host.stop()  # its tunnel too
                print(f"The host had died: {why}. It is cleared away now.")
                return
            raise UsageError("the host is not running (it was stopped or it failed: %llm_host logs)")
        host.stop()
        print("The host stopped.")

    def _host_restart(self, args: argparse.Namespace, argv: list[str]) -> None:
        """The same flags again (or the ones given), the same token, port and public tunnel:
        connected clients carry on."""
        host = self._require_host()
        argv = ["start", *argv[1:]] if len(argv) > 1 else self._host_argv  # new flags, else the last ones
        old = _serve_parser().parse_args(argv)
        if host.token and not old.token:
            old.token = host.token
        port = urllib.parse.urlsplit(host.url).port if host.url else None
        if port:
            old.port = port
        host.stop(keep_tunnel=True)
        try:
            self._host_start(old, argv, previous=host)
        finally:
            host.stop()  # closes the tunnel unless the new host took it

    def _host_status(self, args: argparse.Namespace, argv: list[str]) -> None:
        status = self._require_host().status()
        state = f"{status['state']}: the server died; {status['died']}" if status.get("died") else status["state"]
        rows = [("state", state), ("url", status.get("url")), ("public url", status.get("public_url")),
                ("tunnel", status.get("tunnel")), ("model", status.get("model"))]
        if "uptime_s" in status:
            rows += [("uptime", _duration(status["uptime_s"])), ("requests served", status.get("requests")),
                     ("waiting", status.get("queue")),
                     ("slots busy", f"{status['slots_busy']} of {status['slots']}" if "slots" in status
                      else status.get("busy")),
                     ("tokens generated", status.get("completion_tokens")),
                     ("tokens/s", status.get("tokens_per_second")),
                     ("device", status.get("device")), ("gpu layers", status.get("gpu_layers")),
                     ("memory", status.get("memory"))]
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows if v is not None))
        if status.get("died"):
            print("\nIts log's last lines:\n" + "\n".join("  " + line for line in status.get("log") or ["(none)"]))
            print("\n%llm_host restart brings it back on the same URL, with the same token.")

    def _host_logs(self, args: argparse.Namespace, argv: list[str]) -> None:
        print(self._require_host().logs(args.n) or "(no output yet)")

    # -- %llm and %%llm --------------------------------------------------------------------

    @line_cell_magic
    @_with_help(_chat_parser, "Chat with the connected host.\n\n"
                "As a cell magic, the cell is the next user turn; the answer streams into the output\n"
                "and is kept in ``_llm``. In the cell, ``{name}`` inserts a variable (``{{`` a literal\n"
                "brace), ``{In[3]}``, ``{Out[3]}``, ``{Err[3]}`` the source, result or traceback of\n"
                "cell 3 (``-1``: the cell before), ``{Err}`` the last error::\n\n"
                "  %%llm --system 'You are terse.'\n  Summarise {text} in one line.\n\n"
                "  %%llm --schema City          # City: a pydantic model; _llm is a City\n"
                "  Describe Paris.\n\n"
                "  %%llm --tools weather,convert   # the model may call these functions\n"
                "  What is the weather in Oslo, in Fahrenheit?\n\n"
                "As a line magic:\n"
                "  %llm connect URL [--token T]   connect to a host (after %llm_host start: automatic)\n"
                "  %llm fix                       explain the last error; the fixed cell goes below\n"
                "  %llm history | reset | status | models\n"
                "  %llm save PATH | load PATH     keep the conversation in a file (OpenAI messages JSON)\n\n"
                "A new cell from --format code or %llm fix: Jupyter Notebook, JupyterLab, VS Code and\n"
                "Kaggle open it below; the IPython terminal puts it at the next prompt; Colab cannot,\n"
                "so there the code shows with a Copy button.\n")
    def llm(self, line: str, cell: str | None = None) -> None:
        try:
            if cell is None:
                self._line(line)
            else:
                self._cell(line, cell)
        except LLMMagicError as exc:
            # the connection drops as the process dies, a moment before its exit can be seen
            died = self._host_died(wait=2.0 if isinstance(exc, HostUnreachable) else 0.0)
            raise UsageError(died or exc.message) from None

    def _connected(self) -> Client:
        if self.client is None and os.environ.get("LLM_MAGIC_URL"):
            self.client = Client()
        if self.client is None:
            raise UsageError("not connected: %llm connect URL --token TOKEN (or %llm_host start)")
        died = self._host_died()
        if died:
            raise UsageError(died)
        return self.client

    def _host_died(self, wait: float = 0.0) -> str | None:
        """One line when the host this notebook started, and talks to, has died (waiting up to
        ``wait`` s for its exit to show); None otherwise."""
        host, client = self.host, self.client
        if host is None or client is None or client.url.rstrip("/") not in (host.url, host.public_url):
            return None
        deadline = time.monotonic() + wait
        while not (host.state == HostState.FAILED and host.death):
            if host.state != HostState.RUNNING or time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        return (f"the host this notebook started has died: {host.death}; %llm_host restart brings it back "
                "on the same URL with the same token (%llm_host logs shows its last lines)")

    def _line(self, line: str) -> None:
        args = _line_parser().parse_args(_split(line))
        if args.command == "connect":
            url = args.target or os.environ.get("LLM_MAGIC_URL")
            if not url:
                raise UsageError("give the host's URL: %llm connect URL --token TOKEN")
            client = Client(url, args.token)
            health = client.health()
            client.models()  # checks the token: /health answers anyone
            self.client = client
            model = health.get("model") or ", ".join(health.get("models", []))
            print(f"Connected to {client.url} ({model}).")
            tunnel = health.get("tunnel") if isinstance(health.get("tunnel"), dict) else {}
            if tunnel.get("streams") is False and tunnel.get("public_url") == client.url and self.stream:
                self.stream = False  # a stream would show nothing, then everything: say so instead
                print("Its tunnel delivers streams all at once, so answers will show when complete "
                      "(%config LLMMagics.stream = True to stream anyway).")
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
        elif args.command == "fix":
            self._fix()
        elif args.command == "save":
            self._save(args.target)
        elif args.command == "load":
            self._load(args.target)

    def _show_history(self) -> None:
        if not self.history:
            print("The conversation is empty.")
            return
        names = {call.get("id"): call["function"]["name"]
                 for m in self.history for call in m.get("tool_calls") or []}
        parts = []
        for m in self.history:
            if m["role"] == "tool":
                parts.append(f"**tool** ({names.get(m.get('tool_call_id'), '?')}): {m['content']}")
                continue
            calls = [f"`{c['function']['name']}({c['function'].get('arguments', '')})`"
                     for c in m.get("tool_calls") or []]
            text = m.get("content") or ""
            parts.append(f"**{m['role']}**: {text}" + (" → calls " + ", ".join(calls) if calls else ""))
        display(Shown("\n\n".join(parts), "markdown"))

    # -- a chat turn ---------------------------------------------------------------------------

    def _cell(self, line: str, cell: str) -> None:
        args = _chat_parser().parse_args(_split(line))
        if args.complete and (args.json or args.schema or args.tools):
            raise UsageError("--complete is a raw completion: --json, --schema and --tools need a chat turn")
        schema = self._schema(args.schema) if args.schema else None
        toolbox = self._toolbox(args.tools) if args.tools else None
        client = self._connected()
        prompt = self._interpolate(cell).strip()
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
        as_json = args.json or schema is not None
        data_format = None
        if args.json:
            data_format = {"type": "json_object"}
        elif schema is not None:
            data_format = {"type": "json_schema",
                           "json_schema": {"name": args.schema, "schema": schema[0], "strict": True}}
        if toolbox is None and data_format is not None:
            params["response_format"] = data_format
        fmt = "json" if as_json else (args.format or self.format)
        live = self.stream and not args.no_stream
        if args.complete:
            stream = client.complete_stream(prompt, **params)
            text, finished = self._show_stream(stream, fmt, live)
            answer = stream.answer
        else:
            turn = [*self.history, {"role": "user", "content": prompt}]
            messages, text, finished, answer = self._converse(client, turn, params, fmt, live, toolbox,
                                                              args.tool_choice, data_format)
            if finished:
                self.history = messages
        value: Any = text
        error = None
        if finished and as_json:
            try:
                value = self._parse_json(text, answer, schema, args.schema)
            except UsageError as exc:
                error = exc
        if self.shell is not None:
            self.shell.user_ns["_llm"] = value
            if args.output:
                self.shell.user_ns[args.output] = value
        if answer is not None:
            self.last_answer = answer
            self._footer(answer)
        if error is not None:
            raise error
        if finished and fmt == "code":
            self._offer_code(answer_code(text), "The answer's code")

    def _interpolate(self, cell: str) -> str:
        if self.shell is None:
            return cell
        return interpolate(cell, self.shell.user_ns, self.shell, self.cell_errors)

    def _converse(self, client: Client, turn: list[dict[str, Any]], params: dict[str, Any], fmt: str, live: bool,
                  toolbox: ToolBox | None, tool_choice: str, data_format: dict[str, Any] | None = None,
                  ) -> tuple[list[dict[str, Any]], str, bool, Answer | None]:
        """One chat turn; with tools, as many rounds as the model calls them. Returns the
        conversation with this turn, the final text, whether it finished, and the last answer.

        With tools and a ``data_format`` (``--json``/``--schema``), a host constrains a reply to
        tool calls or to JSON, not both: while the model calls tools its text replies are not
        shown, and once it answers in text (or must answer), it is asked again for the data,
        with tools off and the format on."""
        messages = list(turn)
        rounds = 0
        results: dict[tuple[str, str], str] = {}  # the calls made in this turn, and what they gave
        must_answer = False
        while True:
            extra: dict[str, Any] = {}
            hidden = False
            if toolbox is not None:
                extra = {"tools": toolbox.specs,
                         "tool_choice": "none" if must_answer else (tool_choice if rounds == 0 else "auto")}
                if data_format is not None:
                    if must_answer:
                        extra["response_format"] = data_format
                    else:
                        hidden = True  # a text reply here is asked again, as data
            stream = client.chat_stream(messages, **params, **extra)
            text, finished = self._show_stream(stream, fmt, live, quiet=hidden)
            answer = stream.answer
            if not finished or answer is None:
                return messages, text, False, answer
            if hidden and not answer.tool_calls:
                must_answer = True  # done with tools: now the answer, as data
                continue
            if not answer.tool_calls or must_answer:  # (a server that calls tools anyway is not followed)
                messages.append({"role": "assistant", "content": text})
                return messages, text, True, answer
            assert toolbox is not None, "the host sent tool calls to a request that offered no tools"
            calls = [dict(call, id=call.get("id") or f"call_{rounds}_{i}") for i, call in enumerate(answer.tool_calls)]
            messages.append({"role": "assistant", "content": text or None, "tool_calls": calls})
            repeated = True
            for call in calls:
                key = (call["function"]["name"], _canonical(call["function"].get("arguments")))
                if key in results:  # the same call again: its result is known, and looping is likely
                    result = results[key]
                else:
                    repeated = False
                    result = results[key] = self._run_tool(toolbox, call)
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
            rounds += 1
            if repeated:
                print("(the model repeated a call it had made: now it must answer in text)")
                must_answer = True
            elif rounds >= self.max_tool_rounds:
                print(f"(after {rounds} round{'s' * (rounds > 1)} of tool calls the model must answer in text; "
                      "%config LLMMagics.max_tool_rounds raises the limit)")
                must_answer = True

    def _run_tool(self, toolbox: ToolBox, call: dict[str, Any]) -> str:
        name, arguments = call["function"]["name"], call["function"].get("arguments") or "{}"
        declined = False
        if self.confirm_tools and not self._confirm(f"{name}({arguments})"):
            result, declined = "Error: the user declined to run this call.", True
        else:
            result = toolbox.run(name, arguments)
        bundle = tool_call_bundle(name, arguments, result, declined)
        if self._rich():
            display(bundle, raw=True)
        else:
            print(bundle["text/plain"])
        return result

    def _confirm(self, call: str) -> bool:
        try:
            reply = input(f"Run {call}? [y/N] ")
        except (StdinNotImplementedError, EOFError):
            print("(this front end cannot ask: the call was not run; %config LLMMagics.confirm_tools = False "
                  "runs calls without asking)")
            return False
        return reply.strip().lower() in ("y", "yes")

    def _toolbox(self, names: str) -> ToolBox:
        namespace = self.shell.user_ns if self.shell is not None else {}
        functions = {}
        for name in [n.strip() for n in names.split(",") if n.strip()]:
            if name not in namespace:
                raise UsageError(f"--tools {name}: no such function in the notebook")
            if not callable(namespace[name]):
                raise UsageError(f"--tools {name}: a {type(namespace[name]).__name__}, not a function")
            functions[name] = namespace[name]
        if not functions:
            raise UsageError("--tools: name the functions, separated by commas: --tools f,g")
        return ToolBox(functions)

    def _schema(self, name: str) -> tuple[dict[str, Any], Callable[[Any], Any]]:
        """The JSON schema named by ``--schema`` and a function that turns a parsed answer into
        the object kept in ``_llm`` (raising ``ValueError`` when it does not match)."""
        namespace = self.shell.user_ns if self.shell is not None else {}
        if name not in namespace:
            raise UsageError(f"--schema {name}: no such name in the notebook "
                             "(a pydantic model class or a JSON-schema dict)")
        value = namespace[name]
        if isinstance(value, type) and hasattr(value, "model_json_schema"):
            return value.model_json_schema(), value.model_validate
        if isinstance(value, dict):
            return value, _json_schema_validator(name, value)
        raise UsageError(f"--schema {name}: expected a pydantic model class or a JSON-schema dict, "
                         f"not a {type(value).__name__}")

    def _parse_json(self, text: str, answer: Answer | None, schema: tuple[dict, Callable] | None,
                    name: str | None) -> Any:
        """The answer as data; a clear error if it is not (the text stays in ``_llm``)."""
        cut = answer is not None and answer.finish_reason == "length"
        try:
            data = json.loads(text)
        except ValueError as exc:
            hint = "it stopped at max tokens: raise --max-tokens" if cut else str(exc)
            raise UsageError(f"the answer is not valid JSON ({hint}); its text is in _llm") from None
        if schema is None:
            return data
        try:
            return schema[1](data)
        except ValueError as exc:
            first = str(exc).strip().splitlines()
            raise UsageError(f"the answer does not match {name} ({' '.join(first[:3])}); its text is in _llm") \
                from None

    # -- %llm fix ------------------------------------------------------------------------------

    def _fix(self) -> None:
        client = self._connected()
        error = self.cell_errors.last()
        if error is None:
            raise UsageError("no cell has failed since llm_magic was loaded: %llm fix explains the last error")
        trace = error.traceback if len(error.traceback) <= ERROR_CHARS else "…" + error.traceback[-ERROR_CHARS:]
        prompt = FIX_PROMPT.format(number=error.number, source=error.source.strip(), traceback=trace)
        turn = [*self.history, {"role": "user", "content": prompt}]
        params = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        messages, text, finished, answer = self._converse(client, turn, params, "markdown", self.stream, None, "auto")
        if answer is not None:
            self.last_answer = answer
            self._footer(answer)
        if not finished:
            return
        self.history = messages
        if self.shell is not None:
            self.shell.user_ns["_llm"] = text
        code = fixed_cell(text)
        if code is None:
            print("(the answer has no Python code block to offer as the fixed cell)")
        else:
            self._offer_code(code, f"The fixed cell [{error.number}]")

    def _offer_code(self, code: str, what: str) -> None:
        """Put code into a new cell below, where the front end can; else show it to copy."""
        if not code or self.shell is None:
            return
        if "google.colab" in sys.modules:
            display(copyable_code(code, f"{what} (Colab cannot open a new cell: copy it)"), raw=True)
            return
        self.shell.set_next_input(code, replace=False)
        where = "in a new cell below" if self._rich() else "at the next prompt"
        print(f"{what} is {where}, not run yet.")

    # -- save and load -------------------------------------------------------------------------

    def _save(self, path: str | None) -> None:
        if not path:
            raise UsageError("give a file: %llm save PATH")
        if not self.history:
            raise UsageError("the conversation is empty: nothing to save")
        settings = {"system": self.system or None, "temperature": self.temperature, "max_tokens": self.max_tokens}
        model = self.last_answer.model if self.last_answer is not None else None
        saved = conversation.save(path, self.history, model, settings)
        print(f"Saved {len(self.history)} messages to {saved}.")

    def _load(self, path: str | None) -> None:
        if not path:
            raise UsageError("give a file: %llm load PATH")
        messages, model, settings = conversation.load(path)
        self.history = messages
        for name in ("temperature", "max_tokens"):
            if name in settings:
                try:
                    setattr(self, name, settings[name])
                except Exception as exc:  # noqa: BLE001 — traitlets' TraitError: a bad value in the file
                    raise UsageError(f"{path}: settings.{name}: {exc}") from None
        turns = sum(m["role"] == "user" for m in messages)
        kept = ", ".join(f"{k} {v}" for k, v in settings.items() if k in ("temperature", "max_tokens"))
        print(f"Loaded {len(messages)} messages ({turns} turns)" + (f", held with {model}" if model else "")
              + (f"; settings: {kept}" if kept else "") + ". The next %%llm cell continues it.")

    # -- display -------------------------------------------------------------------------------

    def _rich(self) -> bool:
        return getattr(self.shell, "kernel", None) is not None  # a Jupyter kernel, not a terminal

    def _show_stream(self, stream: Stream, fmt: str, live: bool, quiet: bool = False) -> tuple[str, bool]:
        """Show the answer as it arrives (``quiet``: not at all); return its text and whether it
        finished."""
        if quiet:
            try:
                for _ in stream:
                    pass
            except KeyboardInterrupt:
                stream.close()
                print("\n(interrupted: the answer is not added to the conversation)")
                return stream.text, False
            return stream.text, True
        rich = self._rich()
        live = live and (rich or fmt != "json")  # a terminal prints JSON once, pretty
        handle = None  # shown at the first text: a round that only calls tools shows no empty answer
        last = 0.0
        try:
            for delta in stream:
                if rich and live and handle is None:
                    handle = display(Shown(stream.text, fmt), display_id=True)
                    last = time.monotonic()
                elif handle is not None and time.monotonic() - last >= UPDATE_INTERVAL:
                    handle.update(Shown(stream.text, fmt))
                    last = time.monotonic()
                elif not rich and live:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()  # the host stops generating
            print("\n(interrupted: the answer is not added to the conversation)")
            return stream.text, False
        text = stream.text
        if fmt == "json":
            try:
                text_shown = pretty_json(json.loads(text))
            except ValueError:
                text_shown = text
        else:
            text_shown = text
        if not text and stream.answer is not None and stream.answer.tool_calls:
            return text, True  # a round of tool calls: they show themselves
        if handle is not None:
            handle.update(Shown(text_shown, fmt))
        elif rich:
            display(Shown(text_shown, fmt))
        elif live:
            sys.stdout.write("\n")
        else:
            print(text_shown)
        return text, True

    def _footer(self, answer: Answer) -> None:
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


def _canonical(arguments: str | None) -> str:
    """A call's arguments in one spelling, to recognise a repeated call."""
    try:
        return json.dumps(json.loads(arguments or "{}"), sort_keys=True)
    except ValueError:
        return arguments or ""


def _json_schema_validator(name: str, schema: dict[str, Any]) -> Callable[[Any], Any]:
    """Validation with ``jsonschema`` where it is installed (it is, wherever Jupyter is)."""
    try:
        import jsonschema
    except ImportError:
        print(f"(--schema {name}: answers are constrained on the host but not checked here: pip install jsonschema)")
        return lambda data: data
    try:
        validator_class = jsonschema.validators.validator_for(schema)
        validator_class.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise UsageError(f"--schema {name} is not a valid JSON schema: {exc.message}") from None
    validator = validator_class(schema)

    def validate(data: Any) -> Any:
        error = jsonschema.exceptions.best_match(validator.iter_errors(data))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the top level"
            raise ValueError(f"at {where}: {error.message}")
        return data

    return validate


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext llm_magic``."""
    magics = LLMMagics(shell=ipython)
    ipython.register_magics(magics)
    magics.cell_errors.register()
    if magics not in ipython.configurables:
        ipython.configurables.append(magics)  # so that %config LLMMagics shows and sets it


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext llm_magic``: stop a host this notebook started."""
    for magics in [m for m in ipython.configurables if isinstance(m, LLMMagics)]:
        if magics.host is not None:
            magics.host.stop()
        magics.cell_errors.unregister()
        ipython.configurables.remove(magics)
