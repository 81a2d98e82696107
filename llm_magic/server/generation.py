"""One generation read for a response: in a thread of its own while it waits in line (so
that the response can keep the line alive and notice a client that left), then directly."""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator

from llm_magic.engine.backend import Backend
from llm_magic.errors import LLMMagicError
from llm_magic.server.inbound import ClientGone, client_gone_check
from llm_magic.server.metrics import RequestTrack
from llm_magic.server.replies import CHECK_SECONDS
from llm_magic.wire.events import Completion, Event, ReasoningDelta, Signal, Started, TextDelta, ToolCallDelta
from llm_magic.wire.types import GenerationRequest

log = logging.getLogger("llm_magic.server")

class Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


# The most a withdrawn generation is waited for, in case llama.cpp never ends its step; a step
# ends within a second or so even on a busy machine.
WITHDRAW_SECONDS = 30.0


class Watch:
    """What a response reading events looks at between them: whether its client left (asked every
    ``CHECK_SECONDS``) and whether the line has been quiet for a keep-alive's interval."""

    def __init__(self, gone: Callable[[], bool], keepalive: float, track: Any = None) -> None:
        self._gone, self._keepalive, self._track = gone, keepalive, track
        self._checked = self.quiet_since = time.monotonic()  # the response sets quiet_since per event

    def client_left(self, now: float) -> bool:
        if now - self._checked < CHECK_SECONDS:
            return False
        self._checked = now
        if not self._gone():
            return False
        log.info("the client left; generation stopped")
        if self._track is not None:
            self._track.left = True
        return True

    def keepalive_due(self, now: float) -> bool:
        if now - self.quiet_since < self._keepalive:
            return False
        self.quiet_since = now
        return True

    def closed_early(self) -> None:
        """The events were closed before their end: whoever read them (the client) went away."""
        if self._track is not None and not self._track.completed:
            self._track.left = True


