"""Speculative decoding: n-gram drafts verified in the batch, against the real SmolLM2 model.

Greedy answers with drafts equal those without, token for token. Two things about llama.cpp's
CPU flash attention shape these tests (see the README): the sequences stay under 256 KV cells,
since past that a lone one-token step is computed by a split-KV kernel whose rounding differs in
the last bits from a step of several tokens; and each comparison starts from the same cache
(``warm``), since a prompt read in one batch and the same prompt's last token read again after
it was cached differ in those bits too."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from llm_magic.engine.llama_cpp.backend import LlamaCppBackend
from llm_magic.engine.llama_cpp import batching, step_costs
from llm_magic.engine.llama_cpp.slots import Slot
from llm_magic.engine.llama_cpp.speculation import NgramDrafter, SpecSettings
from llm_magic.engine.llama_cpp.step_costs import StepCosts, draft_length, passes
from llm_magic.errors import InvalidRequest
from llm_magic.wire.events import Completion
from llm_magic.wire.openai import parse_chat
from llm_magic.wire.types import GenerationRequest, ResponseFormat, Sampling

CELL = '''def mean(values):
    total = 0.0
    for value in values:
        total += value
    return total / len(values)
'''
EDIT = ({"role": "user", "content": "Here is a Python cell:\n\n```python\n" + CELL + "```\n\nRewrite the cell with "
                                   "the function mean renamed to average. Reply with the whole cell in a code block."},)
PROSE = ({"role": "user", "content": "Tell me about the sea."},)


# -- the drafter alone -------------------------------------------------------------------------


def test_a_passage_seen_before_is_guessed_from_where_it_was() -> None:
    drafter = NgramDrafter(SpecSettings(draft_max=4, draft_min=2))
    history = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]
    assert drafter.draft(history, 3) == [4, 5, 6, 7]  # after 1 2 3 came 4 5 6 7 ...: up to --spec-draft-max
    assert drafter.draft(history + [3, 4, 5], 6) == [7, 8, 9, 1]  # the index grows with the history


def test_no_guess_without_a_match_or_when_it_is_too_short() -> None:
    assert NgramDrafter(SpecSettings(draft_max=8, draft_min=4)).draft([1, 2, 3, 4, 5], 6) == []  # 4 5 6: never before
    # 1 2 3 was followed by 1 2 (and now 3): shorter than 4
    assert NgramDrafter(SpecSettings(draft_max=8, draft_min=4)).draft([5, 1, 2, 3, 1, 2], 3) == []
    assert NgramDrafter(SpecSettings(draft_max=8, draft_min=2)).draft([5, 1, 2, 3, 1, 2], 3) == [1, 2, 3]


def test_the_acceptance_estimate_follows_the_drafts_and_recovers_while_none_are_tried() -> None:
    drafter = NgramDrafter(SpecSettings(draft_max=16, draft_min=2))
    prior = drafter.accept
    drafter.verified(16, 16)
    assert drafter.accept > prior  # a whole draft taken
    for _ in range(10):
        drafter.verified(4, 0)
    failing = drafter.accept
    assert failing < 0.4  # drafts refused at once, again and again: the 16 taken before are forgotten
    for _ in range(100):
        drafter.passed()
    assert failing < drafter.accept < prior + 0.01  # back near the prior: it will try again
    assert (drafter.drafted, drafter.accepted) == (16 + 40, 16)
    copying = list(range(20)) + list(range(10))
    assert drafter.draft(copying, 10)[:3] == [11, 12, 13]
    assert drafter.accept == pytest.approx(0.9)  # a long match (a line being copied): its own, higher odds


def test_a_step_is_fitted_as_passes_and_tokens_and_a_draft_is_cut_where_it_stops_paying() -> None:
    costs = StepCosts()
    assert not costs.known
    costs.note(1, 1, 0.022)
    per_pass, per_token = costs.figures()  # one shape only: split by the prior share
    assert per_pass + per_token == pytest.approx(0.022) and per_token < per_pass
    for shape, seconds in (((1, 1), 0.0221), ((1, 9), 0.0882), ((1, 17), 0.1539), ((2, 3), 0.0523), ((2, 12), 0.1304)):
        costs.note(*shape, seconds)
    per_pass, per_token = costs.figures()
    assert per_pass == pytest.approx(0.0138, abs=0.002) and per_token == pytest.approx(0.0083, abs=0.001)
    for _ in range(128):  # the window moves on: steps of one shape only, the others forgotten
        costs.note(1, 4, 0.030)
    assert costs.figures() == pytest.approx((0.030 / (1 + 3 * 0.37) * 0.63, 0.030 / (1 + 3 * 0.37) * 0.37))
    # one answer alone on this CPU: a token taken saves a whole step (22 ms), each drafted costs 8 ms
    assert draft_length(16, 0.5, 0.022, 0.0083, 0.0) == 1
    assert 6 <= draft_length(16, 0.9, 0.022, 0.0083, 0.0) <= 10
    assert draft_length(16, 0.99, 0.022, 0.0083, 0.0) == 16
    # beside three other answers: a token is worth a quarter step, and the draft adds a pass
    assert draft_length(16, 0.9, 0.0125, 0.0083, 0.0138) == 0
    # on a GPU a drafted token costs a few percent of a step: long drafts pay even at 70 %
    assert draft_length(16, 0.7, 0.013, 0.0004, 0.0) >= 8


def test_a_lone_answer_weighs_its_draft_against_its_cheaper_one_token_step() -> None:
    """On this CPU a step of one token costs less than the line through steps of several says
    (the step table in the README): a short guess (taken 3 times in 5) that the line alone
    would draft loses there and is not verified; a copy in progress still is."""
    ctx = SimpleNamespace(n_ctx=4096, n_ubatch=512, unified=False)
    spec = SpecSettings("ngram", 16, 2)
    costs = StepCosts()
    for k, ms in ((2, 18.9), (4, 29.7), (8, 48.9), (16, 88.7), (3, 24.0), (12, 68.0)):  # measured; 3 and 12 between
        costs.note(1, k, ms / 1000)

    def slot_with(history: list[int], next_token: int) -> Slot:
        choice = SimpleNamespace(max_tokens=400, generated=10)
        return Slot(0, cache=history, task=SimpleNamespace(speculative=True), choice=choice, next_token=next_token)  # type: ignore[arg-type]

    short = [7, 1, 2, 3, 4, 5, 9, 9, 8, 6, 9, 9, 1, 2]  # 1 2 3 came before, once: a short match
    assert batching.ngram_guesses(ctx, [slot_with(short, 3)], spec, 448, costs)  # the line alone: 3 tokens pay
    costs.note(1, 1, 0.0101)
    assert batching.ngram_guesses(ctx, [slot_with(short, 3)], spec, 448, costs) == {}  # against 10.1 ms steps: they do not
    copying = list(range(20, 60)) + list(range(20, 40))  # a line being copied
    assert len(batching.ngram_guesses(ctx, [slot_with(copying, 40)], spec, 448, costs)[0]) >= 4  # as far as 9 in 10 pay


def test_passes_follow_llama_cpps_split_of_a_batch_by_sequence() -> None:
    assert passes([(0, 1), (1, 1), (2, 1), (3, 1)], 512, unified=False) == 1
    assert passes([(0, 1), (1, 1), (3, 1)], 512, unified=False) == 2  # 0-1, then 3: runs of consecutive sequences
    assert passes([(0, 9), (1, 1), (2, 1), (3, 1)], 512, unified=False) == 2  # a draft beside others: a pass of its own
    assert passes([(0, 3), (1, 3)], 512, unified=False) == 1  # equal drafts share it
    assert passes([(0, 600)], 512, unified=False) == 2
    assert passes([(0, 9), (1, 1), (3, 1)], 512, unified=True) == 1  # one cache: any mix, a ubatch at a time


# -- in the engine -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[LlamaCppBackend]:
    """An engine that verifies every guess whole, as if drafts cost nothing: these tests are
    about what drafts must not change, so they must happen (whether a draft pays on this CPU
    is the economics test's subject, further down)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batching, "draft_length", lambda guess, *_: guess)
        e = LlamaCppBackend(model_path, speculation=SpecSettings("ngram", 16, 2))
        e.load_default()
        yield e
        e.close()


def answer(engine: LlamaCppBackend, **kwargs) -> Completion:
    events = list(engine.generate(GenerationRequest(**kwargs), threading.Event()))
    assert isinstance(events[-1], Completion)
    return events[-1]


def answer_all(engine: LlamaCppBackend, asks: list[dict], timeout: float) -> list[Completion | None]:
    """Every one of ``asks`` answered at once, each from a thread of its own."""
    results: list[Completion | None] = [None] * len(asks)

    def one(i: int) -> None:
        results[i] = answer(engine, **asks[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results


def warm(engine: LlamaCppBackend, **kwargs) -> None:
    """Put the prompt in a slot's cache with more after it, so that both answers compared read
    its last token again alone (a cache that ends with the prompt keeps its logits instead)."""
    answer(engine, **{**kwargs, "speculative": False, "sampling": greedy(2)})


def greedy(n: int) -> Sampling:
    return Sampling(max_tokens=n, temperature=0.0)


def test_a_greedy_edit_is_the_same_with_drafts_and_written_in_fewer_steps(engine: LlamaCppBackend) -> None:
    warm(engine, messages=EDIT)
    plain = answer(engine, messages=EDIT, sampling=greedy(90), speculative=False)
    drafted = answer(engine, messages=EDIT, sampling=greedy(90))
    assert drafted.text == plain.text and "def mean(values):" in drafted.text  # it wrote the cell again
    assert drafted.completion_tokens == plain.completion_tokens
    assert "draft_n" not in plain.timings  # speculative: false drafts nothing
    assert drafted.timings["draft_n_accepted"] >= 10  # tokens that came in drafts: fewer steps
    assert drafted.timings["draft_n"] >= drafted.timings["draft_n_accepted"]


def test_greedy_prose_and_json_under_a_grammar_are_the_same_with_drafts(engine: LlamaCppBackend) -> None:
    for kwargs in (dict(messages=PROSE, sampling=greedy(120)),
                   dict(prompt="A list of three cities as JSON:", sampling=greedy(80),
                        response_format=ResponseFormat(schema={"type": "object", "properties": {
                            "cities": {"type": "array", "items": {"type": "string"}}}, "required": ["cities"]}))):
        warm(engine, **kwargs)
        assert answer(engine, **kwargs).text == answer(engine, speculative=False, **kwargs).text


def test_four_answers_with_mixed_settings_at_once(engine: LlamaCppBackend) -> None:
    other_edit = ({"role": "user", "content": EDIT[0]["content"].replace("average", "avg")},)
    requests = [dict(messages=EDIT, sampling=greedy(80)),
                dict(messages=other_edit, sampling=greedy(80), speculative=False),
                dict(messages=PROSE, sampling=Sampling(max_tokens=60, temperature=0.8, seed=11)),
                dict(prompt="def add(a, b):\n    return a + b\n\ndef add(a, b):", sampling=greedy(60))]
    for r in requests:
        warm(engine, **r)
    results = answer_all(engine, requests, 120)
    assert all(r is not None and r.completion_tokens > 0 for r in results)
    drafted = [r.timings.get("draft_n_accepted", 0) for r in results]  # type: ignore[union-attr]
    assert drafted[0] > 0 and drafted[1] == 0  # each answer drafts as it asked, beside the others
    assert results[3].text.startswith("\n    return a + b")  # type: ignore[union-attr]


def test_a_seeded_sample_with_drafts_is_reproducible_and_the_same_without(engine: LlamaCppBackend) -> None:
    seeded = dict(messages=EDIT, sampling=Sampling(max_tokens=80, temperature=0.7, seed=5))
    warm(engine, **seeded)
    first, second = answer(engine, **seeded), answer(engine, **seeded)
    assert first.text == second.text == answer(engine, speculative=False, **seeded).text
    assert first.timings.get("draft_n_accepted", 0) > 0


def test_the_kv_cache_keeps_no_rejected_draft_and_the_next_turn_reuses_it(engine: LlamaCppBackend) -> None:
    import llama_cpp

    first = answer(engine, messages=EDIT, sampling=greedy(90))
    assert first.timings["draft_n"] > first.timings["draft_n_accepted"]  # some drafted tokens were rejected
    context = engine._loaded.context
    for slot in engine.scheduler.pool.slots:  # each holds exactly the tokens it lists, no more
        assert llama_cpp.llama_memory_seq_pos_max(context.memory, slot.seq) == len(slot.cache) - 1
    follow_up = (*EDIT, {"role": "assistant", "content": first.text}, {"role": "user", "content": "Thanks."})
    again = answer(engine, messages=follow_up, sampling=greedy(20))
    assert again.cached_tokens >= first.prompt_tokens + first.completion_tokens - 2  # the whole first turn
    assert again.completion_tokens > 0


def test_speculative_must_be_true_or_false_and_false_turns_drafts_off() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat({**body, "speculative": False}).speculative is False
    assert parse_chat(body).speculative is True
    with pytest.raises(InvalidRequest, match="'speculative' must be true or false"):
        parse_chat({**body, "speculative": "no"})


def test_no_drafts_without_flash_attention(model_path: Path) -> None:
    plain = LlamaCppBackend(model_path, flash_attention="off", speculation=SpecSettings())
    plain.load_default()
    try:
        assert "draft_n" not in answer(plain, messages=EDIT, sampling=greedy(40)).timings
    finally:
        plain.close()


def test_speculation_and_batch_settings_that_cannot_work_are_clear_errors(model_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="'--spec-draft-min' \\(4\\) must be from 1 to '--spec-draft-max' \\(2\\)"):
        SpecSettings("ngram", draft_max=2, draft_min=4)
    with pytest.raises(InvalidRequest, match="'--spec' must be ngram or none"):
        SpecSettings("eagle")
    with pytest.raises(InvalidRequest, match="'--batch-size' \\(2\\) must be at least '--parallel' \\(4\\)"):
        LlamaCppBackend(model_path, batch_size=2, parallel=4)


def test_on_this_cpu_an_answer_alone_drafts_and_four_at_once_do_not(model_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's own economics (step_costs.py), unpatched: alone, an edit's copied lines are
    drafted; beside three other answers a draft would cost a pass of its own, more on a CPU
    than its tokens could save, so none is verified."""
    monkeypatch.setattr(batching, "draft_length", step_costs.draft_length)  # not the module engine's
    e = LlamaCppBackend(model_path, speculation=SpecSettings("ngram", 16, 2))
    e.load_default()
    try:
        # a cell of several functions: alone, a draft pays only where a copy is taken nearly whole
        # (a one-token step costs less than the line through drafted steps says), and in a short
        # edit the first draft, where the renamed function starts, fails
        long_edit = ({"role": "user", "content": EDIT[0]["content"].replace(CELL, LONG_CELL)},)
        warm(e, messages=long_edit)
        alone = answer(e, messages=long_edit, sampling=greedy(200))
        assert alone.timings.get("draft_n_accepted", 0) > 0
        edits = [({"role": "user", "content": EDIT[0]["content"].replace("average", name)},)
                 for name in ("avg", "middle", "typical", "central")]
        asks = [dict(messages=m, sampling=greedy(60)) for m in edits]
        for ask in asks:
            warm(e, **ask)
        together = answer_all(e, asks, 120)
        assert [r.timings.get("draft_n", 0) for r in together] == [0, 0, 0, 0]  # type: ignore[union-attr]
        per_pass, per_token = e.scheduler._costs.figures()
        assert per_pass > 0 and per_token > 0
        assert step_costs.draft_length(16, 0.9, (per_pass + 4 * per_token) / 4, per_token, per_pass) == 0
    finally:
        e.close()


LONG_CELL = CELL + "".join(CELL.replace("mean", name) for name in ("spread", "middle", "typical", "central", "usual", "median"))


def test_past_256_cached_tokens_drafts_still_change_nothing_where_llama_cpps_kernels_agree(
        model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past 256 cells llama.cpp's CPU flash attention computes a lone token with a split-KV
    kernel and several tokens with another, whose rounding differs (README: Several requests at
    once); with one thread the two agree, and a long edit is the same token for token with
    every guess verified whole."""
    monkeypatch.setattr(batching, "draft_length", lambda guess, *_: guess)
    e = LlamaCppBackend(model_path, speculation=SpecSettings("ngram", 16, 2), threads=1)
    e.load_default()
    try:
        edit = ({"role": "user", "content": "Here is a Python cell:\n\n```python\n" + LONG_CELL + "```\n\nRewrite "
                 "the cell with the function mean renamed to average. Reply with the whole cell in a code block."},)
        warm(e, messages=edit)
        plain = answer(e, messages=edit, sampling=greedy(120), speculative=False)
        drafted = answer(e, messages=edit, sampling=greedy(120))
        assert plain.prompt_tokens > 256 and plain.completion_tokens == 120  # the cache passes 256 cells
        assert drafted.text == plain.text
        assert drafted.timings["draft_n_accepted"] >= 30
    finally:
        e.close()
