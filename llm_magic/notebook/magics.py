"""IPython glue: ``%llm_host``, ``%llm`` and ``%%llm`` (their settings, arguments and help).
Each family's work is in its own module: ``host_commands`` (``%llm_host``), ``chat_commands``
(the ``%llm`` lines), ``chat_cell`` (the ``%%llm`` turn, through the client's ``ChatSession``)
and ``display`` (what shows in the cell)."""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from traitlets import Bool, CaselessStrEnum, Float, Int, Unicode

from llm_magic.client.client import Answer, Client
from llm_magic.client.session import ChatSession
from llm_magic.errors import HostUnreachable, LLMMagicError
from llm_magic.notebook.cells import CellErrors, interpolate
from llm_magic.notebook.chat_cell import ChatCell
from llm_magic.notebook.chat_commands import ChatCommands
from llm_magic.notebook.display import Display
from llm_magic.notebook.host_commands import HostCommands
from llm_magic.supervisor.host import ApiHost, HostState, add_serve_arguments

__all__ = ["LLMMagics", "interpolate", "load_ipython_extension", "unload_ipython_extension"]


class _Parser(MagicArgumentParser):
    """argparse that raises IPython's ``UsageError`` (one line, no traceback) instead of exiting."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        super().__init__(prog=prog, add_help=False, **kwargs)


def _serve_parser() -> _Parser:
    parser = _Parser("llm_host", description="Run a model server in the background of this notebook.")
    parser.add_argument("command", choices=("start", "stop", "restart", "status", "logs", "top"))
    parser.add_argument("-n", type=int, default=None,
                        help="logs: how many lines (default: 40); top: how many refreshes (default: until "
                             "the cell is interrupted)")
    parser.add_argument("--once", action="store_true", help="top: one refresh, then end")
    parser.add_argument("--interval", type=float, default=2.0, metavar="S",
                        help="top: seconds between refreshes (default: %(default)s)")
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
    thinking = parser.add_mutually_exclusive_group()
    thinking.add_argument("--think", dest="think", action="store_const", const=True, default=None,
                          help="a thinking model thinks first (where its template has the switch); its "
                               "reasoning shows collapsed above the answer")
    thinking.add_argument("--no-think", dest="think", action="store_const", const=False,
                          help="answer without thinking (the template's switch off, a reasoning budget of 0)")
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
    think = Bool(None, allow_none=True,
                 help="%%llm: default --think (True) or --no-think (False); None: the model's own default"
                 ).tag(config=True)
    tunnel = CaselessStrEnum(("cloudflared", "none"), "cloudflared",
                             help="%llm_host start: default --tunnel").tag(config=True)
    confirm_tools = Bool(False, help="%%llm --tools: ask before running each call the model makes").tag(config=True)
    max_tool_rounds = Int(5, help="%%llm --tools: rounds of tool calls before the model must answer in text"
                          ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.host: ApiHost | None = None
        self.client: Client | None = None
        self.session = ChatSession(None, limit_hint="%config LLMMagics.max_tool_rounds raises the limit")
        self.last_answer: Answer | None = None  # of a chat turn, %llm fix or --complete
        self.cell_errors = CellErrors(shell)
        self.display = Display(shell)
        self.host_commands = HostCommands(self)
        self.chat_commands = ChatCommands(self)
        self.chat_cell = ChatCell(self)

    @property
    def history(self) -> list[dict[str, Any]]:
        """The notebook's conversation, as OpenAI messages (its chat session's)."""
        return self.session.messages

    @history.setter
    def history(self, messages: list[dict[str, Any]]) -> None:
        self.session.messages = messages

    @line_magic
    @_with_help(_serve_parser, "Host a model from this notebook: %llm_host start|stop|restart|status|logs|top.\n\n"
                "Examples::\n\n  %llm_host start --model bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M\n"
                "  %llm_host start --tunnel none        # the embedded tiny model, local only\n"
                "  %llm_host status\n  %llm_host logs -n 20\n"
                "  %llm_host top                 # slots, queue, tokens/s, live (interrupt the cell to stop)\n"
                "  %llm_host stop")
    def llm_host(self, line: str) -> None:
        argv = _split(line)
        args = _serve_parser().parse_args(argv)
        try:
            self.host_commands.run(args, argv)
        except LLMMagicError as exc:
            raise UsageError(exc.message) from None

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
                "A thinking model's reasoning streams in a collapsed block above the answer\n"
                "(\"Thinking…\", then \"Thought for N s\"); --no-think answers without it, --think asks\n"
                "for it (default: %config LLMMagics.think = True/False)::\n\n"
                "  %%llm --no-think\n  What is 2 + 2?\n\n"
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
                self.chat_commands.run(_line_parser().parse_args(_split(line)))
            else:
                self.chat_cell.run(_chat_parser().parse_args(_split(line)), cell)
        except LLMMagicError as exc:
            # the connection drops as the process dies, a moment before its exit can be seen
            died = self._host_died(wait=2.0 if isinstance(exc, HostUnreachable) else 0.0)
            raise UsageError(died or exc.message) from None

    def connected(self) -> Client:
        """The client to talk through (from ``$LLM_MAGIC_URL`` if none was made); a clear error
        when there is none, or when the host this notebook started has died."""
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
