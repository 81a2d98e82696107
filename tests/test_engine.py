"""The engine against the real SmolLM2 model, checked against llama-cpp-python itself."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from llm_magic.engine.admission import Turnstile
from llm_magic.engine.llama_cpp.backend import LlamaCppBackend, chat_formats
from llm_magic.errors import ContextLengthExceeded, EngineError, HostBusy, InvalidRequest, ModelNotAllowed
from llm_magic.models import ModelPolicy
from llm_magic.wire.events import Completion, Started, TextDelta
from llm_magic.wire.types import GenerationRequest, Sampling

GREEDY = Sampling(max_tokens=40, temperature=0.0)
CHAT = ({"role": "user", "content": "What is the capital of France?"},)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[LlamaCppBackend]:
    e = LlamaCppBackend(model_path)
    e.load_default()
    yield e
    e.close()


def run(engine: LlamaCppBackend, **kwargs) -> tuple[list[str], Completion]:
    events = list(engine.generate(GenerationRequest(**kwargs), threading.Event()))  # as the server does
    assert isinstance(events[0], Started)
    assert isinstance(events[-1], Completion)
    assert all(isinstance(e, TextDelta) for e in events[1:-1])
    return [e.text for e in events[1:-1]], events[-1]


@pytest.fixture(scope="module")
def reference(model_path: Path):
    import llama_cpp

    # flash attention as the engine has it by default (llama-server's default too)
    llm = llama_cpp.Llama(str(model_path), n_ctx=4096, n_threads=2, verbose=False, flash_attn=True)
    yield llm
    llm.close()


def test_greedy_completion_matches_llama_cpp_python(engine: LlamaCppBackend, reference) -> None:
    deltas, result = run(engine, prompt="The three primary colours are", sampling=GREEDY)
    expected = reference.create_completion("The three primary colours are", max_tokens=40, temperature=0.0)
    assert result.text == expected["choices"][0]["text"]
    assert "".join(deltas) == result.text
    assert result.usage == expected["usage"]
    assert result.finish_reason == expected["choices"][0]["finish_reason"] == "length"


FRUITS = "Here is a list of fruits and what colour each is: " + ", ".join(
    f"fruit number {i} is {colour}" for i, colour in enumerate(["red", "yellow", "green", "orange"] * 25))


def test_a_long_prompt_read_in_one_batch_gives_llama_cpp_pythons_greedy_answer(engine: LlamaCppBackend, reference) -> None:
    sizes = recording_batches(engine)
    try:
        _, result = run(engine, prompt=FRUITS, sampling=GREEDY)
    finally:
        del engine._loaded.context.decode
    expected = reference.create_completion(FRUITS, max_tokens=40, temperature=0.0)
    assert result.prompt_tokens > 500
    assert sizes[0] == result.prompt_tokens  # alone, the whole prompt in one step, as llama-server reads it
    assert result.text == expected["choices"][0]["text"]


def test_a_prompt_read_in_small_batches_gives_the_same_greedy_answer(model_path: Path, reference) -> None:
    small = LlamaCppBackend(model_path, batch_size=96, ubatch_size=32, parallel=1)
    small.load_default()
    try:
        sizes = recording_batches(small)
        _, result = run(small, prompt=FRUITS, sampling=GREEDY)
    finally:
        small.close()
    assert max(sizes) == 96 and len(sizes) > 5  # --batch-size bounds a step
    assert result.text == reference.create_completion(FRUITS, max_tokens=40, temperature=0.0)["choices"][0]["text"]


def test_a_long_prompt_read_beside_an_answer_lets_it_keep_writing(engine: LlamaCppBackend, reference) -> None:
    prompt = "Record 1. " + FRUITS  # one no slot holds
    writer = engine.generate(GenerationRequest(prompt="Once upon a time", sampling=Sampling(max_tokens=400, temperature=0)))
    assert isinstance(next(writer), Started)
    next(writer)  # it is writing
    context, slots = engine._loaded.context, engine.scheduler.pool.slots
    steps: list[tuple[int, int]] = []  # tokens in each step, and of those the answers' next tokens
    original = type(context).decode

    def decode() -> int:
        steps.append((context.size, sum(slot.next_token is not None for slot in slots)))
        return original(context)

    context.decode = decode
    try:
        _, result = run(engine, prompt=prompt, sampling=GREEDY)
    finally:
        del context.decode
        writer.close()
    reading, read = [], 0
    for size, writing in steps:
        if read >= result.prompt_tokens:
            break
        reading.append((size - writing, writing))
        read += size - writing
    assert len(reading) >= 2 and all(writing == 1 for _, writing in reading)  # the answer wrote at every step
    assert max(chunk for chunk, _ in reading) < context.n_ubatch  # in chunks, not one long step
    assert result.text == reference.create_completion(prompt, max_tokens=40, temperature=0.0)["choices"][0]["text"]


def test_greedy_under_a_grammar_matches_llama_cpp_python(engine: LlamaCppBackend, reference) -> None:
    from llama_cpp.llama_grammar import LlamaGrammar

    from llm_magic.engine.llama_cpp.grammar.constraints import grammar_for
    from llm_magic.wire.types import ResponseFormat

    schema = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["title", "year"]}
    prompt = "A famous book, as JSON:"
    for fmt in (ResponseFormat(), ResponseFormat(schema=schema)):
        _, result = run(engine, prompt=prompt, sampling=Sampling(max_tokens=60, temperature=0.0), response_format=fmt)
        expected = reference.create_completion(prompt, max_tokens=60, temperature=0.0,
                                               grammar=LlamaGrammar.from_string(grammar_for(fmt).grammar, verbose=False))
        assert result.text == expected["choices"][0]["text"]  # grammar on every token vs on demand
        assert result.completion_tokens == expected["usage"]["completion_tokens"]


def test_a_request_withdrawn_while_its_prompt_is_read_stops_within_a_chunk(engine: LlamaCppBackend) -> None:
    cancel = threading.Event()
    events = engine.generate(GenerationRequest(prompt="word " * 3000, sampling=GREEDY), cancel)
    assert isinstance(next(events), Started)
    evaluated = []
    context = engine._loaded.context
    original = context.decode

    def decode_then_leave():  # the client leaves during the first chunk
        evaluated.append(context.size)
        cancel.set()
        return original()

    context.decode = decode_then_leave
    try:
        assert list(events) == []  # no text, no answer: nobody wants it
    finally:
        del context.decode
    # one step of the 3,000 tokens (a batch: --batch-size, 2048 as llama-server's), not the rest
    assert len(evaluated) == 1 and evaluated[0] == context.n_batch < 3000
    _, result = run(engine, prompt="Hi", sampling=GREEDY)  # the model is free and sound
    assert result.completion_tokens > 0


def test_greedy_chat_uses_the_gguf_template_and_matches_llama_cpp_python(engine: LlamaCppBackend, reference) -> None:
    _, result = run(engine, messages=CHAT, sampling=GREEDY)
    expected = reference.create_chat_completion(list(CHAT), max_tokens=40, temperature=0.0)
    assert result.text == expected["choices"][0]["message"]["content"]
    assert result.prompt_tokens == expected["usage"]["prompt_tokens"]


def test_stop_sequence_ends_the_answer_and_is_never_streamed(engine: LlamaCppBackend) -> None:
    full = run(engine, messages=({"role": "user", "content": "Count from 1 to 10, one per line."},),
               sampling=Sampling(max_tokens=60, temperature=0.0))[1].text
    assert "4" in full
    deltas, result = run(engine, messages=({"role": "user", "content": "Count from 1 to 10, one per line."},),
                         sampling=Sampling(max_tokens=60, temperature=0.0, stop=("4",)))
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index("4")]
    assert "".join(deltas) == result.text


def test_empty_prompt_generates_from_the_start_token(engine: LlamaCppBackend) -> None:
    _, result = run(engine, prompt="", sampling=Sampling(max_tokens=3, temperature=0.0))
    assert result.prompt_tokens == 1 and result.completion_tokens == 3


def test_max_tokens_is_exact(engine: LlamaCppBackend) -> None:
    _, result = run(engine, prompt="Once upon a time", sampling=Sampling(max_tokens=7, temperature=0.0))
    assert result.completion_tokens == 7 and result.finish_reason == "length"
    assert result.timings["predicted_n"] == 7


def test_same_seed_same_text_at_high_temperature(engine: LlamaCppBackend) -> None:
    params = dict(prompt="My favourite animal is", sampling=Sampling(max_tokens=20, temperature=1.5, seed=42))
    assert run(engine, **params)[1].text == run(engine, **params)[1].text


def test_prompt_longer_than_the_context_is_a_clear_error(model_path: Path) -> None:
    small = LlamaCppBackend(model_path, ctx_length=64)
    with pytest.raises(ContextLengthExceeded, match=r"the prompt is \d+ tokens but the model's context holds 64"):
        run(small, prompt="word " * 100)
    with pytest.raises(ContextLengthExceeded, match=r"the prompt is at least \d+ tokens"):  # refused untokenised
        run(small, prompt="word " * 100_000)
    with pytest.raises(ContextLengthExceeded, match="the embedding context holds 64"):
        small.embed(["word " * 100])
    _, result = run(small, prompt="word " * 50, sampling=Sampling(max_tokens=500, temperature=0.0))
    assert result.prompt_tokens + result.completion_tokens <= 64  # max_tokens bounded by the context
    small.close()


def test_next_chat_turn_reuses_the_kv_cache(engine: LlamaCppBackend) -> None:
    history = [{"role": "user", "content": "Tell me about the moon. " * 20}]
    _, first = run(engine, messages=tuple(history), sampling=GREEDY)
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And the sun?"}]
    _, second = run(engine, messages=tuple(history), sampling=GREEDY)
    assert second.timings["cache_n"] >= first.prompt_tokens  # the whole first turn was kept
    assert second.timings["prompt_n"] < second.prompt_tokens - first.prompt_tokens + 10


def test_closing_a_generation_frees_the_model_at_once(engine: LlamaCppBackend) -> None:
    events = engine.generate(GenerationRequest(prompt="word " * 100, sampling=Sampling(max_tokens=2000, temperature=0)))
    next(events), next(events)
    assert engine.turnstile.busy
    events.close()
    assert not engine.turnstile.busy
    assert run(engine, prompt="Hi", sampling=Sampling(max_tokens=2))[1].completion_tokens == 2


def test_named_chat_format_and_unknown_one(engine: LlamaCppBackend) -> None:
    assert "chatml" in chat_formats() and "llama-2" in chat_formats()
    _, result = run(engine, messages=CHAT, chat_format="chatml", sampling=GREEDY)
    assert result.text
    with pytest.raises(InvalidRequest, match="unknown chat_format 'nope'.*chatml"):
        run(engine, messages=CHAT, chat_format="nope")


def test_switching_models_unloads_the_old_one(model_path: Path, model_copy: Path) -> None:
    e = LlamaCppBackend(model_path, policy=ModelPolicy(has_token=True, allow_patterns=[str(model_copy)]))
    e.load_default()
    first = e._loaded
    _, result = run(e, prompt="Hi", model=str(model_copy), sampling=Sampling(max_tokens=2))
    assert result.model == "copy.Q4_1" and e.model == "copy.Q4_1"  # a name, never the host's path
    assert e._loaded is not None and e._loaded.key.path == model_copy
    assert first is not None and first.model.model is None and first.context.ctx is None  # both freed
    assert run(e, prompt="Hi", sampling=Sampling(max_tokens=2))[1].model == "SmolLM2-135M-Instruct.Q4_1"
    e.close()


def test_model_policy_is_enforced(engine: LlamaCppBackend, model_copy: Path) -> None:
    with pytest.raises(ModelNotAllowed):
        run(engine, prompt="Hi", model=str(model_copy))


def test_turnstile_serves_first_come_first_served_and_bounds_the_queue() -> None:
    gate = Turnstile(max_queue=2, timeout=5)
    order: list[int] = []
    release = threading.Event()

    def hold() -> None:
        with gate.turn():
            release.wait(5)

    def wait_turn(i: int) -> None:
        with gate.turn():
            order.append(i)

    holder = threading.Thread(target=hold)
    holder.start()
    while not gate.busy:
        time.sleep(0.01)
    waiters = []
    for i in range(2):
        t = threading.Thread(target=wait_turn, args=(i,))
        t.start()
        waiters.append(t)
        while gate.waiting < i + 1:
            time.sleep(0.01)
    with pytest.raises(HostBusy, match="2 requests are already waiting"):
        with gate.turn():
            pass
    release.set()
    for t in [holder, *waiters]:
        t.join(5)
    assert order == [0, 1]
    assert not gate.busy and gate.waiting == 0


def test_turnstile_wait_has_a_timeout() -> None:
    gate = Turnstile(max_queue=4, timeout=0.2)
    with gate.turn():
        errors = []

        def try_turn() -> None:
            try:
                with gate.turn():
                    pass
            except HostBusy as exc:
                errors.append(exc)

        t = threading.Thread(target=try_turn)
        t.start()
        t.join(5)
    assert errors and gate.waiting == 0


def test_turnstile_wait_can_be_cancelled() -> None:
    from llm_magic.errors import Cancelled

    gate = Turnstile(max_queue=4, timeout=30)
    cancel = threading.Event()
    errors: list[Exception] = []

    def wait_turn() -> None:
        try:
            with gate.turn(cancel):
                pass
        except Cancelled as exc:
            errors.append(exc)

    with gate.turn():
        t = threading.Thread(target=wait_turn)
        t.start()
        while gate.waiting < 1:
            time.sleep(0.01)
        cancel.set()
        t.join(5)
        assert errors and gate.waiting == 0 and gate.busy  # left the line; the holder kept its turn


# -- continuous batching -------------------------------------------------------------------

PROMPTS = ("The three primary colours are", "Write a poem about the sea.\n", "def fibonacci(n):",
           "Once upon a time")


def run_together(engine: LlamaCppBackend, requests: list[dict]) -> list[Completion]:
    """Run the requests at once, each from a thread of its own, as a server's clients would."""
    results: list[Completion | None] = [None] * len(requests)

    def one(i: int) -> None:
        results[i] = run(engine, **requests[i])[1]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def recording_batches(engine: LlamaCppBackend) -> list[int]:
    """Record how many tokens each decode step carries, from now until the returned list is
    dropped by ``del engine._loaded.context.decode``."""
    context = engine._loaded.context
    sizes: list[int] = []
    original = type(context).decode

    def decode() -> int:
        sizes.append(context.size)
        return original(context)

    context.decode = decode
    return sizes


