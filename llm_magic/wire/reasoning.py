"""Reasoning formats: how a thinking model writes its scratch work, and how it is read apart.

Chosen from the chat template, as tool-call formats are (``wire/tool_calls.py``):

- ``deepseek`` — ``<think>…</think>`` before the answer (DeepSeek-R1 and its distills, Qwen3,
  QwQ, SmolLM3, GLM). When the template's generation prompt already opens ``<think>``, the
  answer starts inside the block: everything until ``</think>`` is reasoning.
- ``harmony`` — gpt-oss: ``<|channel|>analysis<|message|>…<|end|>`` then
  ``<|start|>assistant<|channel|>final<|message|>…``. Analysis is reasoning, final is content,
  a commentary message to a tool is a call (``HarmonySplitter.calls``), one without is content.

A splitter reads a streamed answer: ``feed`` returns the reasoning and the content a delta
carries, holding back any tail that could be the start of a marker, so that no part of one is
shown and then retracted. The host's ``--reasoning-format`` (and a request's
``reasoning_format``) is spelt as llama-server's: ``auto`` (from the template), ``none`` (all in
the content) or ``deepseek`` (``<think>`` tags whatever the template says). Pure Python.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REASONING_FORMATS = ("auto", "none", "deepseek")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CHANNEL, MESSAGE, START = "<|channel|>", "<|message|>", "<|start|>"
HARMONY_ENDS = ("<|end|>", "<|return|>", "<|call|>")
HARMONY_FINAL = CHANNEL + "final" + MESSAGE


def held_back(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could be the start of one of ``markers``."""
    keep = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), keep, -1):
            if text.endswith(marker[:k]):
                keep = k
                break
    return keep


class Splitter:
    """Reads one streamed answer into reasoning and content."""

    def feed(self, text: str) -> tuple[str, str]:
        """The reasoning and the content ``text`` adds (either may be "")."""
        raise NotImplementedError

    def finish(self) -> tuple[str, str]:
        """What was held back, at the end of the answer (a marker cut in two is dropped)."""
        raise NotImplementedError


class ThinkSplitter(Splitter):
    """``<think>…</think>``, then the answer; leading and trailing whitespace of both trimmed."""

    def __init__(self, opened: bool = False) -> None:
        self.state = "reasoning" if opened else "start"
        self.buf = ""
        self.begun = False  # the reasoning's first visible character went out

    def feed(self, text: str) -> tuple[str, str]:
        if self.state == "content":
            return "", text
        self.buf += text
        reasoning, content = [], []
        while True:
            buf = self.buf
            if self.state == "start":
                stripped = buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.state, self.buf = "reasoning", stripped[len(THINK_OPEN):]
                    continue
                if not stripped or THINK_OPEN.startswith(stripped):
                    break  # it may still open a block
                self.state, self.buf = "content", ""
                content.append(buf)
                break
            if self.state == "reasoning":
                if not self.begun:
                    buf = buf.lstrip()
                    if buf.startswith(THINK_OPEN):  # written again after a prompt that opened it
                        buf = buf[len(THINK_OPEN):].lstrip()
                    elif THINK_OPEN.startswith(buf):
                        self.buf = buf
                        break
                at = buf.find(THINK_CLOSE)
                if at >= 0:
                    reasoning.append(buf[:at].rstrip() if self.begun else buf[:at].strip())
                    self.state, self.buf = "after", buf[at + len(THINK_CLOSE):]
                    continue
                keep = held_back(buf, (THINK_CLOSE,))
                out = buf[:len(buf) - keep]
                visible = out.rstrip()  # trailing whitespace waits: it may end the reasoning
                if visible:
                    self.begun = True
                reasoning.append(visible)
                self.buf = out[len(visible):] + buf[len(buf) - keep:]
                break
            # after the block: the answer starts at its first visible character
            stripped = buf.lstrip()
            if stripped:
                self.state, self.buf = "content", ""
                content.append(stripped)
            else:
                self.buf = ""
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        buf, self.buf = self.buf, ""
        if self.state == "start":
            return "", "" if THINK_OPEN.startswith(buf.lstrip()) and buf.strip() else buf
        if self.state == "reasoning":
            keep = held_back(buf, (THINK_CLOSE,))
            rest = buf[:len(buf) - keep].rstrip()
            return (rest if self.begun else rest.lstrip()), ""
        return "", ""


