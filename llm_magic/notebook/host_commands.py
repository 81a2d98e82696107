"""``%llm_host start|stop|restart|status|logs``: a model server in the background of the
notebook, run by ``ApiHost``; the notebook's client follows it."""

from __future__ import annotations

import argparse
import importlib.util
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.display import display

from llm_magic.client.client import Client
from llm_magic.errors import LLMMagicError
from llm_magic.notebook.watch import TopView, slots_text
from llm_magic.settings import ServeSettings
from llm_magic.supervisor.host import ApiHost, HostState

if TYPE_CHECKING:
    from llm_magic.notebook.magics import LLMMagics


class HostCommands:
    """The host this notebook started (``magics.host``), its life cycle and its state."""

    def __init__(self, magics: LLMMagics) -> None:
        self.magics = magics

    def run(self, args: argparse.Namespace, argv: list[str]) -> None:
        handlers = {"start": self.start, "stop": self.stop, "restart": self.restart,
                    "status": self.status, "logs": self.logs, "top": self.top}
        handlers[args.command](args, argv)

    def start(self, args: argparse.Namespace, argv: list[str]) -> None:
        magics = self.magics
        if magics.host is not None and magics.host.running:
            raise UsageError(f"a host is already running at {magics.host.url}; "
                             "%llm_host stop (or restart) first")
        if magics.host is not None:
            magics.host.stop()  # one that died or failed: its tunnel and folder go
        needed = ("flask",) if args.engine else ("flask", "llama_cpp")  # an engine elsewhere needs no llama_cpp
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(f"hosting needs the host extra ({', '.join(missing)} missing): "
                             "pip install 'llm_magic[host]'")
        host = ApiHost(**self._settings(args))
        host.start()
        magics.host = host
        self._connect(host)

    def _settings(self, args: argparse.Namespace) -> dict[str, Any]:
        """``ApiHost``'s keywords for the ``%llm_host start`` flags."""
        return dict(model=args.model, use_token=not args.no_token, token=None if args.no_token else args.token,
                    host=args.host, port=args.port, tunnel=args.tunnel or self.magics.tunnel,
                    settings=ServeSettings.from_args(args))

    def _connect(self, host: ApiHost) -> None:
        self.magics.client = Client(host.url, host.token)
        text = host.connection_text() + "\n\nThis notebook is connected: write a %%llm cell."
        display({"text/plain": text}, raw=True)

    def _require_host(self) -> ApiHost:
        if self.magics.host is None:
            raise UsageError("no host was started in this notebook: %llm_host start")
        return self.magics.host

    def stop(self, args: argparse.Namespace, argv: list[str]) -> None:
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

    def restart(self, args: argparse.Namespace, argv: list[str]) -> None:
        """The same flags again (or the ones given), the same token, port and public tunnel:
        connected clients carry on."""
        host = self._require_host()
        if len(argv) > 1:  # new flags: the host takes them, keeping its port (and its token, unless given)
            settings = self._settings(args)
            del settings["port"]
            if settings["token"] is None:
                del settings["token"]
            host.restart(**settings)
        else:
            host.restart()
        self._connect(host)

    def status(self, args: argparse.Namespace, argv: list[str]) -> None:
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
                     ("tokens/s now", status.get("decode_tokens_per_second")),
                     ("device", status.get("device")), ("gpu layers", status.get("gpu_layers")),
                     ("memory", status.get("memory")), ("engine", engine_line(status.get("engine")))]
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows if v is not None))
        if "uptime_s" in status:
            slots = self._slots(self._require_host())
            if slots is not None:
                print("\n" + slots_text(slots))
        if status.get("died"):
            print("\nIts log's last lines:\n" + "\n".join("  " + line for line in status.get("log") or ["(none)"]))
            print("\n%llm_host restart brings it back on the same URL, with the same token.")

    def logs(self, args: argparse.Namespace, argv: list[str]) -> None:
        print(self._require_host().logs(40 if args.n is None else args.n) or "(no output yet)")

    @staticmethod
    def _slots(host: ApiHost) -> dict[str, Any] | None:
        try:
            return Client(host.url, host.token).slots()
        except LLMMagicError:  # an older host, or one going away: the rest of the status stands
            return None

    def top(self, args: argparse.Namespace, argv: list[str]) -> None:
        """Slots, queue and tokens/s, redrawn in place every ``--interval`` s until the cell
        is interrupted (or ``-n`` times; ``--once``)."""
        host = self._require_host()
        if not host.running:
            raise UsageError("the host is not running (%llm_host status says why)")
        client = Client(host.url, host.token)
        TopView(client.slots, f"host {host.url}").run(1 if args.once else args.n, max(0.2, args.interval))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def engine_line(engine: Any) -> str | None:
    """An engine the host fronts, in one line: what it is, where, and whether it answers
    (``None`` for llama.cpp in the host itself, whose device rows say it all)."""
    if not isinstance(engine, dict) or engine.get("kind") != "upstream":
        return None
    what = engine.get("process") or "the engine"
    line = f"{what} at {engine.get('url')}: {engine.get('state')}"
    if engine.get("models"):
        line += f" (serving {', '.join(map(str, engine['models']))})"
    if engine.get("died"):
        line += f"; {str(engine['died']).splitlines()[0]}"
    elif engine.get("error"):
        line += f"; {engine['error']}"
    return line
