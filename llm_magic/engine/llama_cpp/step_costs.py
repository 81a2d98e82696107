"""What a decode step costs here, learned from the steps themselves, and so whether a draft pays.

llama.cpp computes a batch in passes ("ubatches"): with a KV cache per sequence, a pass holds
the same number of tokens of each of a run of consecutive sequences, so an answer's draft
beside other answers costs a pass of its own. A step then takes about ``per_pass × passes +
per_token × tokens``. Measured on 2 CPU cores (SmolLM2-135M): 13.8 ms a pass and 8.3 ms a token,
so verifying 8 drafted tokens costs as much as four plain steps, and a draft beside three other
answers as much as seven of their tokens. On a GPU a token costs a few percent of a pass. The
two figures are fitted to the recent steps that carried answers only (a prompt's chunk is
computed by other kernels), so the same rule drafts long on a GPU and sparingly on a CPU.
A step of one token (an answer alone, without a draft) is kept apart: on a CPU it costs less
than that line says (measured: 10.1 ms, where two tokens took 18.9 ms and each further token
5.0 ms), so a lone answer's drafted token is worth what its one-token step costs, and drafting
at all costs the step that difference more.

A drafted token is worth what the answer's token would otherwise cost: its share of a plain
step. ``draft_length`` keeps as many of a guess's tokens as pay for themselves at the answer's
acceptance rate. Pure Python; used from the scheduler's thread only.
"""

from __future__ import annotations

import collections
from typing import Sequence

WINDOW = 128  # steps the fit looks back on: enough to average noise, few enough to follow load
TOKEN_SHARE = 0.37  # before the steps tell: a token's share of a one-token step (the CPU above)
SPREAD = 1.5  # the steps must differ this much in tokens per pass before both figures are fitted


class StepCosts:
    """The seconds a pass and a token cost, fitted by least squares to the recent steps. The
    fit's sums are kept as steps come and go, so refitting costs the same however long the
    window (it runs in the step loop)."""

    def __init__(self) -> None:
        self._steps: collections.deque[tuple[int, int, float]] = collections.deque()
        # sums over the window of p, t, s, p*p, p*t, t*t, p*s, t*s (p passes, t tokens, s seconds)
        self._sums = [0.0] * 8
        self._ratios: collections.Counter[float] = collections.Counter()  # tokens per pass -> steps
        self._fit: tuple[float, float] | None = None
        # Steps noted but not yet in the sums: noting runs after every decode, when little of
        # Python is in the CPU's caches, so it only appends; they are added when a fit is wanted.
        self._new: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=WINDOW)
        self._singles: collections.deque[float] = collections.deque(maxlen=WINDOW)  # one-token steps' seconds

    def note(self, passes: int, tokens: int, seconds: float) -> None:
        """One step's shape and time (a step of answers and their drafts only)."""
        if passes == tokens == 1 and seconds > 0:
            self._singles.append(seconds)
        elif passes > 0 and seconds > 0:
            self._new.append((passes, tokens, seconds))
            self._fit = None

    def _add_new(self) -> None:
        new = self._new
        if len(new) == WINDOW:  # the window is made of these alone
            self._steps.clear()
            self._sums = [0.0] * 8
            self._ratios.clear()
        for step in new:
            if len(self._steps) == WINDOW:
                self._count(*self._steps.popleft(), sign=-1)
            self._steps.append(step)
            self._count(*step, sign=1)
        new.clear()

    def _count(self, p: int, t: int, s: float, sign: int) -> None:
        for i, term in enumerate((p, t, s, p * p, p * t, t * t, p * s, t * s)):
            self._sums[i] += sign * term
        ratio = t / p
        self._ratios[ratio] += sign
        if not self._ratios[ratio]:
            del self._ratios[ratio]

    @property
    def known(self) -> bool:
        return bool(self._steps or self._new or self._singles)

    def figures(self) -> tuple[float, float]:
        """(seconds per pass, seconds per token) of steps of several tokens; from the one-token
        steps and the prior share while there are none; (0, 0) before any step."""
        if self._new:
            self._add_new()
        if self._steps:
            if self._fit is None:
                self._fit = self._fitted()
            return self._fit
        one = self.single()
        return (one * (1 - TOKEN_SHARE), one * TOKEN_SHARE) if one else (0.0, 0.0)

    def single(self) -> float | None:
        """The seconds of a recent one-token step (their mean); None before one."""
        singles = self._singles
        return sum(singles) / len(singles) if singles else None

    def _fitted(self) -> tuple[float, float]:
        p, t, s, pp, pt, tt, ps, ts = self._sums
        det = pp * tt - pt * pt
        if max(self._ratios) >= SPREAD * min(self._ratios) and det > 0:
            per_pass, per_token = (tt * ps - pt * ts) / det, (pp * ts - pt * ps) / det
            if per_pass > 0 and per_token > 0:
                return per_pass, per_token
        # one shape of step so far (or a fit that makes no sense): split the time by the prior share
        one = s / ((1 - TOKEN_SHARE) * p + TOKEN_SHARE * t)
        return one * (1 - TOKEN_SHARE), one * TOKEN_SHARE


def passes(counts: Sequence[tuple[int, int]], n_ubatch: int, unified: bool) -> int:
    """How many passes llama.cpp makes of a batch holding ``counts`` (sequence, tokens), in
    sequence order: with one cache for all (``unified``) as many as it takes ``n_ubatch`` tokens
    at a time; with a cache per sequence, each pass takes the same number of tokens from a run
    of consecutive sequences (llama_batch_allocr::split_equal, sequential)."""
    if unified:
        return -(-sum(n for _, n in counts) // n_ubatch)
    if len(counts) == 1:  # one answer (the step loop's commonest case): its tokens a ubatch at a time
        return -(-counts[0][1] // n_ubatch) if counts[0][1] > 0 else 0
    left = {seq: n for seq, n in counts if n > 0}
    made = 0
    while left:
        run = []
        for seq in sorted(left):
            if run and seq != run[-1] + 1:
                break
            run.append(seq)
        take = max(1, min(min(left[s] for s in run), n_ubatch // len(run)))
        for seq in run:
            left[seq] -= take
            if left[seq] <= 0:
                del left[seq]
        made += 1
    return made


def draft_length(guess: int, accept: float, worth: float, per_token: float, extra_pass: float) -> int:
    """How many of a guess's ``guess`` tokens to verify (0: none): the length that gains the
    most, when each drafted token is taken with probability ``accept`` if the one before was,
    a token taken saves ``worth`` seconds, each costs ``per_token`` and drafting at all costs
    ``extra_pass`` (the pass it adds to the step, if any)."""
    best, best_gain, gain, kept = 0, 0.0, -extra_pass, 1.0
    for length in range(1, guess + 1):
        kept *= accept
        gain += kept * worth - per_token
        if gain > best_gain:
            best, best_gain = length, gain
    return best
