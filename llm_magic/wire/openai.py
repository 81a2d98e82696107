"""The OpenAI wire format of ``/v1/chat/completions`` and ``/v1/completions``: validate bodies
into a ``GenerationRequest`` and render results back, whole or as SSE chunks.

Lenient where OpenAI's own server is: names that are no model spec (``gpt-4o``) mean the host's
model, valid OpenAI fields that do not apply here are accepted and ignored, and messages may
carry everything the openai SDK and the frameworks send back (``content: null``, tool calls and
results, ``developer``, text parts). No Flask and no llama_cpp here.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from llm_magic.errors import InvalidRequest
from llm_magic.wire.events import Completion, ReasoningDelta, TextDelta, ToolCallDelta
from llm_magic.wire.fields import (
    REASONING_FIELDS, SAMPLING_FIELDS, Fields, check_message_list, looks_like_model_spec, object_or_empty,
    parse_reasoning, parse_response_format, parse_sampling, type_name,
)
from llm_magic.wire.render import StreamRenderer
from llm_magic.wire.sse import SSE_DONE, sse
from llm_magic.wire.tool_calls import parse_tool_request
from llm_magic.wire.types import GenerationRequest, TokenLogprob

DEFAULT_MODEL_ALIASES = ("default",)
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's own limit for /v1/completions
MAX_N = 128  # OpenAI's own limit; the host allows at most its --parallel
OPENAI_COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's own default for /v1/completions
MAX_PROMPTS = 128  # prompts in one /v1/completions list; they run a few at a time, as slots allow

# Valid OpenAI fields that change nothing here; accepted so that clients sending them work.
IGNORED_FIELDS = (
    "user", "store", "metadata", "service_tier", "parallel_tool_calls",
    "prediction", "verbosity", "prompt_cache_key", "prompt_cache_retention", "safety_identifier",
    "web_search_options", "modalities", "audio",
)
_COMMON = ("model", "stream", "stream_options", "n", "logit_bias", "logprobs", "speculative", *SAMPLING_FIELDS,
           *IGNORED_FIELDS)
CHAT_FIELDS = (*_COMMON, "messages", "max_completion_tokens", "response_format", "top_logprobs",
               "tools", "tool_choice", "functions", "function_call", *REASONING_FIELDS)
COMPLETION_FIELDS = (*_COMMON, "prompt", "echo", "suffix", "best_of", "response_format",
                     "reasoning_effort")  # accepted, as before; a completion has no template to pass it to
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "refusal", "audio",
                  "function_call", "annotations", "reasoning_content")


def _ignored_but_checked(f: Fields) -> None:
    """Ignored fields still may not ask for what this host cannot do."""
    modalities = f.obj.get("modalities")
    if modalities is not None:
        if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
            raise InvalidRequest("'modalities' must be a list of strings")
        if set(modalities) - {"text"}:
            raise InvalidRequest("'modalities': this host answers with text only; send [\"text\"] or leave it out")
    if f.obj.get("audio") is not None:
        raise InvalidRequest("'audio': this host answers with text only; leave it out or send null")


def _model(f: Fields, model_ids: Iterable[str]) -> str | None:
    """The model spec asked for; ``None`` for the host's model — also for names that are no
    spec at all (``gpt-4o``, ``my-model``), as llama-server does."""
    model = f.obj.get("model")
    if model is None:
        return None
    if not isinstance(model, str):
        raise InvalidRequest(f"'model' must be a string, not {type_name(model)}")
    model = model.strip()
    if len(model) > 700:
        raise InvalidRequest("'model' is longer than 700 characters")
    if not model or model in DEFAULT_MODEL_ALIASES or model in set(model_ids) or not looks_like_model_spec(model):
        return None
    return model


def _common(f: Fields, model_ids: Iterable[str]) -> dict:
    _ignored_but_checked(f)
    options = Fields(object_or_empty(f.obj, "stream_options"), "stream_options.")
    options.reject_unknown(("include_usage", "include_obfuscation"))
    options.boolean("include_obfuscation")
    return {"model": _model(f, model_ids), "stream": f.boolean("stream", False), "n": f.integer("n", 1, MAX_N, 1),
            "include_usage": bool(options.boolean("include_usage", False)),
            "speculative": bool(f.boolean("speculative", True))}


def _content(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            key = {"text": "text", "refusal": "refusal"}.get(kind or "")
            if key is None or not isinstance(part.get(key), str):
                raise InvalidRequest(f"'{where}.content[{i}]' must be {{\"type\": \"text\", \"text\": \"...\"}}; "
                                     "this host handles text only")
            texts.append(part[key])
        return "".join(texts)
    raise InvalidRequest(f"'{where}.content' must be a string, a list of text parts or null, not {type_name(value)}")


def _tool_calls(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise InvalidRequest(f"'{where}.tool_calls' must be a list")
    calls = []
    for i, call in enumerate(value):
        f = Fields(call, f"{where}.tool_calls[{i}].")
        function = Fields(call.get("function"), f"{where}.tool_calls[{i}].function.")
        name = function.string("name", max_length=256)
        arguments = function.obj.get("arguments", "{}")
        if name is None:
            raise InvalidRequest(f"'{where}.tool_calls[{i}].function.name' is required")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        calls.append({"id": f.string("id", f"call_{i}", max_length=256), "type": "function",
                      "function": {"name": name, "arguments": arguments}})
    return calls


def parse_messages(value: Any, field_name: str = "messages") -> tuple[dict, ...]:
    """OpenAI chat messages, as the chat template receives them: ``developer`` becomes
    ``system``, content is text, tool calls and results keep their fields."""
    check_message_list(value, field_name)
    messages = []
    for i, item in enumerate(value):
        where = f"{field_name}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"'{where}' must be an object with 'role' and 'content', not {type_name(item)}")
        f = Fields(item, where + ".")
        f.reject_unknown(MESSAGE_FIELDS)
        role = item.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"'{where}.role' must be one of {', '.join(ROLES)}, got {json.dumps(role)}")
        message: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                   "content": _content(item.get("content"), where)}
        if role == "function":  # the deprecated form of a tool result
            message["role"] = "tool"
        name = f.string("name", max_length=256)
        if name:
            message["name"] = name
        if item.get("tool_calls"):
            if role != "assistant":
                raise InvalidRequest(f"'{where}.tool_calls' belongs to assistant messages")
            message["tool_calls"] = _tool_calls(item["tool_calls"], where)
        if role == "tool":
            message["tool_call_id"] = f.string("tool_call_id", "", max_length=256) or ""
        reasoning = item.get("reasoning_content")
        if reasoning is not None and role == "assistant":  # for templates that show past thinking
            if not isinstance(reasoning, str):
                raise InvalidRequest(f"'{where}.reasoning_content' must be a string, not {type_name(reasoning)}")
            if reasoning:
                message["reasoning_content"] = reasoning
        messages.append(message)
    if messages[-1]["role"] == "system":
        raise InvalidRequest(f"'{field_name}' must not end with a system message")
    return tuple(messages)


def _function_call_choice(value: Any) -> Any:
    if isinstance(value, dict) and "name" in value:
        return {"type": "function", "function": {"name": value["name"]}}
    return value


def _chat_logprobs(f: Fields) -> int | None:
    if not f.boolean("logprobs", False):
        if f.present("top_logprobs") and f.obj.get("top_logprobs") != 0:
            raise InvalidRequest("'top_logprobs' needs 'logprobs': true")
        return None
    return f.integer("top_logprobs", 0, MAX_TOP_LOGPROBS, 0)


def parse_chat(body: Any, model_ids: Iterable[str] = ()) -> GenerationRequest:
    """Validate a ``POST /v1/chat/completions`` body. ``model_ids``: names of the default model."""
    f = Fields(body)
    f.reject_unknown(CHAT_FIELDS)
    tools = parse_tool_request(f.obj.get("tools"), f.obj.get("tool_choice"), f.obj.get("parallel_tool_calls"))
    if tools is None and f.obj.get("functions"):  # the deprecated spelling of tools
        tools = parse_tool_request([{"type": "function", "function": fn} for fn in f.obj["functions"]]
                                   if isinstance(f.obj["functions"], list) else f.obj["functions"],
                                   _function_call_choice(f.obj.get("function_call")), None)
    response_format = parse_response_format(f.obj.get("response_format"))
    if tools is not None and response_format is not None:
        raise InvalidRequest("give 'tools' or a JSON 'response_format', not both: both constrain the reply")
    if "messages" not in body:
        raise InvalidRequest("'messages' is required: a list of {role, content} messages")
    return GenerationRequest(
        tools=tools,
        messages=parse_messages(body["messages"]),
        sampling=parse_sampling(f, ("max_tokens", "max_completion_tokens"), None, logit_bias=True),
        response_format=response_format,
        logprobs=_chat_logprobs(f),
        **parse_reasoning(f),
        **_common(f, model_ids),
    )


def parse_completion(body: Any, model_ids: Iterable[str] = ()) -> GenerationRequest:
    """Validate a ``POST /v1/completions`` body."""
    f = Fields(body)
    f.reject_unknown(COMPLETION_FIELDS)
    if f.obj.get("echo"):
        raise InvalidRequest("'echo' is not supported by this host")
    if f.obj.get("suffix") is not None:
        raise InvalidRequest("'suffix' is not supported by this host")
    f.integer("best_of", 1, 1)
    prompts = _prompts(body.get("prompt"))
    logprobs = f.obj.get("logprobs")
    return GenerationRequest(
        prompt=prompts[0],
        prompts=prompts if len(prompts) > 1 else (),
        sampling=parse_sampling(f, ("max_tokens",), OPENAI_COMPLETION_DEFAULT_MAX_TOKENS, logit_bias=True),
        response_format=parse_response_format(f.obj.get("response_format")),
        logprobs=None if logprobs is None or logprobs is False else f.integer("logprobs", 0, MAX_COMPLETION_LOGPROBS),
        **_common(f, model_ids),
    )


def _prompts(value: Any) -> tuple[str, ...]:
    """``prompt``: a string, or a list of strings (one answer, or ``n``, per prompt)."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not value:
        raise InvalidRequest("'prompt' is required: a string, or a non-empty list of strings")
    if len(value) > MAX_PROMPTS:
        raise InvalidRequest(f"'prompt' holds more than {MAX_PROMPTS} prompts; send them in several requests")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            hint = " (token ids are not supported here: send text)" if isinstance(item, int) or isinstance(item, list) else ""
            raise InvalidRequest(f"'prompt[{i}]' must be a string, not {type_name(item)}{hint}")
    return tuple(value)