def test_requests_decode_together_and_each_gets_its_own_greedy_answer(engine: LlamaCppBackend, reference) -> None:
    sampling = Sampling(max_tokens=48, temperature=0.0)
    expected = [reference.create_completion(p, max_tokens=48, temperature=0.0)["choices"][0]["text"] for p in PROMPTS]
    sizes = recording_batches(engine)
    try:
        results = run_together(engine, [dict(prompt=p, sampling=sampling) for p in PROMPTS])
    finally:
        del engine._loaded.context.decode
    assert [r.text for r in results] == expected  # token for token, as if each ran alone
    assert max(sizes) >= 4 and sizes.count(4) > 20  # steps that carried all four answers' next tokens


def test_a_seeded_answer_does_not_depend_on_what_runs_beside_it(engine: LlamaCppBackend) -> None:
    seeded = dict(prompt="My favourite animal is", sampling=Sampling(max_tokens=40, temperature=0.9, seed=7))
    alone = run(engine, **seeded)[1].text
    others = [dict(prompt=p, sampling=Sampling(max_tokens=60, temperature=1.0)) for p in PROMPTS[:3]]
    together = run_together(engine, [*others, seeded])
    assert together[-1].text == alone


def test_a_new_request_starts_while_a_long_one_is_written(engine: LlamaCppBackend) -> None:
    long = engine.generate(GenerationRequest(prompt="Once upon a time", sampling=Sampling(max_tokens=400, temperature=0)))
    assert isinstance(next(long), Started)
    next(long)  # it is writing
    try:
        _, short = run(engine, prompt="Hi", sampling=Sampling(max_tokens=5, temperature=0))
        assert short.completion_tokens == 5
        assert engine.turnstile.held == 1  # the long one is still being written
    finally:
        long.close()
    assert not engine.turnstile.busy


