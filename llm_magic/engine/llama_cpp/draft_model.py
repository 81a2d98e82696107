"""Drafts from a small model (``--model-draft``): speculative decoding with a second GGUF.

A small model of the same family (the same tokenizer) guesses each answer's next tokens, and the
scheduler verifies the guesses in the large model's next step exactly as it verifies n-gram
guesses (speculation.py): every drafted position is sampled with the answer's own sampler chain,
so the answer is token for token what the large model alone writes. On a GPU, where a step of a
7B model is bound by reading its weights, checking 8 guesses costs about one step and a 0.5B
draft model's steps cost a fraction of one: the accepted guesses are nearly free tokens.

The draft model has a context of its own, one sequence per slot, each holding what that slot's
answer has written so far (prompt and answer). Before each step every drafting slot's sequence is
brought up to date (what the large model rejected is cut away, what it wrote is read), then the
draft model writes greedily for all slots at once, one batched decode per drafted position, and
a slot stops guessing when the draft model is no longer sure (its likeliest token below
``P_MIN``, llama.cpp's default), since an unsure guess is likely refused.

Used from the scheduler's thread only. Imports llama_cpp lazily, like ``loading.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from llm_magic.engine.llama_cpp.sampling import logits_at
from llm_magic.engine.llama_cpp.slots import common_prefix
from llm_magic.errors import EngineError, InvalidRequest

log = logging.getLogger("llm_magic.engine")

P_MIN = 0.75  # a guess the draft model is less sure of than this is not made (llama.cpp's --draft-p-min)
VOCAB_SIZE_SLACK = 128  # vocabularies may differ in this many (padding) tokens, as llama.cpp allows
VOCAB_CHECK_FROM = 5  # the first few ids are special tokens that families number differently
REST_STEPS = 64  # steps without drafts after the draft model failed


@dataclass(frozen=True)
class Vocabulary:
    """What two models must share for one to draft for the other."""

    kind: int  # llama_vocab_type: SPM, BPE, ...
    size: int
    bos: int
    eos: int
    text: Callable[[int], bytes]  # a token's text


def vocabulary(lib: Any, model: Any) -> Vocabulary:
    """A loaded llama.cpp model's vocabulary (``model`` is a ``llama_model`` pointer)."""
    vocab = lib.llama_model_get_vocab(model)
    return Vocabulary(lib.llama_vocab_type(vocab), lib.llama_vocab_n_tokens(vocab), lib.llama_vocab_bos(vocab),
                      lib.llama_vocab_eos(vocab), lambda token: lib.llama_vocab_get_text(vocab, token) or b"")


def vocabulary_mismatch(model: Vocabulary, draft: Vocabulary) -> str | None:
    """Why ``draft`` cannot draft for ``model`` (their tokens mean different things), or None."""
    if model.kind != draft.kind:
        return "its tokenizer is of another kind"
    if abs(model.size - draft.size) > VOCAB_SIZE_SLACK:
        return f"it has {draft.size} tokens, the model {model.size}"
    if (model.bos, model.eos) != (draft.bos, draft.eos):
        return "its start and end tokens are others"
    for token in range(VOCAB_CHECK_FROM, min(model.size, draft.size)):
        ours, theirs = model.text(token), draft.text(token)
        if ours != theirs:
            return (f"token {token} is {theirs.decode('utf-8', 'replace')!r} there and "
                    f"{ours.decode('utf-8', 'replace')!r} in the model")
    return None


def check_draft_vocabulary(model: Vocabulary, draft: Vocabulary, name: str) -> None:
    """Refuse a draft model whose guesses would be other tokens than they seem."""
    why = vocabulary_mismatch(model, draft)
    if why:
        raise InvalidRequest(f"'--model-draft' {name} cannot draft for this model: {why}. A draft model must "
                             "share the model's tokenizer: a smaller model of the same family "
                             "(Qwen2.5-0.5B-Instruct for Qwen2.5-7B-Instruct, say)")


