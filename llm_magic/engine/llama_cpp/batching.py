"""Continuous batching: several requests decode together in one llama.cpp context.

One thread (the ``Scheduler``'s) drives the context. Each step is one ``llama_decode`` of a
batch that carries the next token of every answer being written, plus a chunk of the prompt of
any request that has just arrived, so a new request starts at once instead of after the others.
A prompt read alone goes in whole batches (``--batch-size``) as llama-server reads it; beside
answers being written it goes in chunks paced to a step of about a second, so their streams
keep flowing while a long prompt is read. An answer's next token may come with a guess of the
tokens after it (from n-grams, speculation.py, or a draft model, draft_model.py), verified in
the same step. The context holds ``parallel`` sequences ("slots"), each with a KV cache that can
hold the whole context, so one long conversation can still use all of it and no answer attends
over what is decoded beside it (see ``BatchContext``). A slot keeps its tokens in
the cache after its request ends; the next request takes the free slot whose tokens share the
longest prefix with its prompt, so several people's conversations each keep their cache. If the
cache is ever full (slots that share one, when memory is short), idle slots give theirs up
first, then new prompts wait; a running answer is never cut off for newer work (only if the
answers being written fill it on their own does the newest of them end, as at a context's end).

A request with ``n`` choices holds ``n`` slots: its prompt is read once, in the first, and
copied to the others (``llama_memory_seq_cp``) before each samples its own answer.

Which slot a request takes, and which gives up its cache, is ``slots.SlotPool``'s choice.

Other jobs (switching the context to a newly loaded model, embeddings) run in the same thread
between two steps: ggml's CPU threads are an OpenMP team per calling thread, and two threads
that compute in turn keep two teams that fight for the cores. Imports llama_cpp lazily, like ``loading.py``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from llm_magic.engine.llama_cpp.decoding import Choice
from llm_magic.engine.llama_cpp.draft_model import DraftModel
from llm_magic.engine.llama_cpp.slots import Slot, SlotPool
from llm_magic.engine.llama_cpp.speculation import NgramDrafter, SpecSettings
from llm_magic.engine.llama_cpp.step_costs import StepCosts, draft_length, passes
from llm_magic.errors import EngineError, LLMMagicError, ModelLoadError
from llm_magic.engine.llama_cpp.sampling import logits_at
from llm_magic.wire.events import Signal

log = logging.getLogger("llm_magic.engine")

# Beside answers being written, a prompt is read in chunks sized so that a step takes about
# PROMPT_STEP_SECONDS: they double while a step takes less and halve past twice that. Measured
# on 2 cores (SmolLM2-135M): 32-token chunks read 131 tokens/s, 64 196, 128 and more 205-220,
# a whole batch 202. In a server, with the streams' threads beside it, half-second steps read a
# 2,000-token prompt in 1.16x llama-server's time and one-second steps in 1.01x. Alone, a prompt
# is read a whole batch (--batch-size) per step, as llama-server does.
PROMPT_CHUNK_MIN = 64
PROMPT_STEP_SECONDS = 1.0
FIRST_TEXT_WAIT = 1.0  # the longest a lone generation pauses for its first text to go out
N_BATCH = 2048  # tokens one decode takes at most (llama-server's default -b)
N_UBATCH = 512  # tokens llama.cpp computes at once (llama-server's default -ub)

FLASH_ATTENTION = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type


DROPPED = Signal.END  # what a task's events end with when it was withdrawn before it finished


class BatchContext:
    """A llama.cpp context for ``n_seq`` sequences of up to ``n_ctx`` tokens each, and the
    batch that feeds it.

    Each sequence has a KV cache of its own (``unified=False``), so that what a request
    computes does not depend on what is decoded beside it: with one cache shared by all
    sequences, llama.cpp's attention runs over the others' (masked) cells too, and the rounding
    then depends on where they are, enough to change greedy answers (seen with flash attention
    and with it off). It costs ``n_seq`` times the memory of one cache; ``unified=True``
    shares one cache of ``n_ctx`` between all sequences instead."""

    def __init__(self, model: Any, *, n_ctx: int, n_seq: int, threads: int, flash_attention: str = "auto",
                 unified: bool = False, batch_size: int = N_BATCH, ubatch_size: int = N_UBATCH) -> None:
        import llama_cpp

        self._lib = lib = llama_cpp
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx if unified else n_ctx * n_seq
        params.n_batch, params.n_ubatch = batch_size, min(ubatch_size, batch_size)
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = FLASH_ATTENTION[flash_attention]
        params.kv_unified = unified
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(model, params)
        if not self.ctx:
            raise ModelLoadError(f"llama.cpp could not make a context of {params.n_ctx} tokens "
                                 f"({n_seq} sequences); there may not be memory enough")
        self.memory = lib.llama_get_memory(self.ctx)
        # the most one sequence holds (llama.cpp may round the context up; the owner's --ctx holds)
        self.n_ctx = min(lib.llama_n_ctx_seq(self.ctx), n_ctx)
        self.n_batch = lib.llama_n_batch(self.ctx)
        self.n_ubatch = lib.llama_n_ubatch(self.ctx)
        self.n_seq = n_seq
        self.unified = unified
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
        # the batch's arrays, looked up once: each is a ctypes pointer indexed per token
        b = self._batch
        self._token, self._pos, self._logits = b.token, b.pos, b.logits
        self._seq_ids = [b.seq_id[i] for i in range(self.n_batch)]  # each token's one sequence
        for i in range(self.n_batch):
            b.n_seq_id[i] = 1
        self.size = 0

    def clear(self) -> None:
        self.size = 0

    def add(self, token: int, pos: int, seq: int, output: bool) -> int:
        """Put one token in the batch; its index there (where its logits will be, if ``output``)."""
        i = self.size
        self._token[i], self._pos[i], self._logits[i] = token, pos, output
        self._seq_ids[i][0] = seq
        self.size = i + 1
        return i

    def decode(self) -> int:
        """llama_decode's status: 0 done, 1 no room in the KV cache (nothing was done), else an error."""
        self._batch.n_tokens = self.size
        return self._lib.llama_decode(self.ctx, self._batch)

    def forget(self, seq: int, start: int = 0) -> bool:
        """Drop ``seq``'s cached tokens from position ``start`` on; False if it cannot be cut there."""
        return bool(self._lib.llama_memory_seq_rm(self.memory, seq, start, -1))

    def copy(self, source: int, target: int) -> None:
        self._lib.llama_memory_seq_cp(self.memory, source, target, -1, -1)

    def close(self) -> None:
        if self.ctx:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self.ctx)
            self.ctx = None


