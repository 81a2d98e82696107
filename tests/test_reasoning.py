"""Reasoning formats without a model: the splitters over answers as real models write them,
streamed in every possible pair of pieces and one character at a time."""

from __future__ import annotations

import pytest

from llm_magic.wire.reasoning import (HarmonySplitter, ReasoningFormat, ThinkSplitter, detect_reasoning,
                                      opens_think, split_reasoning)

QWEN3 = "<think>\nThe user asks for 2+2. That is 4.\n</think>\n\nThe answer is **4**."
R1_OPENED = "Okay, 2+2 is 4. Simple.\n</think>\n\n2 + 2 = 4"
HARMONY = ("<|channel|>analysis<|message|>User asks 2+2. Answer 4.<|end|>"
           "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.")
HARMONY_CALL = ("<|channel|>analysis<|message|>Need weather: call the tool.<|end|>"
                "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
                "<|message|>{\"city\": \"Paris\"}")


def streamed(splitter, pieces):
    """Every event a stream of ``pieces`` gives, and the reasoning and content they make."""
    reasoning, content, seen = "", "", []
    for piece in pieces:
        r, c = splitter.feed(piece)
        reasoning, content = reasoning + r, content + c
        seen.append((reasoning, content))
    r, c = splitter.finish()
    return reasoning + r, content + c, seen


def cuts(text):
    yield [text]
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    yield list(text)


CASES = [
    (lambda: ThinkSplitter(), QWEN3, ("The user asks for 2+2. That is 4.", "The answer is **4**.")),
    (lambda: ThinkSplitter(opened=True), R1_OPENED, ("Okay, 2+2 is 4. Simple.", "2 + 2 = 4")),
    (lambda: ThinkSplitter(opened=True), "<think>\nhm\n</think>\nok", ("hm", "ok")),  # written again
    (lambda: ThinkSplitter(), "Just an answer, no <think> here.", ("", "Just an answer, no <think> here.")),
    (lambda: ThinkSplitter(), "  <thinking is not a tag", ("", "  <thinking is not a tag")),
    (lambda: HarmonySplitter(), HARMONY, ("User asks 2+2. Answer 4.", "2 + 2 = 4.")),
    (lambda: HarmonySplitter(), "Plain text from a model without harmony.", ("", "Plain text from a model without harmony.")),
]


@pytest.mark.parametrize("make, text, expected", CASES)
def test_every_split_gives_the_same_answer_and_never_retracts(make, text, expected):
    reference_reasoning, reference_content = expected
    for pieces in cuts(text):
        reasoning, content, seen = streamed(make(), pieces)
        assert (reasoning, content) == expected, pieces
        for shown_reasoning, shown_content in seen:  # what was shown is always the start of the end
            assert reference_reasoning.startswith(shown_reasoning), (pieces, shown_reasoning)
            assert reference_content.startswith(shown_content), (pieces, shown_content)
            assert "</think" not in shown_reasoning and "<|" not in shown_content + shown_reasoning


def test_no_marker_piece_reaches_the_client_while_streaming():
    splitter = ThinkSplitter()
    assert splitter.feed("<thi") == ("", "")
    assert splitter.feed("nk>step one</th") == ("step one", "")
    assert splitter.feed("ink>") == ("", "")
    assert splitter.feed("\n\nDone") == ("", "Done")


def test_an_answer_cut_inside_the_reasoning_keeps_what_was_thought():
    assert split_reasoning(ReasoningFormat("deepseek"), "<think>still thinking </thi") == ("still thinking", "")
    assert split_reasoning(ReasoningFormat("deepseek", opened=True), "half a thought") == ("half a thought", "")
    assert split_reasoning(ReasoningFormat("harmony"), "<|channel|>analysis<|message|>half<|en") == ("half", "")


def test_harmony_commentary_to_a_tool_is_a_call_not_content():
    for pieces in cuts(HARMONY_CALL):
        splitter = HarmonySplitter()
        reasoning, content, _ = streamed(splitter, pieces)
        assert (reasoning, content) == ("Need weather: call the tool.", "")
        assert splitter.calls == [("get_weather", '{"city": "Paris"}')]


def test_harmony_commentary_without_a_recipient_is_shown():
    text = "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant<|channel|>final<|message|>Done."
    assert split_reasoning(ReasoningFormat("harmony"), text) == ("", "Let me check.Done.")


def test_formats_are_chosen_from_the_template():
    qwen3 = "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>{% endif %}"
    gpt_oss = "<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>"
    assert detect_reasoning(qwen3).name == "deepseek"
    assert detect_reasoning(qwen3, prompt="<|im_start|>assistant\n<think>\n").opened
    assert not detect_reasoning(qwen3, prompt="<|im_start|>assistant\n<think>\n\n</think>\n\n").opened
    assert detect_reasoning(gpt_oss).name == "harmony"
    assert detect_reasoning("{{ messages }}") is None
    assert detect_reasoning("{{ messages }}", "deepseek").name == "deepseek"
    assert detect_reasoning(qwen3, "none") is None
    assert opens_think("...<think>\n") and not opens_think("no tag")


def test_the_backend_events_keep_reasoning_apart_and_parse_calls_after_it():
    from llm_magic.engine.llama_cpp.thinking import split_reasoning as split_events
    from llm_magic.engine.llama_cpp.tool_events import split_tool_calls
    from llm_magic.wire.events import Completion, ReasoningDelta, TextDelta, ToolCallDelta
    from llm_magic.wire.tool_calls import FORMATS

    text = 'I should call it.\n</think>\n\n<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    events = [TextDelta(ch) for ch in text] + [Completion(text, "m", "stop", 3, 20)]
    out = list(split_tool_calls(split_events(events, ReasoningFormat("deepseek", opened=True)), FORMATS["hermes"]))
    assert "".join(e.text for e in out if isinstance(e, ReasoningDelta)) == "I should call it."
    assert not "".join(e.text for e in out if isinstance(e, TextDelta)).strip()
    done = out[-1]
    assert (done.reasoning, done.text, done.finish_reason) == ("I should call it.", "", "tool_calls")
    assert [c.name for c in done.tool_calls] == ["add"] and any(isinstance(e, ToolCallDelta) for e in out)


def test_harmony_commentary_calls_become_tool_calls():
    from llm_magic.engine.llama_cpp.thinking import split_reasoning as split_events
    from llm_magic.wire.events import Completion, TextDelta

    events = [TextDelta(HARMONY_CALL[i:i + 5]) for i in range(0, len(HARMONY_CALL), 5)]
    done = list(split_events([*events, Completion(HARMONY_CALL, "m", "stop", 3, 20)], ReasoningFormat("harmony")))[-1]
    assert done.reasoning == "Need weather: call the tool." and done.text == ""
    assert [(c.name, c.arguments) for c in done.tool_calls] == [("get_weather", '{"city": "Paris"}')]
    assert done.finish_reason == "tool_calls"
