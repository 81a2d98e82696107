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
from llm_magic.wire.events import Completion, ReasoningDelta, TextDelta, ToolCallDelta
from llm_magic.wire.fields import REASONING_FIELDS, Fields, parse_reasoning, parse_response_format, parse_sampling, type_name
from llm_magic.wire.render import StreamRenderer
from llm_magic.wire.sse import sse
from llm_magic.wire.tool_calls import ToolCall, parse_tool_request
from llm_magic.wire.types import GenerationRequest

RESPONSES_FIELDS = (
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "text", "tools",
    "tool_choice", "parallel_tool_calls", "stream", "stream_options", "store", "previous_response_id",
    "metadata", "user", "reasoning", "truncation", "include", "service_tier", "prompt_cache_key",
    "prompt_cache_retention", "safety_identifier", "background", "max_tool_calls", "conversation",
    "top_logprobs", "prompt", "client_metadata",
    "seed", "top_k", "min_p", "repeat_penalty", "stop",  # llama.cpp's sampling, as on /v1/chat
    *(k for k in REASONING_FIELDS if k != "reasoning_effort"),  # the effort is reasoning.effort here
)
STATELESS = "this host keeps no state between requests: send the whole conversation in 'input'"


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of input/output text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"'{where}.content' must be a string or a list of text parts, not {type_name(content)}")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise InvalidRequest(f"'{where}.content[{i}]' must be {{\"type\": \"input_text\", \"text\": \"...\"}}; "
                                 "this host handles text only")
        texts.append(part["text"])
    return "".join(texts)


def _messages(body: dict) -> list[dict]:
    """``instructions`` and ``input`` as chat messages (function calls and their outputs too);
    the system and developer messages before the first turn are one system prompt, as every
    chat template takes one."""
    messages = _history(body)
    lead = 0
    while lead < len(messages) and messages[lead]["role"] in ("system", "developer"):
        lead += 1
    if lead > 1:
        text = "\n\n".join(m["content"] for m in messages[:lead] if m["content"])
        messages[:lead] = [{"role": "system", "content": text}]
    return messages


def _history(body: dict) -> list[dict]:
    messages: list[dict] = []
    names = {(ns, name): flat for flat, (ns, name) in tool_names(body).items()}
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
            raise InvalidRequest(f"'{where}' must be an object, not {type_name(item)}")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            name = names.get((item.get("namespace"), item.get("name")), item.get("name"))
            call = {"id": item.get("call_id") or item.get("id") or f"call_{i}", "type": "function",
                    "function": {"name": name, "arguments": item.get("arguments", "{}")}}
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


# Tools this host cannot run: OpenAI runs them on its side. Left out of the prompt, as Codex
# offers web_search to every model.
HOSTED_TOOLS = ("web_search", "web_search_preview", "file_search", "code_interpreter", "computer_use_preview",
                "image_generation", "mcp", "local_shell", "custom", "tool_search")


def _functions(body: dict) -> list[tuple[str | None, dict, str]]:
    """Every function offered, namespaces opened: (its namespace, the function, where it is)."""
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list")
    found: list[tuple[str | None, dict, str]] = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            found.append((None, tool, f"tools[{i}]"))
        elif kind == "namespace":
            inner = tool.get("tools")
            if not isinstance(tool.get("name"), str) or not isinstance(inner, list):
                raise InvalidRequest(f"'tools[{i}]' must be {{\"type\": \"namespace\", \"name\", \"tools\": [...]}}")
            for j, function in enumerate(inner):
                if isinstance(function, dict) and function.get("type") == "function":
                    found.append((tool["name"], function, f"tools[{i}].tools[{j}]"))
                elif not isinstance(function, dict) or function.get("type") not in HOSTED_TOOLS:
                    raise InvalidRequest(f"'tools[{i}].tools[{j}]': a namespace holds functions")
        elif not isinstance(kind, str) or not kind.startswith(HOSTED_TOOLS):
            raise InvalidRequest(f"'tools[{i}]': this host calls functions only ({{\"type\": \"function\", "
                                 "\"name\", \"parameters\"}}, or a namespace of them)")
    return found


def tool_names(body: dict) -> dict[str, tuple[str | None, str]]:
    """The name the model sees for each function -> (its namespace, its own name): a function in
    a namespace keeps its name where no other function has it, else ``namespace__name``."""
    functions = _functions(body)
    taken = [f.get("name") for _, f, _ in functions]
    names: dict[str, tuple[str | None, str]] = {}
    for namespace, function, _ in functions:
        name = function.get("name")
        flat = name if namespace is None or taken.count(name) == 1 else f"{namespace}__{name}"
        names[flat] = (namespace, name)
    return names


def _tools(body: dict) -> Any:
    functions = _functions(body)
    if body.get("tools") is not None and not functions:
        return None  # only hosted tools
    flat = list(tool_names(body))
    converted = [{"type": "function", "function": {
        "name": flat[k] if len(flat) == len(functions) else function.get("name"),
        **{key: function.get(key) for key in ("description", "parameters")}}}
        for k, (_, function, _) in enumerate(functions)]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    elif isinstance(choice, dict):  # a hosted tool's choice: nothing here can honour it
        choice = "auto"
    return parse_tool_request(converted, choice, body.get("parallel_tool_calls"))