class DraftModel:
    """The draft model's context and what each slot's sequence in it holds."""

    def __init__(self, context: Any, n_vocab: int, model: Any = None) -> None:
        import numpy

        self._np = numpy
        self.context = context  # a BatchContext (batching.py) over the draft model
        self._model = model  # the draft model's weights (a LlamaCppModel), freed with it
        self._n_vocab = n_vocab  # tokens both models have: a guess is never one the model lacks
        self._resting = 0  # steps left without drafts after a failure
        self._held: dict[int, list[int]] = {}  # slot -> the tokens its sequence holds

    def propose(self, wanted: Sequence[tuple[int, list[int], int, int]]) -> dict[int, list[int]]:
        """For each ``(slot, history, next_token, most)``: up to ``most`` tokens guessed to follow
        ``history + [next_token]``, the slot's answer so far."""
        if self._resting:
            self._resting -= 1
            return {}
        if not wanted:
            return {}
        ctx = self.context
        last = self._catch_up(wanted)  # slot -> batch index of its last token's logits
        limits = {slot: most for slot, _, _, most in wanted}
        guesses: dict[int, list[int]] = {slot: [] for slot in last}
        while last:
            chosen = {}
            for slot, index in last.items():
                token, sure = self._likeliest(index)
                if sure < P_MIN:
                    continue
                guesses[slot].append(token)
                if len(guesses[slot]) < limits[slot]:
                    chosen[slot] = token  # decoded, so the next guess can follow it
            if not chosen:
                break
            ctx.clear()
            last = {}
            for slot, token in chosen.items():
                held = self._held[slot]
                last[slot] = ctx.add(token, len(held), slot, True)
                held.append(token)
            self._decode()
        return guesses

    def _catch_up(self, wanted: Sequence[tuple[int, list[int], int, int]]) -> dict[int, int]:
        """Bring each slot's sequence up to its answer so far, at most a ubatch of tokens a step
        (a long prompt is read over several steps, beside the streams, as the model reads it);
        for each slot caught up, the batch index of its next token (where its first guess is)."""
        ctx = self.context
        budget = ctx.n_ubatch
        behind: list[tuple[int, list[int], int]] = []  # slot, history tokens to read, where they start
        ready: list[tuple[int, int, int]] = []  # slot, its next token's position, the token
        for slot, history, next_token, _ in wanted:
            held = self._held.setdefault(slot, [])
            n = len(held)
            same = n if n <= len(history) and held == history[:n] else common_prefix(held, history)
            if same < n:  # what the model refused, or another request's tokens
                if not ctx.forget(slot, same):  # a cache that cannot be cut there: read it all again
                    ctx.forget(slot)
                    same = 0
                del held[same:]
            missing = history[same:]
            take = min(len(missing), budget)
            budget -= take
            if take:
                behind.append((slot, missing[:take], same))
            if take == len(missing):
                ready.append((slot, len(history), next_token))
        ctx.clear()
        for slot, tokens, start in behind:  # no logits wanted: in whole batches
            for i, token in enumerate(tokens):
                if ctx.size == ctx.n_batch:
                    self._decode()
                    ctx.clear()
                ctx.add(token, start + i, slot, False)
            self._held[slot].extend(tokens)
        if ctx.size:
            self._decode()
        ctx.clear()  # then every caught-up slot's next token, its logits wanted: one batch (--parallel fit)
        last = {slot: ctx.add(token, pos, slot, True) for slot, pos, token in ready}
        for slot, _, token in ready:
            self._held[slot].append(token)
        if last:
            self._decode()
        return last

    def _decode(self) -> None:
        status = self.context.decode()
        if status != 0:
            self.reset()
            raise EngineError(f"the draft model could not decode (status {status}); no drafts for "
                              f"{REST_STEPS} steps")

    def reset(self) -> None:
        """Start every sequence again after a failure (what they hold is no longer known), and
        draft nothing for a while: a failure that recurs costs one try in REST_STEPS steps."""
        self._held.clear()
        for slot in range(self.context.n_seq):
            self.context.forget(slot)
        self._resting = REST_STEPS

    def _likeliest(self, index: int) -> tuple[int, float]:
        """The draft model's likeliest next token at batch ``index``, and its probability."""
        logits = logits_at(self.context.ctx, index, self._n_vocab)
        token = int(logits.argmax())
        return token, float(1.0 / self._np.exp(logits - logits[token]).sum())

    def close(self) -> None:
        self._held.clear()
        self.context.close()
        if self._model is not None:
            self._model.close()
