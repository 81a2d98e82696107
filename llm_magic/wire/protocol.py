"""Wire formats: validate seed ``/api`` and OpenAI bodies into one ``GenerationRequest``, and
render engine results back into each format. No Flask and no llama_cpp here."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Union

from llm_magic.errors import InvalidRequest
from llm_magic.wire.tool_calls import ToolRequest

VALID_TASKS = ("text_generation",)
MAX_MESSAGES = 4096
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_TOKENS_LIMIT = 1 << 20  # far beyond any context; the engine clamps to the real one
SEED_LIMIT = 2**64


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters, with the defaults llama.cpp's own server uses."""

    max_tokens: int | None = None  # None: until the context is full
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # OpenAI's logit_bias: (token id, bias) pairs added to the logits before any other stage;
    # -100 bans the token. Ids are checked against the vocabulary when the sampler is made.
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, whatever wire format it came in."""

    prompt: str | None = None  # text completion
    messages: tuple[dict, ...] | None = None  # chat: ({"role", "content"}, ...)
    model: str | None = None  # a model spec (models.py); None: the host's default model
    sampling: Sampling = field(default_factory=Sampling)
    ctx_length: int | None = None  # None: the host's setting
    use_gpu: bool | None = None  # None: the host's setting
    chat_format: str | None = None  # None: the template inside the GGUF
    stream: bool = False
    include_usage: bool = False  # OpenAI stream_options.include_usage
    response_format: "ResponseFormat | None" = None  # constrain the output to JSON
    logprobs: int | None = None  # how many alternatives per token to report; None: no logprobs
    tools: ToolRequest | None = None  # tools the model may call (OpenAI's tools, tool_choice)
    n: int = 1  # answers to write to the one prompt (OpenAI's n)
    # /v1/completions with a list of prompts: all of them (``prompt`` is the first). The engine
    # writes one prompt per request; the server runs one generation per prompt and merges them.
    prompts: tuple[str, ...] = ()

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class ResponseFormat:
    """Structured output: any JSON object, or JSON valid against ``schema``."""

    schema: dict | None = None  # None: any JSON object
    name: str = "response"
    strict: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability and the most likely alternatives."""

    token: str
    logprob: float
    bytes: bytes
    top: tuple[tuple[str, float, bytes], ...] = ()


@dataclass
class Completion:
    """The engine's final result for one generation."""

    text: str
    model: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    cached_tokens: int = 0  # of the prompt, found in the KV cache
    tool_format: str | None = None  # how the model writes tool calls (tool_calls.FORMATS), if offered
    logprobs: list[TokenLogprob] | None = None  # when asked
    index: int = 0  # which of a request's answers this is
    choices: tuple["Completion", ...] = ()  # with n > 1: every answer (this one sums their usage)

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    @property
    def openai_usage(self) -> dict[str, Any]:
        return {**self.usage, "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class LoggedText(str):
    """A text delta that carries the log-probabilities of the tokens that made it."""

    logprobs: tuple[TokenLogprob, ...]

    def __new__(cls, text: str, logprobs: tuple[TokenLogprob, ...]) -> "LoggedText":
        obj = super().__new__(cls, text)
        obj.logprobs = logprobs
        return obj


@dataclass(frozen=True)
class Started:
    """The engine's first event: the request passed every check and generation begins."""

    model: str
    prompt_tokens: int
    tool_format: str | None = None  # how the model writes tool calls, when the request offers tools


@dataclass(frozen=True)
class ChoiceDelta:
    """A text delta of one of several answers (a request with n > 1)."""

    index: int
    text: str  # a LoggedText when logprobs were asked


class KeepAlive:
    """Not from the engine: the server's tick while the model is busy, so proxies that cut idle
    connections (Cloudflare: about 100 s) keep the line open."""


KEEPALIVE = KeepAlive()

# What the engine yields: Started, text deltas, then one Completion (plus the server's ticks).
Event = Union[Started, str, ChoiceDelta, Completion, KeepAlive]


# ---------------------------------------------------------------------------------------------
# Field validation


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


class _Fields:
    """Typed, range-checked access to one JSON object; errors name the field by its path."""

    def __init__(self, obj: Any, path: str = "") -> None:
        if not isinstance(obj, dict):
            where = f"'{path.rstrip('.')}'" if path else "the request body"
            raise InvalidRequest(f"{where} must be a JSON object, not {_type_name(obj)}")
        self.obj = obj
        self.path = path

    def name(self, key: str) -> str:
        return f"'{self.path}{key}'"

    def reject_unknown(self, allowed: Iterable[str], hint: str = "") -> None:
        unknown = sorted(set(self.obj) - set(allowed))
        if unknown:
            names = ", ".join(f"'{self.path}{k}'" for k in unknown)
            valid = ", ".join(sorted(allowed))
            raise InvalidRequest(f"unknown field {names}; valid fields here: {valid}{hint}")

    def present(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def integer(self, key: str, lo: int, hi: int, default: Any = None) -> Any:
        value = self.obj.get(key)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"{self.name(key)} must be an integer, not {_type_name(value)}")
        if not lo <= value <= hi:
            raise InvalidRequest(f"{self.name(key)} must be between {lo} and {hi}, got {value}")
        return value

    def number(self, key: str, lo: float, hi: float, default: Any = None) -> Any:
        value = self.obj.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequest(f"{self.name(key)} must be a number, not {_type_name(value)}")
        if not math.isfinite(value) or not lo <= value <= hi:
            raise InvalidRequest(f"{self.name(key)} must be between {lo} and {hi}, got {value}")
        return float(value)

    def boolean(self, key: str, default: Any = None) -> Any:
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InvalidRequest(f"{self.name(key)} must be true or false, not {_type_name(value)}")
        return value

    def string(self, key: str, default: Any = None, max_length: int = 1000) -> Any:
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise InvalidRequest(f"{self.name(key)} must be a string, not {_type_name(value)}")
        if not value.strip():
            raise InvalidRequest(f"{self.name(key)} must not be empty")
        if len(value) > max_length:
            raise InvalidRequest(f"{self.name(key)} is longer than {max_length} characters")
        return value

    def stop(self, key: str) -> tuple[str, ...]:
        value = self.obj.get(key)
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise InvalidRequest(f"{self.name(key)} must be a string or a list of strings")
        if len(items) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(f"{self.name(key)} holds more than {MAX_STOP_SEQUENCES} sequences")
        for s in items:
            if not s or len(s) > MAX_STOP_LENGTH:
                raise InvalidRequest(
                    f"{self.name(key)}: each stop sequence must have 1 to {MAX_STOP_LENGTH} characters"
                )
        return tuple(dict.fromkeys(items))


_REPO_LIKE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:.+)?$")


