"""Grammars for structured output: a JSON schema turned into llama.cpp's GBNF by the converter
llama-cpp-python ships (``llama_cpp.llama_grammar``, a port of llama.cpp's own
json-schema-to-grammar). Imports llama_cpp lazily, like ``engine.py``.

The converter silently ignores JSON-Schema keywords it cannot enforce, so the output could parse
yet fail the schema. Those keywords are refused up front with a 400 that names them and where
they are, so that what the host returns always validates.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from .errors import InvalidRequest
from .protocol import ResponseFormat
from .tool_calls import ToolFormat, ToolRequest, call_schema

# What the converter enforces, plus annotations that constrain nothing.
SUPPORTED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
    "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
    "pattern", "format", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum",
    "title", "description", "examples", "default", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "nullable", "discriminator",
})
SUPPORTED_FORMATS = frozenset({"date", "time", "date-time", "uuid"})
MAX_PARALLEL_CALLS = 4  # a small model may repeat a call forever; four in one turn is plenty
_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # keyword -> {name: schema}
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")  # keyword -> [schema, ...]
_SCHEMA_VALUES = ("items", "additionalProperties")  # keyword -> schema (or a boolean)


def check_schema(schema: Any, where: str = "schema") -> None:
    """Raise ``InvalidRequest`` naming the first keyword the grammar could not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where} must be a JSON Schema object")
    for key, value in schema.items():
        if key not in SUPPORTED_KEYWORDS:
            raise InvalidRequest(f"{where} uses '{key}', which structured output cannot enforce; "
                                 "remove it (supported: type, properties, required, items, enum, const, "
                                 "anyOf, allOf, $ref, pattern, min/max lengths and bounds)")
        if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            raise InvalidRequest(f"{where} has '$ref' to {json.dumps(value)[:200]}: only references inside the "
                                 "schema ('#/$defs/...') are supported; the host fetches nothing")
        if key == "format" and value not in SUPPORTED_FORMATS:
            raise InvalidRequest(f"{where} uses format '{value}', which structured output cannot enforce "
                                 f"(supported: {', '.join(sorted(SUPPORTED_FORMATS))})")
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                check_schema(sub, f"{where}.{key}.{name}")
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                check_schema(sub, f"{where}.{key}[{i}]")
        elif key in _SCHEMA_VALUES and isinstance(value, (dict, bool)):
            check_schema(value, f"{where}.{key}")


def grammar_for(response_format: ResponseFormat) -> str:
    """The GBNF grammar that constrains an answer to ``response_format``."""
    schema = response_format.schema if response_format.schema is not None else {"type": "object"}
    check_schema(schema, "'response_format' schema")
    return _convert(json.dumps(schema))  # key order kept: it is the order of the output


@lru_cache(maxsize=64)  # frameworks send the same schema with every request
def _convert(schema_json: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(schema_json)
    except (AssertionError, ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        # the converter reports what it cannot do with asserts and ValueErrors
        raise InvalidRequest(f"the 'response_format' schema cannot be turned into a grammar: "
                             f"{str(exc)[:300] or type(exc).__name__}") from None


def tool_grammar(request: ToolRequest, tool_format: ToolFormat) -> str | None:
    """The grammar for a reply that may (``auto``) or must (``required``, a named function) call
    tools in ``tool_format``; ``None`` where the model's own template leads it (native, auto)."""
    if tool_format.native and request.choice == "auto":
        return None
    call = call_schema(request, tool_format)
    for tool in request.callable:
        check_schema(tool.parameters, f"the parameters of tool '{tool.name}'")
    if tool_format.name == "generic":
        calls = {"type": "array", "items": call, "minItems": 1,
                 "maxItems": MAX_PARALLEL_CALLS if request.parallel else 1}
        grammar = _convert(json.dumps({"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]}))
        if request.choice == "required":
            return grammar
        # text, or the calls: the text only may not start like them
        return _renamed_root(grammar, "llm-magic-calls") + "\nroot ::= llm-magic-calls | text\ntext ::= [^{] [^\\x00]*\n"
    grammar = _renamed_root(_convert(json.dumps(call)), "llm-magic-call")
    many = request.parallel
    if tool_format.name == "hermes":
        one = '"<tool_call>\\n" llm-magic-call "\\n</tool_call>"'
        root = f'{one} ("\\n" {one}){{0,{MAX_PARALLEL_CALLS - 1}}}' if many else one
    elif tool_format.name == "mistral":
        root = (f'"[TOOL_CALLS][" llm-magic-call ("," space llm-magic-call){{0,{MAX_PARALLEL_CALLS - 1}}} "]"'
                if many else '"[TOOL_CALLS][" llm-magic-call "]"')
    else:  # llama3: a bare call object
        root = "llm-magic-call"
    return grammar + f"\nroot ::= {root}\n"


def _renamed_root(grammar: str, name: str) -> str:
    """``grammar`` with its ``root`` rule renamed, to be used inside a larger grammar."""
    lines = grammar.splitlines()
    return "\n".join(f"{name} ::={line[len('root ::='):]}" if line.startswith("root ::=") else line for line in lines)