class Pump:
    """One generation, read so that the response can send keep-alives while llama.cpp is busy
    (waiting in the queue, loading, evaluating a long prompt) and notice a client that left. Up
    to ``Started`` (waiting in line, loading) the generation runs in a thread of its own; then
    the response's thread reads it directly, the backend saying ``QUIET`` at each check interval.
    Closing it withdraws the generation, which frees its slot within a token.

    It tells the backend when the first text has gone out: a generation running alone pauses
    until then, since the next token's decode keeps every core busy and on a small machine
    would otherwise starve the threads that must send the first token (ours, the client's,
    cloudflared's). On 2 cores this took the median time to the first streamed token from 2.9
    to 1.6-1.8 ms in a side-by-side probe, at no cost in tokens/s (README, Performance)."""

    def __init__(self, backend: Backend, gen_request: GenerationRequest, track: RequestTrack | None = None) -> None:
        self._track = track  # counts what goes out, for /metrics, /slots and the access log
        self._cancel = threading.Event()
        self._first_text_passed = threading.Event()
        self._events = backend.generate(gen_request, self._cancel, self._first_text_passed, tick=CHECK_SECONDS)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._handed_over = False  # the thread stopped at Started: the rest is read by the response
        self._direct = False  # the response's thread reads the generation itself
        # in the request's context: its log lines carry its id
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._wait_in_line,),
                                        name="llm-magic-request", daemon=True)
        self._thread.start()

    def _wait_in_line(self) -> None:
        try:
            for event in self._events:
                if isinstance(event, Started):
                    # From here the response's own thread reads the events: one hand-over less
                    # per token than relaying them through this thread.
                    self._handed_over = True
                    self._queue.put(event)
                    return
                self._queue.put(event)
                if self._cancel.is_set():
                    break
        except BaseException as exc:  # handed to the request thread, which answers with it
            self._queue.put(Failure(exc))
        try:
            self._events.close()
        finally:
            self._queue.put(Signal.END)

    def get(self, timeout: float) -> Event | object | None:
        """The next event, ``Signal.QUIET`` after ``timeout`` s without one, ``None`` at the end."""
        if self._direct:  # the backend itself says QUIET after each CHECK_SECONDS
            event = next(self._events, None)
            return event
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return Signal.QUIET
        if item is Signal.END:
            return None
        if isinstance(item, Failure):
            raise item.exc
        if isinstance(item, Started):
            self._thread.join()  # it returns right after handing over
            self._direct = True
        return item

    def events(self, keepalive: float, gone: Callable[[], bool], first: Event | None = None) -> Iterator[Event]:
        """The events, with ``Signal.KEEPALIVE`` after each ``keepalive`` s of silence; ends early when
        ``gone()`` says the client left (checked every ``CHECK_SECONDS``)."""
        track = self._track
        watch = Watch(gone, keepalive, track)
        try:
            if first is not None:
                yield first
            while True:
                event = self.get(CHECK_SECONDS)
                now = time.monotonic()
                if watch.client_left(now) or event is None:
                    return
                if event is Signal.QUIET:
                    if watch.keepalive_due(now):
                        yield Signal.KEEPALIVE
                    continue
                watch.quiet_since = now
                if track is not None:  # per event: a type check and an addition
                    kind = type(event)
                    if kind is TextDelta or kind is ToolCallDelta or kind is ReasoningDelta:
                        track.piece(now)
                    elif kind is Completion:
                        track.completion(event)  # type: ignore[arg-type]
                yield event  # type: ignore[misc]
                if isinstance(event, (TextDelta, ReasoningDelta)):  # the consumer is back for more: it passed it on
                    self._first_text_passed.set()
        except GeneratorExit:  # closed before its end: whoever read it (the client) went away
            watch.closed_early()
            raise
        finally:
            self.close()

    def cancel(self) -> None:
        """Withdraw the generation, from any thread; whoever reads it sees it end."""
        self._cancel.set()
        self._first_text_passed.set()

    def close(self) -> None:
        self.cancel()
        self._thread.join(timeout=1.0)  # it leaves the line at once once cancelled
        if self._handed_over and not self._thread.is_alive():
            self._withdraw()

    def _withdraw(self) -> None:
        """Read the cancelled generation to its end. The compute thread lets go of its slot at
        its next step (the one under way cannot be stopped), and only then does the generation
        end and give its seat back: /health, the next request and the request counts then agree
        with what llama.cpp is doing (closing the generation at once gave the seat back while the
        step ran on, so on a busy machine the next request found the slot still taken)."""
        deadline = time.monotonic() + WITHDRAW_SECONDS
        try:
            for _ in self._events:  # QUIET every CHECK_SECONDS until it ends
                if time.monotonic() > deadline:
                    log.warning("a withdrawn generation did not end within %.0f s", WITHDRAW_SECONDS)
                    break
        except LLMMagicError:  # it failed as it was withdrawn: nobody is left to tell
            pass
        finally:
            self._events.close()


def start_generation(backend: Backend, gen_request: GenerationRequest, keepalive: float,
                     track: RequestTrack | None = None) -> tuple[Started | None, Iterator[Event]]:
    """Start a generation and wait up to ``keepalive`` s for its ``Started`` event, so that
    every refusal (model not allowed, busy, prompt too long) becomes an HTTP error status. If the
    model is still busy by then, answer 200 and keep the line alive; later errors then travel in
    the body (an SSE error event, or a JSON error object)."""
    pump = Pump(backend, gen_request, track)
    gone = client_gone_check()
    deadline = time.monotonic() + keepalive
    try:
        while (first := pump.get(CHECK_SECONDS)) is Signal.QUIET and time.monotonic() < deadline:
            if gone():  # it left while waiting in the queue: never run it
                raise ClientGone()
    except BaseException:
        pump.close()
        raise
    if isinstance(first, Started):
        return first, pump.events(keepalive, gone)
    return None, pump.events(keepalive, gone, Signal.KEEPALIVE)