@dataclass(eq=False)
class Task:
    """One request on its way through the scheduler: a prompt and the choices to write."""

    tokens: list[int]
    choices: list[Choice]
    finish: Callable[["Task"], None]  # sends the completion(s), once every choice is complete
    cancel: threading.Event
    events: "queue.SimpleQueue[Any]" = field(default_factory=queue.SimpleQueue)
    closed: Callable[["Task"], None] | None = None  # called once, however the task ends
    tool_format: str | None = None
    reasoning: Any = None  # the answer's ReasoningFormat (wire/reasoning.py), if it may think
    first_text_passed: threading.Event | None = None  # set by the consumer once it sent the first text
    slots: list["Slot"] = field(default_factory=list)
    read: int = 0  # prompt tokens in the KV cache of the first slot
    cached: int = 0  # of those, found there when the task began
    started: float = 0.0
    arrived: float = field(default_factory=time.perf_counter)
    handed_off: bool = False  # its first text went out (see FIRST_TEXT_WAIT)
    kept_logits: Any = None  # its prompt's logits, kept by its slot: nothing to decode
    request_id: str | None = None  # the server's id for the request (shown by /slots)
    speculative: bool = True  # its answers may be drafted ahead (speculation.py); False: one token per step

    @property
    def reading(self) -> bool:
        return self.read < len(self.tokens)

    def close(self) -> None:
        for choice in self.choices:
            choice.close()
        closed, self.closed = self.closed, None
        if closed is not None:
            closed(self)


