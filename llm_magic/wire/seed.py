"""The seed's ``POST /api`` format: validate its bodies into a ``GenerationRequest`` and render
events back, whole or streamed. Pure Python."""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

from llm_magic.errors import InvalidRequest
from llm_magic.wire.events import Completion, Event, ReasoningDelta, Signal, TextDelta
from llm_magic.wire.fields import (
    REASONING_FIELDS, SAMPLING_FIELDS, Fields, check_message_list, object_or_empty, parse_reasoning,
    parse_response_format, parse_sampling, type_name,
)
from llm_magic.wire.sse import SSE_DONE, SSE_KEEPALIVE, sse
from llm_magic.wire.types import GenerationRequest, ResponseFormat

VALID_TASKS = ("text_generation",)


def _api_messages(value: Any, field_name: str) -> tuple[dict, ...]:
    """Validate an ``/api`` chat history: the seed's rule — an optional leading system message,
    then user and assistant alternating, ending with user; content is text."""
    check_message_list(value, field_name)
    roles = ("system", "user", "assistant")
    messages = []
    for i, item in enumerate(value):
        where = f"'{field_name}[{i}]'"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object with 'role' and 'content', not {type_name(item)}")
        extra = set(item) - {"role", "content", "name"}
        if extra:
            raise InvalidRequest(f"{where} has unknown field(s) {', '.join(sorted(extra))}; "
                                 "a message has 'role' and 'content'")
        role = item.get("role")
        if role not in roles:
            raise InvalidRequest(f"{where}.role must be one of {', '.join(roles)}, got {json.dumps(role)}")
        content = item.get("content")
        if not isinstance(content, str):
            raise InvalidRequest(f"{field_name}[{i}].content must be a string, not {type_name(content)}")
        messages.append({"role": role, "content": content})
    _check_seed_order(messages, field_name)
    return tuple(messages)


def _check_seed_order(messages: list[dict], field_name: str) -> None:
    start = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise InvalidRequest(
                f"'{field_name}[{i}]' has role '{message['role']}' but '{expected}' was expected: "
                "an optional leading system message, then user and assistant alternating"
            )
    if messages[-1]["role"] != "user":
        raise InvalidRequest(f"'{field_name}' must end with a user message")


# ---------------------------------------------------------------------------------------------
# Seed /api


API_FIELDS = ("token", "task", "repo_id", "file_name", "inputs", "parameters", "options")
API_OPTIONS = ("use_gpu", "ctx_length", "ctx_lenght", "chat_format", "stream", "speculative", *REASONING_FIELDS)
API_DEFAULT_MAX_TOKENS = 512


def parse_api_request(body: Any) -> GenerationRequest:
    """Validate a seed-format ``POST /api`` body."""
    f = Fields(body)
    f.reject_unknown(API_FIELDS)
    task = body.get("task", "text_generation")
    if task not in VALID_TASKS:
        raise InvalidRequest(f"unknown task {json.dumps(task)}; valid tasks: {', '.join(VALID_TASKS)}")

    repo_id = f.string("repo_id", max_length=200)
    file_name = f.string("file_name", max_length=500)
    if file_name and not repo_id:
        raise InvalidRequest("'file_name' needs a 'repo_id' to say which hub repository holds it")
    model = f"{repo_id}:{file_name}" if file_name else repo_id

    inputs = body.get("inputs")
    prompt, messages = None, None
    if isinstance(inputs, str):
        prompt = inputs
    elif isinstance(inputs, list):
        messages = _api_messages(inputs, "inputs")
    else:
        raise InvalidRequest(
            f"'inputs' must be a string (text completion) or a list of {{role, content}} messages (chat), "
            f"not {type_name(inputs)}"
        )

    params = Fields(object_or_empty(body, "parameters"), "parameters.")
    params.reject_unknown((*SAMPLING_FIELDS, "response_format"))
    options = Fields(object_or_empty(body, "options"), "options.")
    options.reject_unknown(API_OPTIONS)
    if options.present("ctx_length") and options.present("ctx_lenght"):
        raise InvalidRequest("give 'options.ctx_length' or its old spelling 'options.ctx_lenght', not both")
    ctx_key = "ctx_lenght" if options.present("ctx_lenght") else "ctx_length"
    return GenerationRequest(
        prompt=prompt,
        messages=messages,
        model=model,
        sampling=parse_sampling(params, ("max_tokens",), API_DEFAULT_MAX_TOKENS),
        ctx_length=options.integer(ctx_key, 16, 1 << 20),
        use_gpu=options.boolean("use_gpu"),
        chat_format=options.string("chat_format", max_length=100),
        stream=options.boolean("stream", False),
        speculative=bool(options.boolean("speculative", True)),
        response_format=_api_response_format(params.obj.get("response_format")),
        **parse_reasoning(options),
    )


def _api_response_format(value: Any) -> ResponseFormat | None:
    return parse_response_format(value, "parameters.response_format")  # the same object as OpenAI's


def api_answer(result: Completion) -> dict:
    """The seed's 200 answer, for chat and completion alike."""
    answer = {"role": "assistant", "content": result.text}
    usage: dict[str, Any] = dict(result.usage)
    if result.reasoning:
        answer["reasoning_content"] = result.reasoning
    if result.reasoning or result.reasoning_tokens:  # where /v1 counts them, in the same shape
        usage["completion_tokens_details"] = {"reasoning_tokens": result.reasoning_tokens}
    return {
        "answer": answer,
        "model": result.model,
        "finish_reason": result.finish_reason,
        "usage": usage,
        "timings": result.timings,
    }


def api_stream(events: Iterable[Event]) -> Iterator[str]:
    """``/api`` streaming: ``{"delta"}`` events, the full answer, then ``[DONE]``."""
    for event in events:
        if isinstance(event, TextDelta):
            yield sse({"delta": event.text})
        elif isinstance(event, ReasoningDelta):
            yield sse({"reasoning": event.text})
        elif isinstance(event, Completion):
            yield sse(api_answer(event))
        elif event is Signal.KEEPALIVE:
            yield SSE_KEEPALIVE
    yield SSE_DONE
