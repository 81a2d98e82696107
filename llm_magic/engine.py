"""The model engine — the only module that imports ``llama_cpp`` (lazily).

It keeps one resident model (switching waits for running work, unloads, then loads), runs one
generation at a time through a FIFO turnstile with a bounded wait queue, and turns a
``GenerationRequest`` into an iterator of events: ``Started``, text deltas, then one
``Completion``. Streaming and non-streaming, ``/api`` and ``/v1`` all consume that one iterator.
"""

from __future__ import annotations

import codecs
import collections
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .errors import Cancelled, HostBusy, InvalidRequest, ModelLoadError, ModelNotAllowed
from .models import ModelPolicy, ModelSpec, model_name, resolve_model
from .grammars import grammar_for, tool_grammar
from .protocol import Completion, Event, GenerationRequest, LoggedText, Started, TokenLogprob
from .tool_calls import FORMATS, ToolFormat, detect_format, generic_messages

log = logging.getLogger("llm_magic.engine")

DEFAULT_CTX = 4096
EMBEDDING_CTX = 4096  # the longest input an embedding takes (also bounded by --ctx and the model)
PROMPT_CHUNK_MIN = 32  # tokens of a prompt evaluated between two looks at cancellation, at first
PROMPT_CHUNK_SECONDS = 0.05  # ... doubled while a chunk takes less than this


def best_thread_count() -> int:
    """Threads for generation: every core this process may use (on 2 cores,
    2 threads give ~1.5x the tokens/s of llama-cpp-python's default of cpu_count // 2)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Turnstile:
    """One holder at a time, served first in, first out, with at most ``max_queue`` waiting."""

    def __init__(self, max_queue: int = 16, timeout: float = 600.0) -> None:
        self.max_queue = max_queue
        self.timeout = timeout
        self._cond = threading.Condition()
        self._busy = False
        self._queue: collections.deque[object] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._busy

    @contextlib.contextmanager
    def turn(self, cancel: threading.Event | None = None) -> Iterator[None]:
        """Hold the turnstile; wait in line first if needed. Setting ``cancel`` leaves the line."""
        with self._cond:
            if self._busy or self._queue:
                if len(self._queue) >= self.max_queue:
                    raise HostBusy(
                        f"the host is busy: {len(self._queue)} requests are already waiting "
                        "(--max-queue); retry in a few seconds", retry_after=5)
                ticket = object()
                self._queue.append(ticket)
                try:
                    self._wait_for_head(ticket, cancel)
                finally:
                    self._queue.remove(ticket)
                    self._cond.notify_all()  # the head of the line changed
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()


    def _wait_for_head(self, ticket: object, cancel: threading.Event | None) -> None:
        deadline = time.monotonic() + self.timeout
        while self._busy or self._queue[0] is not ticket:
            if cancel is not None and cancel.is_set():
                raise Cancelled("the request was withdrawn while it waited")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HostBusy(f"the host stayed busy for {self.timeout:.0f} s; retry later", retry_after=30)
            self._cond.wait(min(remaining, 0.1))  # wakes on every release, and to look at cancel


class _StopScanner:
    """Cuts generated text at the first stop sequence, holding back any tail that could be the
    start of one, so that no part of a stop sequence is ever streamed."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class ComputeThread:
    """One long-lived thread that runs jobs in order: the thread to drive llama.cpp from.

    ggml's CPU threads are an OpenMP team per calling thread. A new thread per request pays for
    a new team at its first decode (2-10 ms on a 20-token prompt here), and two threads that
    decode in turn keep two teams alive that fight for the cores (about 40% of the throughput on
    2 cores). Started on the first job; ``stop()`` ends it after the jobs already given."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="llm-magic-compute", daemon=True)
                self._thread.start()
            self._jobs.put(job)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a job reports its own failures; this keeps the thread for the next
                log.exception("a compute job failed")

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._jobs.put(None)
        if thread is not None:
            thread.join(timeout)


@dataclass(frozen=True)
class _ModelKey:
    path: Path
    ctx_length: int
    gpu_layers: int


@dataclass
class _Loaded:
    key: _ModelKey
    name: str
    llm: Any  # llama_cpp.Llama
    pieces: dict[int, bytes] = field(default_factory=dict)
    longest_piece: int | None = None
    formatters: dict[str | None, Any] = field(default_factory=dict)
    embedder: Any = None  # an EmbeddingContext on this model, made at the first embedding request

    def close(self) -> None:
        if self.embedder is not None:
            self.embedder.close()  # before the model it uses
        self.llm.close()


@dataclass
class Embeddings:
    """The engine's answer to an embedding request."""

    vectors: list[list[float]]
    model: str
    prompt_tokens: int


@dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        rate = self.completion_tokens / self.generation_seconds if self.generation_seconds else 0.0
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "tokens_per_second": round(rate, 1)}


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ModelLoadError(
            "serving models needs llama-cpp-python: pip install 'llm_magic[host]'") from None
    return llama_cpp


class Engine:
    """Loads GGUF models with llama.cpp and runs generations one at a time."""

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
    ) -> None:
        self.default_path = Path(default_model)
        self.default_name = default_name or model_name(self.default_path)
        self.ctx_length = ctx_length
        self.max_ctx = max(max_ctx or ctx_length, ctx_length)
        self.gpu_layers = gpu_layers
        self.threads = threads or best_thread_count()
        self.chat_format = chat_format
        self.policy = policy or ModelPolicy(has_token=False)
        self.turnstile = Turnstile(max_queue, queue_timeout)
        self.stats = EngineStats()
        self.loading = True  # until the first load: /health says "loading"
        self.compute = ComputeThread()  # where a server runs generations past their start
        self._loaded: _Loaded | None = None
        self._trained_ctx: dict[Path, int] = {}  # what each model loaded so far was trained for
        self.embedding_path = Path(embedding_model) if embedding_model else None
        self._embedding_model: _Loaded | None = None  # loaded at its first request

    # -- state ---------------------------------------------------------------------------

    @property
    def model(self) -> str | None:
        """Name of the resident model."""
        return self._loaded.name if self._loaded else None

    def status(self) -> dict[str, Any]:
        return {
            "status": "loading" if self.loading else "ok",
            "model": self.model or self.default_name,
            "default_model": self.default_name,
            "busy": self.turnstile.busy,
            "queue": self.turnstile.waiting,
            **self.stats.as_dict(),
        }

    def load_default(self) -> None:
        """Load the default model now (at start-up) rather than on the first request."""
        with self.turnstile.turn():
            self._ensure_loaded(self._key(self.default_path, None, None), self.default_name)

    def close(self) -> None:
        """Free the resident models (waits for a running generation) and end the compute thread."""
        with self.turnstile.turn():
            self._unload()
            if self._embedding_model is not None:
                self._embedding_model.close()
                self._embedding_model = None
        self.compute.stop()

    # -- embeddings ----------------------------------------------------------------------

    def embed(self, inputs: Sequence[str | Sequence[int]], cancel: threading.Event | None = None) -> Embeddings:
        """One normalised vector per input (text, or token ids). From ``embedding_model`` when
        the host has one, else from the resident model in an embedding context sharing its
        weights. Waits in line like a generation and computes in the compute thread."""
        with self.turnstile.turn(cancel):
            if self.embedding_path is not None:
                loaded = self._embedding_loaded()
            else:
                loaded = self._loaded or self._ensure_loaded(self._key(self.default_path, None, None), self.default_name)
            return self._in_compute_thread(lambda: self._embed(loaded, inputs))

    @property
    def embedding_names(self) -> tuple[str, ...]:
        """The name of the ``--embedding-model``, if the host has one."""
        return (model_name(self.embedding_path),) if self.embedding_path is not None else ()

    def _embedding_loaded(self) -> _Loaded:
        if self._embedding_model is None:
            llama_cpp = _llama_cpp()
            assert self.embedding_path is not None
            try:
                llm = llama_cpp.Llama(model_path=str(self.embedding_path), embedding=True, n_ctx=EMBEDDING_CTX,
                                      n_gpu_layers=self._key(self.embedding_path, None, None).gpu_layers,
                                      n_threads=self.threads, n_threads_batch=self.threads, verbose=False)
            except (ValueError, RuntimeError, OSError) as exc:
                raise ModelLoadError(f"llama.cpp could not load the embedding model "
                                     f"{self.embedding_path.name} ({exc})") from None
            key = _ModelKey(self.embedding_path, EMBEDDING_CTX, 0)
            self._embedding_model = _Loaded(key, model_name(self.embedding_path), llm)
        return self._embedding_model

    def _embed(self, loaded: _Loaded, inputs: Sequence[str | Sequence[int]]) -> Embeddings:
        from .embeddings import EmbeddingContext

        llm = loaded.llm
        if loaded.embedder is None:
            n_ctx = min(self.ctx_length, llm._model.n_ctx_train() or self.ctx_length, EMBEDDING_CTX)
            loaded.embedder = EmbeddingContext(llm._model.model, n_ctx, self.threads)
        n_vocab = _llama_cpp().llama_vocab_n_tokens(llm._model.vocab)
        vectors, total = [], 0
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                tokens = llm.tokenize(item.encode("utf-8"), add_bos=True, special=False)
            else:
                tokens = list(item)
                bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
                if bad is not None:
                    raise InvalidRequest(f"'input[{i}]' holds token {bad}, which is not in the model's "
                                         f"vocabulary (0 to {n_vocab - 1})")
            try:
                vectors.append(loaded.embedder.embed(tokens))
            except InvalidRequest as exc:
                raise InvalidRequest(f"'input[{i}]': {exc.message}") from None
            total += len(tokens)
        self.stats.requests += 1
        self.stats.prompt_tokens += total
        return Embeddings(vectors, loaded.name, total)

    def _in_compute_thread(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` in the compute thread (llama.cpp's threads belong to it) and wait."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:  # handed to the waiting request thread
                    future.set_exception(exc)

        self.compute.submit(run)
        return future.result(timeout=3600)  # a job ends on its own; this only bounds the wait

    # -- generation ----------------------------------------------------------------------

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None) -> Iterator[Event]:
        """Events for ``request``: ``Started``, text deltas, then a ``Completion``.

        Nothing happens until the first ``next()``; model checks, queueing, loading and prompt
        validation all happen before ``Started`` is yielded, so callers can turn their errors
        into a proper HTTP status before sending anything. Closing the iterator stops the
        generation within one token and frees the model for the next request; setting
        ``cancel`` takes a request that still waits in line out of it. Nothing before ``Started``
        runs llama.cpp's compute, so a caller may wait in line in a thread of its own and run the
        rest in ``self.compute`` (the server does).
        """
        spec = ModelSpec.parse(request.model)
        self.policy.check(spec)
        if request.response_format is not None:
            grammar_for(request.response_format)  # an unsupported schema is a 400 before the line
        if request.ctx_length is not None and request.ctx_length > self.max_ctx:
            raise InvalidRequest(
                f"a context of {request.ctx_length} tokens is more than this host allows ({self.max_ctx}; "
                "its owner sets --ctx and --max-ctx)")
        if spec.is_default:
            path, name = self.default_path, self.default_name
        else:  # downloads outside the turnstile
            path = resolve_model(spec)
            name = model_name(path) if spec.path else str(spec)  # a name, never a local path
        with self.turnstile.turn(cancel):
            loaded = self._ensure_loaded(self._key_for(path, request), name)
            yield from self._generate(loaded, request, cancel)

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
            self._loaded.close()
            self._loaded = None

    def _ensure_loaded(self, key: _ModelKey, name: str) -> _Loaded:
        if self._loaded is not None and self._loaded.key == key:
            return self._loaded
        llama_cpp = _llama_cpp()
        self._unload()  # never two models in memory
        self.loading = True
        started = time.perf_counter()
        try:
            llm = llama_cpp.Llama(
                model_path=str(key.path), n_ctx=key.ctx_length, n_gpu_layers=key.gpu_layers,
                n_threads=self.threads, n_threads_batch=self.threads, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not load {key.path.name} ({exc}); the file may be corrupt or "
                "incomplete: delete it (for a hub model, from the Hugging Face cache) and retry") from None
        finally:
            self.loading = False
        log.info("loaded %s (ctx %d, gpu layers %d) in %.2f s", name, key.ctx_length,
                 key.gpu_layers, time.perf_counter() - started)
        self._trained_ctx[key.path] = llm._model.n_ctx_train()
        if key.ctx_length > llm._model.n_ctx_train():
            log.warning("the context (%d) is larger than %s was trained for (%d): answers past that "
                        "may degrade", key.ctx_length, name, llm._model.n_ctx_train())
        self._loaded = _Loaded(key, name, llm)
        return self._loaded

    def _prompt_tokens(self, loaded: _Loaded, request: GenerationRequest, n_ctx: int,
                       tool_format: ToolFormat | None) -> tuple[list[int], tuple[str, ...]]:
        llm = loaded.llm
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
        # Tokenising megabytes takes seconds while others wait in line: refuse at once what
        # cannot fit, by the fewest tokens that many bytes can make.
        if len(data) > n_ctx and len(data) > n_ctx * self._longest_piece(loaded):
            raise _prompt_too_long(f"at least {len(data) // self._longest_piece(loaded)}", n_ctx)
        return llm.tokenize(data, add_bos=add_bos, special=True), stops

    def _longest_piece(self, loaded: _Loaded) -> int:
        """The most bytes one token of this model's vocabulary stands for."""
        if loaded.longest_piece is None:
            n_vocab = _llama_cpp().llama_vocab_n_tokens(loaded.llm._model.vocab)
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
        return detect_format(loaded.llm.metadata.get("tokenizer.chat_template"))

    def _formatter(self, loaded: _Loaded, chat_format: str | None) -> Any:
        if chat_format not in loaded.formatters:
            loaded.formatters[chat_format] = _make_formatter(loaded.llm, chat_format)
        return loaded.formatters[chat_format]

    def _generate(self, loaded: _Loaded, request: GenerationRequest,
                  cancel: threading.Event | None = None) -> Iterator[Event]:
        llama_cpp = _llama_cpp()
        llm = loaded.llm
        # llama.cpp may pad the context (to 256) beyond the token buffer llama-cpp-python
        # allocated for the requested size; writing past that buffer crashes, so use the smaller.
        n_ctx = min(llm.n_ctx(), len(llm.input_ids))
        tool_format = self._tool_format(loaded, request)
        tokens, stops = self._prompt_tokens(loaded, request, n_ctx, tool_format)
        if request.tools is None:  # a history with tool calls, but none offered now: plain text
            tool_format = None
        if not tokens:  # an empty prompt: generate from the start-of-text token, as llama.cpp does
            if llm.token_bos() == -1:
                raise InvalidRequest("the prompt is empty and this model has no start token: send some text")
            tokens = [llm.token_bos()]
        if len(tokens) >= n_ctx:
            raise _prompt_too_long(str(len(tokens)), n_ctx)
        budget = n_ctx - len(tokens)
        s = request.sampling
        max_tokens = min(s.max_tokens or budget, budget)
        seed = random.getrandbits(32) if s.seed is None or s.seed < 0 else s.seed % 2**32
        llm.set_seed(seed)
        cached = _common_prefix(llm._input_ids, tokens)
        grammar = self._grammar(request, tool_format)

        yield Started(loaded.name, len(tokens), tool_format.name if tool_format else None)

        vocab = llm._model.vocab
        is_eog = llama_cpp.llama_vocab_is_eog
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = _StopScanner(stops)
        parts: list[str] = []
        finish, n_generated = "length", 0
        started = time.perf_counter()
        first_token_at = None
        logprobs = _Logprobs(llm, request.logprobs, self._piece, loaded) if request.logprobs is not None else None
        if not self._read_prompt(llm, tokens, cached, cancel):
            return  # withdrawn while its prompt was read: no answer is wanted
        sampling = dict(top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, temp=s.temperature,
                        repeat_penalty=s.repeat_penalty, frequency_penalty=s.frequency_penalty,
                        presence_penalty=s.presence_penalty)
        if grammar is None:
            tokens_iter = llm.generate(tokens, **sampling)
        else:
            tokens_iter = _constrained_tokens(llm, tokens, grammar, sampling)
        try:
            for token in tokens_iter:
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if is_eog(vocab, token):
                    finish = "stop"
                    break
                n_generated += 1
                if logprobs is not None:
                    logprobs.add(token)  # the logits that chose it are still the context's last
                text, stopped = scanner.feed(decoder.decode(self._piece(loaded, token)))
                if text:
                    parts.append(text)
                    yield logprobs.with_text(text) if logprobs is not None else text
                if stopped:
                    finish = "stop"
                    break
                if n_generated >= max_tokens:
                    break
        finally:
            tokens_iter.close()
            # counted here so that generations cut short by a leaving client count too
            self.stats.requests += 1
            self.stats.prompt_tokens += len(tokens)
            self.stats.completion_tokens += n_generated
            self.stats.generation_seconds += time.perf_counter() - started
        if finish == "length":  # flush what was held back for a possible stop sequence
            text, _ = scanner.feed(decoder.decode(b"", final=True))
            text += scanner.flush()
            if text:
                parts.append(text)
                yield logprobs.with_text(text) if logprobs is not None else text
        ended = time.perf_counter()
        first_token_at = first_token_at or ended
        timings = _timings(len(tokens), cached, n_generated, started, first_token_at, ended)
        yield Completion("".join(parts), loaded.name, finish, len(tokens), n_generated, timings,
                         cached_tokens=cached, tool_format=tool_format.name if tool_format else None,
                         logprobs=logprobs.reported if logprobs is not None else None)

    @staticmethod
    def _grammar(request: GenerationRequest, tool_format: ToolFormat | None) -> Any:
        """The llama.cpp grammar for a request's ``response_format`` or tool calls, if any."""
        if request.response_format is not None:
            text = grammar_for(request.response_format)
        elif request.tools is not None and tool_format is not None:
            text = tool_grammar(request.tools, tool_format)
        else:
            text = None
        if text is None:
            return None
        from llama_cpp.llama_grammar import LlamaGrammar

        return LlamaGrammar.from_string(text, verbose=False)

    @staticmethod
    def _read_prompt(llm: Any, tokens: list[int], cached: int, cancel: threading.Event | None) -> bool:
        """Evaluate the prompt's tokens past the ``cached`` prefix, all but the last (which
        ``Llama.generate`` evaluates, finding the rest in the KV cache), in chunks, looking at
        ``cancel`` between them: a client that leaves during a long prompt frees the model within
        a chunk. Chunks start small and double while each takes under ``PROMPT_CHUNK_SECONDS``
        (on a GPU they soon reach the batch size). False if cancelled."""
        end = len(tokens) - 1
        if cancel is None or cached >= end:
            return True
        position, chunk = _keep_cached(llm, cached), PROMPT_CHUNK_MIN
        while position < end:
            if cancel.is_set():
                return False
            started = time.perf_counter()
            llm.eval(tokens[position:min(position + chunk, end)])
            position = llm.n_tokens
            if time.perf_counter() - started < PROMPT_CHUNK_SECONDS:
                chunk = min(chunk * 2, llm.n_batch)
        return True

    def _piece(self, loaded: _Loaded, token: int) -> bytes:
        """The raw bytes of one token (cached: the vocabulary is fixed)."""
        piece = loaded.pieces.get(token)
        if piece is None:
            llama_cpp = _llama_cpp()
            vocab = loaded.llm._model.vocab
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
            piece = loaded.pieces[token] = buf.raw[:n]
        return piece


def _constrained_tokens(llm: Any, tokens: list[int], grammar: Any, sampling: dict) -> Iterator[int]:
    """Tokens sampled under ``grammar`` the way llama.cpp's own server does it: sample without
    the grammar, ask the grammar about the chosen token only, and apply it to the whole
    vocabulary only when it refuses that token. (llama-cpp-python's chain applies the grammar
    to every candidate at every token: about 40% of the tokens/s for a JSON schema here.)
    Greedy answers are the same either way: the likeliest token is taken when the grammar
    allows it, else the likeliest it allows."""
    import numpy as np
    from llama_cpp import _internals

    lib = _llama_cpp()
    chain = llm._init_sampler(**sampling)  # llama-cpp-python's own chain, without the grammar
    rules = _internals.LlamaSampler()
    rules.add_grammar(llm._model, grammar)
    n_vocab = lib.llama_vocab_n_tokens(llm._model.vocab)
    candidates = _internals.LlamaTokenDataArray(n_vocab=n_vocab)
    one = (lib.llama_token_data * 1)()
    one_array = lib.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
    shortlists = {}
    for size in SHORTLISTS:
        data = (lib.llama_token_data * size)()
        shortlists[size] = (data, lib.llama_token_data_array(data=data, size=size, selected=-1, sorted=False))
    try:
        # The prompt, as Llama.generate reads it: what the KV cache holds is kept, and at least
        # the last token is evaluated again so that its logits are fresh.
        reuse = _keep_cached(llm, min(_common_prefix(llm._input_ids, tokens), len(tokens) - 1))
        llm.eval(tokens[reuse:])
        while True:
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
            _refill(candidates, logits)
            lib.llama_sampler_apply(chain.sampler, ctypes.byref(candidates.candidates))
            token = _selected(candidates.candidates)
            one[0].id, one[0].logit, one[0].p = token, float(logits[token]), 0.0
            one_array.size, one_array.selected = 1, -1
            lib.llama_sampler_apply(rules.sampler, ctypes.byref(one_array))
            if not np.isfinite(one[0].logit):  # refused: the grammar first, then the chain
                token = next((t for size in SHORTLISTS
                              if (t := _sample_allowed(lib, logits, rules, chain, *shortlists[size])) is not None), None)
                if token is None:  # none of the likeliest is allowed: ask about every token
                    _refill(candidates, logits)
                    lib.llama_sampler_apply(rules.sampler, ctypes.byref(candidates.candidates))
                    lib.llama_sampler_apply(chain.sampler, ctypes.byref(candidates.candidates))
                    token = _selected(candidates.candidates)
            lib.llama_sampler_accept(rules.sampler, token)
            lib.llama_sampler_accept(chain.sampler, token)
            yield token
            llm.eval([token])
    finally:
        rules.close()
        chain.close()


def _keep_cached(llm: Any, cached: int) -> int:
    """Keep the first ``cached`` tokens of the KV cache and drop the rest (all of it when the
    cache cannot be cut); return how many are kept."""
    if cached > 0 and llm._ctx.kv_cache_seq_rm(-1, cached, -1):
        llm.n_tokens = cached
        return cached
    llm.reset()
    return 0


def _refill(candidates: Any, logits: Any) -> None:
    """Every token with its logit, in ``candidates`` (llama-cpp-python's array) afresh."""
    candidates.copy_logits(logits)
    candidates.candidates.data = candidates.candidates_data.ctypes.data_as(type(candidates.candidates.data))
    candidates.candidates.selected = -1


def _selected(array: Any) -> int:
    """The token a sampler chain chose, read through the array's own data pointer."""
    if array.selected < 0:
        raise ModelLoadError("llama.cpp's sampler chose no token")
    return int(array.data[array.selected].id)


# How many of the likeliest tokens the grammar is asked about, in turn, before the whole
# vocabulary (asking about all ~50,000 takes ~8 ms here; about 2,000, a thirtieth of that).
SHORTLISTS = (64, 2048)


def _sample_allowed(lib: Any, logits: Any, rules: Any, chain: Any, shortlist: Any, array: Any) -> int | None:
    """A token sampled from the likeliest ``len(shortlist)`` that the grammar allows, or None
    when it allows none of them. The likeliest allowed token overall is among them if any is,
    so greedy answers are exactly those of applying the grammar to every token."""
    import numpy as np

    view = np.ctypeslib.as_array(shortlist)  # the C structs as a numpy record array
    size = len(view)
    best = np.argpartition(logits, -size)[-size:]
    view["id"], view["logit"], view["p"] = best, logits[best], 0.0
    array.data = ctypes.cast(shortlist, type(array.data))  # a sampler may have pointed it elsewhere
    array.size, array.selected, array.sorted = size, -1, False
    lib.llama_sampler_apply(rules.sampler, ctypes.byref(array))
    if not np.isfinite(view["logit"][: array.size]).any():
        return None
    lib.llama_sampler_apply(chain.sampler, ctypes.byref(array))
    return _selected(array)


class _Logprobs:
    """Log-probabilities of generated tokens, read from the logits only when a request asks.
    They are of the model's own distribution (before temperature and other samplers), as
    OpenAI and vLLM report them."""

    def __init__(self, llm: Any, top: int, piece: Callable[[Any, int], bytes], loaded: Any) -> None:
        import numpy

        self._np = numpy
        self._llm, self._top, self._piece, self._loaded = llm, top, piece, loaded
        self._n_vocab = _llama_cpp().llama_vocab_n_tokens(llm._model.vocab)
        self._pending: list[TokenLogprob] = []  # tokens whose text is not out yet
        self.reported: list[TokenLogprob] = []

    def _entry(self, token: int, logprob: float) -> tuple[str, float, bytes]:
        raw = self._piece(self._loaded, token)
        return raw.decode("utf-8", errors="replace"), logprob, raw

    def add(self, token: int) -> None:
        np = self._np
        pointer = _llama_cpp().llama_get_logits_ith(self._llm._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).astype(np.float64)
        peak = logits.max()
        logprobs = logits - (peak + np.log(np.exp(logits - peak).sum()))
        top: tuple = ()
        if self._top:
            best = np.argpartition(-logprobs, self._top)[: self._top]
            best = best[np.argsort(-logprobs[best])]
            top = tuple(self._entry(int(t), float(logprobs[t])) for t in best)
        text, logprob, raw = self._entry(token, float(logprobs[token]))
        self._pending.append(TokenLogprob(text, logprob, raw, top))

    def with_text(self, text: str) -> LoggedText:
        """``text`` carrying the tokens that made it (a held-back token goes with the next)."""
        entries, self._pending = tuple(self._pending), []
        self.reported.extend(entries)
        return LoggedText(text, entries)


def _prompt_too_long(tokens: str, n_ctx: int) -> InvalidRequest:
    return InvalidRequest(f"the prompt is {tokens} tokens but the model's context holds {n_ctx}: shorten "
                          "it (the context is set by the host's owner with --ctx)")


def _gpu_offload_supported() -> bool:
    try:
        return bool(_llama_cpp().llama_supports_gpu_offload())
    except (ModelLoadError, AttributeError):
        return False


def _common_prefix(a: Any, b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _timings(prompt_n: int, cached: int, predicted_n: int, started: float, first: float, ended: float) -> dict:
    prompt_ms = (first - started) * 1000
    predicted_ms = (ended - first) * 1000
    return {
        "prompt_n": prompt_n - cached,
        "cache_n": cached,
        "prompt_ms": round(prompt_ms, 2),
        "prompt_per_second": round((prompt_n - cached) / prompt_ms * 1000, 2) if prompt_ms > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": round(predicted_ms, 2),
        # the first token comes with the prompt; the rest are paced by generation
        "predicted_per_second": round((predicted_n - 1) / predicted_ms * 1000, 2)
        if predicted_n > 1 and predicted_ms > 0 else 0.0,
    }


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


def _make_formatter(llm: Any, chat_format: str | None) -> Any:
    from llama_cpp import llama_chat_format

    template = llm.metadata.get("tokenizer.chat_template")
    if chat_format is None and template:
        eos, bos = llm.token_eos(), llm.token_bos()
        text = llm._model.token_get_text
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

