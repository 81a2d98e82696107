"""Grammars for structured output and tool calls: JSON schemas turned into llama.cpp's GBNF by
``json_schema`` (bounded, exact: what a response format asks and it cannot enforce is a 400
that names it; a tool's parameters are loosened instead), cached, since frameworks send the same
schema with every request.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

from llm_magic.engine.llama_cpp.grammar.gbnf import LIMITS
from llm_magic.engine.llama_cpp.grammar.json_schema import FORMATS, KEYWORDS, schema_grammar
from llm_magic.errors import InvalidRequest
from llm_magic.wire.types import ResponseFormat
from llm_magic.wire.tool_calls import ToolFormat, ToolRequest, call_schema

log = logging.getLogger("llm_magic.engine")

MAX_PARALLEL_CALLS = 4  # a small model may repeat a call forever; four in one turn is plenty
CACHE_BYTES = 4 * 1024 * 1024  # grammars kept for schemas seen again (each is at most 128 KiB)


@dataclass(frozen=True)
class Constraint:
    """What constrains an answer: the grammar, and the exact texts (keys, constants) it makes
    the answer hold, which the model's vocabulary must be able to write."""

    grammar: str
    texts: frozenset[str] = frozenset()
    controls: bool = False  # whether the grammar ever lets a raw control character through


class _GrammarCache:
    """Grammars by schema text, the least recently used dropped past ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: collections.OrderedDict[str, Constraint] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, schema_json: str, where: str) -> Constraint:
        with self._lock:
            if schema_json in self._items:
                self._items.move_to_end(schema_json)
                return self._items[schema_json]
        built = schema_grammar(json.loads(schema_json), where)  # raises InvalidRequest
        constraint = Constraint(built.text(), frozenset(built.texts))
        with self._lock:
            if schema_json not in self._items:
                self._items[schema_json] = constraint
                self._bytes += len(schema_json) + _size(constraint)
                while self._bytes > self.limit and self._items:
                    key, value = self._items.popitem(last=False)
                    self._bytes -= len(key) + _size(value)
        return constraint


def _size(constraint: Constraint) -> int:
    return len(constraint.grammar) + sum(len(t) for t in constraint.texts)


_cache = _GrammarCache(CACHE_BYTES)


def _convert(schema: object, where: str) -> Constraint:
    return _cache.get(json.dumps(schema), where)  # key order kept: it is the order of the output


def grammar_for(response_format: ResponseFormat) -> Constraint:
    """The GBNF grammar that constrains an answer to ``response_format``."""
    schema = response_format.schema if response_format.schema is not None else {"type": "object"}
    return _convert(schema, "'response_format' schema")


def tool_grammar(request: ToolRequest, tool_format: ToolFormat) -> Constraint | None:
    """The grammar for a reply that may (``auto``) or must (``required``, a named function) call
    tools in ``tool_format``; ``None`` where the model's own template leads it (native, auto)."""
    if tool_format.native and request.choice == "auto":
        return None
    request = dataclasses.replace(request, tools=tuple(
        dataclasses.replace(tool, parameters=_enforceable(tool.parameters, tool.name)) for tool in request.tools))
    call = call_schema(request, tool_format)
    if tool_format.name == "generic":
        calls = {"type": "array", "items": call, "minItems": 1,
                 "maxItems": MAX_PARALLEL_CALLS if request.parallel else 1}
        calls_only = _convert({"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]},
                              "the tools")
        if request.choice == "required":
            return calls_only
        # text, or the calls: the text only may not start like them
        return Constraint(_renamed_root(calls_only.grammar, "llm-magic-calls") +
                          "\nroot ::= llm-magic-calls | text\ntext ::= [^{] [^\\x00]*\n", calls_only.texts, controls=True)
    one_call = _convert(call, "the tools")
    grammar = _renamed_root(one_call.grammar, "llm-magic-call")
    many = request.parallel
    if tool_format.name == "hermes":
        one = '"<tool_call>\\n" llm-magic-call "\\n</tool_call>"'
        root = f'{one} ("\\n" {one}){{0,{MAX_PARALLEL_CALLS - 1}}}' if many else one
    elif tool_format.name == "mistral":
        root = (f'"[TOOL_CALLS][" llm-magic-call ("," ws llm-magic-call){{0,{MAX_PARALLEL_CALLS - 1}}} "]"'
                if many else '"[TOOL_CALLS][" llm-magic-call "]"')
    else:  # llama3: a bare call object
        root = "llm-magic-call"
    return Constraint(grammar + f"\nroot ::= {root}\n", one_call.texts, controls=tool_format.name == "hermes")


def _enforceable(parameters: dict, name: str) -> dict:
    """A tool's parameters as a grammar can hold them. Unlike a response format, a tool's schema
    is the client's description of its own function (coding agents send dozens, with
    ``propertyNames``, ``format: uri`` or a ``maxLength`` of 512 KiB): what no grammar enforces
    or would hold in bounds is left out, which only lets more through, and a schema that still
    cannot be built is held to "an object", as llama-server does, rather than refusing the
    request. (A response format is the answer the client asked for: there such a schema is a 400.)"""
    loosened = _without_unenforced(parameters)
    try:
        _convert(loosened, f"the parameters of tool '{name}'")
    except InvalidRequest as exc:
        log.warning("tool %s: its parameters are held to any object (%s)", name, exc.message)
        return {"type": "object"}
    return loosened


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def _without_unenforced(schema: Any) -> Any:
    """``schema`` without the keywords the converter cannot enforce, at every depth."""
    if not isinstance(schema, dict):
        return schema
    out: dict = {}
    for key, value in schema.items():
        if key not in KEYWORDS:
            continue
        if key == "format" and (value not in FORMATS or any(k in schema for k in ("pattern", "minLength", "maxLength"))):
            continue  # a "uri" or "email" is still a string
        if key in _COUNTS and isinstance(value, int) and value > LIMITS.repeat:
            continue  # a string of up to 512 KiB is a string
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            value = {k: _without_unenforced(v) for k, v in value.items()}
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            value = [_without_unenforced(v) for v in value]
        elif key in ("items", "additionalProperties"):
            value = _without_unenforced(value)
        out[key] = value
    return out


def _renamed_root(grammar: str, name: str) -> str:
    """``grammar`` with its ``root`` rule renamed, to be used inside a larger grammar."""
    lines = grammar.splitlines()
    return "\n".join(f"{name} ::={line[len('root ::='):]}" if line.startswith("root ::=") else line for line in lines)
