"""Reasoning in every wire format, without a model: request fields, renderers, the upstream
engine's reasoning passed through."""

from __future__ import annotations

import json

import pytest

from llm_magic.engine.upstream.translate import ChunkReader, request_body
from llm_magic.errors import InvalidRequest
from llm_magic.wire.events import Completion, ReasoningDelta, Started, TextDelta
from llm_magic.wire.openai import OpenAIRenderer, parse_chat
from llm_magic.wire.responses import ResponsesRenderer, parse_responses
from llm_magic.wire.seed import api_answer, api_stream, parse_api_request

USER = [{"role": "user", "content": "hi"}]
DONE = Completion("Four.", "m", "stop", 5, 9, reasoning="2+2 is 4.", reasoning_tokens=6)
EVENTS = [Started("m"), ReasoningDelta("2+2 "), ReasoningDelta("is 4."), TextDelta("Four."), DONE]


def sse_items(chunks):
    return [json.loads(line[6:]) for chunk in chunks for line in chunk.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_chat_fields_are_read_and_checked():
    request = parse_chat({"messages": USER, "reasoning_format": "none", "thinking_budget_tokens": 16,
                          "reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}})
    assert (request.reasoning_format, request.reasoning_budget, request.reasoning_effort) == ("none", 16, "high")
    assert request.chat_template_kwargs == {"enable_thinking": False}
    for field, value in [("chat_template_kwargs", "enable_thinking=false"), ("chat_template_kwargs", [1]),
                         ("reasoning_format", "qwen3"), ("reasoning_effort", "extreme"),
                         ("thinking_budget_tokens", -2), ("thinking_budget_tokens", "10")]:
        with pytest.raises(InvalidRequest, match=f"'{field}'"):
            parse_chat({"messages": USER, field: value})


def test_history_keeps_reasoning_content_for_the_template():
    messages = [*USER, {"role": "assistant", "content": "hello", "reasoning_content": "greet back"},
                {"role": "user", "content": "again"}]
    assert parse_chat({"messages": messages}).messages[1]["reasoning_content"] == "greet back"
    with pytest.raises(InvalidRequest, match="reasoning_content"):
        parse_chat({"messages": [*USER, {"role": "assistant", "content": "", "reasoning_content": 3}, *USER]})


def test_chat_renders_reasoning_content_whole_and_streamed():
    body = OpenAIRenderer(chat=True).answer(DONE)
    assert body["choices"][0]["message"]["reasoning_content"] == "2+2 is 4."
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 6}
    plain = OpenAIRenderer(chat=True).answer(Completion("x", "m", "stop", 1, 1))
    assert "reasoning_content" not in plain["choices"][0]["message"]
    assert "completion_tokens_details" not in plain["usage"]
    chunks = sse_items(OpenAIRenderer(chat=True).stream(EVENTS))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "2+2 is 4."
    assert "".join(d.get("content") or "" for d in deltas) == "Four."


def test_responses_render_a_reasoning_item_first():
    body = ResponsesRenderer({"input": "hi"}).answer(DONE)
    assert [item["type"] for item in body["output"]] == ["reasoning", "message"]
    assert body["output"][0]["content"] == [{"type": "reasoning_text", "text": "2+2 is 4."}]
    assert body["usage"]["output_tokens_details"] == {"reasoning_tokens": 6}
    events = sse_items(ResponsesRenderer({"input": "hi"}).stream(EVENTS))
    kinds = [e["type"] for e in events]
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == "2+2 is 4."
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["type"]) for e in added] == [(0, "reasoning"), (1, "message")]
    text = next(e for e in events if e["type"] == "response.output_text.delta")
    assert text["output_index"] == 1
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "2+2 is 4."


def test_responses_take_reasoning_effort():
    request = parse_responses({"input": "hi", "reasoning": {"effort": "low"}, "thinking_budget_tokens": 4})
    assert (request.reasoning_effort, request.reasoning_budget) == ("low", 4)
    with pytest.raises(InvalidRequest, match="reasoning"):
        parse_responses({"input": "hi", "reasoning": {"effort": "huge"}})


def test_api_answer_and_stream_carry_reasoning():
    assert api_answer(DONE)["answer"] == {"role": "assistant", "content": "Four.", "reasoning_content": "2+2 is 4."}
    items = sse_items(api_stream(EVENTS))
    assert [i for i in items if "reasoning" in i] == [{"reasoning": "2+2 "}, {"reasoning": "is 4."}]
    request = parse_api_request({"inputs": USER, "options": {"thinking_budget_tokens": 8, "reasoning_format": "none"}})
    assert (request.reasoning_budget, request.reasoning_format) == (8, "none")


def test_upstream_reasoning_passes_through():
    reader = ChunkReader("m", chat=True)
    events = reader.feed({"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]})
    events += reader.feed({"choices": [{"index": 0, "delta": {"reasoning": " ok"}}]})
    events += reader.feed({"choices": [{"index": 0, "delta": {"content": "Yes"}, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                     "completion_tokens_details": {"reasoning_tokens": 2}}})
    assert events == [ReasoningDelta("hm"), ReasoningDelta(" ok"), TextDelta("Yes", 0, None)]
    done = reader.completion()
    assert (done.reasoning, done.text, done.reasoning_tokens) == ("hm ok", "Yes", 2)
    body = request_body(parse_chat({"messages": USER, "reasoning_effort": "low",
                                    "chat_template_kwargs": {"enable_thinking": True}}), "m")
    assert body["reasoning_effort"] == "low" and body["chat_template_kwargs"] == {"enable_thinking": True}
