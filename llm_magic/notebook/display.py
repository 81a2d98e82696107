"""What the magics put in a cell's output: an answer streaming in place (Jupyter) or printed as
it comes (a terminal), a thinking model's reasoning collapsed above it, the footer under it,
tool calls, and code offered as a new cell. These are the notebook's hooks for ``ChatSession``."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from IPython.core.error import StdinNotImplementedError
from IPython.display import display

from llm_magic.client.client import Answer, Stream
from llm_magic.notebook.rendering import Shown, Thinking, copyable_code, indent, pretty_json, tool_call_bundle

UPDATE_INTERVAL = 0.05  # seconds between in-place updates of a streaming answer


class Display:
    """Output for one shell: rich in a Jupyter kernel, plain text in the IPython terminal."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell

    @property
    def rich(self) -> bool:
        return getattr(self.shell, "kernel", None) is not None  # a Jupyter kernel, not a terminal

    def stream(self, stream: Stream, fmt: str, live: bool, quiet: bool = False) -> tuple[str, bool]:
        """Show the answer as it arrives (``quiet``: not at all); return its text and whether it
        finished."""
        if quiet:
            try:
                for _ in stream:
                    pass
            except KeyboardInterrupt:
                return self._interrupted(stream)
            return stream.text, True
        rich = self.rich
        live = live and (rich or fmt != "json")  # a terminal prints JSON once, pretty
        thinking = ThinkingView(rich, live)
        handle = None  # shown at the first text: a round that only calls tools shows no empty answer
        last = 0.0
        try:
            for piece in stream.deltas():
                if piece.kind == "reasoning":
                    thinking.add(piece.text)
                    continue
                thinking.end()
                delta = piece.text
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
            thinking.end()
            return self._interrupted(stream)
        thinking.end()
        text = stream.text
        if not text and stream.answer is not None and stream.answer.tool_calls:
            return text, True  # a round of tool calls: they show themselves
        shown = _pretty(text) if fmt == "json" else text
        if handle is not None:
            handle.update(Shown(shown, fmt))
        elif rich:
            display(Shown(shown, fmt))
        elif live:
            sys.stdout.write("\n")
        else:
            print(shown)
        return text, True

    @staticmethod
    def _interrupted(stream: Stream) -> tuple[str, bool]:
        stream.close()  # the host stops generating
        print("\n(interrupted: the answer is not added to the conversation)")
        return stream.text, False

    def footer(self, answer: Answer) -> None:
        """The model, tokens, speed, and whether the answer was cut at max tokens."""
        tokens = answer.usage.get("completion_tokens")
        rate = answer.timings.get("predicted_per_second")
        thought = f" ({answer.reasoning_tokens} thinking)" if answer.reasoning_tokens else ""
        parts = [answer.model or "?", f"{tokens} tokens{thought}" if tokens is not None else None,
                 f"{rate:.1f} tokens/s" if rate else None,
                 "stopped at max tokens" if answer.finish_reason == "length" else None]
        footer = " · ".join(p for p in parts if p)
        if self.rich:
            display({"text/plain": footer, "text/markdown": f"<sub>{footer}</sub>"}, raw=True)
        else:
            print(f"[{footer}]")

    def tool_call(self, name: str, arguments: str, result: str, declined: bool) -> None:
        """One call the model made and its result, collapsed (Jupyter) or on two lines."""
        bundle = tool_call_bundle(name, arguments, result, declined)
        if self.rich:
            display(bundle, raw=True)
        else:
            print(bundle["text/plain"])

    @staticmethod
    def confirm(call: str) -> bool:
        """Ask before a call runs; a front end that cannot ask gets no for an answer."""
        try:
            reply = input(f"Run {call}? [y/N] ")
        except (StdinNotImplementedError, EOFError):
            print("(this front end cannot ask: the call was not run; %config LLMMagics.confirm_tools = False "
                  "runs calls without asking)")
            return False
        return reply.strip().lower() in ("y", "yes")

    def offer_code(self, code: str, what: str) -> None:
        """Put code into a new cell below, where the front end can; else show it to copy."""
        if not code or self.shell is None:
            return
        if "google.colab" in sys.modules:
            display(copyable_code(code, f"{what} (Colab cannot open a new cell: copy it)"), raw=True)
            return
        self.shell.set_next_input(code, replace=False)
        where = "in a new cell below" if self.rich else "at the next prompt"
        print(f"{what} is {where}, not run yet.")


class ThinkingView:
    """One reply's reasoning as it streams: a collapsed block updated in place (Jupyter), lines
    indented under "Thinking…" (a terminal), or the whole block once it ended (not live). It
    ends as "Thought for N s" at the answer's first text, or with the reply."""

    def __init__(self, rich: bool, live: bool) -> None:
        self.rich, self.live = rich, live
        self.started = time.monotonic()  # the reply is being read: the model thinks from here
        self.block = Thinking("")
        self.handle: Any = None
        self.last = 0.0

    def add(self, piece: str) -> None:
        shown = bool(self.block.text.strip())
        self.block.text += piece
        if not self.live or self.block.seconds is not None or not self.block.text.strip():
            return  # shown whole when it ends (or, after the answer began, kept for the history)
        if not self.rich:
            if not shown:  # its first words: under the summary, without the blank start
                sys.stdout.write(self.block.summary + "\n" + indent(""))
                piece = self.block.text.lstrip()
            sys.stdout.write(piece.replace("\n", "\n" + indent("")))
            sys.stdout.flush()
        elif self.handle is None:
            self.handle = display(self.block, display_id=True)
            self.last = time.monotonic()
        elif time.monotonic() - self.last >= UPDATE_INTERVAL:
            self.handle.update(self.block)
            self.last = time.monotonic()

    def end(self) -> None:
        """The reasoning is over: say for how long (once; nothing for a reply without any)."""
        if self.block.seconds is not None or not self.block.text.strip():
            return
        self.block.seconds = time.monotonic() - self.started
        if self.handle is not None:
            self.handle.update(self.block)
        elif self.rich:
            display(self.block)
        elif self.live:
            print("\n" + self.block.summary)
        else:
            print(repr(self.block))


def _pretty(text: str) -> str:
    try:
        return pretty_json(json.loads(text))
    except ValueError:
        return text