def test_each_conversation_keeps_its_cache_when_they_alternate(engine: LlamaCppBackend) -> None:
    def turn(history: list[dict]) -> Completion:
        return run(engine, messages=tuple(history), sampling=Sampling(max_tokens=12, temperature=0))[1]

    talks = [[{"role": "user", "content": f"Tell me about {topic}. " * 15}] for topic in ("the moon", "rivers")]
    firsts = []
    for history in talks:  # A, then B: B must not take A's slot
        firsts.append(turn(history))
        history += [{"role": "assistant", "content": firsts[-1].text}, {"role": "user", "content": "More?"}]
    for history, first in zip(talks, firsts):
        second = turn(history)
        assert second.cached_tokens >= first.prompt_tokens  # its whole first turn was still cached


def test_greedy_without_flash_attention_is_llama_cpp_pythons_default(model_path: Path) -> None:
    import llama_cpp

    plain = LlamaCppBackend(model_path, flash_attention="off")
    reference = llama_cpp.Llama(str(model_path), n_ctx=4096, n_threads=2, verbose=False)
    try:
        for prompt in PROMPTS[:2]:
            expected = reference.create_completion(prompt, max_tokens=40, temperature=0.0)["choices"][0]["text"]
            assert run(plain, prompt=prompt, sampling=GREEDY)[1].text == expected
    finally:
        reference.close()
        plain.close()


