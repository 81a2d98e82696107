"""The model engine: models, prompts, and the line requests wait in.

It keeps one resident model (switching waits for every running generation, unloads, then
loads), seats up to ``parallel`` generations at once through a FIFO turnstile with a bounded
wait queue, and turns a ``GenerationRequest`` into an iterator of events: ``Started``, text
deltas, then one ``Completion``. Streaming and non-streaming, ``/api`` and ``/v1`` all consume
that one iterator. The answers themselves are written by ``batching.Scheduler``, all running
requests in one batch. With ``batching``, ``sampling`` and ``embeddings``, the only code that
imports ``llama_cpp`` (lazily).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from llm_magic.engine.admission import Turnstile
from llm_magic.engine.backend import Embeddings, EngineStats
from llm_magic.engine.llama_cpp.batching import DROPPED, FLASH_ATTENTION, BatchContext, Scheduler, Task
from llm_magic.engine.llama_cpp.decoding import Choice
from llm_magic.errors import Cancelled, InvalidRequest, ModelLoadError, ModelNotAllowed
from llm_magic.engine.llama_cpp.grammar.check import GrammarChecker
from llm_magic.engine.llama_cpp.grammar.constraints import Constraint, grammar_for, tool_grammar
from llm_magic.models import ModelPolicy, ModelSpec, model_name, resolve_model
from llm_magic.engine.llama_cpp.tool_events import split_tool_calls
from llm_magic.wire.events import Completion, Event, Signal, Started
from llm_magic.wire.types import GenerationRequest
from llm_magic.engine.llama_cpp.sampling import Logprobs, TokenSampler
from llm_magic.wire.tool_calls import FORMATS, ToolFormat, detect_format, generic_messages

log = logging.getLogger("llm_magic.engine")

DEFAULT_CTX = 4096
EMBEDDING_CTX = 4096  # the longest input an embedding takes (also bounded by --ctx and the model)
EMBEDDING_TOKENS = 8 * EMBEDDING_CTX  # the most one embedding request computes
EMBEDDING_GROUP_TOKENS = 512  # inputs computed in one go (a longer input alone), between decode steps
DEFAULT_PARALLEL = 4  # slots, as llama-server's default; each keeps its own KV cache of --ctx tokens


def best_thread_count() -> int:
    """Threads for generation: every core this process may use (on 2 cores,
    2 threads give ~1.5x the tokens/s of llama-cpp-python's default of cpu_count // 2)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class _ModelKey:
    path: Path
    ctx_length: int
    gpu_layers: int


@dataclass
class _Loaded:
    key: _ModelKey
    name: str
    model: Any  # llama_cpp's LlamaModel: weights, vocabulary, metadata
    context: BatchContext | None = None  # for generating (an embedding model has none)
    metadata: dict[str, str] = field(default_factory=dict)
    pieces: dict[int, bytes] = field(default_factory=dict)
    longest_piece: int | None = None
    control_tokens: tuple[int, ...] | None = None  # see Engine._control_tokens
    formatters: dict[str | None, Any] = field(default_factory=dict)
    embedder: Any = None  # an EmbeddingContext on this model, made at the first embedding request

    def close(self) -> None:
        for part in (self.embedder, self.context, self.model):  # contexts before the model they use
            if part is not None:
                part.close()


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ModelLoadError(
            "serving models needs llama-cpp-python: pip install 'llm_magic[host]'") from None
    return llama_cpp


class Engine:
    """Loads GGUF models with llama.cpp and writes up to ``parallel`` answers at once."""

    def __init__(
        self,
        default_model: Path,
        *,
        default_name: str | None = None,
        ctx_length: int = DEFAULT_CTX,
        max_ctx: int | None = None,
        gpu_layers: int = -1,
        threads: int | None = None,
        chat_format: str | None = None,
        policy: ModelPolicy | None = None,
        max_queue: int = 16,
        queue_timeout: float = 600.0,
        embedding_model: Path | None = None,
        parallel: int = DEFAULT_PARALLEL,
        flash_attention: str = "auto",
        kv_unified: bool = False,  # one KV cache shared by the slots: less memory, answers may vary
    ) -> None:
        if flash_attention not in FLASH_ATTENTION:
            raise ValueError(f"flash_attention must be one of {', '.join(FLASH_ATTENTION)}")
        self.default_path = Path(default_model)
        self.default_name = default_name or model_name(self.default_path)
        self.ctx_length = ctx_length
        self.max_ctx = max(max_ctx or ctx_length, ctx_length)
        self.gpu_layers = gpu_layers
        self.threads = threads or best_thread_count()
        self.chat_format = chat_format
        self.policy = policy or ModelPolicy(has_token=False)
        self.parallel = max(1, parallel)
        self.flash_attention = flash_attention
        self.kv_unified = kv_unified
        self.turnstile = Turnstile(max_queue, queue_timeout, capacity=self.parallel)
        self.stats = EngineStats()
        self.loading = True  # until the first load: /health says "loading"
        self.scheduler = Scheduler()  # the one thread that runs llama.cpp's compute
        self.grammars = GrammarChecker()
        self._loaded: _Loaded | None = None
        self._trained_ctx: dict[Path, int] = {}  # what each model loaded so far was trained for
        self.embedding_path = Path(embedding_model) if embedding_model else None
        self._embedding_model: _Loaded | None = None  # loaded at its first request
        self._device: dict[str, str] = {}  # the resident model's device, layers offloaded, memory
        self._gpu_memory: str | None = None
        self._gpu_memory_at = 0.0

    # -- state ---------------------------------------------------------------------------

    @property
    def model(self) -> str | None:
        """Name of the resident model."""
        return self._loaded.name if self._loaded else None

    def device(self) -> dict[str, str]:
        """Where the resident model runs: ``device`` ("CPU", "CUDA0 Tesla T4"), ``gpu_layers``
        ("0 (CPU only)", "29 of 29") and ``memory`` (the model's weights and KV cache as llama.cpp
        sizes them; on a GPU also the GPU's memory in use, asked of nvidia-smi at most every 10 s)."""
        info = dict(self._device)
        if info.get("device", "CPU") != "CPU":
            from llm_magic.engine.llama_cpp.gpu import gpu_memory_text

            if time.monotonic() - self._gpu_memory_at > 10:
                self._gpu_memory, self._gpu_memory_at = gpu_memory_text(), time.monotonic()
            if self._gpu_memory:
                info["memory"] += f"; {self._gpu_memory}"
        return info

    def status(self) -> dict[str, Any]:
        device = self.device()
        return {
            **device,  # also at the top, where /health has always had them
            "engine": {"kind": "llama.cpp", "threads": self.threads, "flash_attention": self.flash_attention, **device},
            "status": "loading" if self.loading else "ok",
            "model": self.model or self.default_name,
            "default_model": self.default_name,
            "busy": self.turnstile.busy,
            "slots": self.parallel,
            "slots_busy": min(self.turnstile.held, self.parallel),
            "queue": self.turnstile.waiting,
            **self.stats.as_dict(),
        }

    def load_default(self) -> None:
        """Load the default model now (at start-up) rather than on the first request."""
        with self.turnstile.turn(seats=self.parallel):
            self._ensure_loaded(self._key(self.default_path, None, None), self.default_name)

    def close(self) -> None:
        """Free the resident models (waits for running generations) and end the compute thread."""
        with self.turnstile.turn(seats=self.parallel):
            self._unload()
            if self._embedding_model is not None:
                self._embedding_model.close()
                self._embedding_model = None
        self.scheduler.stop()
        self.grammars.close()

    # -- embeddings ----------------------------------------------------------------------

    def embed(self, inputs: Sequence[str | Sequence[int]], cancel: threading.Event | None = None) -> Embeddings:
        """One normalised vector per input (text, or token ids). From ``embedding_model`` when
        the host has one, else from the resident model in an embedding context sharing its
        weights. Waits in line like a generation; every input is tokenised and checked before
        anything is computed; then the compute thread takes a group of inputs at a time, between
        two decode steps of the generations running, and setting ``cancel`` (the client left)
        stops it at the next group."""
        if self.embedding_path is not None:
            with self.turnstile.turn(cancel):
                return self._embed(self._embedding_loaded(), inputs, cancel)
        seats, key = self._take_seats(
            lambda: self._loaded.key if self._loaded else self._key(self.default_path, None, None), 1, cancel)
        try:
            loaded = self._ensure_loaded(key, self._loaded.name if self._loaded else self.default_name)
            return self._embed(loaded, inputs, cancel)
        finally:
            self.turnstile.release(seats)

    @property
    def embedding_names(self) -> tuple[str, ...]:
        """The name of the ``--embedding-model``, if the host has one."""
        return (model_name(self.embedding_path),) if self.embedding_path is not None else ()

    def _embedding_loaded(self) -> _Loaded:
        if self._embedding_model is None:
            assert self.embedding_path is not None
            key = _ModelKey(self.embedding_path, EMBEDDING_CTX, self._key(self.embedding_path, None, None).gpu_layers)
            try:
                model = _load_model(key)
            except ModelLoadError as exc:
                raise ModelLoadError(f"the embedding model: {exc.message}") from None
            self._embedding_model = _Loaded(key, model_name(self.embedding_path), model)
        return self._embedding_model

    def _embed(self, loaded: _Loaded, inputs: Sequence[str | Sequence[int]],
               cancel: threading.Event | None) -> Embeddings:
        from llm_magic.engine.llama_cpp.embeddings import packed

        embedder = self.scheduler.call(lambda: self._embedder(loaded))
        sequences = self._embedding_tokens(loaded, inputs, embedder.n_ctx)
        vectors: list[list[float]] = []
        cancel = cancel or threading.Event()
        for group in packed(sequences, min(embedder.n_ctx, EMBEDDING_GROUP_TOKENS)):
            if cancel.is_set():
                raise Cancelled("the client left before its embeddings were computed")
            started = time.perf_counter()
            vectors += self.scheduler.call(lambda group=group: embedder.embed_many(group))
            if self.scheduler.generating:  # as long again for the answers being written
                cancel.wait(time.perf_counter() - started)
        total = sum(len(tokens) for tokens in sequences)
        self.stats.requests += 1
        self.stats.prompt_tokens += total
        return Embeddings(vectors, loaded.name, total)

    def _embedder(self, loaded: _Loaded) -> Any:
        """The model's embedding context, made at its first use (in the compute thread)."""
        from llm_magic.engine.llama_cpp.embeddings import EmbeddingContext

        if loaded.embedder is None:
            model = loaded.model
            n_ctx = min(self.ctx_length, model.n_ctx_train() or self.ctx_length, EMBEDDING_CTX)
            loaded.embedder = EmbeddingContext(model.model, n_ctx, self.threads)
        return loaded.embedder

    def _embedding_tokens(self, loaded: _Loaded, inputs: Sequence[str | Sequence[int]], n_ctx: int) -> list[list[int]]:
        """Every input as tokens, checked whole before any is computed: in the vocabulary, within
        the embedding context, and all of them within ``EMBEDDING_TOKENS``."""
        model = loaded.model
        n_vocab = _llama_cpp().llama_vocab_n_tokens(model.vocab)
        sequences, total = [], 0
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                if len(item.encode("utf-8")) > n_ctx * self._longest_piece(loaded):
                    raise InvalidRequest(f"'input[{i}]' is longer than the embedding context ({n_ctx} tokens)")
                tokens = model.tokenize(item.encode("utf-8"), add_bos=True, special=False)
            else:
                tokens = list(item)
                bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
                if bad is not None:
                    raise InvalidRequest(f"'input[{i}]' holds token {bad}, which is not in the model's "
                                         f"vocabulary (0 to {n_vocab - 1})")
            if not tokens:
                raise InvalidRequest(f"'input[{i}]' is empty: send some text")
            if len(tokens) > n_ctx:
                raise InvalidRequest(f"'input[{i}]' is {len(tokens)} tokens but the embedding context holds {n_ctx}")
            total += len(tokens)
            if total > EMBEDDING_TOKENS:
                raise InvalidRequest(f"the inputs are more than {EMBEDDING_TOKENS} tokens together (at 'input[{i}]'); "
                                     "send them in several requests")
            sequences.append(tokens)
        return sequences

    # -- generation ----------------------------------------------------------------------

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
        seats, key = self._take_seats(lambda: self._key_for(path, request), request.n, cancel)
        task: Task | None = None
        submitted = False
        try:
            loaded = self._ensure_loaded(key, name)
            if seats > request.n:  # held them all to load the model: the others may go on now
                self.turnstile.release(seats - request.n)
                seats = request.n
            task = self._task(loaded, request, cancel, first_text_passed)
            yield Started(loaded.name)
            self.scheduler.submit(task)
            submitted = True
            results = self._results(task, tick)
            yield from split_tool_calls(results, FORMATS[task.tool_format]) if task.tool_format else results
        finally:
            cancel.set()  # a task still running stops at the next step
            if task is not None and not submitted:
                task.close()
            self.turnstile.release(seats)

    def _take_seats(self, key_of: Callable[[], _ModelKey], seats: int,
                    cancel: threading.Event | None) -> tuple[int, _ModelKey]:
        """Wait in line for ``seats``, or for all of them when the model settings ``key_of()``
        names are not the resident model's (a switch waits for every running generation).
        How many seats were taken, and the settings as they are once taken."""
        while True:
            key = key_of()  # its refusals come before the line
            wanted = seats if self._is_resident(key) else self.parallel
            self.turnstile.acquire(wanted, cancel)
            try:
                key = key_of()  # the resident model may have changed while this waited
            except BaseException:
                self.turnstile.release(wanted)
                raise
            if wanted == self.parallel or self._is_resident(key):
                return wanted, key
            self.turnstile.release(wanted)

    def _is_resident(self, key: _ModelKey) -> bool:
        return self._loaded is not None and self._loaded.key == key

    def _results(self, task: Task, tick: float | None) -> Iterator[Any]:
        """The events the scheduler sends for ``task`` (and ``QUIET`` every ``tick`` s of silence)."""
        while True:
            try:
                item = task.events.get(timeout=tick or 1.0)
            except queue.Empty:
                if not self.scheduler.alive:
                    raise ModelLoadError("the engine stopped before the answer was complete") from None
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

    def _key(self, path: Path, ctx_length: int | None, use_gpu: bool | None) -> _ModelKey:
        """The settings a model is loaded with: the host's, unless the request asks otherwise."""
        gpu_layers = self.gpu_layers if use_gpu is None else (0 if not use_gpu else (self.gpu_layers or -1))
        if not _gpu_offload_supported():  # layers stay on the CPU whatever is asked: no reload
            gpu_layers = 0
        return _ModelKey(Path(path), ctx_length or self.ctx_length, gpu_layers)

    def _key_for(self, path: Path, request: GenerationRequest) -> _ModelKey:
        """The resident model serves a request whenever it can: a smaller context than the
        resident one fits in it, so only a larger one (up to ``max_ctx``) or another GPU setting
        reloads. Such a reload is a model switch: a host without a token makes none."""
        host_key = self._key(path, None, None)
        key = self._key(path, request.ctx_length, request.use_gpu)
        resident = self._loaded.key if self._loaded is not None else None
        if resident is not None and (resident.path, resident.gpu_layers) == (key.path, key.gpu_layers):
            if key.ctx_length <= resident.ctx_length:
                return resident
        if key.ctx_length < host_key.ctx_length:
            key = _ModelKey(key.path, host_key.ctx_length, key.gpu_layers)
        trained = self._trained_ctx.get(key.path)
        if trained and key.ctx_length > max(trained, host_key.ctx_length):
            raise InvalidRequest(
                f"a context of {key.ctx_length} tokens is more than the model was trained for ({trained})")
        if key != host_key and not self.policy.has_token:
            raise ModelNotAllowed(
                "a host without a token serves its model only with the host's own settings "
                f"(context {host_key.ctx_length}, GPU {'on' if host_key.gpu_layers else 'off'}); "
                "leave options.ctx_length and options.use_gpu out")
        return key

    def _unload(self) -> None:
        if self._loaded is not None:
            self.scheduler.call(lambda: self.scheduler.attach(None))
            self._loaded.close()
            self._loaded = None

    def _ensure_loaded(self, key: _ModelKey, name: str) -> _Loaded:
        """The model for ``key``, loading it if needed (only while every seat is held)."""
        if self._loaded is not None and self._loaded.key == key:
            return self._loaded
        self._unload()  # never two models in memory
        self.loading = True
        started = time.perf_counter()
        try:
            model = _load_model(key)
            try:
                context = self._context(model, key)
            except BaseException:
                model.close()
                raise
        finally:
            self.loading = False
        log.info("loaded %s (ctx %d, gpu layers %d, %d slots) in %.2f s", name, key.ctx_length,
                 key.gpu_layers, self.parallel, time.perf_counter() - started)
        self._trained_ctx[key.path] = model.n_ctx_train()
        if key.ctx_length > model.n_ctx_train():
            log.warning("the context (%d) is larger than %s was trained for (%d): answers past that "
                        "may degrade", key.ctx_length, name, model.n_ctx_train())
        self._loaded = _Loaded(key, name, model, context, metadata=model.metadata())
        self._device = _device_info(self._loaded)
        self._gpu_memory_at = 0.0
        self.scheduler.call(lambda: self.scheduler.attach(context))
        return self._loaded

    def _context(self, model: Any, key: _ModelKey) -> BatchContext:
        """A context with a KV cache per slot; if there is not memory for that, one shared."""
        settings = dict(n_ctx=key.ctx_length, n_seq=self.parallel, threads=self.threads,
                        flash_attention=self.flash_attention)
        try:
            return BatchContext(model.model, unified=self.kv_unified, **settings)
        except ModelLoadError:
            if self.parallel == 1 or self.kv_unified:
                raise
        context = BatchContext(model.model, unified=True, **settings)
        log.warning("there is no memory for %d KV caches of %d tokens: the slots share one, and an "
                    "answer may then differ slightly with what runs beside it (lower --parallel or "
                    "--ctx to avoid this)", self.parallel, key.ctx_length)
        return context

    def _prompt_tokens(self, loaded: _Loaded, request: GenerationRequest, n_ctx: int,
                       tool_format: ToolFormat | None) -> tuple[list[int], tuple[str, ...]]:
        stops = request.sampling.stop
        if not request.is_chat:
            text, add_bos = request.prompt or "", True
        else:
            formatter = self._formatter(loaded, request.chat_format or self.chat_format)
            messages = [dict(m) for m in request.messages or ()]
            extra: dict = {}
            if tool_format is not None and not tool_format.native:
                messages = generic_messages(request.messages or (), request.tools)
            elif request.tools is not None:
                extra["tools"] = [t.as_openai() for t in request.tools.tools]
            try:
                result = formatter(messages=messages, **extra)
            except Exception as exc:  # jinja2 errors and the template's raise_exception()
                raise InvalidRequest(f"the model's chat template rejected these messages: {exc}") from None
            extra = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
            text, add_bos = result.prompt, not result.added_special
            stops = tuple(dict.fromkeys([*stops, *extra]))
        data = text.encode("utf-8")
        # Tokenising megabytes takes seconds: refuse at once what cannot fit, by the fewest
        # tokens that many bytes can make.
        if len(data) > n_ctx and len(data) > n_ctx * self._longest_piece(loaded):
            raise _prompt_too_long(f"at least {len(data) // self._longest_piece(loaded)}", n_ctx)
        return loaded.model.tokenize(data, add_bos=add_bos, special=True), stops

    def _longest_piece(self, loaded: _Loaded) -> int:
        """The most bytes one token of this model's vocabulary stands for."""
        if loaded.longest_piece is None:
            n_vocab = _llama_cpp().llama_vocab_n_tokens(loaded.model.vocab)
            loaded.longest_piece = max(len(self._piece(loaded, t)) for t in range(n_vocab))
        return max(1, loaded.longest_piece)

    def _tool_format(self, loaded: _Loaded, request: GenerationRequest) -> ToolFormat | None:
        """How this model writes tool calls, when the request involves tools (offers them, or
        its history holds calls and results); the template's own format, else ``generic``."""
        involved = request.tools is not None or any(
            m.get("tool_calls") or m["role"] == "tool" for m in request.messages or ())
        if not involved:
            return None
        if request.chat_format or self.chat_format:  # a named format instead of the GGUF's template
            return FORMATS["generic"]
        return detect_format(loaded.metadata.get("tokenizer.chat_template"))

    def _formatter(self, loaded: _Loaded, chat_format: str | None) -> Any:
        if chat_format not in loaded.formatters:
            loaded.formatters[chat_format] = _make_formatter(loaded.model, loaded.metadata, chat_format)
        return loaded.formatters[chat_format]

    def _task(self, loaded: _Loaded, request: GenerationRequest, cancel: threading.Event,
              first_text_passed: threading.Event | None) -> Task:
        """The request as the scheduler takes it: its prompt's tokens and a sampler per choice."""
        lib = _llama_cpp()
        model = loaded.model
        assert loaded.context is not None
        n_ctx = loaded.context.n_ctx
        tool_format = self._tool_format(loaded, request)
        tokens, stops = self._prompt_tokens(loaded, request, n_ctx, tool_format)
        if request.tools is None:  # a history with tool calls, but none offered now: plain text
            tool_format = None
        if not tokens:  # an empty prompt: generate from the start-of-text token, as llama.cpp does
            if model.token_bos() == -1:
                raise InvalidRequest("the prompt is empty and this model has no start token: send some text")
            tokens = [model.token_bos()]
        if len(tokens) >= n_ctx:
            raise _prompt_too_long(str(len(tokens)), n_ctx)
        budget = n_ctx - len(tokens)
        s = request.sampling
        max_tokens = min(s.max_tokens or budget, budget)
        seed = random.getrandbits(32) if s.seed is None or s.seed < 0 else s.seed % 2**32
        constraint = self._grammar(request, tool_format)
        grammar, banned = None, ()
        if constraint is not None:
            banned = () if constraint.controls else self._control_tokens(loaded)
            self._check_writable(loaded, constraint.texts)
            grammar = constraint.grammar
            self.grammars.check(grammar)  # compiled in a child first: a bad one cannot take the host down
        vocab, n_vocab = model.vocab, lib.llama_vocab_n_tokens(model.vocab)
        piece = functools.partial(self._piece, loaded)
        is_end = functools.partial(lib.llama_vocab_is_eog, vocab)
        events: queue.SimpleQueue = queue.SimpleQueue()

        choices = []
        try:
            for i in range(request.n):  # each answer draws its own samples: seed, seed + 1, ...
                choices.append(Choice(
                    i, TokenSampler(vocab, s, (seed + i) % 2**32, grammar, banned), max_tokens=max_tokens,
                    stops=stops, piece=piece, is_end=is_end, emit=events.put,
                    logprobs=Logprobs(request.logprobs, n_vocab, piece) if request.logprobs is not None else None))
        except BaseException:
            for choice in choices:
                choice.close()
            raise
        tool_name = tool_format.name if tool_format else None

        def finish(task: Task) -> None:
            answers = [c.completion(loaded.name, len(tokens), task.cached, task.started) for c in task.choices]
            if len(answers) > 1:  # one event: the first answer, with them all and their usage summed
                answers[0] = dataclasses.replace(
                    answers[0], completion_tokens=sum(a.completion_tokens for a in answers), choices=tuple(answers))
            events.put(answers[0])

        def closed(task: Task) -> None:  # also for answers cut short by a client that left
            if task.started:
                self.stats.requests += 1
                self.stats.prompt_tokens += len(tokens)
                self.stats.completion_tokens += sum(c.generated for c in task.choices)
                self.stats.generation_seconds += time.perf_counter() - task.started

        return Task(tokens, choices, finish, cancel, events=events, closed=closed,
                    first_text_passed=first_text_passed, tool_format=tool_name)

    def _control_tokens(self, loaded: _Loaded) -> tuple[int, ...]:
        """The tokens whose text holds a control character (a raw newline, a tab): JSON grammars
        never allow one, so a constrained answer bans them up front (looked up once per model)."""
        if loaded.control_tokens is None:
            n_vocab = _llama_cpp().llama_vocab_n_tokens(loaded.model.vocab)
            loaded.control_tokens = tuple(t for t in range(n_vocab)
                                          if any(b < 0x20 or b == 0x7F for b in self._piece(loaded, t)))
        return loaded.control_tokens

    def _check_writable(self, loaded: _Loaded, texts: frozenset[str]) -> None:
        """Refuse a constraint whose exact texts (keys, constants) this model's vocabulary cannot
        write: the answer would reach them and find no token to go on with."""
        for text in texts:
            data = text.encode("utf-8")
            tokens = loaded.model.tokenize(data, add_bos=False, special=False)
            if b"".join(self._piece(loaded, t) for t in tokens) != data:
                raise InvalidRequest(f"the schema asks for {json.dumps(text, ensure_ascii=False)[:80]}, which "
                                     f"{loaded.name}'s vocabulary cannot write (it lacks some of its bytes); "
                                     "use other characters there")

    @staticmethod
    def _grammar(request: GenerationRequest, tool_format: ToolFormat | None) -> Constraint | None:
        """The llama.cpp grammar for a request's ``response_format`` or tool calls, if any."""
        if request.response_format is not None:
            return grammar_for(request.response_format)
        if request.tools is not None and tool_format is not None:
            return tool_grammar(request.tools, tool_format)
        return None

    def _piece(self, loaded: _Loaded, token: int) -> bytes:
        """The raw bytes of one token (cached: the vocabulary is fixed)."""
        piece = loaded.pieces.get(token)
        if piece is None:
            llama_cpp = _llama_cpp()
            vocab = loaded.model.vocab
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
            piece = loaded.pieces[token] = buf.raw[:n]
        return piece


_backend_ready = False


def _load_model(key: _ModelKey) -> Any:
    """llama_cpp's ``LlamaModel`` for ``key``: the weights, vocabulary and metadata alone (the
    engine makes its own contexts)."""
    global _backend_ready
    lib = _llama_cpp()
    from llama_cpp import _internals, _logger

    if not _backend_ready:
        lib.llama_backend_init()
        _logger.set_verbose(False)  # llama.cpp's own log: errors only, as Llama(verbose=False)
        _backend_ready = True
    params = lib.llama_model_default_params()
    params.n_gpu_layers = key.gpu_layers
    try:
        return _internals.LlamaModel(path_model=str(key.path), params=params, verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(
            f"llama.cpp could not load {key.path.name} ({exc}); the file may be corrupt or "
            "incomplete: delete it (for a hub model, from the Hugging Face cache) and retry") from None


def _prompt_too_long(tokens: str, n_ctx: int) -> InvalidRequest:
    return InvalidRequest(f"the prompt is {tokens} tokens but the model's context holds {n_ctx}: shorten "
                          "it (the context is set by the host's owner with --ctx)")


def _gpu_offload_supported() -> bool:
    try:
        return bool(_llama_cpp().llama_supports_gpu_offload())
    except (ModelLoadError, AttributeError):
        return False


def gpu_offload_supported() -> bool | None:
    """Whether the installed llama-cpp-python can offload layers to a GPU (built with CUDA,
    Metal, …); None when llama-cpp-python is not installed."""
    try:
        _llama_cpp()
    except ModelLoadError:
        return None
    return _gpu_offload_supported()


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def _device_info(loaded: _Loaded) -> dict[str, str]:
    """The resident model's device, layers offloaded and memory (see ``Engine.device``)."""
    from llm_magic.engine.llama_cpp.gpu import device_name

    lib = _llama_cpp()
    model, key, meta = loaded.model.model, loaded.key, loaded.metadata
    n_layer = lib.llama_model_n_layer(model)
    layers = n_layer + 1  # as llama.cpp counts them ("offloaded 29/29 layers"): the output layer too
    offloaded = 0 if key.gpu_layers == 0 or not _gpu_offload_supported() else (
        layers if key.gpu_layers < 0 else min(key.gpu_layers, layers))
    arch = meta.get("general.architecture", "")
    n_head, n_head_kv = lib.llama_model_n_head(model), lib.llama_model_n_head_kv(model)
    head = lib.llama_model_n_embd(model) // max(n_head, 1)
    k_dim = int(meta.get(f"{arch}.attention.key_length") or head)
    v_dim = int(meta.get(f"{arch}.attention.value_length") or head)
    context = loaded.context
    cells = lib.llama_n_ctx(context.ctx) if context is not None else 0
    kv_bytes = cells * n_layer * n_head_kv * (k_dim + v_dim) * 2  # an f16 cache, llama.cpp's default
    slots = "no context" if context is None else (
        f"{context.n_seq} slot{'s' * (context.n_seq > 1)} of {context.n_ctx} tokens"
        if cells >= context.n_seq * context.n_ctx else f"{context.n_seq} slots sharing {cells} tokens")
    return {"device": device_name(offloaded),
            "gpu_layers": f"{offloaded} of {layers}" if offloaded else "0 (CPU only)",
            "memory": f"{_mib(lib.llama_model_size(model))} model + {_mib(kv_bytes)} KV cache ({slots})"}


def chat_formats() -> list[str]:
    """Names accepted as ``chat_format`` besides the GGUF's own template (the default)."""
    from llama_cpp import llama_chat_format

    registry = llama_chat_format.LlamaChatCompletionHandlerRegistry()._chat_handlers
    return sorted(name for name, handler in registry.items() if _formatter_of(handler) is not None)


def _formatter_of(handler: Any) -> Any:
    # llama-cpp-python registers named prompt formats only as completion handlers that close
    # over their formatter; we need the formatter alone, to run generation through our loop.
    code = getattr(handler, "__code__", None)
    if code is None or "chat_formatter" not in code.co_freevars:
        return None
    return handler.__closure__[code.co_freevars.index("chat_formatter")].cell_contents


def _make_formatter(model: Any, metadata: dict[str, str], chat_format: str | None) -> Any:
    from llama_cpp import llama_chat_format

    template = metadata.get("tokenizer.chat_template")
    if chat_format is None and template:
        eos, bos = model.token_eos(), model.token_bos()
        text = model.token_get_text
        return llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=text(eos) if eos != -1 else "",
            bos_token=text(bos) if bos != -1 else "")
    if chat_format is None:
        log.warning("the model has no chat template; using chatml")
        chat_format = "chatml"
    try:
        handler = llama_chat_format.get_chat_completion_handler(chat_format)
    except Exception:  # llama-cpp-python raises its own not-found exception type
        handler = None
    formatter = _formatter_of(handler) if handler is not None else None
    if formatter is None:
        raise InvalidRequest(
            f"unknown chat_format '{chat_format}'; leave it out to use the model's own template, "
            f"or use one of: {', '.join(chat_formats())}")
    return formatter
