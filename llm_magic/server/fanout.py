"""A list of prompts (``/v1/completions``) answered as one: each its own generation, a few at
a time, merged into one answer."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Iterator

from llm_magic.engine.backend import Backend
from llm_magic.server.generation import Failure, Pump, Watch
from llm_magic.server.inbound import ClientGone, client_gone_check
from llm_magic.server.metrics import RequestTrack
from llm_magic.server.replies import CHECK_SECONDS
from llm_magic.wire.events import Completion, Event, Signal, Started, TextDelta
from llm_magic.wire.types import GenerationRequest

log = logging.getLogger("llm_magic.server")


class Fanout:
    """The prompts of one ``/v1/completions`` list, each its own generation, merged into one
    answer: prompt i's choices take the indices i*n to i*n + n - 1, as OpenAI numbers them. At
    most as many run at once as the host has slots for (each holds ``n``), the rest following
    as they finish, so a long list neither fills the queue nor is refused as busy."""

    def __init__(self, backend: Backend, gen_request: GenerationRequest, gone: Callable[[], bool],
                 track: RequestTrack | None = None) -> None:
        self._track = track  # every prompt's pieces and usage count for the one request
        self._requests = [dataclasses.replace(gen_request, prompt=p, prompts=()) for p in gen_request.prompts]
        self._n = gen_request.n
        self._gone = gone
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # (prompt index, event, Failure or Signal.END)
        self._lock = threading.Lock()
        self._next = 0  # the next prompt to start
        self._pumps: list[Pump] = []
        self._cancelled = False
        self._started = 0
        self._first: Started | None = None
        self._failure: BaseException | None = None
        self._changed = threading.Condition(self._lock)  # a prompt started or failed
        self._wave = max(1, min(len(self._requests), backend.parallel // max(1, self._n)))
        self._threads = [threading.Thread(target=self._work, args=(backend,), name="llm-magic-prompt", daemon=True)
                         for _ in range(self._wave)]
        for thread in self._threads:
            thread.start()

    @classmethod
    def start(cls, backend: Backend, gen_request: GenerationRequest, keepalive: float,
              track: RequestTrack | None = None) -> tuple[Started | None, Iterator[Event]]:
        """As ``start_generation``: refusals of the prompts that start at once (too long, busy, ...)
        become an HTTP error status, waiting up to ``keepalive`` s for them."""
        fanout = cls(backend, gen_request, client_gone_check(), track)
        deadline = time.monotonic() + keepalive
        try:
            with fanout._changed:
                while fanout._failure is None and fanout._started < fanout._wave and time.monotonic() < deadline:
                    fanout._changed.wait(CHECK_SECONDS)
                    if fanout._gone():
                        raise ClientGone()
                if fanout._failure is not None:
                    raise fanout._failure
        except BaseException:
            fanout.close()
            raise
        ready = fanout._started >= fanout._wave
        return fanout._first, fanout.events(keepalive, None if ready else Signal.KEEPALIVE)

    def _take(self) -> int | None:
        """The next prompt to run; None once there is none, or the answer was given up."""
        with self._lock:
            if self._cancelled or self._next >= len(self._requests):
                return None
            self._next += 1
            return self._next - 1

    def _work(self, backend: Backend) -> None:
        """One of ``_wave`` threads: run prompts one after another, passing their events on."""
        while (index := self._take()) is not None:
            pump = Pump(backend, self._requests[index], self._track)
            with self._lock:
                self._pumps.append(pump)
                if self._cancelled:  # the answer was given up as this one started
                    pump.cancel()
            try:
                for event in pump.events(float("inf"), lambda: False):  # the response's thread watches
                    if isinstance(event, Started):
                        with self._changed:
                            self._first, self._started = self._first or event, self._started + 1
                            self._changed.notify_all()
                    self._queue.put((index, event))
            except BaseException as exc:  # handed to the response's thread, which answers with it
                with self._changed:
                    self._failure = self._failure or exc
                    self._changed.notify_all()
                self._queue.put((index, Failure(exc)))
                return
            self._queue.put((index, Signal.END))

    def events(self, keepalive: float, first: Event | None) -> Iterator[Event]:
        """The merged events: one ``Started``, every prompt's text as ``ChoiceDelta``, then one
        ``Completion`` holding every choice; ``Signal.KEEPALIVE`` after each ``keepalive`` s of silence.
        Ends early when the client left."""
        watch = Watch(self._gone, keepalive, self._track)
        try:
            if first is not None:
                yield first
            done: dict[int, Completion] = {}
            ended = 0
            started_passed = False
            while ended < len(self._requests):
                try:
                    index, item = self._queue.get(timeout=CHECK_SECONDS)
                except queue.Empty:
                    index, item = -1, Signal.QUIET
                now = time.monotonic()
                if watch.client_left(now):
                    return
                if item is Signal.QUIET:
                    if watch.keepalive_due(now):
                        yield Signal.KEEPALIVE
                    continue
                watch.quiet_since = now
                if isinstance(item, Failure):
                    raise item.exc
                if item is Signal.END:
                    ended += 1
                elif isinstance(item, Completion):
                    done[index] = item
                elif isinstance(item, Started) and not started_passed:
                    started_passed = True
                    yield item
                elif isinstance(item, TextDelta):
                    yield dataclasses.replace(item, index=index * self._n + item.index)
            yield self._merged(done)
        except GeneratorExit:  # closed before its end: whoever read it (the client) went away
            watch.closed_early()
            raise
        finally:
            self.close()

    def _merged(self, done: dict[int, Completion]) -> Completion:
        """One completion for the whole list: every choice, usage summed."""
        results = [done[i] for i in sorted(done)]
        choices = tuple(dataclasses.replace(choice, index=i * self._n + choice.index, choices=())
                        for i in sorted(done) for choice in done[i].choices or (done[i],))
        timings: dict[str, float] = {}
        for result in results:  # counts add up; the times overlap, as the prompts ran side by side
            for key, value in result.timings.items():
                timings[key] = timings.get(key, 0) + value if key.endswith("_n") else max(timings.get(key, 0), value)
        for what in ("prompt", "predicted"):
            if f"{what}_ms" in timings and timings[f"{what}_ms"] > 0:
                timings[f"{what}_per_second"] = round(timings.get(f"{what}_n", 0) / timings[f"{what}_ms"] * 1000, 2)
        return dataclasses.replace(
            choices[0], choices=choices, timings=timings,
            prompt_tokens=sum(r.prompt_tokens for r in results),
            completion_tokens=sum(r.completion_tokens for r in results),
            cached_tokens=sum(r.cached_tokens for r in results))

    def close(self) -> None:
        """Give the answer up: no prompt starts any more, and those running are withdrawn."""
        with self._lock:
            self._cancelled = True
            pumps = list(self._pumps)
        for pump in pumps:
            pump.cancel()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=1.0)  # each leaves once its prompt is withdrawn
