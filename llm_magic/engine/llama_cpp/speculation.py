"""Guessing an answer's next tokens from its own history (n-gram speculation).

An answer that repeats what its prompt holds (``%llm fix`` rewriting a cell, an edited function,
a quote) is predictable: where the last few tokens written occurred before, the tokens that
followed them then are a good guess of what follows now. The scheduler puts such a guess (a
"draft") into the next decode step after the slot's next token, samples every drafted position
with the slot's own sampler chain, and keeps the drafted tokens up to the first one the chain
did not choose: the answer is token for token what it would be without drafts, only fewer
steps long. This is llama-server's prompt lookup (``--spec-type ngram-simple``), with a draft
length that adapts per slot.

Drafts cost: on a CPU, verifying 8 drafted tokens takes about four single steps (measured on
2 cores: 12 ms for one token, 47 ms for nine), on a GPU little more than one. So a slot drafts
only while its drafts pay: the length doubles while whole drafts are accepted, shrinks to what
was accepted otherwise, and a slot whose drafts keep failing waits longer and longer before it
tries again. Pure Python; used from the scheduler's thread only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from llm_magic.errors import InvalidRequest
from llm_magic.settings import SPEC_KINDS

NGRAM = 3  # tokens matched: long enough that a match predicts, short enough to find one
MAX_PAUSE = 64  # the most steps a failing slot waits before it drafts again


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
    last occurred, kept up to date as tokens are written, and the draft length that pays now."""

    def __init__(self, settings: SpecSettings) -> None:
        self._max, self._min = settings.draft_max, settings.draft_min
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> where the token after its latest occurrence is
        self._indexed = NGRAM  # history positions below this have their n-gram indexed
        self.length = min(4, self._max)  # the next draft's length: it starts modest
        self._failures = 0
        self._pause = 0  # steps to wait before the next draft
        self.drafted = 0  # totals for the answer's timings
        self.accepted = 0

    def draft(self, history: Sequence[int], next_token: int) -> list[int]:
        """Tokens guessed to follow ``history`` (the slot's cached tokens) and ``next_token``
        (sampled, about to be decoded); empty when there is no guess worth verifying."""
        self._index(history)
        if self._pause:
            self._pause -= 1
            return []
        if len(history) < NGRAM - 1:
            return []
        key = (*history[len(history) - NGRAM + 1:], next_token)
        start = self._after.get(key)
        if start is None:
            return []
        guess = list(history[start:start + self.length])
        if len(guess) < self.length and start + len(guess) == len(history):
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
        """Note how many of ``drafted`` guessed tokens the sampler chose, and adapt."""
        self.drafted += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.length = min(self._max, self.length * 2)
            self._failures = 0
        elif accepted >= self._min:  # as long as what was accepted: longer ones cost more than they bring
            self.length = max(self._min, accepted)
            self._failures = 0
        else:  # the guess did not pay: wait 1, 2, 4, ... steps before the next
            self.length = max(self._min, min(4, self._max))
            self._pause = min(MAX_PAUSE, 2 ** self._failures)
            self._failures += 1
