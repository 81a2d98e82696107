"""A ``GenerationRequest`` as an OpenAI-compatible engine takes it, and the engine's streamed
chunks back as events. Pure Python: the HTTP is in ``backend.py``.

What every such engine (vLLM, SGLang, llama-server, Ollama, TGI, LM Studio, another llm_magic)
reads: the OpenAI fields. llama.cpp's own sampling fields (``top_k``, ``min_p``,
``repeat_penalty``) go only when a request set them to something else than their defaults, since
an engine that does not know them may refuse them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llm_magic.wire.events import Completion, ReasoningDelta, TextDelta, ToolCallDelta
from llm_magic.wire.tool_calls import ToolCall
from llm_magic.wire.types import GenerationRequest, Sampling, TokenLogprob

_DEFAULTS = Sampling()


def request_body(request: GenerationRequest, model: str, prompt: str | None = None) -> dict[str, Any]:
    """The body to POST to the engine's ``/v1/chat/completions`` (chat) or ``/v1/completions``."""
    s = request.sampling
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "temperature": s.temperature, "top_p": s.top_p}
    if request.is_chat:
        body["messages"] = [dict(m) for m in request.messages or ()]
    else:
        body["prompt"] = request.prompt if prompt is None else prompt
    if s.max_tokens is not None:
        body["max_tokens"] = s.max_tokens
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(s, name) != getattr(_DEFAULTS, name):
            body[name] = getattr(s, name)
    for name, wire_name in (("top_k", "top_k"), ("min_p", "min_p"), ("repeat_penalty", "repetition_penalty")):
        if getattr(s, name) != getattr(_DEFAULTS, name):
            body[wire_name] = getattr(s, name)
    if s.stop:
        body["stop"] = list(s.stop)
    if s.seed is not None and s.seed >= 0:
        body["seed"] = s.seed
    if s.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in s.logit_bias}
    if request.n > 1:
        body["n"] = request.n
    if request.is_chat:  # thinking: as vLLM and llama-server read them
        if request.reasoning_effort is not None:
            body["reasoning_effort"] = request.reasoning_effort
        if request.chat_template_kwargs is not None:
            body["chat_template_kwargs"] = request.chat_template_kwargs
        if request.reasoning_budget is not None:
            body["thinking_budget_tokens"] = request.reasoning_budget
        if request.reasoning_format is not None:
            body["reasoning_format"] = request.reasoning_format
    if request.logprobs is not None:
        if request.is_chat:
            body.update(logprobs=True, top_logprobs=request.logprobs)
        else:
            body["logprobs"] = request.logprobs
    if request.response_format is not None:
        fmt = request.response_format
        body["response_format"] = {"type": "json_object"} if fmt.schema is None else {
            "type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema, "strict": fmt.strict}}
    if request.tools is not None:
        tools = request.tools
        body["tools"] = [t.as_openai() for t in tools.tools]
        body["tool_choice"] = {"type": "function", "function": {"name": tools.named}} if tools.named else tools.choice
        if not tools.parallel:
            body["parallel_tool_calls"] = False
    return body


@dataclass
class _Answer:
    """One choice as its chunks arrive."""

    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    calls: dict[int, dict] = field(default_factory=dict)  # call index -> id, name, arguments
    logprobs: list[TokenLogprob] | None = None
    stop_sequence: str | None = None  # vLLM's ``stop_reason``: the stop string it ended on


class ChunkReader:
    """Reads an engine's streamed chunks (chat or completions) into events and, at the end, the
    ``Completion``: the engine's own structured tool calls pass through as they come."""

    def __init__(self, model: str, chat: bool, n: int = 1, want_logprobs: bool = False) -> None:
        self.model, self.chat, self.n = model, chat, n
        self.answers = [_Answer(logprobs=[] if want_logprobs else None) for _ in range(n)]
        self.usage: dict[str, Any] = {}
        self.timings: dict[str, Any] = {}

    def feed(self, chunk: dict) -> list:
        """The events one chunk carries."""
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):  # llama-server's
            self.timings = chunk["timings"]
        if isinstance(chunk.get("model"), str) and chunk["model"]:
            self.model = chunk["model"]
        events: list = []
        for choice in chunk.get("choices") or ():
            index = choice.get("index") or 0
            if not isinstance(index, int) or not 0 <= index < self.n:
                continue
            answer = self.answers[index]
            logprobs = _token_logprobs(choice.get("logprobs"), self.chat) if answer.logprobs is not None else None
            if logprobs:
                answer.logprobs.extend(logprobs)  # type: ignore[union-attr]
            delta = choice.get("delta") if self.chat else {"content": choice.get("text")}
            delta = delta if isinstance(delta, dict) else {}
            thought = delta.get("reasoning_content", delta.get("reasoning"))  # llama-server's; vLLM's newer name
            if isinstance(thought, str) and thought:
                answer.reasoning += thought
                events.append(ReasoningDelta(thought, index))
            text = delta.get("content")
            if isinstance(text, str) and text:
                answer.text += text
                events.append(TextDelta(text, index, tuple(logprobs) if logprobs else None))
            for piece in delta.get("tool_calls") or ():
                events.extend(self._tool_piece(answer, index, piece))
            if choice.get("finish_reason"):
                answer.finish_reason = choice["finish_reason"]
            if isinstance(choice.get("stop_reason"), str):  # an int there is a stop token's id
                answer.stop_sequence = choice["stop_reason"]
        return events

    def _tool_piece(self, answer: _Answer, index: int, piece: Any) -> list:
        if not isinstance(piece, dict):
            return []
        number = piece.get("index", len(answer.calls))
        function = piece.get("function") if isinstance(piece.get("function"), dict) else {}
        call = answer.calls.get(number)
        events = []
        if call is None:
            call = answer.calls[number] = {"id": piece.get("id") or f"call_{index}_{number}",
                                          "name": function.get("name") or "", "arguments": ""}
            events.append(ToolCallDelta(number, id=call["id"], name=call["name"], index=index))
        arguments = function.get("arguments")
        if isinstance(arguments, dict):  # an engine that sends the arguments as an object
            arguments = json.dumps(arguments)
        if isinstance(arguments, str) and arguments:
            call["arguments"] += arguments
            events.append(ToolCallDelta(number, arguments=arguments, index=index))
        return events

    def completion(self) -> Completion:
        prompt_tokens = int(self.usage.get("prompt_tokens") or 0)
        completion_tokens = int(self.usage.get("completion_tokens") or 0)
        details = self.usage.get("prompt_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        details = self.usage.get("completion_tokens_details") or {}
        thinking = int(details.get("reasoning_tokens") or 0) if isinstance(details, dict) else 0
        answers = []
        for i, answer in enumerate(self.answers):
            calls = tuple(ToolCall(c["name"], c["arguments"] or "{}", id=c["id"])
                          for _, c in sorted(answer.calls.items()))
            reason = answer.finish_reason or "stop"
            if reason == "function_call":
                reason = "tool_calls"
            answers.append(Completion(answer.text, self.model, reason, prompt_tokens, completion_tokens,
                                      dict(self.timings), cached_tokens=cached, tool_calls=calls,
                                      logprobs=answer.logprobs, index=i, reasoning=answer.reasoning,
                                      reasoning_tokens=thinking, stop_sequence=answer.stop_sequence))
        if len(answers) == 1:
            return answers[0]
        first = answers[0]
        return Completion(first.text, self.model, first.finish_reason, prompt_tokens, completion_tokens,
                          dict(self.timings), cached_tokens=cached, tool_calls=first.tool_calls,
                          logprobs=first.logprobs, choices=tuple(answers), reasoning=first.reasoning,
                          reasoning_tokens=thinking, stop_sequence=first.stop_sequence)


def _token_logprobs(value: Any, chat: bool) -> list[TokenLogprob]:
    """OpenAI's logprobs of a chunk, as ``TokenLogprob``s (chat's ``content`` list, or the
    legacy ``tokens``/``token_logprobs``/``top_logprobs`` of completions)."""
    if not isinstance(value, dict):
        return []
    out = []
    if chat:
        for entry in value.get("content") or ():
            if not isinstance(entry, dict):
                continue
            token = str(entry.get("token", ""))
            top = tuple((str(t.get("token", "")), float(t.get("logprob", 0.0)), bytes(t.get("bytes") or b""))
                        for t in entry.get("top_logprobs") or () if isinstance(t, dict))
            out.append(TokenLogprob(token, float(entry.get("logprob", 0.0)), bytes(entry.get("bytes") or token.encode()),
                                    top))
        return out
    tops = value.get("top_logprobs") or []
    for i, (token, logprob) in enumerate(zip(value.get("tokens") or (), value.get("token_logprobs") or ())):
        top_entry = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        top = tuple((str(t), float(lp), str(t).encode()) for t, lp in top_entry.items())
        out.append(TokenLogprob(str(token), float(logprob if logprob is not None else 0.0), str(token).encode(), top))
    return out
