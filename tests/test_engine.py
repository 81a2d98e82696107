"""The engine against the real SmolLM2 model, checked against llama-cpp-python itself."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from llm_magic.engine import Engine, Turnstile, chat_formats
from llm_magic.errors import HostBusy, InvalidRequest, ModelNotAllowed
from llm_magic.models import ModelPolicy
from llm_magic.protocol import Completion, GenerationRequest, Sampling, Started

GREEDY = Sampling(max_tokens=40, temperature=0.0)
CHAT = ({"role": "user", "content": "What is the capital of France?"},)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[Engine]:
    e = Engine(model_path)
    e.load_default()
    yield e
    e.close()


def run(engine: Engine, **kwargs) -> tuple[list[str], Completion]:
    events = list(engine.generate(GenerationRequest(**kwargs), threading.Event()))  # as the server does
    assert isinstance(events[0], Started)
    assert isinstance(events[-1], Completion)
    return events[1:-1], events[-1]


@pytest.fixture(scope="module")
def reference(model_path: Path):
    import llama_cpp

    llm = llama_cpp.Llama(str(model_path), n_ctx=4096, n_threads=2, verbose=False)
    yield llm
    llm.close()


def test_greedy_completion_matches_llama_cpp_python(engine: Engine, reference) -> None:
    deltas, result = run(engine, prompt="The three primary colours are", sampling=GREEDY)
    expected = reference.create_completion("The three primary colours are", max_tokens=40, temperature=0.0)
    assert result.text == expected["choices"][0]["text"]
    assert "".join(deltas) == result.text
    assert result.usage == expected["usage"]
    assert result.finish_reason == expected["choices"][0]["finish_reason"] == "length"


def test_a_long_prompt_read_in_chunks_gives_llama_cpp_pythons_greedy_answer(engine: Engine, reference) -> None:
    prompt = "Here is a list of fruits and what colour each is: " + ", ".join(
        f"fruit number {i} is {colour}" for i, colour in enumerate(["red", "yellow", "green", "orange"] * 25))
    _, result = run(engine, prompt=prompt, sampling=GREEDY)
    expected = reference.create_completion(prompt, max_tokens=40, temperature=0.0)
    assert result.prompt_tokens > 500  # several chunks
    assert result.text == expected["choices"][0]["text"]


def test_greedy_under_a_grammar_matches_llama_cpp_python(engine: Engine, reference) -> None:
    from llama_cpp.llama_grammar import LlamaGrammar

    from llm_magic.grammars import grammar_for
    from llm_magic.protocol import ResponseFormat

    schema = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["title", "year"]}
    prompt = "A famous book, as JSON:"
    for fmt in (ResponseFormat(), ResponseFormat(schema=schema)):
        _, result = run(engine, prompt=prompt, sampling=Sampling(max_tokens=60, temperature=0.0), response_format=fmt)
        expected = reference.create_completion(prompt, max_tokens=60, temperature=0.0,
                                               grammar=LlamaGrammar.from_string(grammar_for(fmt), verbose=False))
        assert result.text == expected["choices"][0]["text"]  # grammar on every token vs on demand
        assert result.completion_tokens == expected["usage"]["completion_tokens"]


def test_a_request_withdrawn_while_its_prompt_is_read_stops_within_a_chunk(engine: Engine) -> None:
    cancel = threading.Event()
    events = engine.generate(GenerationRequest(prompt="word " * 3000, sampling=GREEDY), cancel)
    assert isinstance(next(events), Started)
    evaluated = []
    original = engine._loaded.llm.eval

    def eval_then_leave(tokens):  # the client leaves during the first chunk
        evaluated.append(len(tokens))
        cancel.set()
        return original(tokens)

    engine._loaded.llm.eval = eval_then_leave
    try:
        assert list(events) == []  # no text, no answer: nobody wants it
    finally:
        del engine._loaded.llm.eval
    assert evaluated == [32]  # one small chunk of the 3,000 tokens
    _, result = run(engine, prompt="Hi", sampling=GREEDY)  # the model is free and sound
    assert result.completion_tokens > 0


def test_greedy_chat_uses_the_gguf_template_and_matches_llama_cpp_python(engine: Engine, reference) -> None:
    _, result = run(engine, messages=CHAT, sampling=GREEDY)
    expected = reference.create_chat_completion(list(CHAT), max_tokens=40, temperature=0.0)
    assert result.text == expected["choices"][0]["message"]["content"]
    assert result.prompt_tokens == expected["usage"]["prompt_tokens"]


def test_stop_sequence_ends_the_answer_and_is_never_streamed(engine: Engine) -> None:
    full = run(engine, messages=({"role": "user", "content": "Count from 1 to 10, one per line."},),
               sampling=Sampling(max_tokens=60, temperature=0.0))[1].text
    assert "4" in full
    deltas, result = run(engine, messages=({"role": "user", "content": "Count from 1 to 10, one per line."},),
                         sampling=Sampling(max_tokens=60, temperature=0.0, stop=("4",)))
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index("4")]
    assert "".join(deltas) == result.text


def test_empty_prompt_generates_from_the_start_token(engine: Engine) -> None:
    _, result = run(engine, prompt="", sampling=Sampling(max_tokens=3, temperature=0.0))
    assert result.prompt_tokens == 1 and result.completion_tokens == 3


def test_max_tokens_is_exact(engine: Engine) -> None:
    _, result = run(engine, prompt="Once upon a time", sampling=Sampling(max_tokens=7, temperature=0.0))
    assert result.completion_tokens == 7 and result.finish_reason == "length"
    assert result.timings["predicted_n"] == 7


def test_same_seed_same_text_at_high_temperature(engine: Engine) -> None:
    params = dict(prompt="My favourite animal is", sampling=Sampling(max_tokens=20, temperature=1.5, seed=42))
    assert run(engine, **params)[1].text == run(engine, **params)[1].text


def test_prompt_longer_than_the_context_is_a_clear_error(model_path: Path) -> None:
    small = Engine(model_path, ctx_length=64)
    with pytest.raises(InvalidRequest, match=r"the prompt is \d+ tokens but the model's context holds 64"):
        run(small, prompt="word " * 100)
    _, result = run(small, prompt="word " * 50, sampling=Sampling(max_tokens=500, temperature=0.0))
    assert result.prompt_tokens + result.completion_tokens <= 64  # max_tokens bounded by the context
    small.close()


def test_next_chat_turn_reuses_the_kv_cache(engine: Engine) -> None:
    history = [{"role": "user", "content": "Tell me about the moon. " * 20}]
    _, first = run(engine, messages=tuple(history), sampling=GREEDY)
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And the sun?"}]
    _, second = run(engine, messages=tuple(history), sampling=GREEDY)
    assert second.timings["cache_n"] >= first.prompt_tokens  # the whole first turn was kept
    assert second.timings["prompt_n"] < second.prompt_tokens - first.prompt_tokens + 10


def test_closing_a_generation_frees_the_model_at_once(engine: Engine) -> None:
    events = engine.generate(GenerationRequest(prompt="word " * 100, sampling=Sampling(max_tokens=2000, temperature=0)))
    next(events), next(events)
    assert engine.turnstile.busy
    events.close()
    assert not engine.turnstile.busy
    assert run(engine, prompt="Hi", sampling=Sampling(max_tokens=2))[1].completion_tokens == 2


def test_named_chat_format_and_unknown_one(engine: Engine) -> None:
    assert "chatml" in chat_formats() and "llama-2" in chat_formats()
    _, result = run(engine, messages=CHAT, chat_format="chatml", sampling=GREEDY)
    assert result.text
    with pytest.raises(InvalidRequest, match="unknown chat_format 'nope'.*chatml"):
        run(engine, messages=CHAT, chat_format="nope")


def test_switching_models_unloads_the_old_one(model_path: Path, model_copy: Path) -> None:
    e = Engine(model_path, policy=ModelPolicy(has_token=True, allow_patterns=[str(model_copy)]))
    e.load_default()
    first = e._loaded
    _, result = run(e, prompt="Hi", model=str(model_copy), sampling=Sampling(max_tokens=2))
    assert result.model == "copy.Q4_1" and e.model == "copy.Q4_1"  # a name, never the host's path
    assert e._loaded is not None and e._loaded.key.path == model_copy
    assert first is not None and first.llm._stack is not None
    # llama-cpp-python frees a model's memory through its exit stack, which close() empties
    assert not first.llm._stack._exit_callbacks
    assert run(e, prompt="Hi", sampling=Sampling(max_tokens=2))[1].model == "SmolLM2-135M-Instruct.Q4_1"
    e.close()


def test_model_policy_is_enforced(engine: Engine, model_copy: Path) -> None:
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
