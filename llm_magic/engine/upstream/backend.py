"""A backend in front of a running OpenAI-compatible engine: vLLM, SGLang, llama-server, Ollama,
TGI, LM Studio, another llm_magic. The engine does the batching and the GPUs (tensor and
pipeline parallel, several nodes); the host in front keeps what llm_magic adds: the token, the
tunnel with its keep-alives, the seed ``/api``, Responses, the chat page, the queue with 503.

Every generation is one streamed request to the engine's ``/v1/chat/completions`` (or
``/v1/completions``), read by a thread of its own so that the response can send keep-alives and
notice a client that left; closing the generation closes that request, and the engine stops
writing. The engine's own structured tool calls pass through as they come.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from typing import Any, Iterator, Sequence

import requests

from llm_magic.engine.admission import Turnstile
from llm_magic.engine.backend import Embeddings, EngineStats
from llm_magic.engine.upstream.tokens import count_chat_tokens
from llm_magic.engine.upstream.translate import ChunkReader, request_body
from llm_magic.errors import (
    EngineTimeout, EngineUnavailable, HostBusy, InvalidRequest, LLMMagicError, ModelNotFound,
    connection_reason,
)
from llm_magic.settings import DEFAULTS, FRONTED_PARALLEL
from llm_magic.wire.events import Event, Signal, Started
from llm_magic.wire.types import GenerationRequest

log = logging.getLogger("llm_magic.engine")

CONNECT_SECONDS = 10.0
READ_SECONDS = 600.0  # the longest an engine may stay silent mid-answer (a long prompt on a slow GPU)
STATUS_SECONDS = 3.0  # /health asks the engine at most this long ...
STATUS_CACHE_SECONDS = 5.0  # ... and at most this often
_END = object()


class UpstreamBackend:
    """Serves through the engine at ``url`` (its base, with or without ``/v1``)."""

    def __init__(self, url: str, *, key: str | None = None, model: str | None = None,
                 parallel: int = FRONTED_PARALLEL, max_queue: int = DEFAULTS.max_queue, queue_timeout: float = 600.0,
                 read_timeout: float = READ_SECONDS, start_wait: float = 0.0) -> None:
        base = url.rstrip("/")
        self.url = base[: -len("/v1")] if base.endswith("/v1") else base
        self.parallel = max(1, parallel)
        self.read_timeout = read_timeout
        self.start_wait = start_wait  # how long load_default waits for an engine still starting
        self.turnstile = Turnstile(max_queue, queue_timeout, capacity=self.parallel)
        self.stats = EngineStats()
        self._key = key
        self._wanted_model = model
        self._models: list[str] = []
        self._http = requests.Session()
        self._status: tuple[float, dict[str, Any]] = (0.0, {})
        self._lock = threading.Lock()
        self._flight: dict[int, dict[str, Any]] = {}  # the requests at the engine now, for /slots
        self._flight_ids = itertools.count()

    def __repr__(self) -> str:  # never the key
        return f"UpstreamBackend({self.url!r})"

    # -- names and state ---------------------------------------------------------------------

    @property
    def default_name(self) -> str:
        return self._wanted_model or (self._models[0] if self._models else "default")

    @property
    def model(self) -> str | None:
        return self.default_name if self._models else None

    @property
    def embedding_names(self) -> tuple[str, ...]:
        return tuple(m for m in self._models if m != self.default_name)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    def _get(self, path: str, timeout: float) -> Any:
        try:
            response = self._http.get(self.url + path, headers=self._headers(), timeout=timeout)
        except requests.Timeout:
            raise EngineTimeout(f"the engine at {self.url} did not answer {path} within {timeout:.0f} s") from None
        except requests.RequestException as exc:
            raise EngineUnavailable(f"the engine at {self.url} does not answer ({connection_reason(exc)})") from None
        if response.status_code != 200:
            raise engine_failure(response, path, self.url)
        try:
            return response.json()
        except ValueError:
            raise EngineUnavailable(f"the engine at {self.url} answered {path} with something that is not JSON") from None

    def list_models(self, timeout: float = STATUS_SECONDS) -> list[str]:
        """The engine's model ids (its ``GET /v1/models``)."""
        data = self._get("/v1/models", timeout)
        ids = [m.get("id") for m in data.get("data") or () if isinstance(m, dict)] if isinstance(data, dict) else []
        self._models = [i for i in ids if isinstance(i, str) and i]
        return self._models

    def load_default(self) -> None:
        """Check that the engine answers and learn its models, retrying for up to
        ``start_wait`` s (an engine still starting)."""
        deadline = time.monotonic() + self.start_wait
        while True:
            try:
                models = self.list_models(timeout=CONNECT_SECONDS)
                break
            except EngineUnavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)
        if self._wanted_model and models and self._wanted_model not in models:
            raise ModelNotFound(f"the engine at {self.url} serves {', '.join(models)}, not {self._wanted_model}")
        log.info("fronting the engine at %s (models: %s)", self.url, ", ".join(models) or "none listed")

    def status(self) -> dict[str, Any]:
        engine = self._engine_status()
        return {
            "status": "ok" if engine["state"] == "ok" else "loading" if engine["state"] == "starting" else "degraded",
            "model": self.default_name, "default_model": self.default_name,
            "busy": self.turnstile.busy, "slots": self.parallel, "slots_busy": min(self.turnstile.held, self.parallel),
            "queue": self.turnstile.waiting, **self.stats.as_dict(), "engine": engine,
        }

    def _engine_status(self) -> dict[str, Any]:
        """The engine's state, asked at most every ``STATUS_CACHE_SECONDS``: /health stays fast."""
        with self._lock:
            at, cached = self._status
            if time.monotonic() - at < STATUS_CACHE_SECONDS and cached:
                return cached
            try:
                models = self.list_models()
                state: dict[str, Any] = {"kind": "upstream", "url": self.url, "state": "ok", "models": models}
            except LLMMagicError as exc:
                state = {"kind": "upstream", "url": self.url, "state": "down", "error": exc.message}
            self._status = (time.monotonic(), state)
            return state

    def slots(self) -> list[dict[str, Any]]:
        """The requests at the engine now (its own slots are its business): their ids and how
        long they have run; the server adds what it has seen of their answers."""
        return [{"id": i, "state": "writing", "cache_tokens": None, "request_id": f["request_id"], "tokens": None,
                 "tokens_per_second": None} for i, f in sorted(self._flight.copy().items())]

    def close(self) -> None:
        self._http.close()

    # -- generation --------------------------------------------------------------------------

    def _model_for(self, request: GenerationRequest) -> str:
        """A model the engine lists is passed on; any other name means the default one."""
        if request.model and (request.model in self._models or not self._models):
            return request.model
        return self.default_name

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None,
                 first_text_passed: threading.Event | None = None, tick: float | None = None) -> Iterator[Event]:
        if request.n > self.parallel:
            raise InvalidRequest(f"'n' is {request.n}, but this host sends at most {self.parallel} answers at once "
                                 "(its owner sets --parallel)")
        cancel = cancel or threading.Event()
        model = self._model_for(request)
        path = "/v1/chat/completions" if request.is_chat else "/v1/completions"
        body = request_body(request, model)
        with self.turnstile.turn(cancel, seats=request.n):
            started = time.perf_counter()
            flight = next(self._flight_ids)
            self._flight[flight] = {"request_id": request.request_id, "started": started}
            try:
                response = self._post(path, body, request.request_id)
            except BaseException:
                self._flight.pop(flight, None)
                raise
            reader = ChunkReader(model, request.is_chat, request.n, want_logprobs=request.logprobs is not None)
            lines: queue.SimpleQueue = queue.SimpleQueue()
            thread = threading.Thread(target=_read_lines, args=(response, lines), name="llm-magic-upstream",
                                      daemon=True)
            thread.start()
            try:
                yield Started(model)
                yield from self._events(lines, reader, cancel, tick)
                if cancel.is_set():  # withdrawn: no answer
                    return
                result = reader.completion()
                if not result.timings:
                    result.timings = {"predicted_n": result.completion_tokens,
                                      "predicted_ms": round((time.perf_counter() - started) * 1000, 2)}
                self._count(result, started)
                yield result
            finally:
                _hang_up(response)  # the engine sees the connection end and stops writing
                thread.join(timeout=5.0)
                response.close()
                self._flight.pop(flight, None)

    def _send(self, path: str, body: dict, request_id: str | None = None, stream: bool = True) -> requests.Response:
        """The engine's response to ``body`` at ``path``, whatever its status."""
        headers = {**self._headers(), **({"X-Request-Id": request_id} if request_id else {})}  # followed there too
        try:
            return self._http.post(self.url + path, json=body, headers=headers, stream=stream,
                                   timeout=(CONNECT_SECONDS, self.read_timeout))
        except requests.Timeout:
            raise EngineTimeout(f"the engine at {self.url} did not answer within {self.read_timeout:.0f} s") from None
        except requests.RequestException as exc:
            raise EngineUnavailable(f"the engine at {self.url} does not answer ({connection_reason(exc)})") from None

    def _post(self, path: str, body: dict, request_id: str | None = None, stream: bool = True) -> requests.Response:
        """The engine's answer to ``body`` at ``path``; its refusals and failures as our errors."""
        response = self._send(path, body, request_id, stream)
        if response.status_code != 200:
            with response:
                raise engine_failure(response, path, self.url)
        return response

    def _ask(self, path: str, body: dict) -> Any:
        """The engine's JSON answer at ``path``; None where it has no such route."""
        with self._send(path, body, stream=False) as response:
            if response.status_code in (404, 405, 501):
                return None
            if response.status_code != 200:
                raise engine_failure(response, path, self.url)
            try:
                return response.json()
            except ValueError:
                return None

    def _events(self, lines: queue.SimpleQueue, reader: ChunkReader, cancel: threading.Event,
                tick: float | None) -> Iterator[Event]:
        while not cancel.is_set():
            try:
                item = lines.get(timeout=tick or 1.0)
            except queue.Empty:
                if tick is not None:
                    yield Signal.QUIET
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                if isinstance(item, requests.Timeout):
                    raise EngineTimeout(f"the engine at {self.url} stopped sending for {self.read_timeout:.0f} s")
                raise EngineUnavailable(f"the connection to the engine at {self.url} broke mid-answer "
                                        f"({connection_reason(item)})")
            chunk = _chunk(item)
            if chunk is None:
                continue
            if "error" in chunk and not chunk.get("choices"):
                error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
                raise EngineUnavailable(f"the engine at {self.url} failed mid-answer: {error.get('message')}")
            yield from reader.feed(chunk)

    def _count(self, result: Any, started: float) -> None:
        self.stats.count(result.prompt_tokens, result.completion_tokens, time.perf_counter() - started)

    def count_tokens(self, request: GenerationRequest) -> int:
        """The prompt's tokens as the engine templates and tokenizes it (Anthropic's
        count_tokens), through its ``/tokenize``; a 501 for an engine without one."""
        return count_chat_tokens(self._ask, request_body(request, self._model_for(request)), self.url)

    # -- embeddings --------------------------------------------------------------------------

    def embed(self, inputs: Sequence[str | Sequence[int]], cancel: threading.Event | None = None) -> Embeddings:
        body = {"model": self.default_name, "input": [i if isinstance(i, str) else list(i) for i in inputs]}
        with self.turnstile.turn(cancel):
            data = self._post("/v1/embeddings", body, stream=False).json()
        rows = sorted(data.get("data") or (), key=lambda d: d.get("index", 0))
        usage = data.get("usage") or {}
        return Embeddings([list(map(float, row.get("embedding") or ())) for row in rows], data.get("model") or
                          self.default_name, int(usage.get("prompt_tokens") or 0))


