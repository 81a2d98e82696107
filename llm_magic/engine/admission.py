"""Admission: the line requests wait in before a backend takes them. A bounded FIFO queue in
front of a fixed number of seats, so that a busy host answers 503 with ``Retry-After`` instead of
piling up work, and nobody is overtaken."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Iterator

from llm_magic.errors import Cancelled, HostBusy
from llm_magic.settings import DEFAULTS


class Turnstile:
    """``capacity`` seats, taken first come, first served, with at most ``max_queue`` waiting.

    A generation holds one seat per answer it writes; a model switch holds them all."""

    def __init__(self, max_queue: int = DEFAULTS.max_queue, timeout: float = 600.0, capacity: int = 1) -> None:
        self.max_queue = max_queue
        self.timeout = timeout
        self.capacity = capacity
        self._cond = threading.Condition()
        self._held = 0
        self._queue: collections.deque[object] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def held(self) -> int:
        return self._held

    @property
    def busy(self) -> bool:
        return self._held > 0

    def acquire(self, seats: int = 1, cancel: threading.Event | None = None) -> None:
        """Take ``seats``; wait in line first if needed. Setting ``cancel`` leaves the line."""
        seats = min(seats, self.capacity)
        with self._cond:
            if self._queue or self._held + seats > self.capacity:
                if len(self._queue) >= self.max_queue:
                    raise HostBusy(
                        f"the host is busy: {len(self._queue)} requests are already waiting "
                        "(--max-queue); retry in a few seconds", retry_after=5)
                ticket = object()
                self._queue.append(ticket)
                try:
                    self._wait_for_head(ticket, seats, cancel)
                finally:
                    self._queue.remove(ticket)
                    self._cond.notify_all()  # the head of the line changed
            self._held += seats

    def release(self, seats: int = 1) -> None:
        with self._cond:
            self._held -= min(seats, self.capacity)
            self._cond.notify_all()

    @contextlib.contextmanager
    def turn(self, cancel: threading.Event | None = None, seats: int = 1) -> Iterator[None]:
        """Hold ``seats`` for the ``with`` block."""
        self.acquire(seats, cancel)
        try:
            yield
        finally:
            self.release(seats)

    def _wait_for_head(self, ticket: object, seats: int, cancel: threading.Event | None) -> None:
        deadline = time.monotonic() + self.timeout
        while self._held + seats > self.capacity or self._queue[0] is not ticket:
            if cancel is not None and cancel.is_set():
                raise Cancelled("the request was withdrawn while it waited")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HostBusy(f"the host stayed busy for {self.timeout:.0f} s; retry later", retry_after=30)
            self._cond.wait(min(remaining, 0.1))  # wakes on every release, and to look at cancel
