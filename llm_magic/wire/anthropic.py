"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``), as Claude
Code and the anthropic SDK speak it: bodies into the same chat ``GenerationRequest`` as
``/v1/chat/completions`` (tool_use / tool_result blocks become OpenAI tool calls and tool
messages), and the answer back as a ``message`` or its stream of named events.

Lenient as Anthropic's own server is with what does not apply here: ``cache_control``,
``context_management``, ``output_config.effort``, ``metadata``, hosted tools and foreign model
names are accepted; images and documents are a 400 until the host can see them. No Flask here.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from llm_magic.errors import HostBusy, InvalidRequest, LLMMagicError
from llm_magic.wire.events import Completion, ReasoningDelta, TextDelta, ToolCallDelta
from llm_magic.wire.fields import Fields, check_message_list, parse_sampling, type_name
from llm_magic.wire.openai import _model, parse_messages
from llm_magic.wire.render import StreamRenderer
from llm_magic.wire.sse import sse
from llm_magic.wire.tool_calls import ToolCall, parse_tool_request
from llm_magic.wire.types import MAX_TOKENS_LIMIT, GenerationRequest, ResponseFormat

# Valid Anthropic fields that change nothing here (caching, billing, Anthropic's own services).
IGNORED_FIELDS = ("metadata", "cache_control", "context_management", "container", "mcp_servers",
                  "service_tier", "speed", "inference_geo", "diagnostics", "user_profile_id", "workspace_id",
                  "betas")
COUNT_FIELDS = ("model", "messages", "system", "tools", "tool_choice", "thinking", "output_config",
                *IGNORED_FIELDS)
MESSAGES_FIELDS = (*COUNT_FIELDS, "max_tokens", "stop_sequences", "stream", "temperature", "top_p", "top_k")
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
# Claude Code's per-request attribution line changes every turn: left in, no turn would ever
# reuse the last one's KV cache (llama.cpp's server drops it too).
BILLING_LINE = re.compile(r"^x-anthropic-billing-header:.*(?:\n|$)", re.MULTILINE)
TEXT_ONLY = "this host handles text only"
# What adds nothing to each kind of block: a keep-alive that is an event (see keepalive).
EMPTY_DELTAS = {"text": {"type": "text_delta", "text": ""}, "thinking": {"type": "thinking_delta", "thinking": ""},
                "tool_use": {"type": "input_json_delta", "partial_json": ""}}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _blocks(value: Any, where: str) -> list[dict]:
    """A message's content as a list of blocks (a string is one text block)."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise InvalidRequest(f"'{where}' must be a string or a list of content blocks, not {type_name(value)}")
    for i, block in enumerate(value):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise InvalidRequest(f"'{where}[{i}]' must be a content block: an object with a 'type'")
    return value


def _text_of(block: dict, where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise InvalidRequest(f"'{where}.text' must be a string, not {type_name(text)}")
    return text


def _plain_text(value: Any, where: str) -> str:
    """Text from a string or text blocks (``system``, a ``tool_result``'s content)."""
    if value is None:
        return ""
    texts = []
    for i, block in enumerate(_blocks(value, where)):
        if block["type"] != "text":
            raise InvalidRequest(f"'{where}[{i}]' is a {json.dumps(block['type'])} block; {TEXT_ONLY} here")
        texts.append(_text_of(block, f"{where}[{i}]"))
    return "\n\n".join(texts) if not isinstance(value, str) else value


def _system(body: dict) -> list[str]:
    system = body.get("system")
    return [] if system is None else [_plain_text(system, "system")]


def _assistant(blocks: list[dict], where: str) -> dict:
    texts, calls, reasoning = [], [], []
    for i, block in enumerate(blocks):
        kind, at = block["type"], f"{where}[{i}]"
        if kind == "text":
            texts.append(_text_of(block, at))
        elif kind == "tool_use":
            name, call_id = block.get("name"), block.get("id")
            if not isinstance(name, str) or not name or not isinstance(call_id, str) or not call_id:
                raise InvalidRequest(f"'{at}' needs a string 'id' and 'name'")
            tool_input = block.get("input", {})
            if not isinstance(tool_input, dict):
                raise InvalidRequest(f"'{at}.input' must be an object, not {type_name(tool_input)}")
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name, "arguments": json.dumps(tool_input, ensure_ascii=False)}})
        elif kind == "thinking":
            thinking = block.get("thinking")
            if not isinstance(thinking, str):
                raise InvalidRequest(f"'{at}.thinking' must be a string, not {type_name(thinking)}")
            reasoning.append(thinking)
        elif kind in ("image", "document"):
            raise InvalidRequest(f"'{at}' is an {kind} block; {TEXT_ONLY}")
        # redacted_thinking, server_tool_use and hosted tools' results: nothing this model can read
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    if any(reasoning):
        message["reasoning_content"] = "\n\n".join(r for r in reasoning if r)
    return message


