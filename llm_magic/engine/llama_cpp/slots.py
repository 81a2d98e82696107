"""The context's sequences ("slots"): which one a new request takes, and which give up their
cache when the KV cache is full.

A slot keeps its tokens in the KV cache after its request ends; the next request takes the
free slot whose tokens share the longest prefix with its prompt, so that several people's
conversations each keep their cache, and a prompt a slot holds exactly is answered from the
logits kept with it, without a decode. When the cache is full, an idle slot gives its tokens
up first, the one unused the longest. Used from the scheduler's thread only, between steps:
nothing here runs per token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llm_magic.engine.llama_cpp.decoding import Choice

if TYPE_CHECKING:
    from llm_magic.engine.llama_cpp.batching import BatchContext, Task


@dataclass(eq=False)
class Slot:
    """One sequence of the context: the tokens it holds in the KV cache, and what it writes."""

    seq: int
    cache: list[int] = field(default_factory=list)
    task: Task | None = None
    choice: Choice | None = None
    next_token: int | None = None  # sampled, not yet in the cache
    last_used: float = 0.0
    # The logits that follow the cache's last token, kept when an answer ends: a request whose
    # prompt is exactly the cache samples from them instead of decoding its last token again.
    logits: Any = None
    drafter: Any = None  # its answer's NgramDrafter (speculation.py), made at its first draft


class SlotPool:
    """The slots of one context, and the moves that hand them out and take them back."""

    def __init__(self, context: BatchContext | None) -> None:
        self.context = context
        self.slots: list[Slot] = [Slot(seq) for seq in range(context.n_seq)] if context is not None else []

    def free(self) -> list[Slot]:
        return [s for s in self.slots if s.task is None]

    def seat(self, task: Task, free: list[Slot]) -> None:
        """Give ``task`` one of the ``free`` slots per choice: first the one that suits its
        prompt best (see ``best_slot``), its cache cut back to what the prompt shares; then the
        ones unused the longest. The task reads its prompt from where that cache ends."""
        ctx = self.context
        assert ctx is not None
        lead = best_slot(free, task.tokens)
        shared = common_prefix(lead.cache, task.tokens)
        if shared == len(task.tokens) == len(lead.cache) and lead.logits is not None:
            keep, task.kept_logits = shared, lead.logits  # all of it, and what follows it
        else:
            keep = min(shared, len(task.tokens) - 1)  # the last token is read again for its logits
        if keep < len(lead.cache) and not ctx.forget(lead.seq, keep):
            ctx.forget(lead.seq)
            keep = 0
        del lead.cache[keep:]
        others = sorted((s for s in free if s is not lead), key=lambda s: s.last_used)
        task.slots = [lead, *others[: len(task.choices) - 1]]
        now = time.perf_counter()
        for slot, choice in zip(task.slots, task.choices):
            slot.task, slot.choice, slot.next_token, slot.last_used, slot.logits = task, choice, None, now, None
            slot.drafter = None
        task.read = task.cached = keep
        task.started = now

    def share_prompt(self, task: Task) -> None:
        """The prompt is in the task's first slot: copy it to the others (``n`` > 1)."""
        assert self.context is not None
        lead = task.slots[0]
        for slot in task.slots[1:]:
            self.context.forget(slot.seq)
            self.context.copy(lead.seq, slot.seq)
            slot.cache = list(lead.cache)

    @staticmethod
    def release(slot: Slot, kept: Any = None) -> None:
        """Free ``slot``, keeping its cache (and ``kept``, the logits that follow it)."""
        slot.task, slot.choice, slot.next_token, slot.logits = None, None, None, kept
        slot.last_used = time.perf_counter()

    def empty(self, slot: Slot) -> None:
        """Free ``slot`` and forget its cache (what it held is not to be trusted, or needed)."""
        if self.context is not None:
            self.context.forget(slot.seq)
        slot.cache = []
        self.release(slot)

    def release_all(self, task: Task, forget: bool = False) -> None:
        """Free every slot ``task`` still holds; with ``forget``, their caches too."""
        for slot in task.slots:
            if slot.task is task:
                if forget:
                    self.empty(slot)
                else:
                    self.release(slot)

    def evict_idle(self) -> bool:
        """Make room in a full KV cache from an idle slot, the one unused the longest: whether
        there was one."""
        idle = [s for s in self.slots if s.task is None and s.cache]
        if not idle:
            return False
        assert self.context is not None
        slot = min(idle, key=lambda s: s.last_used)
        self.context.forget(slot.seq)
        slot.cache, slot.logits = [], None
        return True

    def snapshot(self) -> list[dict[str, Any]]:
        """Each slot as ``/slots`` shows it. Read from any thread, without a lock: each field
        is one attribute read, so the compute thread is never held up (what it shows may be a
        step old, never broken)."""
        now = time.perf_counter()
        rows: list[dict[str, Any]] = []
        for slot in list(self.slots):
            task, choice = slot.task, slot.choice
            row: dict[str, Any] = {"id": slot.seq, "state": "idle", "cache_tokens": len(slot.cache)}
            if task is not None:
                generated = choice.generated if choice is not None else 0
                first = choice.first_token_at if choice is not None else None
                rate = generated / (now - first) if first is not None and now > first and generated else 0.0
                row.update(state="reading_prompt" if task.reading else "writing", request_id=task.request_id,
                           prompt_tokens=len(task.tokens), tokens=generated, tokens_per_second=round(rate, 1))
            rows.append(row)
        return rows

    def cache_cells(self, shared: bool = False) -> tuple[int, int]:
        """KV cache cells in use (tokens the slots hold) and the room in all: a cache per slot,
        or with ``shared`` one for them all."""
        ctx = self.context
        used = sum(len(slot.cache) for slot in list(self.slots))
        return used, (0 if ctx is None else ctx.n_ctx if shared else ctx.n_ctx * ctx.n_seq)

    def newest_writing(self) -> Slot | None:
        """The slot writing the answer of the newest request, if any."""
        writing = [s for s in self.slots if s.choice is not None]
        return max(writing, key=lambda s: s.task.arrived if s.task else 0.0) if writing else None


def best_slot(free: list[Slot], tokens: list[int]) -> Slot:
    """The free slot to write an answer to ``tokens`` in. One whose cache starts this prompt
    for at least half of the cache or half of the prompt (a conversation going on; a prompt
    varied at its end), with the longest such start; else one with nothing cached, else the one
    unused the longest. Sharing a little (a system prompt) is no reason to take a slot: its
    cache holds someone else's conversation. Among equal starts, the slot with the least else
    cached (a prompt it holds exactly needs no decode at all)."""
    shared = [(n, slot) for slot in free if (n := common_prefix(slot.cache, tokens))
              and (2 * n >= len(slot.cache) or 2 * n >= len(tokens))]
    if shared:
        return max(shared, key=lambda pair: (pair[0], -len(pair[1].cache)))[1]
    return min(free, key=lambda slot: (bool(slot.cache), slot.last_used))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
