"""OpenAI's Responses API (``POST /v1/responses``), stateless: the request is turned into the
same chat ``GenerationRequest`` as ``/v1/chat/completions``, and the result rendered as a
``response`` object or as its typed stream of events. The host keeps nothing between requests,
so ``previous_response_id``, ``store: true``, ``conversation`` and ``background`` are refused
with a message that says so. No Flask and no llama_cpp here.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from llm_magic.errors import InvalidRequest
from llm_magic.wire.openai import _model, parse_messages
from llm_magic.wire.protocol import (
    SSE_KEEPALIVE, Completion, Event, GenerationRequest, KeepAlive, Sampling, Started, _Fields,
    _type_name, parse_response_format, sse,
)
from llm_magic.wire.tool_calls import FORMATS, ToolCall, ToolStream, parse_tool_request, read_answer

RESPONSES_FIELDS = (
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "text", "tools",
    "tool_choice", "parallel_tool_calls", "stream", "stream_options", "store", "previous_response_id",
    "metadata", "user", "reasoning", "truncation", "include", "service_tier", "prompt_cache_key",
    "prompt_cache_retention", "safety_identifier", "background", "max_tool_calls", "conversation",
    "top_logprobs", "prompt",
    "seed", "top_k", "min_p", "repeat_penalty", "stop",  # llama.cpp's sampling, as on /v1/chat
)
STATELESS = "this host keeps no state between requests: send the whole conversation in 'input'"


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of input/output text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"'{where}.content' must be a string or a list of text parts, not {_type_name(content)}")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise InvalidRequest(f"'{where}.content[{i}]' must be {{\"type\": \"input_text\", \"text\": \"...\"}}; "
                                 "this host handles text only")
        texts.append(part["text"])
    return "".join(texts)


def _messages(body: dict) -> list[dict]:
    """``instructions`` and ``input`` as chat messages (function calls and their outputs too)."""
    messages: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest("'instructions' must be a string")
        messages.append({"role": "system", "content": instructions})
    value = body.get("input")
    if isinstance(value, str):
        return messages + [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidRequest("'input' is required: a string, or a list of message and function-call items")
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"'{where}' must be an object, not {_type_name(item)}")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id") or f"call_{i}", "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls") is not None and not last["content"]:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue  # a reasoning model's notes from another server: nothing to show this one
        else:
            raise InvalidRequest(f"'{where}.type' {json.dumps(kind)} is not supported: use message, "
                                 "function_call or function_call_output")
    return messages


def _tools(body: dict) -> Any:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list")
    converted = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidRequest(f"'tools[{i}]': this host calls functions only ({{\"type\": \"function\", "
                                 "\"name\", \"parameters\"}})")
        converted.append({"type": "function", "function": {k: tool.get(k) for k in ("name", "description", "parameters")}})
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return parse_tool_request(converted, choice, body.get("parallel_tool_calls"))


def parse_responses(body: Any, model_ids: Iterable[str] = ()) -> GenerationRequest:
    """Validate a ``POST /v1/responses`` body."""
    f = _Fields(body)
    f.reject_unknown(RESPONSES_FIELDS)
    if body.get("previous_response_id") is not None or body.get("conversation") is not None:
        raise InvalidRequest(f"'previous_response_id' / 'conversation': {STATELESS}")
    if body.get("store") is True:
        raise InvalidRequest(f"'store': true is not possible: {STATELESS}; send \"store\": false")
    if body.get("background") is True:
        raise InvalidRequest("'background': true is not supported: this host answers while you wait (or streams)")
    text = _Fields(body.get("text") or {}, "text.")
    text.reject_unknown(("format", "verbosity"))
    fmt = text.obj.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":  # flat here, nested in chat
        fmt = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    response_format = parse_response_format(fmt, "text.format")
    tools = _tools(body)
    if tools is not None and response_format is not None:
        raise InvalidRequest("give 'tools' or a JSON 'text.format', not both: both constrain the reply")
    d = Sampling()
    sampling = Sampling(
        max_tokens=f.integer("max_output_tokens", 1, 1 << 20),
        temperature=f.number("temperature", 0.0, 2.0, d.temperature),
        top_p=f.number("top_p", 0.0, 1.0, d.top_p),
        top_k=f.integer("top_k", 0, 1_000_000, d.top_k),
        min_p=f.number("min_p", 0.0, 1.0, d.min_p),
        repeat_penalty=f.number("repeat_penalty", 0.0, 10.0, d.repeat_penalty),
        stop=f.stop("stop"),
        seed=f.integer("seed", -1, 2**64 - 1),
    )
    return GenerationRequest(messages=parse_messages(_messages(body), "input"), model=_model(f, model_ids),
                             sampling=sampling, stream=f.boolean("stream", False),
                             response_format=response_format, tools=tools)


@dataclass
class ResponsesRenderer:
    """Renders one generation as a Responses-API ``response`` (whole or as typed events)."""

    request: dict  # the request body, echoed in the response object as OpenAI does
    model: str = ""
    tool_format: str | None = None
    id: str = field(default_factory=lambda: "resp_" + uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    _sequence: int = 0

    def _response(self, status: str, output: list, result: Completion | None) -> dict:
        body = self.request
        incomplete = result is not None and result.finish_reason == "length"
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": "incomplete" if incomplete else status, "model": result.model if result else self.model,
            "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") or {}, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": None, "reasoning": None, "store": False,
            "temperature": body.get("temperature", 0.8), "top_p": body.get("top_p", 0.95),
            "text": body.get("text") or {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "truncation": "disabled", "user": body.get("user"),
            "usage": None if result is None else {
                "input_tokens": result.prompt_tokens, "input_tokens_details": {"cached_tokens": result.cached_tokens},
                "output_tokens": result.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": result.prompt_tokens + result.completion_tokens},
        }

    @staticmethod
    def _message(item_id: str, text: str, status: str = "completed") -> dict:
        content = [] if status == "in_progress" else [
            {"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def _call(call: ToolCall, status: str | None = None) -> dict:
        """A ``function_call`` item; its status: in_progress while streamed, else completed, or
        incomplete for a call cut off by ``max_output_tokens``."""
        status = status or ("completed" if call.complete else "incomplete")
        return {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
                "name": call.name, "arguments": "" if status == "in_progress" else call.arguments, "status": status}

    def _split(self, result: Completion) -> tuple[str, list[ToolCall]]:
        if self.request.get("tools") and result.tool_format:
            return read_answer(result.tool_format, result.text, result.finish_reason == "length")
        return result.text, []

    def answer(self, result: Completion) -> dict:
        text, calls = self._split(result)
        cut = result.finish_reason == "length"
        # a message cut off is incomplete; one followed by calls was finished before them
        status = "incomplete" if cut and not calls else "completed"
        output = ([self._message("msg_" + uuid.uuid4().hex, text, status)] if text or not calls else [])
        output += [self._call(c) for c in calls]
        return self._response("completed", output, result)

    def _event(self, kind: str, **fields: Any) -> str:
        self._sequence += 1
        return f"event: {kind}\n" + sse({"type": kind, "sequence_number": self._sequence, **fields})

    def stream(self, events: Iterable[Event]) -> Iterator[str]:
        yield self._event("response.created", response=self._response("in_progress", [], None))
        yield self._event("response.in_progress", response=self._response("in_progress", [], None))
        tools = bool(self.request.get("tools"))
        tool_stream = ToolStream(FORMATS[self.tool_format]) if tools and self.tool_format else None
        item_id, output = "msg_" + uuid.uuid4().hex, []
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        message = {"text": "", "opened": False}

        def open_message() -> Iterator[str]:
            if not message["opened"]:
                message["opened"] = True
                yield self._event("response.output_item.added", output_index=0,
                                  item=self._message(item_id, "", "in_progress"))
                yield self._event("response.content_part.added", **where,
                                  part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})

        def text_delta(delta: str) -> Iterator[str]:
            yield from open_message()
            message["text"] += delta
            yield self._event("response.output_text.delta", **where, delta=delta, logprobs=[])

        for event in events:
            if isinstance(event, KeepAlive):
                yield SSE_KEEPALIVE
                continue
            if isinstance(event, Started):
                self.model, self.tool_format = event.model, event.tool_format
                if tools and tool_stream is None and event.tool_format:
                    tool_stream = ToolStream(FORMATS[event.tool_format])
                continue
            if isinstance(event, str):
                delta = tool_stream.feed(str(event)) if tool_stream is not None else str(event)
                if delta:
                    yield from text_delta(delta)
                continue
            if not isinstance(event, Completion):
                continue
            calls: list[ToolCall] = []
            cut = event.finish_reason == "length"
            if tool_stream is not None:
                rest, calls = tool_stream.finish(cut)
                if rest:
                    yield from text_delta(rest)
            if message["opened"] or not calls:
                yield from open_message()
                text = message["text"]
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                yield self._event("response.output_text.done", **where, text=text, logprobs=[])
                yield self._event("response.content_part.done", **where, part=part)
                output.append(self._message(item_id, text, "incomplete" if cut and not calls else "completed"))
                yield self._event("response.output_item.done", output_index=0, item=output[-1])
            for call in calls:
                index = len(output)
                item = self._call(call, "in_progress")
                yield self._event("response.output_item.added", output_index=index, item=item)
                yield self._event("response.function_call_arguments.delta", item_id=item["id"],
                                  output_index=index, delta=call.arguments)
                yield self._event("response.function_call_arguments.done", item_id=item["id"],
                                  output_index=index, name=call.name, arguments=call.arguments)
                output.append(self._call(call))
                yield self._event("response.output_item.done", output_index=index, item=output[-1])
            final = self._response("completed", output, event)
            kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
            yield self._event(kind, response=final)
