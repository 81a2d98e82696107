"""The per-token work of the engine's step loop. Each token's bookkeeping runs right after a
decode, when little of Python is in the CPU's caches, so the loop takes short cuts: greedy
answers choose with numpy's argmax instead of llama.cpp's chain, whole UTF-8 pieces are decoded
directly, end tokens are looked up once, step costs are added to their fit only when one is
wanted. Each short cut must give exactly what the general path gives."""

from __future__ import annotations

import codecs
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from llm_magic.engine.llama_cpp.backend import LlamaCppBackend
from llm_magic.engine.llama_cpp.decoding import Choice
from llm_magic.engine.llama_cpp.loading import ModelKey, load_model
from llm_magic.engine.llama_cpp.sampling import TokenSampler
from llm_magic.engine.llama_cpp.step_costs import WINDOW, StepCosts
from llm_magic.wire.events import Completion, TextDelta
from llm_magic.wire.types import GenerationRequest, Sampling


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Iterator[object]:
    model = load_model(ModelKey(model_path, 512, 0))
    yield model.vocab
    model.close()


def chosen(vocab: object, sampling: Sampling, logits: np.ndarray, argmax: bool | None = None) -> int:
    sampler = TokenSampler(vocab, sampling, seed=1)
    if argmax is not None:
        sampler._argmax = argmax  # the general path (llama.cpp's chain), for comparison
    try:
        return sampler.sample_from(logits)
    finally:
        sampler.close()


def test_greedy_takes_the_short_cut_only_with_nothing_else_to_apply(vocab: object) -> None:
    def short_cut(**settings) -> bool:
        sampler = TokenSampler(vocab, Sampling(**settings), seed=1)
        try:
            return sampler._argmax
        finally:
            sampler.close()

    assert short_cut(temperature=0)
    assert not short_cut(temperature=0.7)
    assert not short_cut(temperature=0, repeat_penalty=1.1)
    assert not short_cut(temperature=0, presence_penalty=0.5)
    assert not short_cut(temperature=0, logit_bias=((5, 3.0),))
    grammar = TokenSampler(vocab, Sampling(temperature=0), seed=1, grammar='root ::= "yes"')
    banned = TokenSampler(vocab, Sampling(temperature=0), seed=1, banned=(1, 2))
    try:
        assert not grammar._argmax and not banned._argmax
    finally:
        grammar.close()
        banned.close()


def test_greedys_short_cut_chooses_what_llama_cpps_chain_chooses_ties_included(vocab: object) -> None:
    rng = np.random.default_rng(7)
    n_vocab = TokenSampler(vocab, Sampling(temperature=0), seed=1)._n_vocab
    cases = [rng.normal(size=n_vocab).astype(np.float32) for _ in range(20)]
    tied = np.zeros(n_vocab, dtype=np.float32)
    tied[[900, 40, 7000]] = 5.0  # equal best logits: llama.cpp's greedy keeps the first, as argmax does
    banned = rng.normal(size=n_vocab).astype(np.float32)
    banned[: n_vocab // 2] = -np.inf
    for logits in [*cases, tied, banned]:
        fast = chosen(vocab, Sampling(temperature=0), logits)
        assert fast == chosen(vocab, Sampling(temperature=0), logits, argmax=False) == int(np.argmax(logits))
    assert chosen(vocab, Sampling(temperature=0), tied) == 40


def choice_of(pieces: dict[int, bytes], stops: tuple[str, ...] = (), max_tokens: int = 100) -> tuple[Choice, list]:
    sent: list = []
    sampler = type("Sampler", (), {"close": lambda self: None})()
    return Choice(0, sampler, max_tokens=max_tokens, stops=stops, piece=pieces.__getitem__,  # type: ignore[arg-type]
                  is_end=lambda token: token == 0, emit=sent.append), sent


def test_text_is_decoded_across_token_boundaries_as_the_incremental_decoder_does() -> None:
    # "café ", a character split over three tokens, invalid bytes, an emoji in two halves
    pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9 ", 4: b"\xe2\x82", 5: b"\xac!", 6: b"\xff", 7: b"ok", 8: b"\xf0\x9f",
              9: b"\x98\x80", 10: b"\x80x", 11: b"\xc3"}
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 7, 11]
    choice, sent = choice_of(pieces)
    for token in tokens:
        assert not choice.add(token, lambda: None)
    assert choice.cut("length")
    reference = codecs.getincrementaldecoder("utf-8")(errors="replace")
    expected = "".join(reference.decode(pieces[t]) for t in tokens) + reference.decode(b"", final=True)
    assert choice.text == expected == "café €!\ufffdok😀\ufffdxok\ufffd"
    assert "".join(event.text for event in sent) == expected
    assert all(isinstance(event, TextDelta) and event.text for event in sent)  # no empty deltas


def test_a_stop_sequence_still_cuts_the_text_and_an_end_token_ends_it() -> None:
    pieces = {1: b"one ", 2: b"tw", 3: b"o three", 4: b"four"}
    choice, sent = choice_of(pieces, stops=("two",))
    assert not choice.add(1, lambda: None)
    assert choice.add(2, lambda: None) is False  # "tw" may start the stop sequence: held back
    assert choice.add(3, lambda: None)
    assert choice.text == "one " and choice.finish_reason == "stop" and choice._scanner.matched == "two"
    choice, _ = choice_of(pieces)
    choice.add(4, lambda: None)
    assert choice.add(0, lambda: None) and choice.text == "four" and choice.finish_reason == "stop"


def test_step_costs_added_when_wanted_fit_what_they_would_if_added_at_once() -> None:
    rng = np.random.default_rng(3)
    steps = [(int(p), int(t), 0.0138 * p + 0.0083 * t + float(rng.normal(0, 0.0005)))
             for p, t in zip(rng.integers(1, 4, 300), rng.integers(1, 8, 300))]
    for seen in (5, WINDOW, WINDOW + 1, 300):
        costs = StepCosts()
        for i, step in enumerate(steps[:seen]):
            costs.note(*step)
            if i % 37 == 0:  # figures asked for now and then, as drafting does
                costs.figures()
        several = [step for step in steps[:seen] if step[:2] != (1, 1)]  # one-token steps are kept apart
        window = np.array(several[-WINDOW:], dtype=float)
        (per_pass, per_token), *_ = np.linalg.lstsq(window[:, :2], window[:, 2], rcond=None)
        assert costs.figures() == pytest.approx((per_pass, per_token), rel=1e-6)
        singles = [s for p, t, s in steps[:seen] if (p, t) == (1, 1)][-WINDOW:]
        assert costs.single() == (pytest.approx(sum(singles) / len(singles)) if singles else None)


# -- through the real engine ----------------------------------------------------------------


def test_a_greedy_answer_and_a_penalised_one_through_the_engine(model_path: Path) -> None:
    """Greedy takes the short cut and a repetition penalty the chain: a greedy answer is the same
    each time, and the penalised one differs from it, so the penalty is not short-cut away."""
    engine = LlamaCppBackend(model_path, parallel=2)
    try:
        def text(sampling: Sampling) -> str:
            request = GenerationRequest(prompt="List the numbers: one, one, one,", sampling=sampling)
            events = list(engine.generate(request, threading.Event()))
            assert isinstance(events[-1], Completion)
            return events[-1].text

        plain = text(Sampling(max_tokens=24, temperature=0))
        assert plain == text(Sampling(max_tokens=24, temperature=0))
        assert text(Sampling(max_tokens=24, temperature=0, repeat_penalty=1.5)) != plain
    finally:
        engine.close()
