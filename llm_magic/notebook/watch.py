"""Watching a host from the notebook: its slots and pace as text (``%llm_host status``,
``%llm status``), and ``%llm_host top``, a view that redraws in place (one display handle)
until the cell is interrupted, with a plot of tokens/s and busy slots over the last minutes
(matplotlib where it is installed, else a text sparkline)."""

from __future__ import annotations

import collections
import io
import time
from typing import Any, Callable

from IPython.display import display

SPARKS = "▁▂▃▄▅▆▇█"
HISTORY_SECONDS = 300.0  # what the plot shows: the last five minutes


def sparkline(values: list[float], width: int = 60) -> str:
    """``values`` (the last ``width`` of them) as a line of block characters, 0 at the bottom."""
    values = values[-width:]
    top = max(values, default=0.0)
    if top <= 0:
        return SPARKS[0] * len(values)
    return "".join(SPARKS[min(len(SPARKS) - 1, int(v / top * (len(SPARKS) - 1) + 0.5))] for v in values)


def slots_text(slots: dict[str, Any]) -> str:
    """``/slots`` as lines: the summary, then one line per slot."""
    lines = [f"slots {slots.get('slots_busy', 0)} of {slots.get('slots_total', '?')} busy · "
             f"waiting {slots.get('queue', 0)} · {slots.get('tokens_per_second', 0.0):.1f} tokens/s"]
    for slot in slots.get("slots") or ():
        cache = slot.get("cache_tokens")
        line = f"  {slot.get('id')!s:>3}  {slot.get('state', '?'):<15}" + (f"cache {cache:>6}" if cache is not None else "")
        request = slot.get("request")
        if request:
            line += (f"  {str(request.get('id'))[:12]:<12}  {request.get('route') or '':<22} "
                     f"{request.get('tokens', 0):>5} tokens  {request.get('tokens_per_second', 0.0):6.1f} tok/s")
        lines.append(line.rstrip())
    return "\n".join(lines)


class TopView:
    """The live view: each refresh asks ``fetch()`` for ``/slots``, keeps the pace and the busy
    slots over the last minutes, and redraws one output in place."""

    def __init__(self, fetch: Callable[[], dict[str, Any]], title: str) -> None:
        self.fetch, self.title = fetch, title
        self.history: collections.deque[tuple[float, float, int]] = collections.deque()  # (time, tokens/s, busy)
        self.handle: Any = None
        self.refreshes = 0

    def refresh(self) -> None:
        slots = self.fetch()
        now = time.monotonic()
        self.history.append((now, float(slots.get("tokens_per_second") or 0.0), int(slots.get("slots_busy") or 0)))
        while self.history and now - self.history[0][0] > HISTORY_SECONDS:
            self.history.popleft()
        bundle = self.bundle(slots)
        if self.handle is None:
            self.handle = display(bundle, raw=True, display_id=True)
        else:
            self.handle.update(bundle, raw=True)
        self.refreshes += 1

    def bundle(self, slots: dict[str, Any]) -> dict[str, Any]:
        rates = [rate for _, rate, _ in self.history]
        busy = [float(b) for _, _, b in self.history]
        text = (f"{self.title} — {time.strftime('%H:%M:%S')}\n{slots_text(slots)}\n\n"
                f"tokens/s    {sparkline(rates)}  (peak {max(rates, default=0.0):.1f})\n"
                f"busy slots  {sparkline(busy)}  (of {slots.get('slots_total', '?')})")
        bundle: dict[str, Any] = {"text/plain": text}
        png = _plot(self.history, slots.get("slots_total"))
        if png is not None:
            bundle["image/png"] = png
        return bundle

    def run(self, refreshes: int | None, interval: float) -> None:
        """Refresh every ``interval`` s, ``refreshes`` times (None: until the cell is interrupted)."""
        try:
            while refreshes is None or self.refreshes < refreshes:
                self.refresh()
                if refreshes is None or self.refreshes < refreshes:
                    time.sleep(interval)
        except KeyboardInterrupt:  # the way to stop it: interrupt the cell
            print(f"(stopped after {self.refreshes} refreshes)")


def _plot(history: collections.deque, slots_total: Any) -> bytes | None:
    """A small PNG of tokens/s and busy slots over the history, if matplotlib is installed."""
    try:
        from matplotlib.figure import Figure  # no pyplot: the notebook's own backend stays as it is
    except ImportError:
        return None
    if len(history) < 2:
        return None
    start = history[-1][0]
    seconds = [t - start for t, _, _ in history]
    figure = Figure(figsize=(6, 1.8), dpi=80)
    rate_axes = figure.add_subplot()
    rate_axes.plot(seconds, [r for _, r, _ in history], color="tab:blue")
    rate_axes.set_ylabel("tokens/s")
    rate_axes.set_xlabel("seconds ago")
    busy_axes = rate_axes.twinx()
    busy_axes.step(seconds, [b for _, _, b in history], color="tab:orange", where="post")
    busy_axes.set_ylabel("busy slots")
    if isinstance(slots_total, int):
        busy_axes.set_ylim(0, max(1, slots_total))
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