def _user(blocks: list[dict], where: str) -> list[dict]:
    """A user turn: its tool results first (they answer the turn before), then its text."""
    results, texts = [], []
    for i, block in enumerate(blocks):
        kind, at = block["type"], f"{where}[{i}]"
        if kind == "text":
            texts.append(_text_of(block, at))
        elif kind == "tool_result":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequest(f"'{at}.tool_use_id' must be the id of the tool_use it answers")
            content = _plain_text(block.get("content"), f"{at}.content")
            if block.get("is_error") is True:
                content = "Error: " + content
            results.append({"role": "tool", "tool_call_id": call_id, "content": content})
        elif kind in ("image", "document", "search_result"):
            raise InvalidRequest(f"'{at}' is an {kind} block; {TEXT_ONLY}")
        elif kind not in ("thinking", "redacted_thinking"):
            raise InvalidRequest(f"'{at}.type' {json.dumps(kind)} is not supported in a user turn: "
                                 "use text or tool_result")
    return results + ([{"role": "user", "content": "".join(texts)}] if texts else [])


def _messages(body: dict) -> list[dict]:
    """``system`` and ``messages`` as OpenAI chat messages; ``role: "system"`` entries (Claude
    Code sends one) join the system prompt."""
    value = body.get("messages")
    check_message_list(value, "messages")
    system, messages = _system(body), []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"'{where}' must be an object with 'role' and 'content', not {type_name(item)}")
        Fields(item, where + ".").reject_unknown(("role", "content"))
        role = item.get("role")
        if role == "system":
            system.append(_plain_text(item.get("content"), where + ".content"))
            continue
        blocks = _blocks(item.get("content"), where + ".content")
        if role == "assistant":
            messages.append(_assistant(blocks, where + ".content"))
        elif role == "user":
            messages += _user(blocks, where + ".content")
        else:
            raise InvalidRequest(f"'{where}.role' must be user or assistant, got {json.dumps(role)}")
    text = BILLING_LINE.sub("", "\n\n".join(s for s in system if s)).strip()
    if not messages:
        raise InvalidRequest("'messages' must hold at least one user or assistant message")
    return ([{"role": "system", "content": text}] if text else []) + messages


def _tools(body: dict) -> Any:
    """Client tools (those with an ``input_schema``) as OpenAI tools; Anthropic's hosted tools
    (web search, code execution, ...) have no schema and nothing here runs them: left out."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest(f"'tools' must be a list, not {type_name(tools)}")
    converted = []
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, dict):
            raise InvalidRequest(f"'tools[{i}]' must be an object, not {type_name(tool)}")
        if tool.get("type") not in (None, "custom") and "input_schema" not in tool:
            continue
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise InvalidRequest(f"'tools[{i}].input_schema' must be a JSON Schema object, not {type_name(schema)}")
        converted.append({"type": "function", "function": {
            "name": tool.get("name"), "description": tool.get("description") or "", "parameters": schema}})
    parallel = None
    if choice is not None:
        f = Fields(choice, "tool_choice.")
        kind = choice.get("type")
        if kind not in ("auto", "any", "tool", "none"):
            raise InvalidRequest(f"'tool_choice.type' must be auto, any, tool or none, got {json.dumps(kind)}")
        disabled = f.boolean("disable_parallel_tool_use")
        parallel = None if disabled is None else not disabled
        name = f.string("name", max_length=256) if kind == "tool" else None
        if kind == "tool" and name is None:
            raise InvalidRequest("'tool_choice.name' is required with {\"type\": \"tool\"}")
        choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or \
            {"type": "function", "function": {"name": name}}
    if not converted:
        return None
    try:
        return parse_tool_request(converted, choice, parallel)
    except InvalidRequest as exc:  # its message speaks OpenAI: say it in this API's words
        raise InvalidRequest(exc.message.replace(".function.parameters'", ".input_schema'")
                             .replace(".function.", ".")) from None


def _thinking(body: dict) -> int | None:
    """``thinking`` as the reasoning budget: ``enabled`` its ``budget_tokens``, ``disabled`` none,
    ``adaptive`` the host's setting."""
    value = body.get("thinking")
    if value is None:
        return None
    f = Fields(value, "thinking.")
    kind = value.get("type")
    if kind == "enabled":
        budget = f.integer("budget_tokens", 0, MAX_TOKENS_LIMIT)
        if budget is None:
            raise InvalidRequest("'thinking.budget_tokens' is required with {\"type\": \"enabled\"}")
        return budget
    if kind == "disabled":
        return 0
    if kind in ("adaptive", "between_tools"):
        return None
    raise InvalidRequest(f"'thinking.type' must be enabled, adaptive or disabled, got {json.dumps(kind)}")


