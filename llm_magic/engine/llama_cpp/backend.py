"""The llama.cpp backend: which model answers a request, and the line requests wait in.

It keeps one resident model (a switch waits for every running generation, unloads, then
loads) and seats up to ``parallel`` generations at once through a FIFO turnstile with a bounded
wait queue. A request goes one way down: the backend checks it, resolves its model and takes
its seats; the ``LoadedModel`` prepares it (prompt, constraint, samplers) as a ``Task``; the
``Scheduler`` writes it beside the others, all in one batch; its events come back up, read as
tool calls when tools are offered. Streaming and non-streaming, ``/api`` and ``/v1`` all consume
that one iterator.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from llm_magic.settings import DEFAULTS, LLAMA_PARALLEL
from llm_magic.engine.admission import Turnstile
from llm_magic.engine.backend import Embeddings, EngineStats
from llm_magic.engine.llama_cpp.batching import DROPPED, FLASH_ATTENTION, Scheduler, Task
from llm_magic.engine.llama_cpp.grammar.check import GrammarChecker
from llm_magic.engine.llama_cpp.grammar.constraints import grammar_for
from llm_magic.engine.llama_cpp.loaded import EMBEDDING_TOKENS, LoadedModel
from llm_magic.engine.llama_cpp.loading import (HostSettings, ModelKey, best_thread_count, chat_formats,
                                                check_split, gpu_offload_supported)
from llm_magic.engine.llama_cpp.placement import SplitFlags
from llm_magic.engine.llama_cpp.residency import Residency
from llm_magic.engine.llama_cpp.speculation import SpecSettings
from llm_magic.engine.llama_cpp.thinking import read_template, split_reasoning
from llm_magic.engine.llama_cpp.tool_events import split_tool_calls
from llm_magic.errors import Cancelled, EngineError, InvalidRequest
from llm_magic.models import ModelPolicy, ModelSpec, model_name, resolve_model
from llm_magic.wire.events import Completion, Event, Signal, Started
from llm_magic.wire.tool_calls import FORMATS
from llm_magic.wire.types import MAX_TOKENS_LIMIT, GenerationRequest

__all__ = ["DEFAULT_CTX", "DEFAULT_PARALLEL", "EMBEDDING_TOKENS", "FLASH_ATTENTION", "LlamaCppBackend",
           "best_thread_count", "chat_formats", "gpu_offload_supported"]

log = logging.getLogger("llm_magic.engine")

DEFAULT_CTX = DEFAULTS.ctx
DEFAULT_PARALLEL = LLAMA_PARALLEL  # slots, as llama-server's default; each keeps its own KV cache of --ctx tokens
EMBEDDING_GROUP_TOKENS = 512  # inputs computed in one go (a longer input alone), between decode steps


class LlamaCppBackend:
    """Loads GGUF models with llama.cpp and writes up to ``parallel`` answers at once."""

    def __init__(
        self, default_model: Path, *,
        default_name: str | None = None,
        ctx_length: int = DEFAULT_CTX,
        max_ctx: int | None = None,
        gpu_layers: int = -1,
        threads: int | None = None,
        chat_format: str | None = None,
        policy: ModelPolicy | None = None,
        max_queue: int = DEFAULTS.max_queue,
        queue_timeout: float = 600.0,
        embedding_model: Path | None = None,
        parallel: int = DEFAULT_PARALLEL,
        flash_attention: str = DEFAULTS.flash_attn,
        batch_size: int = DEFAULTS.batch_size,
        ubatch_size: int = DEFAULTS.ubatch_size,
        speculation: SpecSettings | None = None,
        kv_unified: bool = False,  # one KV cache shared by the slots: less memory, answers may vary
        reasoning_format: str = DEFAULTS.reasoning_format,
        reasoning_budget: int = DEFAULTS.reasoning_budget,
        chat_template_file: Path | str | None = None,
        split: SplitFlags = SplitFlags(),  # --split-mode, --main-gpu, --tensor-split; none: one GPU if it fits
    ) -> None:
        check_split(split)  # a clear error now, rather than a failed load once the host runs
        self.settings = HostSettings(ctx_length=ctx_length, threads=threads or best_thread_count(),
                                     parallel=max(1, parallel), flash_attention=flash_attention,
                                     batch_size=max(1, batch_size), ubatch_size=max(1, min(ubatch_size, batch_size)),
                                     kv_unified=kv_unified, chat_format=chat_format, split=split,
                                     chat_template=read_template(chat_template_file),
                                     reasoning_format=reasoning_format, reasoning_budget=max(-1, reasoning_budget))
        self.default_path = Path(default_model)
        self.default_name = default_name or model_name(self.default_path)
        self.max_ctx = max(max_ctx or ctx_length, ctx_length)
        self.policy = policy or ModelPolicy(has_token=False)
        self.turnstile = Turnstile(max_queue, queue_timeout, capacity=self.parallel)
        self.stats = EngineStats()
        # the one compute thread; no drafts without flash attention (several tokens round unlike one)
        self.scheduler = Scheduler(speculation if flash_attention != "off" else None)
        self.grammars = GrammarChecker()
        self.models = Residency(self.settings, self.scheduler, self.grammars, gpu_layers=gpu_layers, policy=self.policy,
                                embedding_path=Path(embedding_model) if embedding_model else None)

    # -- state ---------------------------------------------------------------------------

    @property
    def parallel(self) -> int:
        """Slots: the answers written at once, and the seats of the turnstile."""
        return self.settings.parallel

    @property
    def _loaded(self) -> LoadedModel | None:
        """The resident model (tests look at its context)."""
        return self.models.loaded

    @property
    def model(self) -> str | None:
        """Name of the resident model."""
        return self.models.loaded.name if self.models.loaded else None

    @property
    def embedding_names(self) -> tuple[str, ...]:
        """The name of the ``--embedding-model``, if the host has one."""
        path = self.models.embedding_path
        return (model_name(path),) if path is not None else ()

    def device(self) -> dict[str, str]:
        """Where the resident model runs (see ``Residency.device``)."""
        return self.models.device()

    def status(self) -> dict[str, Any]:
        device = self.device()
        settings = self.settings
        return {
            **device,  # also at the top, where /health has always had them
            "engine": {"kind": "llama.cpp", "threads": settings.threads, "flash_attention": settings.flash_attention,
                       **device},
            "status": "loading" if self.models.loading else "ok",
            "model": self.model or self.default_name,
            "default_model": self.default_name,
            "busy": self.turnstile.busy,
            "slots": self.parallel,
            "slots_busy": min(self.turnstile.held, self.parallel),
            "queue": self.turnstile.waiting,
            **self.stats.as_dict(),
        }

    def slots(self) -> list[dict[str, Any]]:
        """Each slot's state, cache and request (``SlotPool.snapshot``: no lock, no wait)."""
        return self.scheduler.pool.snapshot()

    def gauges(self) -> dict[str, float]:
        """For ``/metrics``: KV cache cells in use and in all, model loads and their seconds."""
        used, total = self.scheduler.pool.cache_cells(shared=self.settings.kv_unified)
        return {"kv_cells_used": used, "kv_cells_total": total, "model_loads": self.stats.model_loads,
                "model_load_seconds": self.stats.model_load_seconds, "draft_tokens": self.stats.draft_tokens,
                "draft_accepted_tokens": self.stats.draft_accepted_tokens}

    def load_default(self) -> None:
        """Load the default model now (at start-up) rather than on the first request."""
        with self.turnstile.turn(seats=self.parallel):
            self._ensure(self.models.key(self.default_path), self.default_name)

    def close(self) -> None:
        """Free the resident models (waits for running generations) and end the compute thread."""
        with self.turnstile.turn(seats=self.parallel):
            self.models.close()
        self.scheduler.stop()
        self.grammars.close()

    # -- requests ------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None,
                 first_text_passed: threading.Event | None = None, tick: float | None = None) -> Iterator[Event]:
        """Events for ``request``: ``Started``, text deltas, then a ``Completion``.

        Nothing happens until the first ``next()``; model checks, queueing, loading and prompt
        validation all happen before ``Started`` is yielded, so callers can turn their errors
        into a proper HTTP status before sending anything. The answer is written by the
        scheduler's thread, alongside others'; closing the iterator (or setting ``cancel``)
        withdraws the request within one token and frees its slot. ``first_text_passed``, if
        given, is set by the caller once it has sent the first text on: a generation running
        alone pauses for it (see ``batching.FIRST_TEXT_WAIT``). With ``tick``, once the
        generation runs, ``QUIET`` comes after every ``tick`` seconds without an event, so that a
        caller can look around (a client gone, a keep-alive due) in the thread that reads.
        """
        spec = ModelSpec.parse(request.model)
        self.policy.check(spec)
        if request.n > self.parallel:
            raise InvalidRequest(f"'n' is {request.n}, but this host writes at most {self.parallel} answers "
                                 "at once (its owner sets --parallel)")
        if request.response_format is not None:
            grammar_for(request.response_format)  # an unsupported schema is a 400 before the line
        if request.ctx_length is not None and request.ctx_length > self.max_ctx:
            raise InvalidRequest(
                f"a context of {request.ctx_length} tokens is more than this host allows ({self.max_ctx}; "
                "its owner sets --ctx and --max-ctx)")
        if spec.is_default:
            path, name = self.default_path, self.default_name
        else:  # downloads outside the line
            path = resolve_model(spec)
            name = model_name(path) if spec.path else str(spec)  # a name, never a local path
        cancel = cancel or threading.Event()
        seats, key = self._take_seats(lambda: self.models.key_for(path, request), request.n, cancel)
        task: Task | None = None
        submitted = False
        try:
            loaded = self._ensure(key, name)
            if seats > request.n:  # held them all to load the model: the others may go on now
                self.turnstile.release(seats - request.n)
                seats = request.n
            task = loaded.prepare(request, cancel, first_text_passed)
            task.request_id = request.request_id
            task.closed = self._count
            yield Started(loaded.name)
            self.scheduler.submit(task)
            submitted = True
            results = _events_of(task, self.scheduler, tick)
            if task.reasoning is not None:  # reasoning first, then tool calls in the content
                results = split_reasoning(results, task.reasoning, first_text_passed)
            yield from split_tool_calls(results, FORMATS[task.tool_format]) if task.tool_format else results
        finally:
            cancel.set()  # a task still running stops at the next step
            if task is not None and not submitted:
                task.close()
            self.turnstile.release(seats)

    def _count(self, task: Task) -> None:
        """Add a task's work to the stats once it ends (an answer cut short by a client that
        left too), before its answer goes out, so that /health agrees with what clients saw."""
        if task.started:
            choices = task.choices
            self.stats.count(len(task.tokens), sum(c.generated for c in choices), time.perf_counter() - task.started,
                             sum(c.drafted for c in choices), sum(c.accepted for c in choices))

    def count_tokens(self, request: GenerationRequest) -> int:
        """How many tokens the request's prompt is, made by the chat template with its tools as
        its generation would be (Anthropic's count_tokens), by the resident model (the default
        one when none is). It waits in line for a seat as an embedding does: no model switch can
        free the model while it tokenises."""
        models = self.models
        seats, key = self._take_seats(
            lambda: models.loaded.key if models.loaded else models.key(self.default_path), 1, None)
        try:
            loaded = self._ensure(key, models.loaded.name if models.loaded else self.default_name)
            tokens, _, _ = loaded.prompt_tokens(request, MAX_TOKENS_LIMIT, loaded.tool_format(request))
            return len(tokens)
        finally:
            self.turnstile.release(seats)

    def embed(self, inputs: Sequence[str | Sequence[int]], cancel: threading.Event | None = None) -> Embeddings:
        """One normalised vector per input (text, or token ids). From ``embedding_model`` when
        the host has one, else from the resident model in an embedding context sharing its
        weights. Waits in line like a generation; every input is tokenised and checked before
        anything is computed; then the compute thread takes a group of inputs at a time, between
        two decode steps of the generations running, and setting ``cancel`` (the client left)
        stops it at the next group."""
        models = self.models
        if models.embedding_path is not None:
            with self.turnstile.turn(cancel):
                return self._embed(models.embedding_model(), inputs, cancel)
        seats, key = self._take_seats(
            lambda: models.loaded.key if models.loaded else models.key(self.default_path), 1, cancel)
        try:
            loaded = self._ensure(key, models.loaded.name if models.loaded else self.default_name)
            return self._embed(loaded, inputs, cancel)
        finally:
            self.turnstile.release(seats)

    def _embed(self, loaded: LoadedModel, inputs: Sequence[str | Sequence[int]],
               cancel: threading.Event | None) -> Embeddings:
        embedder = self.scheduler.call(loaded.make_embedder)
        sequences = loaded.embedding_tokens(inputs, embedder.n_ctx)
        vectors = _embedded_in_groups(self.scheduler, embedder, sequences, cancel or threading.Event())
        total = sum(len(tokens) for tokens in sequences)
        self.stats.requests += 1
        self.stats.prompt_tokens += total
        return Embeddings(vectors, loaded.name, total)

    # -- models --------------------------------------------------------------------------

    def _ensure(self, key: ModelKey, name: str) -> LoadedModel:
        """``Residency.ensure``, a load counted with its seconds (for /metrics)."""
        if self.models.is_resident(key):
            return self.models.ensure(key, name)
        started = time.perf_counter()
        loaded = self.models.ensure(key, name)
        self.stats.model_loads += 1
        self.stats.model_load_seconds += time.perf_counter() - started
        return loaded

    def _take_seats(self, key_of: Callable[[], ModelKey], seats: int,
                    cancel: threading.Event | None) -> tuple[int, ModelKey]:
        """Wait in line for ``seats``, or for all of them when the model settings ``key_of()``
        names are not the resident model's (a switch waits for every running generation).
        How many seats were taken, and the settings as they are once taken."""
        while True:
            key = key_of()  # its refusals come before the line
            wanted = seats if self.models.is_resident(key) else self.parallel
            self.turnstile.acquire(wanted, cancel)
            try:
                key = key_of()  # the resident model may have changed while this waited
            except BaseException:
                self.turnstile.release(wanted)
                raise
            if wanted == self.parallel or self.models.is_resident(key):
                return wanted, key
            self.turnstile.release(wanted)


