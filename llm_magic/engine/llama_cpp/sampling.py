"""Choosing each request's next token with llama.cpp's own sampler chains.

Every request (every choice of a request with ``n > 1``) gets a chain of its own, so requests
decoded in one batch keep their own parameters, seed, grammar and repetition history. The chain
is the one llama-cpp-python builds for ``Llama.generate`` (penalties, then greedy, or top-k,
typical, top-p, min-p, temperature and a seeded draw), so greedy answers and seeded samples are
token for token those of llama-cpp-python. Sampling runs in C (``llama_sampler_sample``), plain
greedy as numpy's argmax (the same token, sooner); only a grammar adds Python work, and only when
the grammar refuses the token the chain chose.
Called from the engine's compute thread only. Imports llama_cpp lazily, like ``loading.py``.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Callable, Sequence

from llm_magic.errors import EngineError, InvalidRequest
from llm_magic.wire.types import Sampling, TokenLogprob

PENALTY_LAST_N = 64  # tokens the repetition penalties look back on (llama-cpp-python's default)

# How many of the likeliest tokens a grammar is asked about, in turn, before the whole
# vocabulary (asking about all ~50,000 takes ~8 ms here; about 2,000, a thirtieth of that).
SHORTLISTS = (64, 2048)


class TokenSampler:
    """One request's sampler chain, and its grammar if the request constrains its output.

    With a grammar, the token is chosen the way llama.cpp's own server does it: the chain
    chooses without the grammar, the grammar is asked about that token only, and only when it
    refuses is the grammar applied, first to a shortlist of the likeliest tokens, then to the
    whole vocabulary. Greedy answers are the same as applying the grammar to every token: the
    likeliest token is taken when the grammar allows it, else the likeliest it allows."""

    def __init__(self, vocab: Any, sampling: Sampling, seed: int, grammar: str | None = None,
                 banned: Sequence[int] = ()) -> None:
        import llama_cpp

        self._lib = lib = llama_cpp
        self._n_vocab = lib.llama_vocab_n_tokens(vocab)
        self.chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        self.rules = None
        # Without repetition penalties the chain keeps no history, so it may choose in C (which
        # also notes the token) before the grammar is asked: a refused token leaves no trace.
        self._choose_in_c = (sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty) == (1.0, 0.0, 0.0)
        # Greedy with nothing else to apply (no grammar, bias or penalty): the chain's choice is
        # the first of the largest logits, which numpy finds in a seventh of the time llama.cpp
        # takes to copy the vocabulary into its candidates (9 vs 65 us a token for 49,152 tokens:
        # a percent of a decode step of a small model), and the chain keeps nothing of it.
        self._argmax = (grammar is None and not banned and not sampling.logit_bias and sampling.temperature == 0
                        and self._choose_in_c)
        try:
            for stage in _stages(lib, self._n_vocab, sampling, seed, banned):
                lib.llama_sampler_chain_add(self.chain, stage)
            if grammar is not None:
                self.rules = lib.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
                if not self.rules:
                    raise InvalidRequest("llama.cpp could not compile the structured-output grammar")
        except BaseException:
            self.close()
            raise

    def _arrays(self) -> None:
        """Candidate arrays for choosing in Python, made once per request when first needed."""
        if hasattr(self, "_all"):
            return
        lib = self._lib
        self._all = (lib.llama_token_data * self._n_vocab)()
        self._all_array = lib.llama_token_data_array(data=self._all, size=self._n_vocab, selected=-1, sorted=False)
        self._one = (lib.llama_token_data * 1)()
        self._one_array = lib.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        self._shortlists = []
        for size in SHORTLISTS:
            data = (lib.llama_token_data * size)()
            self._shortlists.append((data, lib.llama_token_data_array(data=data, size=size, selected=-1, sorted=False)))

    def sample(self, ctx: Any, index: int) -> int:
        """The next token, from the logits of the batch's ``index``-th output; the chain (and
        grammar) take note of it."""
        if self._argmax:
            return int(logits_at(ctx, index, self._n_vocab).argmax())
        if self.rules is None:
            return self._lib.llama_sampler_sample(self.chain, ctx, index)  # chooses and accepts
        if self._choose_in_c:
            first = self._lib.llama_sampler_sample(self.chain, ctx, index)  # the chain noted it
            return self._sample_constrained(logits_at(ctx, index, self._n_vocab), first, noted=True)
        return self._sample_constrained(logits_at(ctx, index, self._n_vocab), None, noted=False)

    def sample_from(self, logits: Any) -> int:
        """The next token from logits kept aside (a slot's, for a prompt it holds exactly)."""
        if self._argmax:
            return int(logits.argmax())
        self._arrays()
        if self.rules is not None:
            return self._sample_constrained(logits, None, noted=False)
        token = self._choose(self._all, self._all_array, logits, None)
        assert token is not None
        self._lib.llama_sampler_accept(self.chain, token)
        return token

    def _sample_constrained(self, logits: Any, token: int | None, noted: bool) -> int:
        import numpy as np

        lib = self._lib
        self._arrays()
        if token is None:
            token = self._choose(self._all, self._all_array, logits, None)
        self._one[0].id, self._one[0].logit, self._one[0].p = token, float(logits[token]), 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        lib.llama_sampler_apply(self.rules, ctypes.byref(self._one_array))
        if not np.isfinite(self._one[0].logit):  # refused: the grammar first, then the chain
            token = next((t for data, array in self._shortlists
                          if (t := self._choose(data, array, logits, self.rules)) is not None), None)
            if token is None:  # none of the likeliest is allowed: ask about every token
                token = self._choose(self._all, self._all_array, logits, self.rules)
                if token is None:
                    raise InvalidRequest("the structured-output grammar allows no next token here: the schema "
                                         "may ask for something no text satisfies")
        lib.llama_sampler_accept(self.rules, token)
        if not noted:
            lib.llama_sampler_accept(self.chain, token)
        return token

    def _choose(self, data: Any, array: Any, logits: Any, rules: Any) -> int | None:
        """A token sampled by the chain from ``data`` filled with the likeliest ``len(data)``
        tokens (all of them, in vocabulary order, when ``data`` is the whole vocabulary), after
        ``rules`` if given; None when ``rules`` allow none of them."""
        import numpy as np

        lib = self._lib
        view = np.ctypeslib.as_array(data)  # the C structs as a numpy record array
        size = len(view)
        if size == self._n_vocab:
            view["id"], view["logit"] = np.arange(self._n_vocab), logits
        else:
            best = np.argpartition(logits, -size)[-size:]
            view["id"], view["logit"] = best, logits[best]
        view["p"] = 0.0
        array.data = ctypes.cast(data, type(array.data))  # a sampler may have pointed it elsewhere
        array.size, array.selected, array.sorted = size, -1, False
        if rules is not None:
            lib.llama_sampler_apply(rules, ctypes.byref(array))
            if not np.isfinite(view["logit"][: array.size]).any():
                return None
        lib.llama_sampler_apply(self.chain, ctypes.byref(array))
        if array.selected < 0:
            raise EngineError("llama.cpp's sampler chose no token")
        return int(array.data[array.selected].id)

    def close(self) -> None:
        if self.rules:
            self._lib.llama_sampler_free(self.rules)
            self.rules = None
        if self.chain:
            self._lib.llama_sampler_free(self.chain)
            self.chain = None


def _stages(lib: Any, n_vocab: int, s: Sampling, seed: int, banned: Sequence[int] = ()) -> list[Any]:
    """The samplers of llama-cpp-python's ``Llama._init_sampler``, in its order, after
    OpenAI's ``logit_bias`` when the request has one (llama-server puts it first too) and the
    ``banned`` tokens (ones a grammar would always refuse: banned up front, the chain rarely
    chooses a token the grammar then refuses, which costs a search of the likeliest)."""
    stages: list[Any] = []
    if s.logit_bias or banned:
        bad = next((token for token, _ in s.logit_bias if not 0 <= token < n_vocab), None)
        if bad is not None:
            raise InvalidRequest(f"'logit_bias': token {bad} is not in the model's vocabulary (0 to {n_vocab - 1})")
        entries = [*s.logit_bias, *((token, -100) for token in banned)]
        biases = (lib.llama_logit_bias * len(entries))()
        for entry, (token, bias) in zip(biases, entries):
            # OpenAI: -100 bans the token; an added -100 alone might not, against a peaked distribution
            entry.token, entry.bias = token, float("-inf") if bias <= -100 else bias
        stages.append(lib.llama_sampler_init_logit_bias(n_vocab, len(entries), biases))  # llama.cpp copies them
    stages.append(lib.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, s.repeat_penalty,
                                                   s.frequency_penalty, s.presence_penalty))
    if s.temperature < 0:
        stages.append(lib.llama_sampler_init_dist(seed))
    elif s.temperature == 0:
        stages.append(lib.llama_sampler_init_greedy())
    else:
        stages += [lib.llama_sampler_init_top_k(s.top_k), lib.llama_sampler_init_typical(1.0, 1),
                   lib.llama_sampler_init_top_p(s.top_p, 1), lib.llama_sampler_init_min_p(s.min_p, 1),
                   lib.llama_sampler_init_temp(s.temperature), lib.llama_sampler_init_dist(seed)]
    return stages