def test_turnstile_seats_several_and_a_switch_waits_for_all_of_them() -> None:
    gate = Turnstile(max_queue=4, timeout=5, capacity=2)
    gate.acquire()
    gate.acquire()  # two at once
    order: list[str] = []

    def take(name: str, seats: int) -> None:
        with gate.turn(seats=seats):
            order.append(name)

    switch = threading.Thread(target=take, args=("switch", 2))
    switch.start()
    while gate.waiting < 1:
        time.sleep(0.01)
    later = threading.Thread(target=take, args=("later", 1))
    later.start()
    while gate.waiting < 2:
        time.sleep(0.01)
    gate.release()
    time.sleep(0.2)
    assert order == []  # one seat is free, but the switch needs both, and the later one waits behind it
    gate.release()
    for t in (switch, later):
        t.join(5)
    assert order == ["switch", "later"] and not gate.busy


def test_a_lone_generation_pauses_until_its_first_text_has_gone_out(engine: LlamaCppBackend) -> None:
    passed = threading.Event()
    events = engine.generate(GenerationRequest(prompt="Once upon a time", sampling=Sampling(max_tokens=20, temperature=0)),
                             threading.Event(), passed)
    sizes = recording_batches(engine)
    try:
        assert isinstance(next(events), Started)
        assert isinstance(next(events), TextDelta)
        steps = len(sizes)
        time.sleep(0.2)
        assert len(sizes) == steps  # paused: no decode while the first text is on its way out
        passed.set()
        rest = list(events)
    finally:
        del engine._loaded.context.decode
    assert isinstance(rest[-1], Completion) and rest[-1].completion_tokens == 20
    assert len(sizes) > steps