class ComputeThread:
    """The thread llama.cpp computes in, started at the first thing handed to it: other threads
    put tasks and jobs in its ``inbox``, and ``serve`` (the scheduler's loop) takes them out."""

    def __init__(self, serve: Callable[[], None]) -> None:
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._serve = serve
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def put(self, item: Any) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="llm-magic-compute", daemon=True)
                self._thread.start()
            self.inbox.put(item)

    def call(self, job: Callable[[], Any], timeout: float = 3600.0) -> Any:
        """Run ``job`` in the thread and return its result (or raise its exception here)."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:  # handed to the waiting thread
                    future.set_exception(exc)

        self.put(run)
        return future.result(timeout=timeout)  # a job ends on its own; this only bounds the wait

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread after what it was already given (``None`` in the inbox: the end)."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self.inbox.put(None)
        if thread is not None:
            thread.join(timeout)


class Scheduler:
    """The one thread that drives llama.cpp, stepping every running request together."""

    def __init__(self, spec: SpecSettings | None = None) -> None:
        self.spec = spec or SpecSettings(kind="none")
        self._drafts_off = False  # the KV cache was full with drafts in the step: the next goes without
        self.draft_model: DraftModel | None = None  # --model-draft's, which drafts instead of n-grams
        self._compute = ComputeThread(self._serve)
        self.context: BatchContext | None = None
        self._pool = SlotPool(None)
        self._slots: list[Slot] = self._pool.slots  # the pool's own list, read every step
        self._pending: collections.deque[Task] = collections.deque()
        self._running: list[Task] = []
        self._chunk = PROMPT_CHUNK_MIN
        self._hold_new = False  # the KV cache was full: no new task until one ends
        self._costs = StepCosts()  # what this context's steps cost, to size the drafts

    # -- from other threads --------------------------------------------------------------

    def submit(self, task: Task) -> None:
        """Queue ``task``; its events arrive on ``task.events``."""
        self._compute.put(task)

    def call(self, job: Callable[[], Any], timeout: float = 3600.0) -> Any:
        """Run ``job`` in the scheduler's thread, between two steps, and return its result."""
        return self._compute.call(job, timeout)

    @property
    def generating(self) -> bool:
        """Whether answers are being written or wait for a slot (read from other threads)."""
        return bool(self._running or self._pending)

    @property
    def alive(self) -> bool:
        return self._compute.alive

    @property
    def pool(self) -> SlotPool:
        """The slots now (read from other threads only through ``SlotPool.snapshot``)."""
        return self._pool

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread after what it was already given."""
        self._compute.stop(timeout)

    # -- in the scheduler's thread -------------------------------------------------------

    def attach(self, context: BatchContext | None, draft_model: DraftModel | None = None) -> None:
        """Drive ``context`` (and draft with ``draft_model``) from now on (None: none). Only between requests."""
        for task in [*self._running, *self._pending]:
            self._drop(task)
        self._pending.clear()
        self.context, self.draft_model, self._costs = context, draft_model, StepCosts()
        self._pool = SlotPool(context)
        self._slots = self._pool.slots

    def _serve(self) -> None:
        inbox = self._compute.inbox
        while True:
            # between steps, what was handed in meanwhile (asked for: no exception per step)
            while not inbox.empty() or not self.generating:
                item = inbox.get()
                if item is None:
                    self.attach(None)
                    return
                if isinstance(item, Task):
                    self._pending.append(item)
                else:
                    try:
                        item()
                    except Exception:  # a job reports its own failures; this keeps the thread
                        log.exception("a compute job failed")
            if self.generating:
                try:
                    self._step()
                except Exception as exc:  # a fault of ours or llama.cpp's: fail what runs, go on
                    log.exception("a decode step failed")
                    for task in list(self._running):
                        self._fail(task, exc)

    def _step(self) -> None:
        for task in [t for t in [*self._running, *self._pending] if t.cancel.is_set()]:
            self._drop(task)
        if self._pending:
            self._assign()
        ctx, running = self.context, self._running
        if ctx is None or not running:
            return
        for task in [t for t in running if t.kept_logits is not None]:
            logits, task.kept_logits = task.kept_logits, None
            self._begin(task, lambda slot, logits=logits: self._sample(slot, -1, logits))
        if not running:
            return
        ctx.clear()
        reading = [t for t in running if t.read < len(t.tokens)]
        if len(reading) > 1:
            reading.sort(key=lambda t: t.arrived)
        # drafts leave a prompt being read at least its smallest chunk of the ubatch
        room = ctx.n_ubatch - PROMPT_CHUNK_MIN if reading else ctx.n_batch
        writing = add_answers(ctx, self._slots, None if self._drafts_off else self.spec, room, self.draft_model,
                              self._costs)
        # beside answers being written, in chunks that keep them flowing (within one ubatch)
        budget = min(self._chunk, ctx.n_ubatch - ctx.size) if writing else ctx.n_batch
        chunks = add_prompt_chunks(ctx, reading, budget)
        started = time.perf_counter()
        status = ctx.decode()
        if status == 1:
            if any(draft for _, _, draft in writing):
                self._drafts_off = True  # first try again without guesses
            else:
                self._make_room()
            return
        self._drafts_off = False
        if status != 0:
            raise EngineError(f"llama.cpp could not decode (status {status})")
        if chunks and writing:
            self._chunk = paced(self._chunk, time.perf_counter() - started, ctx.n_ubatch)
        elif writing:  # a step of answers alone: what its shape costs
            self._costs.note(passes([(s.seq, 1 + len(d)) for s, _, d in writing], ctx.n_ubatch, ctx.unified),
                             ctx.size, time.perf_counter() - started)
        for task, n, index in chunks:
            lead = task.slots[0]
            lead.cache.extend(task.tokens[task.read:task.read + n])
            task.read += n
            if index >= 0:  # the prompt is read: every choice samples its first token from it
                self._begin(task, lambda slot, index=index: self._sample(slot, index))
        for slot, index, draft in writing:
            verify(ctx, slot, index, draft, self._sample)
        if len(self._running) == 1:
            task = self._running[0]
            if task.first_text_passed is not None and not task.handed_off and any(c.text for c in task.choices):
                # Alone, the next decode would take every core from the threads that must send
                # the first text (ours, the client's, a tunnel's): let them, briefly.
                task.handed_off = True
                task.first_text_passed.wait(FIRST_TEXT_WAIT)

    def _begin(self, task: Task, first: Callable[[Slot], None]) -> None:
        """The prompt is in the first slot's cache: copy it to the others (n > 1), and let
        every choice take its first token with ``first(slot)``."""
        self._pool.share_prompt(task)
        for slot in list(task.slots):
            if slot.task is task:  # the task may have failed at an earlier choice
                first(slot)

    def _sample(self, slot: Slot, index: int, kept: Any = None) -> None:
        """Sample the slot's next token from the batch's ``index``-th logits (or logits its cache
        ``kept``) and write it: per token, right after a decode, so in few calls."""
        ctx, choice, task = self.context, slot.choice, slot.task  # the task as it was before writing
        assert ctx is not None
        if choice is None:  # its task failed earlier in this step
            return
        try:
            if kept is not None:
                self._advance(slot, kept, choice.sampler.sample_from(kept))
            else:
                token = choice.sampler.sample(ctx.ctx, index)
                self._advance(slot, functools.partial(logits_at, ctx.ctx, index, ctx.n_vocab), token)
        except Exception as exc:
            self._write_failed(task, exc)

    def _write_failed(self, task: Task | None, exc: Exception) -> None:
        """Writing a token of ``task`` failed (a grammar that allows no token): that task fails
        alone and every other answer goes on."""
        if not isinstance(exc, LLMMagicError):
            log.exception("sampling failed", exc_info=exc)
        if task is not None and (task in self._running or any(s.task is task for s in self._slots)):
            self._fail(task, exc)

    def _advance(self, slot: Slot, logits: Any, token: int) -> None:
        """Write ``token``, chosen from ``logits`` (an array, or a function that returns it)."""
        choice, task = slot.choice, slot.task
        assert choice is not None and task is not None
        logits_of = logits if callable(logits) else (lambda: logits)
        if choice.add(token, logits_of):
            self._pool.release(slot, kept=logits_of().copy() if callable(logits) else logits)
            if all(c.finish_reason is not None for c in task.choices):
                self._end(task)
        else:
            slot.next_token = token

    def _assign(self) -> None:
        """Give waiting tasks, first come first served, the free slots that suit them best."""
        if not self._running:  # (with nothing pending it waits: a new task comes through here)
            self._hold_new = False
        while self._pending and not self._hold_new:
            task = self._pending[0]
            free = self._pool.free()
            if len(free) < len(task.choices):
                return
            self._pending.popleft()
            if self.context is None:
                self._fail(task, EngineError("no model is loaded"))
                continue
            self._pool.seat(task, free)
            self._running.append(task)

    def _make_room(self) -> None:
        """The KV cache is full. Idle slots give up their cached tokens first (the longest
        unused first); then the newest task still reading its prompt waits again, and no new
        task starts until one ends; only when the answers being written fill the cache on
        their own does the newest of them end, as an answer does that reaches the context's end."""
        if self._pool.evict_idle():
            return
        self._hold_new = True
        reading = [t for t in self._running if t.reading]
        if reading:
            task = max(reading, key=lambda t: t.arrived)
            for slot in task.slots:
                self._pool.empty(slot)
            task.slots, task.read = [], 0
            self._running.remove(task)
            self._pending.appendleft(task)
            log.info("the KV cache is full: a request waits for others to finish")
            return
        slot = self._pool.newest_writing()
        if slot is not None:
            task = slot.task
            assert slot.choice is not None and task is not None
            log.warning("the KV cache is full: the newest answer ends here")
            slot.choice.cut("length")
            self._pool.empty(slot)
            if all(c.finish_reason is not None for c in task.choices):
                self._end(task)

    def _end(self, task: Task) -> None:
        self._running.remove(task)
        self._hold_new = False
        task.close()  # counted before its answer goes out, so /health agrees with what clients saw
        task.finish(task)

    def _drop(self, task: Task) -> None:
        """Withdraw a task (its client left): free its slots, keeping what they cached."""
        self._pool.release_all(task)
        if task in self._running:
            self._running.remove(task)
            self._hold_new = False
        elif task in self._pending:
            self._pending.remove(task)
        task.close()
        task.events.put(DROPPED)

    def _fail(self, task: Task, exc: BaseException) -> None:
        """End a task with ``exc``; its slots forget their caches, which it may have left half written."""
        self._pool.release_all(task, forget=True)
        if task in self._running:
            self._running.remove(task)
        task.close()
        task.events.put(exc if isinstance(exc, LLMMagicError) else
                        EngineError(f"generation failed ({type(exc).__name__}); see the host's log"))