def parse_responses(body: Any, model_ids: Iterable[str] = ()) -> GenerationRequest:
    """Validate a ``POST /v1/responses`` body."""
    f = Fields(body)
    f.reject_unknown(RESPONSES_FIELDS)
    if body.get("previous_response_id") is not None or body.get("conversation") is not None:
        raise InvalidRequest(f"'previous_response_id' / 'conversation': {STATELESS}")
    if body.get("store") is True:
        raise InvalidRequest(f"'store': true is not possible: {STATELESS}; send \"store\": false")
    if body.get("background") is True:
        raise InvalidRequest("'background': true is not supported: this host answers while you wait (or streams)")
    text = Fields(body.get("text") or {}, "text.")
    text.reject_unknown(("format", "verbosity"))
    fmt = text.obj.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":  # flat here, nested in chat
        fmt = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    response_format = parse_response_format(fmt, "text.format")
    tools = _tools(body)
    if tools is not None and response_format is not None:
        raise InvalidRequest("give 'tools' or a JSON 'text.format', not both: both constrain the reply")
    sampling = parse_sampling(f, ("max_output_tokens",), None)
    reasoning = Fields(body.get("reasoning") or {}, "reasoning.")
    reasoning.reject_unknown(("effort", "summary", "generate_summary"))
    return GenerationRequest(messages=parse_messages(_messages(body), "input"), model=_model(f, model_ids),
                             sampling=sampling, stream=f.boolean("stream", False),
                             response_format=response_format, tools=tools,
                             **parse_reasoning(f, reasoning.obj.get("effort")))