def test_n_answers_share_one_prompt_and_each_draws_its_own_samples(engine: LlamaCppBackend) -> None:
    sampling = Sampling(max_tokens=24, temperature=0.9, seed=3)
    sizes = recording_batches(engine)
    try:
        events = list(engine.generate(GenerationRequest(prompt="My favourite animal is", sampling=sampling, n=3)))
    finally:
        del engine._loaded.context.decode
    final = events[-1]
    assert isinstance(final, Completion) and [c.index for c in final.choices] == [0, 1, 2]
    streamed: dict[int, str] = {}
    for event in events:
        if isinstance(event, TextDelta):
            streamed[event.index] = streamed.get(event.index, "") + event.text
    assert streamed == {c.index: c.text for c in final.choices}
    assert final.completion_tokens == sum(c.completion_tokens for c in final.choices)
    assert sizes[0] == final.prompt_tokens - final.cached_tokens  # the prompt was read once, in one slot
    # answer i is the single answer with seed + i: the same samplers, run side by side
    for choice in final.choices:
        alone = Sampling(max_tokens=24, temperature=0.9, seed=3 + choice.index)
        assert run(engine, prompt="My favourite animal is", sampling=alone)[1].text == choice.text


def test_n_beyond_the_slots_is_a_clear_error(engine: LlamaCppBackend) -> None:
    with pytest.raises(InvalidRequest, match="'n' is 5, but this host writes at most 4 answers at once"):
        run(engine, prompt="Hi", n=5)


