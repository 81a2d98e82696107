"""Guessing an answer's next tokens from its own history (n-gram speculation).

An answer that repeats what its prompt holds (``%llm fix`` rewriting a cell, an edited function,
a quote) is predictable: where the last few tokens written occurred before, the tokens that
followed them then are a good guess of what follows now. The scheduler puts such a guess (a
"draft") into the next decode step after the slot's next token, samples every drafted position
with the slot's own sampler chain, and keeps the drafted tokens up to the first one the chain
did not choose: the answer is token for token what it would be without drafts, only fewer
steps long. This is llama-server's prompt lookup (``--spec-type ngram-simple``).

Drafts cost compute, a lot on a CPU and little on a GPU, so how much of a guess is verified is
an economic choice (step_costs.py): each answer keeps an estimate of how often its drafted
tokens are taken, and a guess is kept only as far as its expected tokens pay for their cost
in the step. An answer whose guesses keep failing stops drafting; its estimate drifts back
towards the prior while it does not draft, so it tries again now and then. Pure Python; used
from the scheduler's thread only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from llm_magic.errors import InvalidRequest
from llm_magic.settings import SPEC_KINDS

NGRAM = 3  # tokens matched: long enough that a match predicts, short enough to find one
LONG_MATCH = 8  # a guess whose match runs this far back is a copy in progress: its odds are kept apart
# The estimates before any draft, (taken, refused): a short match's drafted token is taken 3 times
# in 5, a long one's 9 in 10 (a line being copied goes on as it went).
PRIORS = ((1.2, 0.8), (1.8, 0.2))
MEMORY = 0.7  # each draft's outcome weighs this much less at the next: the estimate follows the answer
RECOVERY = 0.9  # per step a guess was not drafted, the counts shrink towards the prior


@dataclass(frozen=True)
class SpecSettings:
    """The host's speculation settings (``--spec``, ``--spec-draft-max``, ``--spec-draft-min``)."""

    kind: str = "ngram"  # ngram | none
    draft_max: int = 16  # the most tokens guessed per step
    draft_min: int = 2  # a shorter guess is not tried: verifying it costs more than it saves
    model: Path | None = None  # --model-draft: a small GGUF of the same vocabulary guesses instead (draft_model.py)

    def __post_init__(self) -> None:
        if self.kind not in SPEC_KINDS:
            raise InvalidRequest(f"'--spec' must be {' or '.join(SPEC_KINDS)}, not {self.kind!r}")
        if not 1 <= self.draft_min <= self.draft_max:
            raise InvalidRequest(f"'--spec-draft-min' ({self.draft_min}) must be from 1 to '--spec-draft-max' "
                                 f"({self.draft_max})")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


class NgramDrafter:
    """One answer's guesses: an index of where each n-gram of its history (prompt and answer)
    last occurred, kept up to date as tokens are written, and how often its drafted tokens are
    taken (``accept``: the chance that a drafted token is taken when the one before it was),
    apart for guesses from short and from long matches."""

    def __init__(self, settings: SpecSettings) -> None:
        self._max, self._min = settings.draft_max, settings.draft_min
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> where the token after its latest occurrence is
        self._indexed = NGRAM  # history positions below this have their n-gram indexed
        self._counts = [[0.0, 0.0], [0.0, 0.0]]  # per match kind: recent drafted tokens taken, drafts cut short
        self._long = False  # whether the latest guess came from a long match
        self.drafted = 0  # totals for the answer's timings
        self.accepted = 0

    @property
    def accept(self) -> float:
        """The estimate for the latest guess's kind of match."""
        (taken, refused), (prior_taken, prior_refused) = self._counts[self._long], PRIORS[self._long]
        return (taken + prior_taken) / (taken + refused + prior_taken + prior_refused)

    def draft(self, history: Sequence[int], next_token: int) -> list[int]:
        """Tokens guessed to follow ``history`` (the slot's cached tokens) and ``next_token``
        (sampled, about to be decoded), at most ``--spec-draft-max``; empty without a guess
        of at least ``--spec-draft-min`` tokens."""
        self._index(history)
        if len(history) < NGRAM - 1:
            return []
        key = (*history[len(history) - NGRAM + 1:], next_token)
        start = self._after.get(key)
        if start is None:
            return []
        self._long = _matched(history, start) >= LONG_MATCH
        guess = list(history[start:start + self._max])
        if len(guess) < self._max and start + len(guess) == len(history):
            guess.append(next_token)  # the match runs into the present: its next token follows
        return guess if len(guess) >= self._min else []

    def _index(self, history: Sequence[int]) -> None:
        if len(history) < self._indexed - 1:  # the history was cut back (it never is mid-answer)
            self._after.clear()
            self._indexed = NGRAM
        after = self._after
        for end in range(self._indexed, len(history)):  # the n-gram ending before ``end``, and its successor there
            after[tuple(history[end - NGRAM:end])] = end
        self._indexed = max(self._indexed, len(history))

    def verified(self, drafted: int, accepted: int) -> None:
        """Note how many of ``drafted`` guessed tokens the sampler chose."""
        self.drafted += drafted
        self.accepted += accepted
        counts = self._counts[self._long]
        counts[0] = counts[0] * MEMORY + accepted
        counts[1] = counts[1] * MEMORY + (accepted < drafted)

    def passed(self) -> None:
        """A guess was not drafted (it would not pay): forget a little of what failed."""
        for counts in self._counts:
            counts[0] *= RECOVERY
            counts[1] *= RECOVERY


def _matched(history: Sequence[int], start: int) -> int:
    """How many tokens the match that guessed ``history[start:]`` spans: its n-gram, and as many
    tokens before it as agree with those before the present (at most LONG_MATCH)."""
    a, b, n = start - NGRAM - 1, len(history) - NGRAM, NGRAM
    while n < LONG_MATCH and a >= 0 and history[a] == history[b]:
        a, b, n = a - 1, b - 1, n + 1
    return n
