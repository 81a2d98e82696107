"""What a host has done and is doing: ``/metrics`` (Prometheus), ``/slots``, request ids and
the access log.

Everything is counted at the server from the events every backend yields (``Started``, the
deltas, the ``Completion`` with its usage), so a host in front of another engine gets the same
metrics as one running llama.cpp. Per event: a few integer additions, no lock. Per request: the
Prometheus counters and histograms, once, when its response closes. At scrape time: gauges read
from the backend (queue, slots, KV cache, model loads) and the tunnel's state. Each app has a
registry of its own (tests build many apps in one process). No token and no prompt text (unless
``--log-prompts``) is ever written into a metric, a log line or ``/slots``.
"""

from __future__ import annotations

import collections
import contextvars
import json
import logging
import time
import uuid
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llm_magic.server.httpserver import loggable
from llm_magic.version import __version__
from llm_magic.wire.events import Completion
from llm_magic.wire.types import GenerationRequest

log = logging.getLogger("llm_magic.server")

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID = 128
RATE_WINDOW = 5.0  # seconds the host's tokens/s is measured over
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TUNNEL_UP = ("ready", "unverified")  # cloudflared's states in which the public URL answers
PROMPT_LOG_CHARS = 300
LOGGERS = ("llm_magic.server", "llm_magic.engine")  # their lines carry the request's id

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("llm_magic_request_id", default=None)


def request_id_from(header: str | None, token: str | None) -> str:
    """The id a request goes by: the client's ``X-Request-Id`` when it is printable ASCII
    without spaces, at most 128 characters and free of the token; else a new one."""
    if (header and len(header) <= MAX_REQUEST_ID and all("!" <= c <= "~" for c in header)
            and not (token and token in header)):
        return header
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Puts ``[request id]`` before every line the server and engine log for a request (in
    the threads that carry its context), whatever format the log's handler has."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = _request_id.get()
        if rid is not None and getattr(record, "request_id", None) is None:
            record.request_id = rid
            record.msg = f"[{rid.replace('%', '%%') if record.args else rid}] {record.msg}"
        return True


def install_log_filter() -> None:
    """Once per process: the loggers that speak for a request name its id."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RequestIdFilter) for f in logger.filters):
            logger.addFilter(RequestIdFilter())


class Throughput:
    """Pieces of answers written per second over the last ``RATE_WINDOW`` s, all answers
    together. Counted per delta without a lock: a count lost to a race does not matter to a rate."""

    def __init__(self) -> None:
        self._buckets: collections.deque[list[int]] = collections.deque(maxlen=64)  # [second, count]

    def add(self, now: float) -> None:
        second, buckets = int(now), self._buckets
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += 1
        else:
            buckets.append([second, 1])

    def rate(self, now: float | None = None) -> float:
        since = (time.monotonic() if now is None else now) - RATE_WINDOW
        return round(sum(count for second, count in list(self._buckets) if second + 1 > since) / RATE_WINDOW, 1)


class RequestTrack:
    """One request as the server sees it: who asked what, its answer's pieces as they go out,
    its usage once complete, and whether its client left."""

    __slots__ = ("id", "method", "path", "route", "client", "arrived", "first_at", "pieces", "prompt_tokens",
                 "completion_tokens", "cached_tokens", "completed", "left", "prompt", "_rate", "_finished")

    def __init__(self, rid: str, method: str, path: str, route: str, client: str, rate: Throughput) -> None:
        self.id, self.method, self.path, self.route, self.client = rid, method, path, route, client
        self.arrived = time.monotonic()
        self.first_at: float | None = None
        self.pieces = self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        self.completed = self.left = self._finished = False
        self.prompt: str | None = None  # only with --log-prompts
        self._rate = rate

    def piece(self, now: float) -> None:
        """A text or tool-call delta went out (the per-token path: keep it this small)."""
        if self.first_at is None:
            self.first_at = now
        self.pieces += 1
        self._rate.add(now)

    def completion(self, done: Completion) -> None:
        self.prompt_tokens += done.prompt_tokens
        self.completion_tokens += done.completion_tokens
        self.cached_tokens += done.cached_tokens
        self.completed = True

    def tokens_per_second(self, now: float) -> float:
        if self.first_at is None or now <= self.first_at:
            return 0.0
        return round(self.pieces / (now - self.first_at), 1)


def prompt_text(request: GenerationRequest) -> str:
    """The start of a request's prompt (its last message), for ``--log-prompts`` only."""
    if request.messages:
        content = request.messages[-1].get("content")
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    else:
        text = request.prompt or ""
    return loggable(json.dumps(text[:PROMPT_LOG_CHARS], ensure_ascii=False), PROMPT_LOG_CHARS + 20)


