"""A model's raw text read as tool calls: the llama.cpp backend writes an answer as text, in
its chat template's tool-call format, and this turns its events into structured ones."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Sequence

from llm_magic.wire.events import Completion, Event, TextDelta, ToolCallDelta
from llm_magic.wire.tool_calls import ToolCall, ToolFormat, ToolStream, read_answer


def split_tool_calls(events: Iterable[Event], fmt: ToolFormat) -> Iterator[Event]:
    """``events`` with each answer's text read in ``fmt``: text passes on as soon as it cannot
    be the start of a call; at the end come the rest of the text, each call as ``ToolCallDelta``
    pieces (its id and name, then its arguments), and a ``Completion`` whose ``text`` is the
    content and whose ``tool_calls`` are the calls (``finish_reason`` "tool_calls", unless the
    answer was cut short by ``max_tokens``: then the calls so far, the last one cut)."""
    streams: dict[int, ToolStream] = {}
    for event in events:
        if isinstance(event, TextDelta):
            stream = streams.get(event.index) or streams.setdefault(event.index, ToolStream(fmt))
            plain = stream.feed(event.text)
            if plain == event.text:
                yield event
            elif plain:
                yield TextDelta(plain, event.index)  # held-back text goes without its logprobs
            continue
        if not isinstance(event, Completion):
            yield event
            continue
        answers = []
        for answer in event.choices or (event,):
            stream = streams.get(answer.index) or ToolStream(fmt)
            cut = answer.finish_reason == "length"
            rest, _ = stream.finish(cut)
            content, calls = read_answer(fmt.name, answer.text, cut)
            if rest:
                yield TextDelta(rest, answer.index)
            yield from call_deltas(calls, answer.index)
            finish_reason = "tool_calls" if calls and not cut else answer.finish_reason
            answers.append(dataclasses.replace(answer, text=content, tool_calls=tuple(calls),
                                               finish_reason=finish_reason))
        yield regathered(event, answers)


def call_deltas(calls: Sequence[ToolCall], index: int) -> Iterator[ToolCallDelta]:
    """Calls read out of an answer's text, as events: each one's id and name, then its arguments."""
    for i, call in enumerate(calls):
        yield ToolCallDelta(i, id=call.id, name=call.name, index=index)
        yield ToolCallDelta(i, arguments=call.arguments, index=index)


def regathered(event: Completion, answers: list[Completion]) -> Completion:
    """``event`` again with its answers read anew (one, or the first holding them all)."""
    return dataclasses.replace(answers[0], choices=tuple(answers)) if event.choices else answers[0]