def _output_config(body: dict) -> tuple[str | None, ResponseFormat | None]:
    """``output_config``: its ``effort`` for templates that take one, its JSON ``format``."""
    f = Fields(body.get("output_config") or {}, "output_config.")
    f.reject_unknown(("effort", "format", "task_budget"))
    effort = f.obj.get("effort")
    if effort is not None and effort not in EFFORTS:
        raise InvalidRequest(f"'output_config.effort' must be one of {', '.join(EFFORTS)}, got {json.dumps(effort)[:40]}")
    fmt = f.obj.get("format")
    if fmt is None:
        return EFFORTS.get(effort or ""), None
    spec = Fields(fmt, "output_config.format.")
    spec.reject_unknown(("type", "schema"))
    if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise InvalidRequest("'output_config.format' must be {\"type\": \"json_schema\", \"schema\": {...}}")
    return EFFORTS.get(effort or ""), ResponseFormat(schema=fmt["schema"], strict=True)


def parse_anthropic(body: Any, model_ids: Iterable[str] = (), counting: bool = False) -> GenerationRequest:
    """Validate a ``POST /v1/messages`` body (``counting``: a ``count_tokens`` body, which has
    no ``max_tokens`` and no sampling)."""
    f = Fields(body)
    f.reject_unknown(COUNT_FIELDS if counting else MESSAGES_FIELDS)
    if not counting and not f.present("max_tokens"):
        raise InvalidRequest("'max_tokens' is required: the most tokens to write (a large value means "
                             "as many as the context has room for)")
    if "messages" not in f.obj:
        raise InvalidRequest("'messages' is required: a list of {role, content} messages")
    tools = _tools(f.obj)
    effort, response_format = _output_config(f.obj)
    if tools is not None and response_format is not None:
        raise InvalidRequest("give 'tools' or 'output_config.format', not both: both constrain the reply")
    sampling = parse_sampling(f, ("max_tokens",), None)
    return GenerationRequest(
        messages=parse_messages(_messages(f.obj)),
        model=_model(f, model_ids),
        sampling=dataclasses.replace(sampling, stop=f.stop("stop_sequences")),
        stream=bool(f.boolean("stream", False)),
        tools=tools,
        response_format=response_format,
        reasoning_budget=_thinking(f.obj),
        reasoning_effort=effort,
    )


# ---------------------------------------------------------------------------------------------
# Errors

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}
OVERLOADED = 529  # Anthropic's status for "try again later"; the SDK retries it after Retry-After


def anthropic_status(exc: LLMMagicError) -> int:
    """The status on these routes: a busy host is Anthropic's 529, the rest as elsewhere."""
    return OVERLOADED if isinstance(exc, HostBusy) else exc.status


def anthropic_error(exc: LLMMagicError) -> dict:
    """An error in Anthropic's shape, which the SDK turns into its typed exceptions."""
    status = anthropic_status(exc)
    kind = ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


def _event(kind: str, **fields: Any) -> str:
    return f"event: {kind}\n" + sse({"type": kind, **fields})


def anthropic_error_event(exc: LLMMagicError) -> str:
    """An error after the stream began, as Anthropic sends one (an ``error`` event)."""
    return _event("error", error=anthropic_error(exc)["error"])


# ---------------------------------------------------------------------------------------------
# Rendering