def add_answers(ctx: BatchContext, slots: list[Slot], spec: SpecSettings | None, room: int,
                draft_model: DraftModel | None = None, costs: StepCosts | None = None) -> list[tuple[Slot, int, list[int]]]:
    """Put every answer's next token into the batch, each followed by its draft if it has one
    (``spec``: None, no drafts; all of them and their drafts within ``room`` tokens; guessed by
    ``draft_model`` if there is one, else from n-grams, as far as they pay at ``costs``): for
    each answer, its slot, the batch index of that token and the drafted tokens."""
    answers = [slot for slot in slots if slot.next_token is not None]
    room -= len(answers)  # every answer's next token has its place (the batch holds --parallel)
    if spec is None or room <= 0:
        guesses: dict[int, list[int]] = {}
    elif draft_model is not None:
        guesses = model_guesses(draft_model, ctx, answers, spec, room)
    else:
        guesses = ngram_guesses(ctx, answers, spec, room, costs or StepCosts())
    writing = []
    for slot in answers:
        pos = len(slot.cache)
        index = ctx.add(slot.next_token, pos, slot.seq, True)  # type: ignore[arg-type]
        draft = guesses.get(slot.seq, [])
        for i, token in enumerate(draft, pos + 1):
            ctx.add(token, i, slot.seq, True)
        writing.append((slot, index, draft))
    return writing


