"""The one seam between the HTTP front and whatever writes the answers.

``create_app`` is written against ``Backend`` alone. A backend takes a validated
``GenerationRequest`` and yields structured events (``wire.events``): ``Started``, then text and
tool-call deltas, then one ``Completion``. It answers embeddings, its status and its model names.
Everything that knows an engine (llama.cpp's grammars, slots, chat-template quirks, parsing a
model's raw tool-call text) lives behind it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

from llm_magic.wire.events import Event
from llm_magic.wire.types import GenerationRequest


@dataclass
class Embeddings:
    """A backend's answer to an embedding request: one normalised vector per input."""

    vectors: list[list[float]]
    model: str
    prompt_tokens: int


@dataclass
class EngineStats:
    """What a backend has served, for ``/health``."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0
    model_loads: int = 0  # for /metrics (not /health): loads of a model for generating, and their time
    model_load_seconds: float = 0.0
    draft_tokens: int = 0  # tokens guessed ahead (speculation), and of those, the ones answers wrote
    draft_accepted_tokens: int = 0

    def count(self, prompt: int, completion: int, seconds: float, drafted: int = 0, accepted: int = 0) -> None:
        """Add one request's work."""
        self.requests += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.generation_seconds += seconds
        self.draft_tokens += drafted
        self.draft_accepted_tokens += accepted

    def as_dict(self) -> dict[str, float]:
        rate = self.completion_tokens / self.generation_seconds if self.generation_seconds else 0.0
        stats = {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                 "completion_tokens": self.completion_tokens, "tokens_per_second": round(rate, 1)}
        if self.draft_tokens:
            stats.update(draft_tokens=self.draft_tokens, draft_accepted_tokens=self.draft_accepted_tokens)
        return stats


@runtime_checkable
class Backend(Protocol):
    """What the server needs of an engine."""

    @property
    def default_name(self) -> str:
        """The name of the model a request gets when it names none."""

    @property
    def model(self) -> str | None:
        """The name of the model in memory now, if any."""

    @property
    def embedding_names(self) -> tuple[str, ...]:
        """Names of models that answer embeddings besides the default one."""

    @property
    def parallel(self) -> int:
        """How many answers it writes at once (the most a request's ``n`` may be)."""

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None,
                 first_text_passed: threading.Event | None = None, tick: float | None = None) -> Iterator[Event]:
        """The events of one generation.

        Nothing happens until the first ``next()``. Every refusal (model not allowed, busy, prompt
        too long) is raised before ``Started``, so that the server can answer it with an HTTP
        status. Setting ``cancel`` (or closing the iterator) withdraws the request. The caller
        sets ``first_text_passed`` once it has sent the first text on. With ``tick``, once the
        answer is being written, ``Signal.QUIET`` comes after every ``tick`` seconds without an
        event, so that the reading thread can look around (a client gone, a keep-alive due)."""

    def embed(self, inputs: Sequence[str | Sequence[int]], cancel: threading.Event | None = None) -> Embeddings:
        """One vector per input (text or token ids); ``cancel`` stops the work early."""

    def status(self) -> dict[str, Any]:
        """``/health``'s fields: ``status`` ("ok"/"loading"), ``model``, ``default_model``,
        ``busy``, ``slots``, ``slots_busy``, ``queue``, the served counts, and an ``engine`` block
        of the backend's own (its kind and what it knows of its device)."""

    def slots(self) -> list[dict[str, Any]]:
        """What each slot does now, for ``/slots`` and ``/metrics``: ``id``, ``state`` ("idle",
        "reading_prompt", "writing"), ``cache_tokens`` (None: unknown), and for a busy slot
        ``request_id`` (the request's ``request_id``), ``tokens`` written so far and their
        ``tokens_per_second`` (None where the backend does not know; the server fills them in
        from what it saw). A snapshot, read without stopping the work: it may be a step old.

        A backend may also have ``gauges() -> dict[str, float]``, read when ``/metrics`` is
        scraped: ``kv_cells_used``, ``kv_cells_total``, ``model_loads``, ``model_load_seconds``."""

    def load_default(self) -> None:
        """Make the default model ready now rather than at the first request."""

    def close(self) -> None:
        """Free the models and end every thread the backend started."""