# ---------------------------------------------------------------------------------------------
# Rendering


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -9999.0  # JSON has no -Infinity


def chat_logprobs(entries: Iterable[TokenLogprob]) -> dict:
    """``choices[].logprobs`` of a chat completion (or of one chunk)."""
    return {"content": [
        {"token": e.token, "logprob": _finite(e.logprob), "bytes": list(e.bytes),
         "top_logprobs": [{"token": t, "logprob": _finite(lp), "bytes": list(b)} for t, lp, b in e.top]}
        for e in entries], "refusal": None}


def completion_logprobs(entries: Iterable[TokenLogprob], offset: int = 0) -> dict:
    """``choices[].logprobs`` of a text completion: parallel lists, as OpenAI's legacy API."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        tokens.append(e.token)
        token_logprobs.append(_finite(e.logprob))
        top.append({t: _finite(lp) for t, lp, _ in e.top})
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


@dataclass
class OpenAIRenderer(StreamRenderer):
    """Renders one generation in the OpenAI wire format (whole or as SSE chunks)."""

    chat: bool
    model: str = ""
    include_usage: bool = False
    fingerprint: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    n: int = 1  # answers per request
    _text_offsets: dict[int, int] = field(default_factory=dict)  # completions logprobs, per answer

    @property
    def _object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _envelope(self, obj: str, choices: list, model: str) -> dict:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": obj, "created": self.created, "model": model,
                "system_fingerprint": self.fingerprint, "choices": choices}

    def _logprobs(self, entries: Iterable[TokenLogprob] | None, index: int) -> dict | None:
        if entries is None:
            return None
        if self.chat:
            return chat_logprobs(entries)
        rendered = completion_logprobs(entries, self._text_offsets.get(index, 0))
        self._text_offsets[index] = self._text_offsets.get(index, 0) + sum(len(t) for t in rendered["tokens"])
        return rendered

    def answer(self, result: Completion) -> dict:
        body = self._envelope(self._object, [self._choice(c) for c in result.choices or (result,)], result.model)
        body["usage"] = result.openai_usage
        body["timings"] = result.timings
        return body

    def _choice(self, result: Completion) -> dict:
        logprobs = self._logprobs(result.logprobs, result.index)
        if not self.chat:
            return {"index": result.index, "text": result.text, "logprobs": logprobs,
                    "finish_reason": result.finish_reason}
        message: dict = {"role": "assistant", "content": result.text, "refusal": None}
        if result.reasoning:  # llama-server's and DeepSeek's field, only when there is reasoning
            message["reasoning_content"] = result.reasoning
        if result.tool_calls:
            message.update(content=result.text or None, tool_calls=[c.as_openai() for c in result.tool_calls])
        return {"index": result.index, "message": message, "logprobs": logprobs, "finish_reason": result.finish_reason}

    def _chunk(self, delta: dict | str | None, finish_reason: str | None, model: str, index: int = 0,
               logprobs: dict | None = None) -> str:
        if self.chat:
            choice = {"index": index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish_reason}
            return sse(self._envelope("chat.completion.chunk", [choice], model))
        choice = {"index": index, "text": delta or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return sse(self._envelope("text_completion", [choice], model))

    def opening(self) -> Iterable[str]:
        if not self.chat:
            return ()
        return [self._chunk({"role": "assistant", "content": ""}, None, self.model, index=i) for i in range(self.n)]

    def text(self, delta: TextDelta) -> Iterable[str]:
        logprobs = self._logprobs(delta.logprobs, delta.index)
        yield self._chunk({"content": delta.text} if self.chat else delta.text, None, self.model, delta.index, logprobs)

    def reasoning(self, delta: ReasoningDelta) -> Iterable[str]:
        if self.chat:  # a text completion has no reasoning apart
            yield self._chunk({"reasoning_content": delta.text}, None, self.model, delta.index)

    def tool_call(self, delta: ToolCallDelta) -> Iterable[str]:
        """As OpenAI streams a call: its id and name first, then pieces of its arguments."""
        piece: dict = {"index": delta.call}
        if delta.id is not None:
            piece.update(id=delta.id, type="function")
        function: dict = {"arguments": delta.arguments}
        if delta.name is not None:
            function = {"name": delta.name, **function}
        piece["function"] = function
        yield self._chunk({"tool_calls": [piece]}, None, self.model, delta.index)

    def finished(self, result: Completion) -> Iterable[str]:
        for answer in result.choices or (result,):
            yield self._chunk(None, answer.finish_reason, result.model, answer.index)
        if self.include_usage:
            usage_chunk = self._envelope(self._object + (".chunk" if self.chat else ""), [], result.model)
            usage_chunk["usage"] = result.openai_usage
            usage_chunk["timings"] = result.timings
            yield sse(usage_chunk)

    def closing(self) -> Iterable[str]:
        return (SSE_DONE,)


# ---------------------------------------------------------------------------------------------
# Embeddings

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit
EMBEDDING_FIELDS = ("input", "model", "encoding_format", "dimensions", "user")


@dataclass(frozen=True)
class EmbeddingRequest:
    inputs: tuple[str | tuple[int, ...], ...]
    model: str | None = None
    base64: bool = False


def parse_embeddings(body: Any, model_ids: Iterable[str] = ()) -> EmbeddingRequest:
    """Validate a ``POST /v1/embeddings`` body: ``input`` is a string, a list of strings, a list
    of token ids, or a list of such lists."""
    f = Fields(body)
    f.reject_unknown(EMBEDDING_FIELDS)
    value = body.get("input")
    if isinstance(value, str):
        items: list = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        items = [value]  # one input as token ids
    elif isinstance(value, list) and value:
        items = value
    else:
        raise InvalidRequest("'input' must be a string, a list of strings, or token ids (a list of "
                             "integers, or a list of such lists), and not empty")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"'input' holds more than {MAX_EMBEDDING_INPUTS} inputs")
    inputs: list = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(f"'input[{i}]' is empty")
            inputs.append(item)
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            inputs.append(tuple(item))
        else:
            raise InvalidRequest(f"'input[{i}]' must be a non-empty string or list of token ids, not {type_name(item)}")
    encoding = f.obj.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidRequest(f"'encoding_format' must be float or base64, got {json.dumps(encoding)}")
    f.integer("dimensions", 1, 1 << 16)  # checked against the model's size when it is known
    return EmbeddingRequest(tuple(inputs), _model(f, model_ids), encoding == "base64")


def embeddings_answer(vectors: list[list[float]], model: str, prompt_tokens: int, base64: bool) -> dict:
    """The ``/v1/embeddings`` answer; ``base64``: little-endian float32, as the openai SDK reads."""
    import base64 as b64
    import struct

    data = []
    for i, vector in enumerate(vectors):
        embedding: Any = vector
        if base64:
            embedding = b64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
