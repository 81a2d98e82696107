"""One event dispatch for every streaming renderer: a subclass says what each event becomes,
this walks the events. Renderers only render: the backend has already split its model's text
into visible text and tool calls."""

from __future__ import annotations

from typing import Iterable, Iterator

from llm_magic.wire.events import Completion, Event, ReasoningDelta, Signal, Started, TextDelta, ToolCallDelta
from llm_magic.wire.sse import SSE_KEEPALIVE


class StreamRenderer:
    """Turns a generation's events into the text of a streamed response."""

    model: str = ""

    def stream(self, events: Iterable[Event]) -> Iterator[str]:
        yield from self.opening()
        for event in events:
            if isinstance(event, TextDelta):
                yield from self.text(event)
            elif isinstance(event, ToolCallDelta):
                yield from self.tool_call(event)
            elif isinstance(event, ReasoningDelta):
                yield from self.reasoning(event)
            elif isinstance(event, Completion):
                yield from self.finished(event)
            elif event is Signal.KEEPALIVE:
                yield from self.keepalive()
            elif isinstance(event, Started):
                self.model = event.model
        yield from self.closing()

    def opening(self) -> Iterable[str]:
        return ()

    def keepalive(self) -> Iterable[str]:
        """What keeps a silent line open: an SSE comment, unless the format's clients reset
        their idle timers only on events (Codex, Claude Code)."""
        return (SSE_KEEPALIVE,)

    def text(self, delta: TextDelta) -> Iterable[str]:
        return ()

    def tool_call(self, delta: ToolCallDelta) -> Iterable[str]:
        return ()

    def reasoning(self, delta: ReasoningDelta) -> Iterable[str]:
        return ()

    def finished(self, result: Completion) -> Iterable[str]:
        return ()

    def closing(self) -> Iterable[str]:
        return ()
