"""Field validation shared by every wire format: typed, range-checked reads of a JSON object
whose errors name the field by its path, and the fields several formats share (sampling,
``response_format``, ``logit_bias``). Pure Python."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable

from llm_magic.errors import InvalidRequest
from llm_magic.wire.reasoning import REASONING_FORMATS
from llm_magic.wire.types import MAX_TOKENS_LIMIT, SEED_LIMIT, ResponseFormat, Sampling

MAX_MESSAGES = 4096
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


class Fields:
    """Typed, range-checked access to one JSON object; errors name the field by its path."""

    def __init__(self, obj: Any, path: str = "") -> None:
        if not isinstance(obj, dict):
            where = f"'{path.rstrip('.')}'" if path else "the request body"
            raise InvalidRequest(f"{where} must be a JSON object, not {type_name(obj)}")
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
            raise InvalidRequest(f"{self.name(key)} must be an integer, not {type_name(value)}")
        if not lo <= value <= hi:
            raise InvalidRequest(f"{self.name(key)} must be between {lo} and {hi}, got {value}")
        return value

    def number(self, key: str, lo: float, hi: float, default: Any = None) -> Any:
        value = self.obj.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequest(f"{self.name(key)} must be a number, not {type_name(value)}")
        if not math.isfinite(value) or not lo <= value <= hi:
            raise InvalidRequest(f"{self.name(key)} must be between {lo} and {hi}, got {value}")
        return float(value)

    def boolean(self, key: str, default: Any = None) -> Any:
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InvalidRequest(f"{self.name(key)} must be true or false, not {type_name(value)}")
        return value

    def string(self, key: str, default: Any = None, max_length: int = 1000) -> Any:
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise InvalidRequest(f"{self.name(key)} must be a string, not {type_name(value)}")
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


def object_or_empty(body: dict, key: str) -> Any:
    value = body.get(key)
    return {} if value is None else value


def parse_sampling(f: Fields, max_tokens_keys: tuple[str, ...], default_max_tokens: int | None,
                   logit_bias: bool = False) -> Sampling:
    """The sampling fields every format shares, with one set of limits; ``logit_bias``: the
    body may carry OpenAI's ``logit_bias`` (``/api`` does not take it). A field the format does
    not list is refused before this by its ``reject_unknown``."""
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
        logit_bias=parse_logit_bias(f.obj.get("logit_bias")) if logit_bias else (),
    )


LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range: -100 to 100
MAX_LOGIT_BIAS = 1024  # entries; OpenAI's own limit is 300, llama.cpp has none


def parse_logit_bias(value: Any, key: str = "logit_bias") -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: ``{"<token id>": bias}``, bias from -100 to 100."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{key}' must be an object mapping token ids (as strings) to a bias from -100 to 100, "
                             f"not {type_name(value)}")
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
    f = Fields(value, where + ".")
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
    spec = Fields(value.get("json_schema"), where + ".json_schema.")
    spec.reject_unknown(("name", "schema", "strict", "description"))
    schema = spec.obj.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise InvalidRequest(f"'{where}.json_schema.schema' must be a JSON Schema object, not {type_name(schema)}")
    return ResponseFormat(schema=schema, name=spec.string("name", "response", max_length=64),
                          strict=bool(spec.boolean("strict", False)))


REASONING_FIELDS = ("reasoning_format", "thinking_budget_tokens", "reasoning_effort", "chat_template_kwargs")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")  # OpenAI's
MAX_TEMPLATE_KWARGS = 64


def parse_reasoning(f: Fields, effort: Any = None) -> dict[str, Any]:
    """The thinking fields (``REASONING_FIELDS``) as ``GenerationRequest`` keywords; ``effort``:
    the effort given elsewhere (Responses' ``reasoning.effort``)."""
    fmt = f.obj.get("reasoning_format")
    if fmt is not None and fmt not in REASONING_FORMATS:
        raise InvalidRequest(f"{f.name('reasoning_format')} must be one of {', '.join(REASONING_FORMATS)}, "
                             f"got {json.dumps(fmt)[:40]}")
    effort = f.obj.get("reasoning_effort") if effort is None else effort
    if effort is not None and effort not in REASONING_EFFORTS:
        raise InvalidRequest(f"{f.name('reasoning_effort')} must be one of {', '.join(REASONING_EFFORTS)}, "
                             f"got {json.dumps(effort)[:40]}")
    kwargs = f.obj.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise InvalidRequest(f"{f.name('chat_template_kwargs')} must be an object of template variables "
                                 f"(e.g. {{\"enable_thinking\": false}}), not {type_name(kwargs)}")
        if len(kwargs) > MAX_TEMPLATE_KWARGS:
            raise InvalidRequest(f"{f.name('chat_template_kwargs')} holds more than {MAX_TEMPLATE_KWARGS} variables")
    return {"reasoning_format": fmt, "reasoning_effort": effort, "chat_template_kwargs": kwargs,
            "reasoning_budget": f.integer("thinking_budget_tokens", -1, MAX_TOKENS_LIMIT)}


def check_message_list(value: Any, field_name: str) -> None:
    """A chat history is a non-empty list of at most ``MAX_MESSAGES`` items."""
    if not isinstance(value, list):
        raise InvalidRequest(f"'{field_name}' must be a list of messages, not {type_name(value)}")
    if not value:
        raise InvalidRequest(f"'{field_name}' must hold at least one message")
    if len(value) > MAX_MESSAGES:
        raise InvalidRequest(f"'{field_name}' holds more than {MAX_MESSAGES} messages")