def looks_like_model_spec(name: str) -> bool:
    """Whether ``name`` is written as a model spec (a ``.gguf`` path or ``OWNER/REPO[:...]``),
    rather than a bare name such as ``gpt-4o`` that OpenAI clients send by default."""
    return name.lower().endswith(".gguf") or bool(_REPO_LIKE.match(name))


def _object_or_empty(body: dict, key: str) -> Any:
    value = body.get(key)
    return {} if value is None else value


def _sampling(f: _Fields, max_tokens_keys: tuple[str, ...], default_max_tokens: int | None) -> Sampling:
    """The sampling fields shared by /api ``parameters`` and the OpenAI bodies."""
    max_tokens = default_max_tokens
    for key in max_tokens_keys:
        if f.present(key):
            max_tokens = f.integer(key, 1, MAX_TOKENS_LIMIT)
    d = Sampling()
    return Sampling(
        max_tokens=max_tokens,
        temperature=f.number("temperature", 0.0, 5.0, d.temperature),
        top_p=f.number("top_p", 0.0, 1.0, d.top_p),
        top_k=f.integer("top_k", 0, 1_000_000, d.top_k),
        min_p=f.number("min_p", 0.0, 1.0, d.min_p),
        repeat_penalty=f.number("repeat_penalty", 0.0, 10.0, d.repeat_penalty),
        presence_penalty=f.number("presence_penalty", -2.0, 2.0, d.presence_penalty),
        frequency_penalty=f.number("frequency_penalty", -2.0, 2.0, d.frequency_penalty),
        stop=f.stop("stop"),
        seed=f.integer("seed", -1, SEED_LIMIT - 1),
    )


LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range: -100 to 100
MAX_LOGIT_BIAS = 1024  # entries; OpenAI's own limit is 300, llama.cpp has none


def parse_logit_bias(value: Any, key: str = "logit_bias") -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: ``{"<token id>": bias}``, bias from -100 to 100."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{key}' must be an object mapping token ids (as strings) to a bias from -100 to 100, "
                             f"not {_type_name(value)}")
    if len(value) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"'{key}' holds more than {MAX_LOGIT_BIAS} tokens")
    pairs = []
    for token, bias in value.items():
        if not (isinstance(token, str) and token.isascii() and token.isdigit() and len(token) < 10):
            raise InvalidRequest(f"'{key}': {json.dumps(token)[:40]} is not a token id; the keys are token ids "
                                 "such as \"50256\"")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias) \
                or not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
            raise InvalidRequest(f"'{key}.{token}' must be a number from -100 to 100, got {json.dumps(bias)[:40]}")
        pairs.append((int(token), float(bias)))
    return tuple(pairs)


SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                   "presence_penalty", "frequency_penalty", "stop", "seed")