@dataclass
class ResponsesRenderer(StreamRenderer):
    """Renders one generation as a Responses-API ``response`` (whole or as typed events)."""

    request: dict  # the request body, echoed in the response object as OpenAI does
    model: str = ""
    id: str = field(default_factory=lambda: "resp_" + uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    _sequence: int = 0
    _item_id: str = field(default_factory=lambda: "msg_" + uuid.uuid4().hex)  # the message item's
    _text: str = ""  # the message's text so far
    _opened: bool = False  # the message item was announced
    _output: list = field(default_factory=list)  # items done
    _message_done: bool = False
    _open_call: dict | None = None  # the function_call item being streamed, with its output index
    _calls_done: int = 0
    _message_index: int = 0  # the message item's output index (1 after a reasoning item)
    _reasoning_id: str = field(default_factory=lambda: "rs_" + uuid.uuid4().hex)
    _reasoning: str | None = None  # the reasoning streamed so far, while its item is open
    _names: dict | None = None  # the model's tool names -> (namespace, name), once asked

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
                "output_tokens": result.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": result.reasoning_tokens},
                "total_tokens": result.prompt_tokens + result.completion_tokens},
        }

    @staticmethod
    def _message(item_id: str, text: str, status: str = "completed") -> dict:
        content = [] if status == "in_progress" else [
            {"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}

    def _named(self, name: str) -> dict:
        """A call's name as the client offered it: a function of a namespace under its own
        name, with the namespace (the model saw them flattened)."""
        if self._names is None:
            self._names = tool_names(self.request)
        namespace, own = self._names.get(name, (None, name))
        return {"name": own, "namespace": namespace} if namespace is not None else {"name": name}

    def _call(self, call: ToolCall, status: str | None = None) -> dict:
        """A ``function_call`` item; its status: in_progress while streamed, else completed, or
        incomplete for a call cut off by ``max_output_tokens``."""
        status = status or ("completed" if call.complete else "incomplete")
        return {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
                **self._named(call.name), "arguments": "" if status == "in_progress" else call.arguments,
                "status": status}

    def _reasoning_item(self, text: str, status: str = "completed") -> dict:
        content = [] if status == "in_progress" else [{"type": "reasoning_text", "text": text}]
        return {"type": "reasoning", "id": self._reasoning_id, "summary": [], "content": content,
                "encrypted_content": None, "status": status}

    def answer(self, result: Completion) -> dict:
        calls = list(result.tool_calls)
        cut = result.finish_reason == "length"
        # a message cut off is incomplete; one followed by calls was finished before them
        status = "incomplete" if cut and not calls else "completed"
        output = [self._reasoning_item(result.reasoning)] if result.reasoning else []
        if result.text or not calls:
            output.append(self._message(self._item_id, result.text, status))
        output += [self._call(c) for c in calls]
        return self._response("completed", output, result)

    def _event(self, kind: str, **fields: Any) -> str:
        self._sequence += 1
        return f"event: {kind}\n" + sse({"type": kind, "sequence_number": self._sequence, **fields})

    @property
    def _where(self) -> dict:
        return {"item_id": self._item_id, "output_index": self._message_index, "content_index": 0}

    def keepalive(self) -> Iterable[str]:
        """An event, not a comment: Codex resets its idle timer (300 s) only on events, and a
        long prompt on a slow GPU takes that long. The SDKs take a repeated in_progress."""
        yield self._event("response.in_progress", response=self._response("in_progress", list(self._output), None))

    def opening(self) -> Iterable[str]:
        yield self._event("response.created", response=self._response("in_progress", [], None))
        yield self._event("response.in_progress", response=self._response("in_progress", [], None))

    def reasoning(self, delta: ReasoningDelta) -> Iterable[str]:
        if delta.index or self._opened or self._output:  # reasoning comes first, in one item
            return
        where = {"item_id": self._reasoning_id, "output_index": 0, "content_index": 0}
        if self._reasoning is None:
            self._reasoning = ""
            yield self._event("response.output_item.added", output_index=0, item=self._reasoning_item("", "in_progress"))
            yield self._event("response.content_part.added", **where, part={"type": "reasoning_text", "text": ""})
        self._reasoning += delta.text
        yield self._event("response.reasoning_text.delta", **where, delta=delta.text)

    def _close_reasoning(self) -> Iterator[str]:
        if self._reasoning is None:
            return
        text, self._reasoning = self._reasoning, None
        where = {"item_id": self._reasoning_id, "output_index": 0, "content_index": 0}
        yield self._event("response.reasoning_text.done", **where, text=text)
        yield self._event("response.content_part.done", **where, part={"type": "reasoning_text", "text": text})
        self._output.append(self._reasoning_item(text))
        yield self._event("response.output_item.done", output_index=0, item=self._output[-1])

    def _open_message(self) -> Iterator[str]:
        yield from self._close_reasoning()
        if not self._opened:
            self._opened = True
            self._message_index = len(self._output)
            yield self._event("response.output_item.added", output_index=self._message_index,
                              item=self._message(self._item_id, "", "in_progress"))
            yield self._event("response.content_part.added", **self._where,
                              part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})

    def _close_message(self, status: str) -> Iterator[str]:
        yield from self._open_message()
        self._message_done = True
        part = {"type": "output_text", "text": self._text, "annotations": [], "logprobs": []}
        yield self._event("response.output_text.done", **self._where, text=self._text, logprobs=[])
        yield self._event("response.content_part.done", **self._where, part=part)
        self._output.append(self._message(self._item_id, self._text, status))
        yield self._event("response.output_item.done", output_index=self._message_index, item=self._output[-1])

    def text(self, delta: TextDelta) -> Iterable[str]:
        if delta.index or self._message_done:  # one answer; text after its calls has nowhere to go
            return
        yield from self._open_message()
        self._text += delta.text
        yield self._event("response.output_text.delta", **self._where, delta=delta.text, logprobs=[])

    def _start_call(self, call_id: str, name: str) -> Iterator[str]:
        self._open_call = {"index": len(self._output), "item": {
            "type": "function_call", "id": "fc_" + call_id.removeprefix("call_"), "call_id": call_id,
            **self._named(name), "arguments": "", "status": "in_progress"}, "arguments": ""}
        yield self._event("response.output_item.added", output_index=len(self._output), item=self._open_call["item"])

    def _end_call(self, call: ToolCall | None) -> Iterator[str]:
        """The open call is done: as ``call`` says (the last one may be cut), else as streamed."""
        opened, self._open_call = self._open_call, None
        assert opened is not None
        item = self._call(call) if call is not None else {
            **opened["item"], "arguments": opened["arguments"], "status": "completed"}
        yield self._event("response.function_call_arguments.done", item_id=item["id"], output_index=opened["index"],
                          name=item["name"], arguments=item["arguments"])
        self._output.append(item)
        self._calls_done += 1
        yield self._event("response.output_item.done", output_index=opened["index"], item=item)

    def tool_call(self, delta: ToolCallDelta) -> Iterable[str]:
        if delta.index:
            return
        yield from self._close_reasoning()
        if self._opened and not self._message_done:  # the message before the calls is done
            yield from self._close_message("completed")
        if delta.id is not None:
            if self._open_call is not None:
                yield from self._end_call(None)
            yield from self._start_call(delta.id, delta.name or "")
        if delta.arguments and self._open_call is not None:
            self._open_call["arguments"] += delta.arguments
            yield self._event("response.function_call_arguments.delta", item_id=self._open_call["item"]["id"],
                              output_index=self._open_call["index"], delta=delta.arguments)

    def finished(self, result: Completion) -> Iterable[str]:
        cut = result.finish_reason == "length"
        calls = list(result.tool_calls)
        yield from self._close_reasoning()
        if not calls or (self._opened and not self._message_done):
            yield from self._close_message("incomplete" if cut and not calls else "completed")
        if self._open_call is not None:
            yield from self._end_call(calls[self._calls_done] if self._calls_done < len(calls) else None)
        for call in calls[self._calls_done:]:  # a backend that sent them whole, at the end
            yield from self._start_call(call.id, call.name)
            assert self._open_call is not None
            self._open_call["arguments"] = call.arguments
            yield self._event("response.function_call_arguments.delta", item_id=self._open_call["item"]["id"],
                              output_index=self._open_call["index"], delta=call.arguments)
            yield from self._end_call(call)
        final = self._response("completed", self._output, result)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        yield self._event(kind, response=final)