def _input(call: ToolCall) -> dict:
    """A call's arguments as the object a ``tool_use`` block holds ({} for a call cut short)."""
    try:
        value = json.loads(call.arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {"value": value}


def stop_of(result: Completion) -> tuple[str, str | None]:
    """``stop_reason`` and ``stop_sequence``: which of the request's stop sequences ended the
    answer, when one did (the engine says which; an end-of-turn token is ``end_turn``)."""
    if result.finish_reason == "stop" and result.stop_sequence:
        return "stop_sequence", result.stop_sequence
    return STOP_REASONS.get(result.finish_reason, "end_turn"), None


def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def usage(result: Completion | None) -> dict:
    """Anthropic's usage: ``input_tokens`` are those read anew, the rest came from the cache."""
    if result is None:
        return {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    cached = min(result.cached_tokens, result.prompt_tokens)
    return {"input_tokens": result.prompt_tokens - cached, "output_tokens": result.completion_tokens,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


@dataclass
class AnthropicRenderer(StreamRenderer):
    """Renders one generation as an Anthropic ``message`` (whole or as its named events):
    a thinking block from the reasoning, then the text, then a ``tool_use`` block per call."""

    model: str = ""
    id: str = field(default_factory=lambda: "msg_" + uuid.uuid4().hex[:24])
    _block: str | None = None  # the kind of the open block: thinking, text or tool_use
    _index: int = -1  # the open block's index
    _calls: int = 0  # tool_use blocks opened
    _idle_text: bool = False  # the open block is an empty text block that only keep-alives went into

    def _message(self, content: list, result: Completion | None) -> dict:
        stop_reason, stop_sequence = stop_of(result) if result else (None, None)
        return {"id": self.id, "type": "message", "role": "assistant", "model": result.model if result else self.model,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage(result)}

    def answer(self, result: Completion) -> dict:
        content: list[dict] = []
        if result.reasoning:
            content.append({"type": "thinking", "thinking": result.reasoning, "signature": ""})
        if result.text or not result.tool_calls:
            content.append({"type": "text", "text": result.text})
        content += [{"type": "tool_use", "id": _tool_id(c.id), "name": c.name, "input": _input(c)}
                    for c in result.tool_calls]
        return self._message(content, result)

    def keepalive(self) -> Iterable[str]:
        """A ``ping``, then an empty ``text_delta``: Claude Code's 300 s idle watchdog skips
        pings, and a long prompt on a slow GPU takes longer than that to read. Before the answer
        begins, the delta goes into a text block opened for it, which the answer's text continues."""
        yield _event("ping")
        if self._index < 0:
            yield from self._open("text", {"type": "text", "text": ""})
            self._idle_text = True
        if self._block in EMPTY_DELTAS:
            yield self._delta(EMPTY_DELTAS[self._block])

    def opening(self) -> Iterable[str]:
        yield _event("message_start", message=self._message([], None))

    def _open(self, kind: str, block: dict) -> Iterator[str]:
        yield from self._close()
        self._block, self._index = kind, self._index + 1
        yield _event("content_block_start", index=self._index, content_block=block)

    def _close(self) -> Iterator[str]:
        if self._block is None:
            return
        if self._block == "thinking":  # no signature: nothing here checks one
            yield self._delta({"type": "signature_delta", "signature": ""})
        self._block = None
        yield _event("content_block_stop", index=self._index)

    def _delta(self, delta: dict) -> str:
        return _event("content_block_delta", index=self._index, delta=delta)

    def reasoning(self, delta: ReasoningDelta) -> Iterable[str]:
        if delta.index or not (self._index < 0 or self._block == "thinking" or self._idle_text):
            return  # one answer; reasoning comes first, in one block
        self._idle_text = False
        if self._block != "thinking":
            yield from self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        yield self._delta({"type": "thinking_delta", "thinking": delta.text})

    def text(self, delta: TextDelta) -> Iterable[str]:
        if delta.index or self._calls:  # text after the calls has nowhere to go
            return
        self._idle_text = False
        if self._block != "text":
            yield from self._open("text", {"type": "text", "text": ""})
        yield self._delta({"type": "text_delta", "text": delta.text})

    def _start_call(self, call_id: str, name: str) -> Iterator[str]:
        self._calls += 1
        yield from self._open("tool_use", {"type": "tool_use", "id": _tool_id(call_id), "name": name, "input": {}})

    def tool_call(self, delta: ToolCallDelta) -> Iterable[str]:
        if delta.index:
            return
        if delta.id is not None:
            yield from self._start_call(delta.id, delta.name or "")
        if delta.arguments and self._block == "tool_use":
            yield self._delta({"type": "input_json_delta", "partial_json": delta.arguments})

    def finished(self, result: Completion) -> Iterable[str]:
        if self._index < 0 or (not result.tool_calls and self._block != "text" and not self._calls):
            yield from self._open("text", {"type": "text", "text": ""})  # a message holds a text block
        for call in result.tool_calls[self._calls:]:  # a backend that sent them whole, at the end
            yield from self._start_call(call.id, call.name)
            yield self._delta({"type": "input_json_delta", "partial_json": call.arguments})
        yield from self._close()
        stop, sequence = stop_of(result)
        yield _event("message_delta", delta={"stop_reason": stop, "stop_sequence": sequence}, usage=usage(result))
        yield _event("message_stop")


def estimate_tokens(request: GenerationRequest) -> int:
    """About how many tokens a chat request's prompt takes, for a backend that cannot count
    them: four characters a token, as English text runs, and a few per message for its template."""
    chars = sum(len(json.dumps(m, ensure_ascii=False)) for m in request.messages or ())
    if request.tools is not None:
        chars += sum(len(json.dumps(t.as_openai(), ensure_ascii=False)) for t in request.tools.tools)
    return max(1, chars // 4 + 4 * len(request.messages or ()))