def _events_of(task: Task, scheduler: Scheduler, tick: float | None) -> Iterator[Any]:
    """The events the scheduler sends for ``task`` (and ``QUIET`` every ``tick`` s of silence)."""
    while True:
        try:
            item = task.events.get(timeout=tick or 1.0)
        except queue.Empty:
            if not scheduler.alive:
                raise EngineError("the engine stopped before the answer was complete") from None
            if tick is not None:
                yield Signal.QUIET
            continue
        if item is DROPPED:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
        if isinstance(item, Completion):
            return


def _embedded_in_groups(scheduler: Scheduler, embedder: Any, sequences: list[list[int]],
                        cancel: threading.Event) -> list[list[float]]:
    """The vectors of ``sequences``, computed a group at a time in the compute thread. While
    answers are being written, each group is followed by a pause as long as it took, so that
    they go on at half speed rather than wait for the whole request."""
    from llm_magic.engine.llama_cpp.embeddings import packed

    vectors: list[list[float]] = []
    for group in packed(sequences, min(embedder.n_ctx, EMBEDDING_GROUP_TOKENS)):
        if cancel.is_set():
            raise Cancelled("the client left before its embeddings were computed")
        started = time.perf_counter()
        vectors += scheduler.call(lambda group=group: embedder.embed_many(group))
        if scheduler.generating:  # as long again for the answers being written
            cancel.wait(time.perf_counter() - started)
    return vectors
