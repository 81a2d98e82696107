"""Turning one choice's sampled tokens into the text a client sees.

A ``Choice`` is one answer being written: it decodes UTF-8 across token boundaries, cuts the
text at the first stop sequence (never streaming any part of one), counts tokens against
``max_tokens``, keeps log-probabilities when asked, and finally describes itself as a
``Completion``. Pure Python; the engine's compute thread feeds it tokens.
"""

from __future__ import annotations

import codecs
import time
from typing import Any, Callable

from llm_magic.wire.events import Completion, Event, TextDelta
from llm_magic.engine.llama_cpp.sampling import Logprobs, TokenSampler


class StopScanner:
    """Cuts generated text at the first stop sequence, holding back any tail that could be the
    start of one, so that no part of a stop sequence is ever streamed."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""
        self.matched: str | None = None  # the stop sequence the text was cut at

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [(i, stop) for stop in self.stops if (i := buf.find(stop)) >= 0]
        if hits:
            self.held = ""
            at, self.matched = min(hits, key=lambda hit: hit[0])
            return buf[:at], True
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


class Choice:
    """One answer of a request, written token by token."""

    def __init__(self, index: int, sampler: TokenSampler, *, max_tokens: int, stops: tuple[str, ...],
                 piece: Callable[[int], bytes], is_end: Callable[[int], bool],
                 emit: Callable[[Event], None], logprobs: Logprobs | None = None) -> None:
        self.index = index
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.logprobs = logprobs
        self._piece, self._is_end, self._emit = piece, is_end, emit
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._split = False  # the decoder holds the first bytes of a character
        self._scanner = StopScanner(stops)
        self._parts: list[str] = []
        self.generated = 0
        self.finish_reason: str | None = None  # set when the choice is complete
        self.first_token_at: float | None = None
        self.drafted = 0  # tokens guessed ahead for it (speculation.py), and of those, the ones it wrote
        self.accepted = 0
        self.ended_at: float | None = None

    def add(self, token: int, logits: Callable[[], Any]) -> bool:
        """Take the token sampled from ``logits()``; True when the choice is complete (an
        end-of-generation token, a stop sequence, or ``max_tokens``)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self._is_end(token):  # what was held back for a possible stop sequence was not one
            return self.cut("stop")
        self.generated += 1
        if self.logprobs is not None:
            self.logprobs.add(token, logits())
        text = self._decode(self._piece(token))
        if self._scanner.stops:
            text, stopped = self._scanner.feed(text)
            if stopped:
                self._send(text)
                return self._end("stop")
        if text:
            self._send(text)
        if self.generated >= self.max_tokens:
            return self.cut("length")
        return False

    def _decode(self, piece: bytes) -> str:
        # Most pieces are whole UTF-8 on their own: decoded directly, without the incremental
        # decoder's Python layer, needed (for the same text) only while a character spans tokens.
        if not self._split:
            try:
                return piece.decode()
            except UnicodeDecodeError:
                pass
        text = self._decoder.decode(piece)
        self._split = bool(self._decoder.getstate()[0])
        return text

    def cut(self, reason: str) -> bool:
        """End the choice where it is, sending what was held back for a possible stop sequence."""
        text, _ = self._scanner.feed(self._decoder.decode(b"", final=True))
        self._send(text + self._scanner.flush())
        return self._end(reason)

    def _send(self, text: str) -> None:
        if text:
            self._parts.append(text)
            self._emit(TextDelta(text, self.index, self.logprobs.take() if self.logprobs is not None else None))

    def _end(self, reason: str) -> bool:
        self.finish_reason = reason
        self.ended_at = time.perf_counter()
        return True

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def completion(self, model: str, prompt_tokens: int, cached: int, started: float) -> Completion:
        ended = self.ended_at or time.perf_counter()
        first = self.first_token_at or ended
        times = timings(prompt_tokens, cached, self.generated, started, first, ended)
        if self.drafted:  # as llama-server reports speculation
            times.update(draft_n=self.drafted, draft_n_accepted=self.accepted)
        return Completion(self.text, model, self.finish_reason or "length", prompt_tokens, self.generated, times,
                          cached_tokens=cached, index=self.index,
                          logprobs=self.logprobs.reported if self.logprobs is not None else None,
                          # an end token the sampler saw while thinking is not one of the answer's
                          reasoning_tokens=min(getattr(self.sampler, "reasoning_tokens", 0), self.generated),
                          stop_sequence=self._scanner.matched)

    def close(self) -> None:
        self.sampler.close()


def timings(prompt_n: int, cached: int, predicted_n: int, started: float, first: float, ended: float) -> dict:
    """llama.cpp server's ``timings`` object for one answer."""
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