def parse_response_format(value: Any, where: str = "response_format") -> ResponseFormat | None:
    """OpenAI's ``response_format``: ``text``, ``json_object`` or ``json_schema``."""
    if value is None:
        return None
    f = _Fields(value, where + ".")
    kind = value.get("type")
    if kind == "text":
        f.reject_unknown(("type",))
        return None
    if kind == "json_object":
        f.reject_unknown(("type",))
        return ResponseFormat()
    if kind != "json_schema":
        raise InvalidRequest(f"'{where}.type' must be text, json_object or json_schema, got {json.dumps(kind)}")
    f.reject_unknown(("type", "json_schema"))
    spec = _Fields(value.get("json_schema"), where + ".json_schema.")
    spec.reject_unknown(("name", "schema", "strict", "description"))
    schema = spec.obj.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise InvalidRequest(f"'{where}.json_schema.schema' must be a JSON Schema object, not {_type_name(schema)}")
    return ResponseFormat(schema=schema, name=spec.string("name", "response", max_length=64),
                          strict=bool(spec.boolean("strict", False)))


def check_message_list(value: Any, field_name: str) -> None:
    """A chat history is a non-empty list of at most ``MAX_MESSAGES`` items."""
    if not isinstance(value, list):
        raise InvalidRequest(f"'{field_name}' must be a list of messages, not {_type_name(value)}")
    if not value:
        raise InvalidRequest(f"'{field_name}' must hold at least one message")
    if len(value) > MAX_MESSAGES:
        raise InvalidRequest(f"'{field_name}' holds more than {MAX_MESSAGES} messages")


def _api_messages(value: Any, field_name: str) -> tuple[dict, ...]:
    """Validate an ``/api`` chat history: the seed's rule — an optional leading system message,
    then user and assistant alternating, ending with user; content is text."""
    check_message_list(value, field_name)
    roles = ("system", "user", "assistant")
    messages = []
    for i, item in enumerate(value):
        where = f"'{field_name}[{i}]'"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object with 'role' and 'content', not {_type_name(item)}")
        extra = set(item) - {"role", "content", "name"}
        if extra:
            raise InvalidRequest(f"{where} has unknown field(s) {', '.join(sorted(extra))}; "
                                 "a message has 'role' and 'content'")
        role = item.get("role")
        if role not in roles:
            raise InvalidRequest(f"{where}.role must be one of {', '.join(roles)}, got {json.dumps(role)}")
        content = item.get("content")
        if not isinstance(content, str):
            raise InvalidRequest(f"{field_name}[{i}].content must be a string, not {_type_name(content)}")
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
API_OPTIONS = ("use_gpu", "ctx_length", "ctx_lenght", "chat_format", "stream")
API_DEFAULT_MAX_TOKENS = 512


def parse_api_request(body: Any) -> GenerationRequest:
    """Validate a seed-format ``POST /api`` body."""
    f = _Fields(body)
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
            f"not {_type_name(inputs)}"
        )

    params = _Fields(_object_or_empty(body, "parameters"), "parameters.")
    params.reject_unknown((*SAMPLING_FIELDS, "response_format"))
    options = _Fields(_object_or_empty(body, "options"), "options.")
    options.reject_unknown(API_OPTIONS)
    if options.present("ctx_length") and options.present("ctx_lenght"):
        raise InvalidRequest("give 'options.ctx_length' or its old spelling 'options.ctx_lenght', not both")
    ctx_key = "ctx_lenght" if options.present("ctx_lenght") else "ctx_length"
    return GenerationRequest(
        prompt=prompt,
        messages=messages,
        model=model,
        sampling=_sampling(params, ("max_tokens",), API_DEFAULT_MAX_TOKENS),
        ctx_length=options.integer(ctx_key, 16, 1 << 20),
        use_gpu=options.boolean("use_gpu"),
        chat_format=options.string("chat_format", max_length=100),
        stream=options.boolean("stream", False),
        response_format=_api_response_format(params.obj.get("response_format")),
    )


def _api_response_format(value: Any) -> ResponseFormat | None:
    return parse_response_format(value, "parameters.response_format")  # the same object as OpenAI's


def api_answer(result: Completion) -> dict:
    """The seed's 200 answer, for chat and completion alike."""
    return {
        "answer": {"role": "assistant", "content": result.text},
        "model": result.model,
        "finish_reason": result.finish_reason,
        "usage": result.usage,
        "timings": result.timings,
    }


def sse(data: Any) -> str:
    """One server-sent event carrying JSON (or the literal ``[DONE]``)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")
SSE_KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: every client ignores it


def api_stream(events: Iterable[Event]) -> Iterator[str]:
    """``/api`` streaming: ``{"delta"}`` events, the full answer, then ``[DONE]``."""
    for event in events:
        if isinstance(event, str):
            yield sse({"delta": event})
        elif isinstance(event, Completion):
            yield sse(api_answer(event))
        elif isinstance(event, KeepAlive):
            yield SSE_KEEPALIVE
    yield SSE_DONE