def ngram_guesses(ctx: BatchContext, answers: list[Slot], spec: SpecSettings, room: int,
                  costs: StepCosts) -> dict[int, list[int]]:
    """Each answer's n-gram guess, cut to the length that pays (step_costs.py), within ``room``
    tokens in all: slot number -> tokens; none before a step's cost is known."""
    if not costs.known:
        return {}
    # every answer's history is indexed each step; the economics only where there is a guess
    found = [(slot, guess) for slot in answers
             if (guess := drafted(slot, spec, min(room, ctx.n_ctx - len(slot.cache) - 2)))]
    if not found:
        return {}
    per_pass, per_token = costs.figures()
    counts = {slot.seq: 1 for slot in answers}

    def shape_passes() -> int:
        return passes(sorted(counts.items()), ctx.n_ubatch, ctx.unified)

    plain = shape_passes()
    worth = (per_pass * plain + per_token * len(answers)) / len(answers)  # an answer's share of a plain step
    jump = 0.0  # what drafting at all adds to the step besides the drafted tokens and any pass
    alone = costs.single() if len(answers) == 1 else None
    if alone is not None:  # a plain step of one token costs less than the line through longer ones
        worth, jump = alone, max(0.0, per_pass + per_token - alone)
    guesses = {}
    for slot, guess in found:
        guess = guess[:room]
        if len(guess) < spec.draft_min:
            continue
        before = shape_passes()
        counts[slot.seq] += len(guess)
        extra = shape_passes() - before
        counts[slot.seq] -= len(guess)
        length = draft_length(len(guess), slot.drafter.accept, worth, per_token, extra * per_pass + jump)
        if length < spec.draft_min:
            slot.drafter.passed()
            continue
        guesses[slot.seq] = guess[:length]
        counts[slot.seq] += length
        room -= length
    return guesses