def test_a_full_shared_cache_ends_the_newest_answer_and_the_others_go_on(model_path: Path) -> None:
    """Slots that share one KV cache (the fallback when memory is short) can fill it: the
    answer started last ends there (finish_reason "length", as at a context's end), the
    others run to their end, and nobody gets an error."""
    shared = LlamaCppBackend(model_path, ctx_length=512, parallel=2, kv_unified=True)
    try:
        shared.load_default()
        long = dict(prompt="Once upon a time", sampling=Sampling(max_tokens=400, temperature=0))
        first = shared.generate(GenerationRequest(**long))
        assert isinstance(next(first), Started)
        next(first)  # the first answer is being written
        (second,) = run_together(shared, [long])
        rest = list(first)
        assert isinstance(rest[-1], Completion) and rest[-1].completion_tokens == 400
        assert second.finish_reason == "length" and second.completion_tokens < 400
        assert run(shared, prompt="Hi", sampling=Sampling(max_tokens=3))[1].completion_tokens == 3
    finally:
        shared.close()


def test_a_prompt_a_slot_holds_exactly_is_answered_from_its_kept_logits(engine: LlamaCppBackend) -> None:
    """A request for exactly what a slot holds (the same prompt again, say) decodes nothing
    before its first token: the slot kept the logits that follow it. The answer is the same."""
    ask = dict(prompt="The capital of Italy is", sampling=Sampling(max_tokens=1, temperature=0))
    first = run(engine, **ask)[1]
    sizes = recording_batches(engine)
    try:
        again = run(engine, **ask)[1]
        assert sizes == []  # nothing decoded at all
        longer = run(engine, prompt="The capital of Italy is", sampling=Sampling(max_tokens=12, temperature=0))[1]
    finally:
        del engine._loaded.context.decode
    assert again.text == first.text and again.cached_tokens == again.prompt_tokens
    assert sizes[0] == 1  # its first decode was of the answer's first token, not the prompt's last
    assert longer.text.startswith(first.text) and longer.completion_tokens == 12


