"""The ``%llm`` line commands: connect to a host, look at or reset the conversation, keep it in
a file, and ``%llm fix`` (the last error explained, the fixed cell offered below)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from IPython.core.error import UsageError
from IPython.display import display

from llm_magic.client.client import Client
from llm_magic.errors import LLMMagicError
from llm_magic.notebook.chat_cell import think_fields
from llm_magic.notebook.rendering import fixed_cell, history_bundle
from llm_magic.notebook.watch import slots_text

if TYPE_CHECKING:
    from llm_magic.notebook.magics import LLMMagics

KEPT_SETTINGS = ("temperature", "max_tokens", "think")  # what %llm load sets again from a saved file
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


class ChatCommands:
    """``%llm connect|reset|history|status|models|save|load|fix`` for ``magics``."""

    def __init__(self, magics: LLMMagics) -> None:
        self.magics = magics

    def run(self, args: argparse.Namespace) -> None:
        handlers = {"connect": self.connect, "reset": self.reset, "history": self.history, "status": self.status,
                    "models": self.models, "fix": self.fix, "save": self.save, "load": self.load}
        handlers[args.command](args)

    def connect(self, args: argparse.Namespace) -> None:
        url = args.target or os.environ.get("LLM_MAGIC_URL")
        if not url:
            raise UsageError("give the host's URL: %llm connect URL --token TOKEN")
        client = Client(url, args.token)
        health = client.health()
        client.models()  # checks the token: /health answers anyone
        self.magics.client = client
        model = health.get("model") or ", ".join(health.get("models", []))
        print(f"Connected to {client.url} ({model}).")
        tunnel = health.get("tunnel") if isinstance(health.get("tunnel"), dict) else {}
        if tunnel.get("streams") is False and tunnel.get("public_url") == client.url and self.magics.stream:
            self.magics.stream = False  # a stream would show nothing, then everything: say so instead
            print("Its tunnel delivers streams all at once, so answers will show when complete "
                  "(%config LLMMagics.stream = True to stream anyway).")

    def reset(self, args: argparse.Namespace) -> None:
        self.magics.history.clear()
        print("New conversation.")

    def history(self, args: argparse.Namespace) -> None:
        history = self.magics.history
        if not history:
            print("The conversation is empty.")
            return
        display(history_bundle(history), raw=True)

    def status(self, args: argparse.Namespace) -> None:
        client = self.magics.connected()
        health = client.health()
        turns = sum(m["role"] == "user" for m in self.magics.history)
        print(f"connected to {client.url}\nmodel        {health.get('model', '?')}\n"
              f"host status  {health.get('status', '?')} (waiting: {health.get('queue', '?')})\n"
              f"conversation {turns} turn(s)")
        try:
            slots = client.slots()  # with the token; another kind of server has none
        except LLMMagicError:
            return
        print(slots_text(slots))

    def models(self, args: argparse.Namespace) -> None:
        print("\n".join(self.magics.connected().models()))

    def fix(self, args: argparse.Namespace) -> None:
        m = self.magics
        m.connected()
        error = m.cell_errors.last()
        if error is None:
            raise UsageError("no cell has failed since llm_magic was loaded: %llm fix explains the last error")
        trace = error.traceback if len(error.traceback) <= ERROR_CHARS else "…" + error.traceback[-ERROR_CHARS:]
        prompt = FIX_PROMPT.format(number=error.number, source=error.source.strip(), traceback=trace)
        params = {"max_tokens": m.max_tokens, "temperature": m.temperature, **think_fields(m.think)}
        text, finished, answer = m.chat_cell.turn(prompt, params, "markdown", m.stream)
        if answer is not None:
            m.last_answer = answer
            m.display.footer(answer)
        if not finished:
            return
        if m.shell is not None:
            m.shell.user_ns["_llm"] = text
        code = fixed_cell(text)
        if code is None:
            print("(the answer has no Python code block to offer as the fixed cell)")
        else:
            m.display.offer_code(code, f"The fixed cell [{error.number}]")

    def save(self, args: argparse.Namespace) -> None:
        m = self.magics
        if not args.target:
            raise UsageError("give a file: %llm save PATH")
        if not m.history:
            raise UsageError("the conversation is empty: nothing to save")
        settings = {"system": m.system or None, "temperature": m.temperature, "max_tokens": m.max_tokens,
                    "think": m.think}
        model = m.last_answer.model if m.last_answer is not None else None
        saved = m.session.save(args.target, model=model, settings=settings)
        print(f"Saved {len(m.history)} messages to {saved}.")

    def load(self, args: argparse.Namespace) -> None:
        m = self.magics
        if not args.target:
            raise UsageError("give a file: %llm load PATH")
        model, settings = m.session.load(args.target)
        for name in KEPT_SETTINGS:
            if name in settings:
                try:
                    setattr(m, name, settings[name])
                except Exception as exc:  # noqa: BLE001 — traitlets' TraitError: a bad value in the file
                    raise UsageError(f"{args.target}: settings.{name}: {exc}") from None
        messages = m.history
        turns = sum(msg["role"] == "user" for msg in messages)
        kept = ", ".join(f"{k} {v}" for k, v in settings.items() if k in KEPT_SETTINGS)
        print(f"Loaded {len(messages)} messages ({turns} turns)" + (f", held with {model}" if model else "")
              + (f"; settings: {kept}" if kept else "") + ". The next %%llm cell continues it.")