class Meter:
    """The app's metrics: its registry, the requests in flight, the access log."""

    def __init__(self, backend: Any, extra_status: Callable[[], dict] | None = None, log_prompts: bool = False) -> None:
        self.backend, self.extra_status, self.log_prompts = backend, extra_status, log_prompts
        self.rate = Throughput()
        self.in_flight: dict[str, RequestTrack] = {}
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llm_magic_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("llm_magic_prompt_tokens", "Prompt tokens read (embedding inputs too)", registry=r)
        self.generated_tokens = Counter("llm_magic_generated_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("llm_magic_cached_prompt_tokens",
                                     "Prompt tokens found in the KV cache, not read again", registry=r)
        self.ttft = Histogram("llm_magic_time_to_first_token_seconds",
                              "From the request's arrival to its first text or tool-call piece",
                              buckets=TTFT_BUCKETS, registry=r)
        self.latency = Histogram("llm_magic_request_duration_seconds", "From arrival to the end of the response",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.refusals = Counter("llm_magic_busy_refusals", "Requests answered 503 (the line full, an engine down)",
                                registry=r)
        self.clients_left = Counter("llm_magic_clients_left", "Clients that left before their answer was complete",
                                    registry=r)
        r.register(ScrapeCollector(self))
        ProcessCollector(registry=r)  # the server's memory, CPU time and open files

    def begin(self, rid: str, method: str, path: str, route: str, client: str) -> RequestTrack:
        track = RequestTrack(rid, method, loggable(path), route, client or "-", self.rate)
        _request_id.set(rid)
        self.in_flight[rid] = track
        return track

    def finish(self, track: RequestTrack, status: int) -> None:
        """The response is over (sent, or its client gone): count it and write its one log line."""
        if track._finished:
            return
        track._finished = True
        seconds = time.monotonic() - track.arrived
        self.requests.labels(track.route, str(status)).inc()
        self.latency.labels(track.route).observe(seconds)
        if track.first_at is not None:
            self.ttft.observe(track.first_at - track.arrived)
        for counter, value in ((self.prompt_tokens, track.prompt_tokens), (self.generated_tokens, track.completion_tokens),
                               (self.cached_tokens, track.cached_tokens)):
            if value:
                counter.inc(value)
        if status == 503:
            self.refusals.inc()
        left = track.left
        if left:
            self.clients_left.inc()
        tokens = f" prompt={track.prompt_tokens} completion={track.completion_tokens}" if track.completed or left else ""
        ttft = f" ttft={track.first_at - track.arrived:.3f}s" if track.first_at is not None else ""
        log.info("%s %s %s%s%s %.3fs client=%s%s%s", track.method, track.path, status, tokens, ttft, seconds,
                 track.client, " (the client left)" if left else "",
                 f" prompt_text={track.prompt}" if track.prompt is not None else "")
        if self.in_flight.get(track.id) is track:
            del self.in_flight[track.id]
        _request_id.set(None)

    def slots(self) -> dict[str, Any]:
        """``/slots``: each slot of the backend with the request it serves, and the host's pace."""
        now = time.monotonic()
        rows = []
        for slot in self.backend.slots():
            row = {"id": slot.get("id"), "state": slot.get("state", "idle"), "cache_tokens": slot.get("cache_tokens")}
            if row["state"] != "idle":
                rid = slot.get("request_id")
                track = self.in_flight.get(rid) if rid else None
                tokens, rate = slot.get("tokens"), slot.get("tokens_per_second")
                if tokens is None and track is not None:  # the backend does not count: what went out
                    tokens, rate = track.pieces, track.tokens_per_second(now)
                    if track.first_at is None:
                        row["state"] = "reading_prompt"
                row["request"] = {"id": rid, "route": track.route if track else None, "tokens": tokens or 0,
                                  "tokens_per_second": rate or 0.0,
                                  "seconds": round(now - track.arrived, 2) if track else None}
            rows.append(row)
        status = self.backend.status()
        busy = sum(row["state"] != "idle" for row in rows)
        return {"slots": rows, "slots_busy": busy, "slots_total": status.get("slots", len(rows)),
                "queue": status.get("queue", 0), "tokens_per_second": self.rate.rate(now)}


class ScrapeCollector:
    """The gauges read when ``/metrics`` is scraped: nothing is kept up to date in between."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    def describe(self) -> list:
        return []  # registering must not read the backend

    def collect(self) -> Iterator[Any]:
        meter, backend = self.meter, self.meter.backend
        status = backend.status()
        info = GaugeMetricFamily("llm_magic_info", "The host's version and model", labels=["version", "model"])
        info.add_metric([__version__, str(status.get("model") or "")], 1)
        yield info
        for name, key, text in (("queue_length", "queue", "Requests waiting for a slot"),
                                ("slots_busy", "slots_busy", "Slots writing an answer or reading its prompt"),
                                ("slots_total", "slots", "Slots: answers written at once")):
            yield GaugeMetricFamily(f"llm_magic_{name}", text, value=float(status.get(key) or 0))
        yield GaugeMetricFamily("llm_magic_decode_tokens_per_second",
                                f"Tokens written per second, all answers together, over the last {RATE_WINDOW:.0f} s",
                                value=meter.rate.rate())
        gauges = getattr(backend, "gauges", None)
        values = gauges() if callable(gauges) else {}
        if "kv_cells_total" in values:
            yield GaugeMetricFamily("llm_magic_kv_cache_cells_used", "KV cache cells the slots hold",
                                    value=float(values.get("kv_cells_used", 0)))
            yield GaugeMetricFamily("llm_magic_kv_cache_cells_total", "KV cache cells in all",
                                    value=float(values["kv_cells_total"]))
        if "model_loads" in values:
            yield CounterMetricFamily("llm_magic_model_loads", "Models loaded for generating",
                                      value=float(values["model_loads"]))
            yield CounterMetricFamily("llm_magic_model_load_seconds", "Seconds spent loading them",
                                      value=float(values.get("model_load_seconds", 0.0)))
        if "draft_tokens" in values:
            yield CounterMetricFamily("llm_magic_draft_tokens", "Tokens guessed ahead by speculative decoding",
                                      value=float(values["draft_tokens"]))
            yield CounterMetricFamily("llm_magic_draft_accepted_tokens", "Of those, tokens the answers wrote",
                                      value=float(values.get("draft_accepted_tokens", 0)))
        tunnel = (meter.extra_status() or {}).get("tunnel") if meter.extra_status else None
        if isinstance(tunnel, dict) and tunnel.get("state"):
            yield GaugeMetricFamily("llm_magic_tunnel_up", "1 while the public tunnel answers, else 0",
                                    value=1.0 if tunnel["state"] in TUNNEL_UP else 0.0)
            yield CounterMetricFamily("llm_magic_tunnel_restarts", "Times the tunnel was restarted",
                                      value=float(tunnel.get("restarts") or 0))