def test_a_grammar_that_dead_ends_fails_its_own_answer_only(engine: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_magic.engine.llama_cpp import sampling
    from llm_magic.wire.types import ResponseFormat

    real = sampling.TokenSampler._sample_constrained
    calls = {"n": 0}

    def dead_end_at_the_fifth(self, logits, token, noted):  # as a grammar that allows nothing further
        calls["n"] += 1
        if calls["n"] == 5:
            raise InvalidRequest("the structured-output grammar allows no next token here")
        return real(self, logits, token, noted)

    monkeypatch.setattr(sampling.TokenSampler, "_sample_constrained", dead_end_at_the_fifth)
    plain = engine.generate(GenerationRequest(prompt="Count: one, two, three,", sampling=Sampling(max_tokens=30, temperature=0)))
    try:
        assert isinstance(next(plain), Started)
        first = next(plain)  # the plain answer is being written when the other starts
        long_text = {"type": "object", "properties": {"a": {"type": "string", "minLength": 20}}, "required": ["a"]}
        constrained = engine.generate(GenerationRequest(prompt="JSON:", response_format=ResponseFormat(long_text),
                                                        sampling=Sampling(max_tokens=30, temperature=0)))
        with pytest.raises(InvalidRequest, match="allows no next token"):
            list(constrained)
        rest = list(plain)
    finally:
        plain.close()
    assert calls["n"] == 5
    assert isinstance(rest[-1], Completion) and rest[-1].finish_reason == "length"
    assert rest[-1].text == first.text + "".join(e.text for e in rest[:-1] if isinstance(e, TextDelta))
    assert rest[-1].completion_tokens == 30


def test_embeddings_packed_together_equal_those_computed_alone(engine: LlamaCppBackend) -> None:
    texts = ["hi", "The capital of France is Paris.", "def add(a, b): return a + b", "a" * 300]
    together = engine.embed(texts).vectors
    for text, vector in zip(texts, together):
        alone = engine.embed([text]).vectors[0]
        assert sum(a * b for a, b in zip(vector, alone)) > 0.9995  # the same, up to rounding


def test_embedding_inputs_are_checked_whole_before_any_is_computed(engine: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_magic.engine.llama_cpp.embeddings import EmbeddingContext

    engine.embed(["warm"])  # the context exists
    computed = []
    real = EmbeddingContext.embed_many
    monkeypatch.setattr(EmbeddingContext, "embed_many", lambda self, group: computed.append(len(group)) or real(self, group))
    with pytest.raises(InvalidRequest, match=r"'input\[2047\]' holds token 99999999"):
        engine.embed([*["some text"] * 2047, [99999999]])
    with pytest.raises(InvalidRequest, match="more than 32768 tokens together"):
        engine.embed(["word " * 3000] * 12)
    assert computed == []


def test_embeddings_stop_when_the_client_leaves_and_let_answers_go_on(engine: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_magic.engine.llama_cpp.embeddings import EmbeddingContext
    from llm_magic.errors import Cancelled

    cancel = threading.Event()
    groups = []
    real = EmbeddingContext.embed_many

    def counted(self, group):
        groups.append(len(group))
        if len(groups) == 3:
            cancel.set()  # the client leaves during the third group
        return real(self, group)

    monkeypatch.setattr(EmbeddingContext, "embed_many", counted)
    with pytest.raises(Cancelled):
        engine.embed(["hi"] * 1000, cancel)
    assert len(groups) == 3  # of 63

    # while a long embedding request runs, an answer is written beside it, not after it
    groups.clear()
    done: list[str] = []
    embedding = threading.Thread(target=lambda: (engine.embed(["word " * 90] * 24), done.append("embeddings")))
    embedding.start()
    while not groups:
        time.sleep(0.01)
    run(engine, prompt="Once upon a time", sampling=Sampling(max_tokens=20, temperature=0))
    done.append("answer")
    embedding.join(120)
    assert done == ["answer", "embeddings"], (done, len(groups))


def test_a_decode_fault_is_an_engine_error_and_the_host_goes_on(engine: LlamaCppBackend) -> None:
    """llama.cpp failing in the middle of an answer is the engine's fault (500), not a model
    that could not be loaded (502): that request ends with it, the next one is answered."""
    context = engine._loaded.context
    context.decode = lambda: -3  # as llama_decode's status for an error of its own
    try:
        with pytest.raises(EngineError, match=r"could not decode \(status -3\)"):
            run(engine, prompt="Hello", sampling=Sampling(max_tokens=5, temperature=0))
    finally:
        del context.decode
    assert run(engine, prompt="Hello", sampling=Sampling(max_tokens=5, temperature=0))[1].completion_tokens == 5


def test_a_schema_sent_again_is_not_tokenised_again(engine: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the vocabulary can write a schema's exact texts is remembered per model, so
    that a client sending the same schema with every request pays for the check once."""
    from llm_magic.wire.types import ResponseFormat

    model = engine._loaded.model
    checked: list[bytes] = []
    real = model.tokenize
    monkeypatch.setattr(model, "tokenize", lambda data, add_bos, special: (
        checked.append(data) if not add_bos and not special else None) or real(data, add_bos, special))
    schema = {"type": "object", "properties": {"colour_of_the_sky": {"type": "string"}},
              "required": ["colour_of_the_sky"]}
    ask = dict(prompt="JSON:", response_format=ResponseFormat(schema=schema), sampling=Sampling(max_tokens=3, temperature=0))
    run(engine, **ask)
    after_the_first = list(checked)
    run(engine, **ask)
    assert any(b"colour_of_the_sky" in data for data in after_the_first)
    assert checked == after_the_first


def test_prompt_chunks_beside_answers_grow_to_about_a_one_second_step_and_no_further() -> None:
    from llm_magic.engine.llama_cpp.batching import PROMPT_CHUNK_MIN, PROMPT_STEP_SECONDS, paced

    assert paced(64, PROMPT_STEP_SECONDS / 4, 512) == 128  # quick steps: larger chunks
    assert paced(256, PROMPT_STEP_SECONDS / 4, 256) == 256  # never past one ubatch
    assert paced(128, PROMPT_STEP_SECONDS * 1.5, 512) == 128  # about right: kept
    assert paced(128, PROMPT_STEP_SECONDS * 3, 512) == 64  # slow steps: smaller
    assert paced(PROMPT_CHUNK_MIN, PROMPT_STEP_SECONDS * 10, 512) == PROMPT_CHUNK_MIN
