"""What a backend yields for one generation, and the ticks the server adds while it waits.

A generation is ``Started``, then reasoning deltas (``ReasoningDelta``, a thinking model's
scratch work), text deltas (``TextDelta``) and tool-call pieces (``ToolCallDelta``) as the
answer grows, then one ``Completion``. Backends parse their model's
raw text themselves; renderers only render these events. Pure Python.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Union

from llm_magic.wire.tool_calls import ToolCall
from llm_magic.wire.types import TokenLogprob


@dataclass(frozen=True)
class Started:
    """The first event: the request passed every check (model, queue, prompt) and its answer
    begins. Everything before it can still become an HTTP error status."""

    model: str  # the model that answers


@dataclass(frozen=True)
class TextDelta:
    """A piece of an answer's visible text."""

    text: str
    index: int = 0  # which of the request's answers (n > 1)
    logprobs: tuple[TokenLogprob, ...] | None = None  # when asked: the tokens that made this text


@dataclass(frozen=True)
class ReasoningDelta:
    """A piece of a thinking model's reasoning, kept apart from the visible answer."""

    text: str
    index: int = 0  # which of the request's answers


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call: the first piece of call ``call`` carries its ``id`` and ``name``,
    later pieces carry its arguments' JSON text, in order."""

    call: int  # which call of the answer (0, 1, ...)
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    index: int = 0  # which of the request's answers


@dataclass
class Completion:
    """The engine's final result for one generation."""

    text: str  # the visible answer (without the tool calls)
    model: str
    finish_reason: str  # "stop" | "length" | "tool_calls"
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    cached_tokens: int = 0  # of the prompt, found in the KV cache
    tool_calls: tuple[ToolCall, ...] = ()  # when the request offered tools and the model called them
    logprobs: list[TokenLogprob] | None = None  # when asked
    index: int = 0  # which of a request's answers this is
    choices: tuple["Completion", ...] = ()  # with n > 1: every answer (this one sums their usage)
    reasoning: str = ""  # a thinking model's reasoning, apart from ``text``; "" when none
    reasoning_tokens: int = 0  # of ``completion_tokens``, those the reasoning took
    stop_sequence: str | None = None  # the request's stop sequence the answer ended on, if one

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    @property
    def openai_usage(self) -> dict[str, Any]:
        usage = {**self.usage, "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}
        if self.reasoning_tokens or self.reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return usage


class Signal(enum.Enum):
    """The ticks that travel with the events."""

    QUIET = "quiet"  # a backend's: nothing happened within the wait, so its reader may look around
    KEEPALIVE = "keep-alive"  # the server's: the line has been silent; renderers send a keep-alive
    END = "end"  # the last item of a queue of events: there are no more (a generation withdrawn)


Event = Union[Started, ReasoningDelta, TextDelta, ToolCallDelta, "Completion", Signal]
