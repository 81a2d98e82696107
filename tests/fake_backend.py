"""A scripted stand-in for a backend: it answers every request from a script of replies, so that
the wire, server and client layers are tested in milliseconds without llama.cpp, as httpx tests
with ``MockTransport``. What it sends is what a real backend sends (``engine.backend.Backend``);
the integration tests keep running the real model through the real server."""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from llm_magic.engine.admission import Turnstile
from llm_magic.engine.backend import Embeddings, EngineStats
from llm_magic.errors import InvalidRequest
from llm_magic.wire.events import Completion, Event, Signal, Started, TextDelta, ToolCallDelta
from llm_magic.wire.tool_calls import ToolCall
from llm_magic.wire.types import GenerationRequest


@dataclass
class Reply:
    """One scripted answer: its text (streamed a word at a time), the tool calls it ends with,
    how it ends, and what goes wrong (an error raised before ``Started``, or after ``fail_after``
    pieces). ``wait`` seconds pass before it starts (as a model loading or a queue)."""

    text: str = "Hello from the script."
    tool_calls: Sequence[tuple[str, str]] = ()  # (name, arguments JSON)
    finish_reason: str | None = None  # None: "tool_calls" with calls, else "stop"
    error: BaseException | None = None
    fail_after: int | None = None
    wait: float = 0.0
    piece_delay: float = 0.0  # between pieces


@dataclass
class ScriptedBackend:
    """Answers request i with ``replies[i]`` (the last one again once they run out), or with
    ``script(request)``. Every request it saw is kept in ``requests``."""

    replies: list[Reply] = field(default_factory=lambda: [Reply()])
    script: Callable[[GenerationRequest], Reply] | None = None
    default_name: str = "scripted-model"
    parallel: int = 4
    max_queue: int = 16
    requests: list[GenerationRequest] = field(default_factory=list)
    stats: EngineStats = field(default_factory=EngineStats)
    closed: bool = False

    def __post_init__(self) -> None:
        self.turnstile = Turnstile(self.max_queue, 30.0, capacity=self.parallel)
        self._lock = threading.Lock()
        self._keys = itertools.count()
        self._flight: dict[int, str | None] = {}  # the requests being answered: their ids, for /slots

    @property
    def model(self) -> str | None:
        return self.default_name

    @property
    def embedding_names(self) -> tuple[str, ...]:
        return ()

    def _reply(self, request: GenerationRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self.script is not None:
                return self.script(request)
            return self.replies[min(len(self.requests) - 1, len(self.replies) - 1)]

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None,
                 first_text_passed: threading.Event | None = None, tick: float | None = None) -> Iterator[Event]:
        reply = self._reply(request)
        if request.n > self.parallel:
            raise InvalidRequest(f"'n' is {request.n}, but this host writes at most {self.parallel} answers at once")
        cancel = cancel or threading.Event()
        with self.turnstile.turn(cancel, seats=request.n):
            key = next(self._keys)
            self._flight[key] = request.request_id
            try:
                yield from self._answer(request, reply, cancel, tick)
            finally:
                self._flight.pop(key, None)

    def _answer(self, request: GenerationRequest, reply: Reply, cancel: threading.Event,
                tick: float | None) -> Iterator[Event]:
        deadline = time.monotonic() + reply.wait
        while time.monotonic() < deadline and not cancel.is_set():
            time.sleep(0.01)
        if reply.error is not None:
            raise reply.error
        yield Started(self.default_name)
        pieces = [w for w in reply.text.split(" ")]
        pieces = [p + " " for p in pieces[:-1]] + pieces[-1:] if pieces != [""] else []
        for i, piece in enumerate(pieces):
            if cancel.is_set():
                return
            if reply.fail_after is not None and i >= reply.fail_after:
                raise InvalidRequest("the script fails here")
            for index in range(request.n):
                yield TextDelta(piece, index)
            if reply.piece_delay:
                time.sleep(reply.piece_delay)
                if tick is not None:
                    yield Signal.QUIET
        calls = tuple(ToolCall(name, args) for name, args in reply.tool_calls)
        for i, call in enumerate(calls):
            yield ToolCallDelta(i, id=call.id, name=call.name)
            half = len(call.arguments) // 2
            for part in (call.arguments[:half], call.arguments[half:]):
                yield ToolCallDelta(i, arguments=part)
        finish = reply.finish_reason or ("tool_calls" if calls else "stop")
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in request.messages or ()) or \
            len((request.prompt or "").split()) or 1
        answers = [Completion(reply.text, self.default_name, finish, prompt_tokens, len(pieces),
                              {"predicted_n": len(pieces)}, tool_calls=calls, index=i) for i in range(request.n)]
        self.stats.requests += 1
        if request.n == 1:
            yield answers[0]
        else:
            yield Completion(reply.text, self.default_name, finish, prompt_tokens, len(pieces) * request.n,
                             tool_calls=calls, choices=tuple(answers))

    def count_tokens(self, request: GenerationRequest) -> int:
        """The prompt's tokens as this backend counts them in its answers: words."""
        with self._lock:
            self.requests.append(request)
        return sum(len(str(m.get("content") or "").split()) for m in request.messages or ()) or 1

    def embed(self, inputs: Sequence[str | Sequence[int]], cancel: threading.Event | None = None) -> Embeddings:
        vectors = []
        for item in inputs:
            digest = hashlib.sha256(repr(item).encode()).digest()[:8]
            raw = [b - 127.5 for b in digest]
            norm = math.sqrt(sum(v * v for v in raw)) or 1.0
            vectors.append([v / norm for v in raw])
        return Embeddings(vectors, self.default_name, sum(len(str(i).split()) for i in inputs))

    def status(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.default_name, "default_model": self.default_name,
                "busy": self.turnstile.busy, "slots": self.parallel,
                "slots_busy": min(self.turnstile.held, self.parallel), "queue": self.turnstile.waiting,
                **self.stats.as_dict(), "engine": {"kind": "scripted"}}

    def slots(self) -> list[dict[str, Any]]:
        """The requests being answered, one slot each (as the upstream backend shows them), and
        the rest idle."""
        busy = list(self._flight.copy().values())
        rows: list[dict[str, Any]] = [{"id": i, "state": "writing", "cache_tokens": None, "request_id": rid,
                                       "tokens": None, "tokens_per_second": None} for i, rid in enumerate(busy)]
        return rows + [{"id": i, "state": "idle", "cache_tokens": 0} for i in range(len(rows), self.parallel)]

    def gauges(self) -> dict[str, float]:
        return {"kv_cells_used": 0, "kv_cells_total": 1024 * self.parallel, "model_loads": 1,
                "model_load_seconds": 0.25}

    def load_default(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