def engine_failure(response: requests.Response, path: str, url: str) -> LLMMagicError:
    """The engine's refusal as our error: its own message, under the status it means here
    (its 400 is the client's mistake; its 5xx, 401 or 403 is the host's)."""
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error or response.text
    except (ValueError, AttributeError):
        message = response.text
    message = str(message or response.reason)[:500]
    status = response.status_code
    if status in (429, 503):
        return HostBusy(f"the engine at {url} is busy: {message}", retry_after=5)
    if status in (400, 413, 422):
        return InvalidRequest(f"the engine says: {message}")
    if status == 404 and "model" in message.lower():
        return ModelNotFound(f"the engine says: {message}")
    if status in (401, 403):
        return EngineUnavailable(f"the engine at {url} refused this host's key ({status}): set --engine-key")
    return EngineUnavailable(f"the engine at {url} answered {path} with {status}: {message}")


def _read_lines(response: requests.Response, lines: queue.SimpleQueue) -> None:
    """Pass the engine's SSE ``data:`` lines on as they arrive, then ``_END`` (or the error)."""
    try:
        for raw in response.iter_lines(chunk_size=None):
            if raw.startswith(b"data:"):
                data = raw[5:].strip()
                if data == b"[DONE]":  # the answer is over, even if the engine keeps the line open
                    break
                lines.put(data)
    except Exception as exc:  # the stream broke, or was closed under us: handed to the reader
        lines.put(exc)
    lines.put(_END)


def _hang_up(response: requests.Response) -> None:
    """End the engine's request now, waking the reader thread blocked on it (closing alone
    would not interrupt a read under way, and the engine would go on writing)."""
    try:
        response.raw.shutdown()
    except (ValueError, RuntimeError, OSError, AttributeError):  # already released or closed
        pass
    response.close()


def _chunk(data: bytes) -> dict | None:
    if data == b"[DONE]" or not data:
        return None
    try:
        chunk = json.loads(data)
    except ValueError:
        return None
    return chunk if isinstance(chunk, dict) else None