class HarmonySplitter(Splitter):
    """gpt-oss's harmony messages: analysis to reasoning, final (and plain commentary) to
    content; a commentary message to a recipient is a tool call, kept in ``calls``."""

    MARKERS = (CHANNEL, MESSAGE, START, *HARMONY_ENDS)

    def __init__(self) -> None:
        self.state = "header"
        self.buf = ""
        self.channel = ""
        self.recipient = ""
        self.body = ""  # a call's arguments so far
        self.plain = False  # the model wrote no harmony markup at all: everything is content
        self.calls: list[tuple[str, str]] = []  # (recipient, arguments)
        self.seen = False  # some header was read

    def feed(self, text: str) -> tuple[str, str]:
        if self.plain:
            return "", text
        self.buf += text
        reasoning, content = [], []
        while True:
            if self.state == "header":
                at = self.buf.find(MESSAGE)
                if at < 0:
                    if not self.seen and not self._may_be_header(self.buf):
                        self.plain, text, self.buf = True, self.buf, ""
                        content.append(text)
                    break
                self._read_header(self.buf[:at])
                self.state, self.buf, self.seen = "body", self.buf[at + len(MESSAGE):], True
                continue
            ends = [(i, m) for m in (*HARMONY_ENDS, START) if (i := self.buf.find(m)) >= 0]
            if ends:
                at, marker = min(ends)
                self._body(self.buf[:at], reasoning, content)
                self._end_message()
                self.state, self.buf = "header", self.buf[at + (len(marker) if marker != START else 0):]
                continue
            keep = held_back(self.buf, self.MARKERS)
            self._body(self.buf[:len(self.buf) - keep], reasoning, content)
            self.buf = self.buf[len(self.buf) - keep:]
            break
        return "".join(reasoning), "".join(content)

    @staticmethod
    def _may_be_header(text: str) -> bool:
        stripped = text.lstrip()
        return not stripped or stripped.startswith(("<|", "analysis", "final", "commentary")) or any(
            m.startswith(stripped) for m in (CHANNEL, START))

    def _read_header(self, header: str) -> None:
        found = re.search(r"<\|channel\|>\s*(\w+)", header) or re.match(r"\s*(analysis|final|commentary)\b", header)
        self.channel = found.group(1) if found else "final"
        recipient = re.search(r"\bto=([\w.\-]+)", header)
        self.recipient = recipient.group(1) if recipient else ""

    def _body(self, text: str, reasoning: list, content: list) -> None:
        if not text:
            return
        if self.channel == "analysis":
            reasoning.append(text)
        elif self.recipient:
            self.body += text
        else:
            content.append(text)

    def _end_message(self) -> None:
        if self.recipient:
            name = self.recipient.removeprefix("functions.")
            self.calls.append((name, self.body.strip() or "{}"))
        self.channel, self.recipient, self.body = "", "", ""

    def finish(self) -> tuple[str, str]:
        if self.plain or self.state == "header":
            self.buf = ""
            return "", ""
        reasoning: list = []
        content: list = []
        keep = held_back(self.buf, self.MARKERS)
        self._body(self.buf[:len(self.buf) - keep], reasoning, content)
        self.buf = ""
        self._end_message()
        return "".join(reasoning), "".join(content)


@dataclass(frozen=True)
class ReasoningFormat:
    """How one model family thinks: its splitter, and what the engine needs to know (where
    the reasoning ends, what closes it when the budget is spent)."""

    name: str  # "deepseek" | "harmony"
    opened: bool = False  # the generation prompt already opened the block

    @property
    def content_marker(self) -> str:
        """The text after which the answer (and any grammar) begins."""
        return THINK_CLOSE if self.name == "deepseek" else HARMONY_FINAL

    @property
    def open_marker(self) -> str:
        return THINK_OPEN if self.name == "deepseek" else ""

    @property
    def forced_close(self) -> str:
        """What the engine writes to end the reasoning once the budget is spent."""
        return "\n" + THINK_CLOSE + "\n\n" if self.name == "deepseek" else "<|end|><|start|>assistant" + HARMONY_FINAL

    @property
    def special_tokens(self) -> bool:
        """Whether its markers are control tokens, which the answer's text must then render."""
        return self.name == "harmony"

    def splitter(self) -> Splitter:
        return ThinkSplitter(self.opened) if self.name == "deepseek" else HarmonySplitter()


def detect_reasoning(template: str | None, setting: str = "auto", prompt: str = "") -> ReasoningFormat | None:
    """The reasoning format of a chat template under ``setting`` (``REASONING_FORMATS``), for a
    prompt rendered with it; None: the answer is content only."""
    if setting == "none":
        return None
    template = template or ""
    if CHANNEL in template and "analysis" in template:
        return ReasoningFormat("harmony")
    if setting == "deepseek" or THINK_OPEN in template:
        return ReasoningFormat("deepseek", opened=opens_think(prompt))
    return None


def opens_think(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open ``<think>`` block."""
    at = prompt.rfind(THINK_OPEN)
    return at >= 0 and THINK_CLOSE not in prompt[at:] and not prompt[at + len(THINK_OPEN):].strip()


def split_reasoning(fmt: ReasoningFormat, text: str) -> tuple[str, str]:
    """The reasoning and the content of a finished answer (as its stream would read it)."""
    splitter = fmt.splitter()
    reasoning, content = splitter.feed(text)
    more_reasoning, more_content = splitter.finish()
    return reasoning + more_reasoning, content + more_content
