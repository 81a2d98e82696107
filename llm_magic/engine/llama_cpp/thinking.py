"""Thinking models in the llama.cpp backend: the sampler that knows where the reasoning ends,
and the events that keep it apart from the answer.

The sampler watches the bytes of its own tokens: past the budget it writes the closing marker
itself, and a grammar (structured output, tool calls) starts only once the reasoning has
ended, so a model may think freely and then write JSON that validates. Only requests to a
model with a reasoning format get it; every other answer keeps the plain ``TokenSampler``.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from llm_magic.engine.llama_cpp.sampling import TokenSampler, logits_at
from llm_magic.engine.llama_cpp.tool_events import call_deltas, regathered
from llm_magic.errors import InvalidRequest
from llm_magic.wire.events import Completion, Event, ReasoningDelta, TextDelta
from llm_magic.wire.reasoning import ReasoningFormat, Splitter
from llm_magic.wire.tool_calls import ToolCall
from llm_magic.wire.types import Sampling


class ThinkingSampler(TokenSampler):
    """A ``TokenSampler`` for an answer that may start with reasoning: ``state`` is "start"
    (the model may open a block), "thinking", then "content", where the grammar applies."""

    def __init__(self, vocab: Any, sampling: Sampling, seed: int, grammar: str | None, *,
                 fmt: ReasoningFormat, budget: int, piece: Callable[[int], bytes],
                 tokenize: Callable[[str], list[int]]) -> None:
        super().__init__(vocab, sampling, seed, grammar)  # nothing banned: reasoning writes newlines
        self._grammar, self.rules = self.rules, None  # the grammar waits for the answer
        self._piece = piece
        self._open = fmt.open_marker.encode()
        self._end = fmt.content_marker.encode()
        self.state = "thinking" if fmt.opened or not self._open else "start"
        self._tail = b""
        self.reasoning_tokens = 0
        self._budget = budget
        close = fmt.forced_close
        cut = close.index(fmt.content_marker) + len(fmt.content_marker)
        # after the marker, only what the grammar (if any) will judge: nothing is forced past it
        self._close = tokenize(close[:cut]) + (tokenize(close[cut:]) if grammar is None and close[cut:] else [])
        self._forced: list[int] = []
        self._closing = False  # the budget was spent and the closing marker forced

    def sample(self, ctx: Any, index: int) -> int:
        return self._pick(lambda: super(ThinkingSampler, self).sample(ctx, index),
                          lambda: logits_at(ctx, index, self._n_vocab))

    def sample_from(self, logits: Any) -> int:
        return self._pick(lambda: super(ThinkingSampler, self).sample_from(logits), lambda: logits)

    def _pick(self, plain: Callable[[], int], logits: Callable[[], Any]) -> int:
        if self._forced:
            token = self._forced.pop(0)
            self._lib.llama_sampler_accept(self.chain, token)
            self._note(token, forced=True)
            return token
        if self.state == "content":
            return plain()
        if self.state == "thinking" and not self._closing and 0 <= self._budget <= self.reasoning_tokens:
            self._closing, self._forced = True, list(self._close)  # the budget is spent: close the block
            return self._pick(plain, logits)
        if self.state == "start" and self._grammar is not None:
            token = self._start_constrained(logits())
        else:
            token = plain()
        self._note(token)
        return token

    def _start_constrained(self, logits: Any) -> int:
        """The first tokens of an answer that may open a block or be the constrained answer:
        the chain's choice if it opens the block, else the grammar's from here."""
        self._arrays()
        token = self._choose(self._all, self._all_array, logits, None)
        assert token is not None
        stripped = (self._tail + self._piece(token)).lstrip()
        if stripped.startswith(self._open) or self._open.startswith(stripped):
            self._lib.llama_sampler_accept(self.chain, token)
            return token
        self._begin_answer()
        return self._sample_constrained(logits, token, noted=False)

    def _note(self, token: int, forced: bool = False) -> None:
        if self.state == "content":
            return
        self._tail += self._piece(token)
        if not forced:
            self.reasoning_tokens += 1
        if self.state == "start":
            stripped = self._tail.lstrip()
            if stripped.startswith(self._open):
                self.state, self._tail = "thinking", stripped[len(self._open):]
            elif not self._open.startswith(stripped):
                self.reasoning_tokens = 0  # no block: this was the answer
                self._begin_answer()
            return
        if self._end in self._tail:
            self._begin_answer()
        else:
            self._tail = self._tail[-len(self._end):]

    def _begin_answer(self) -> None:
        self.state, self.rules, self._grammar = "content", self._grammar, None

    def close(self) -> None:
        if self._grammar:
            self._lib.llama_sampler_free(self._grammar)
            self._grammar = None
        super().close()


def split_reasoning(events: Iterable[Event], fmt: ReasoningFormat,
                    first_text_passed: threading.Event | None = None) -> Iterator[Event]:
    """``events`` with each answer's text read in ``fmt``: ``ReasoningDelta``s and the content's
    ``TextDelta``s as they come, then a ``Completion`` whose ``text`` is the content and whose
    ``reasoning`` is the reasoning (gpt-oss's commentary calls become its ``tool_calls``).
    ``first_text_passed`` is set once reasoning has gone out, as the server does for text."""
    splitters: dict[int, Splitter] = {}
    parts: dict[int, tuple[list[str], list[str]]] = {}
    for event in events:
        if isinstance(event, TextDelta):
            splitter = splitters.get(event.index) or splitters.setdefault(event.index, fmt.splitter())
            reasoning, content = splitter.feed(event.text)
            yield from _deltas(parts.setdefault(event.index, ([], [])), reasoning, content, event)
            if reasoning and first_text_passed is not None:
                first_text_passed.set()  # the consumer came back for more: it passed it on
            continue
        if not isinstance(event, Completion):
            yield event
            continue
        answers = []
        for answer in event.choices or (event,):
            splitter = splitters.get(answer.index) or fmt.splitter()
            kept = parts.setdefault(answer.index, ([], []))
            reasoning, content = splitter.finish()
            yield from _deltas(kept, reasoning, content, None, answer.index)
            calls = tuple(ToolCall(name, arguments) for name, arguments in getattr(splitter, "calls", ()))
            yield from call_deltas(calls, answer.index)
            extra: dict = {"tool_calls": calls, "finish_reason": "tool_calls"} if calls else {}
            answers.append(dataclasses.replace(answer, text="".join(kept[1]), reasoning="".join(kept[0]), **extra))
        yield regathered(event, answers)


def _deltas(kept: tuple[list[str], list[str]], reasoning: str, content: str, event: TextDelta | None,
            index: int = 0) -> Iterator[Event]:
    if event is not None:
        index = event.index
    if reasoning:
        kept[0].append(reasoning)
        yield ReasoningDelta(reasoning, index)
    if content:
        kept[1].append(content)
        whole = event is not None and not reasoning and content == event.text
        yield event if whole else TextDelta(content, index)  # type: ignore[misc]


def harmony_calls_offered(fmt: ReasoningFormat | None) -> bool:
    """Whether tool calls come from the reasoning format itself (gpt-oss's commentary)."""
    return fmt is not None and fmt.name == "harmony"



def read_template(path: Path | str | None) -> str | None:
    """The text of a ``--chat-template-file``: a Jinja chat template used instead of the GGUF's."""
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"'--chat-template-file': cannot read {path} ({exc})") from None
    if not text.strip():
        raise InvalidRequest(f"'--chat-template-file': {path} is empty")
    return text