def model_guesses(draft_model: DraftModel, ctx: BatchContext, answers: list[Slot], spec: SpecSettings,
                  room: int) -> dict[int, list[int]]:
    """The draft model's guesses for the answers that may be drafted, within ``room`` tokens in
    all: slot number -> tokens. A draft model that fails makes no guesses (the answers go on)."""
    wanted = []
    for slot in answers:
        most = draft_room(slot, spec, min(room, ctx.n_ctx - len(slot.cache) - 2))
        if most:
            wanted.append((slot.seq, slot.cache, slot.next_token, most))
            room -= most
    try:
        return draft_model.propose(wanted)  # type: ignore[arg-type]
    except EngineError as exc:
        log.warning("%s", exc.message)
    except Exception:  # a fault of ours or llama.cpp's in drafting: never the answers'
        log.exception("the draft model failed; no drafts for a while")
        draft_model.reset()
    return {}


def verify(ctx: BatchContext, slot: Slot, index: int, draft: list[int], sample: Callable[[Slot, int], None]) -> None:
    """Write the answer's next token (``index`` in the batch) and as many of its drafted tokens
    as its sampler chooses in turn (``sample``), each from the logits after the one before: the
    answer is what it would be without the draft. The drafted tokens not chosen leave the KV cache."""
    task, choice = slot.task, slot.choice
    if choice is None:  # its task failed earlier in this step (another of its choices): nothing to write
        return
    slot.cache.append(slot.next_token)  # type: ignore[arg-type]
    choice.drafted += len(draft)
    accepted = 0
    sample(slot, index)
    while accepted < len(draft) and slot.task is task and slot.next_token == draft[accepted]:
        slot.cache.append(draft[accepted])  # already decoded: its logits are in this batch
        accepted += 1
        choice.accepted += 1
        sample(slot, index + accepted)
    if draft:
        if accepted < len(draft) or slot.task is not task:
            ctx.forget(slot.seq, len(slot.cache))  # the cache holds what the answer wrote, no more
        if slot.drafter is not None and slot.task is task:
            slot.drafter.verified(len(draft), accepted)


def draft_room(slot: Slot, spec: SpecSettings, room: int) -> int:
    """How many tokens the slot's answer may have drafted now (0: none), at most ``room``."""
    task, choice = slot.task, slot.choice
    if task is None or choice is None or not task.speculative or not spec.enabled:
        return 0
    room = min(room, spec.draft_max, choice.max_tokens - choice.generated - 1)  # none past the answer's end
    return room if room >= spec.draft_min else 0


def drafted(slot: Slot, spec: SpecSettings, room: int) -> list[int]:
    """The slot's guess (from n-grams) of the tokens after its next one, at most ``room`` of them."""
    room = draft_room(slot, spec, room)
    if not room:
        return []
    if slot.drafter is None:
        slot.drafter = NgramDrafter(spec)
    return slot.drafter.draft(slot.cache, slot.next_token)[:room]  # type: ignore[arg-type]


def add_prompt_chunks(ctx: BatchContext, tasks: list[Task], budget: int) -> list[tuple[Task, int, int]]:
    """Put up to ``budget`` prompt tokens of ``tasks``, first come first, into the batch: for
    each task, how many it got and the batch index of its prompt's last token (-1 if not yet)."""
    chunks = []
    for task in tasks:
        if budget <= 0:
            break
        n = min(budget, len(task.tokens) - task.read)
        seq, end = task.slots[0].seq, task.read + n
        index = -1
        for pos in range(task.read, end):
            index = ctx.add(task.tokens[pos], pos, seq, pos == len(task.tokens) - 1)
        chunks.append((task, n, index if end == len(task.tokens) else -1))
        budget -= n
    return chunks


def paced(chunk: int, seconds: float, n_ubatch: int) -> int:
    """The next prompt chunk's size beside answers being written: as large as keeps a step
    near ``PROMPT_STEP_SECONDS``, so that their streams keep flowing while the prompt is read."""
    if seconds < PROMPT_STEP_SECONDS:
        return min(chunk * 2, n_ubatch)
    if seconds > 2 * PROMPT_STEP_SECONDS:
        return max(chunk // 2, PROMPT_CHUNK_MIN)
    return chunk
