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