def logits_at(ctx: Any, index: int, n_vocab: int) -> Any:
    """The logits of the batch's ``index``-th output, as a numpy view (valid until the next decode)."""
    import numpy as np

    address = _logits_address()(ctx, index)
    if not address:
        raise EngineError(f"llama.cpp has no logits for output {index} of the batch")
    # from the address, not np.ctypeslib.as_array: its casts and array interface per call took
    # 40 us a token right after a decode, when little of Python is still in the CPU's caches
    return np.frombuffer((ctypes.c_float * n_vocab).from_address(address), dtype=np.float32)


@functools.cache
def _logits_address() -> Callable[[Any, int], int | None]:
    """llama_get_logits_ith, returning the address as an int (a prototype of our own: the
    llama_cpp module's returns a ctypes pointer)."""
    import llama_cpp

    function = llama_cpp.llama_cpp._lib["llama_get_logits_ith"]  # a new function object, not llama_cpp's
    function.argtypes, function.restype = [ctypes.c_void_p, ctypes.c_int32], ctypes.c_void_p
    return function


class Logprobs:
    """Log-probabilities of generated tokens, read from the logits only when a request asks.
    They are of the model's own distribution (before temperature and other samplers), as
    OpenAI and vLLM report them."""

    def __init__(self, top: int, n_vocab: int, piece: Callable[[int], bytes]) -> None:
        self._top, self._n_vocab, self._piece = top, n_vocab, piece
        self._pending: list[TokenLogprob] = []  # tokens whose text is not out yet
        self.reported: list[TokenLogprob] = []

    def _entry(self, token: int, logprob: float) -> tuple[str, float, bytes]:
        raw = self._piece(token)
        return raw.decode("utf-8", errors="replace"), logprob, raw

    def add(self, token: int, logits: Any) -> None:
        """Note ``token``, chosen from ``logits``."""
        import numpy as np

        logits = logits.astype(np.float64)
        peak = logits.max()
        logprobs = logits - (peak + np.log(np.exp(logits - peak).sum()))
        top: tuple = ()
        if self._top:
            best = np.argpartition(-logprobs, self._top)[: self._top]
            best = best[np.argsort(-logprobs[best])]
            top = tuple(self._entry(int(t), float(logprobs[t])) for t in best)
        text, logprob, raw = self._entry(token, float(logprobs[token]))
        self._pending.append(TokenLogprob(text, logprob, raw, top))

    def take(self) -> tuple[TokenLogprob, ...]:
        """The tokens noted since the last call: those that made the text about to be sent (a
        held-back token goes with the next text)."""
        entries, self._pending = tuple(self._pending), []
        self.reported.extend(entries)
        return entries
