"""JSON Schema to llama.cpp's GBNF, within bounds a public host can afford.

The grammar decides every token a constrained answer may take, so it must be exact and it must
be small. This converter handles the subset of JSON Schema that a grammar can enforce, refuses
everything else with a 400 that names the schema part (so what the host returns always parses
and validates), and refuses schemas whose grammar would be too large or too deep for llama.cpp
to compile and check per token without slowing everyone (``Limits``).

What it writes: strings whose characters are JSON's (no raw control characters; ``\\`` escapes),
keys and constants as exact JSON text (any key, empty and non-ASCII included), integer (and
integer-bounded number) ranges as digit grammars, bounded repetitions as GBNF ``{m,n}``, and one
optional space where JSON allows whitespace, so a model cannot run away in it. Pure Python.
"""

from __future__ import annotations

import json
import math
from typing import Any

from llm_magic.errors import InvalidRequest
from llm_magic.engine.llama_cpp.grammar.gbnf import DIGITS, LIMITS, Grammar, Limits, is_name
from llm_magic.engine.llama_cpp.grammar.patterns import pattern_rule
from llm_magic.engine.llama_cpp.grammar.ranges import int_range, number_range

# What is enforced, plus annotations that constrain nothing.
ANNOTATIONS = frozenset({"title", "description", "examples", "default", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly", "discriminator"})
KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
    "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
    "pattern", "format", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "nullable",
}) | ANNOTATIONS
FORMATS = ("date", "time", "date-time", "uuid")
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


def schema_to_gbnf(schema: Any, where: str = "schema", limits: Limits = LIMITS) -> str:
    """The GBNF grammar (root rule ``root``) of JSON values valid against ``schema``; raises
    ``InvalidRequest`` naming the part of the schema that cannot be enforced or is too large."""
    return schema_grammar(schema, where, limits).text()


def schema_grammar(schema: Any, where: str = "schema", limits: Limits = LIMITS) -> Grammar:
    """``schema_to_gbnf``'s grammar as built: its text, and the exact texts (``Grammar.texts``)
    an answer must hold, so that the engine can check its model's vocabulary writes them."""
    grammar = Grammar(limits)
    root = grammar.reserve("root")
    assert root == "root"
    body = _Converter(grammar, schema, where).visit(schema, where, 0)
    grammar.define("root", body, where)
    return grammar


class _Converter:
    def __init__(self, grammar: Grammar, root: Any, where: str) -> None:
        self.g = grammar
        self.root = root
        self.root_where = where
        self.refs: dict[str, str] = {}  # "#/..." -> its rule

    def visit(self, schema: Any, where: str, depth: int) -> str:
        """A GBNF expression for the values ``schema`` accepts."""
        if depth > self.g.limits.depth:
            raise _fail(where, f"schemas nest more than {self.g.limits.depth} deep; flatten the schema")
        if schema is True or schema == {}:
            return self.g.builtin("value")
        if schema is False:
            raise _fail(where, "the schema 'false' accepts no value")
        if not isinstance(schema, dict):
            raise _fail(where, "must be a JSON Schema object")
        for key in schema:
            if key not in KEYWORDS:
                raise _fail(where, f"'{_short(key)}' is a keyword structured output cannot enforce; remove it "
                            "(supported: type, properties, required, additionalProperties, items, prefixItems, "
                            "min/maxItems, enum, const, anyOf, oneOf, allOf, $ref, pattern, format, "
                            "min/maxLength, minimum/maximum)")
        for key in ("$defs", "definitions"):
            if key in schema and not isinstance(schema[key], dict):
                raise _fail(where, f"'{key}' must be an object of schemas")
        if schema.get("nullable") is True:
            rest = {k: v for k, v in schema.items() if k != "nullable"}
            return f"{self.visit(rest, where, depth)} | {self.g.builtin('null')}"
        if "$ref" in schema:
            return self._ref(schema, where, depth)
        if "const" in schema:
            self._only_annotations(schema, ("const",), where)
            return self._literals([schema["const"]], where + ".const")
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise _fail(where, "'enum' must be a non-empty list")
            if len(values) > self.g.limits.enum:
                raise _fail(where, f"'enum' has {len(values)} values; structured output allows "
                            f"{self.g.limits.enum}")
            kept = [v for v in values if _type_allows(schema.get("type"), v)]
            if not kept:
                raise _fail(where, "no value of 'enum' has the schema's 'type'")
            self._only_annotations(schema, ("enum", "type"), where)
            return self._literals(kept, where + ".enum")
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self._any_of(schema, key, where, depth)
        if "allOf" in schema:
            return self.visit(_merge_all_of(schema, self.root, where, self.g.limits), where, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind or any(k not in TYPES for k in kind):
                raise _fail(where, f"'type' must name types among {', '.join(TYPES)}")
            alternatives = [self._typed(schema, k, f"{where}(type {k})", depth) for k in dict.fromkeys(kind)]
            return " | ".join(f"({a})" for a in alternatives)
        if kind is None:
            kind = _implied_type(schema)
            if kind is None:
                return self.g.builtin("value")
            if kind == "mixed":
                raise _fail(where, "the schema has keywords of several types and no 'type'; add one")
        elif kind not in TYPES:
            raise _fail(where, f"'type' {_short(kind)} is not one of {', '.join(TYPES)}")
        return self._typed(schema, kind, where, depth)

    # -- combinators ---------------------------------------------------------------------

    def _ref(self, schema: dict, where: str, depth: int) -> str:
        ref = schema["$ref"]
        self._only_annotations(schema, ("$ref", "$defs", "definitions"), where)
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise _fail(where, f"'$ref' to {_short(ref)}: only references inside the schema "
                        "('#/$defs/...') are supported; the host fetches nothing")
        if ref in self.refs:
            return self.refs[ref]
        target: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise _fail(where, f"'$ref' {_short(ref)} points at nothing in the schema")
        name = self.refs[ref] = self.g.reserve("ref-" + ref.rsplit("/", 1)[-1])
        self.g.define(name, self.visit(target, f"{self.root_where}{ref[1:].replace('/', '.')}", depth + 1), where)
        return name

    def _any_of(self, schema: dict, key: str, where: str, depth: int) -> str:
        options = schema[key]
        if not isinstance(options, list) or not options:
            raise _fail(where, f"'{key}' must be a non-empty list of schemas")
        base = {k: v for k, v in schema.items() if k != key and k not in ANNOTATIONS}
        alternatives = []
        for i, option in enumerate(options):
            if base and isinstance(option, dict):  # pydantic puts shared keywords beside anyOf
                option = {**base, **option}
            alternatives.append(self.visit(option, f"{where}.{key}[{i}]", depth + 1))
        return " | ".join(f"({a})" for a in alternatives)

    def _literals(self, values: list, where: str) -> str:
        texts = [self.g.exact(v) for v in values]
        if sum(len(t) for t in texts) > self.g.limits.literal_bytes:
            raise _fail(where, f"the values are more than {self.g.limits.literal_bytes} bytes of JSON; shorten them")
        return " | ".join(dict.fromkeys(texts))

    def _only_annotations(self, schema: dict, allowed: tuple[str, ...], where: str) -> None:
        extra = [k for k in schema if k not in allowed and k not in ANNOTATIONS and k not in ("$defs", "definitions")]
        if extra and not (extra == ["type"] and "const" in schema and _type_allows(schema["type"], schema["const"])):
            raise _fail(where, f"'{_short(extra[0])}' beside '{allowed[0]}' cannot be enforced; remove one")

    # -- types ---------------------------------------------------------------------------

    def _typed(self, schema: dict, kind: str, where: str, depth: int) -> str:
        if kind == "object":
            return self._object(schema, where, depth)
        if kind == "array":
            return self._array(schema, where, depth)
        if kind == "string":
            return _string(self.g, schema, where)
        if kind in ("integer", "number"):
            return _number(self.g, schema, kind, where)
        return self.g.builtin(kind)  # boolean, null

    def _object(self, schema: dict, where: str, depth: int) -> str:
        g = self.g
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise _fail(where, "'properties' must be an object of schemas")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _fail(where, "'required' must be a list of property names")
        missing = [r for r in required if r not in properties]
        extra = schema.get("additionalProperties")
        if missing and (extra is False or properties or extra is None):
            raise _fail(where, f"'required' names '{_short(missing[0])}', which is not in 'properties'; "
                        "add it there (with its schema) or remove it from 'required'")
        if sum(len(json.dumps(k, ensure_ascii=False)) for k in properties) > g.limits.literal_bytes:
            raise _fail(where, f"the property names are more than {g.limits.literal_bytes} bytes; shorten them")
        g.builtin("ws")
        if not properties:
            if extra is False:
                return '"{" ws "}"'
            if extra is None or extra is True or extra == {}:
                return g.builtin("object")
            if not isinstance(extra, dict):
                raise _fail(where, "'additionalProperties' must be a schema or a boolean")
            value = self.visit(extra, f"{where}.additionalProperties", depth + 1)
            pair = g.rule(f"{where}-kv", f'{g.builtin("string")} ":" ws {_grouped(value)} ws', where)
            return f'"{{" ws ({pair} ("," ws {pair})*)? "}}"'
        if extra not in (None, True, False) and not isinstance(extra, dict):
            raise _fail(where, "'additionalProperties' must be a schema or a boolean")
        # Properties in their order, each required one present, the optional ones maybe; as a
        # chain of rules, linear in the number of properties: ``then`` is what may follow
        # property i once something was written, ``first`` how the object may start at i.
        then, first = "", ""
        for name, sub in reversed(list(properties.items())):
            value = self.visit(sub, f"{where}.properties.{name}", depth + 1)
            pair = f'{g.exact(name)} ":" ws {_grouped(value)} ws'
            after = f" {then}" if then else ""
            if name in required:
                then_body, first_body = f'"," ws {pair}{after}', f"{pair}{after}"
            else:
                then_body = f'("," ws {pair})?{after}'
                first_body = f"{pair}{after}" + (f" | {first}" if first else "")
            then = g.rule(f"{where}-then", then_body, where)
            first = g.rule(f"{where}-first", first_body, where)
        inside = first if any(name in properties for name in required) else f"{first}?"
        return f'"{{" ws {inside} "}}"'

    def _array(self, schema: dict, where: str, depth: int) -> str:
        g = self.g
        g.builtin("ws")
        low, high = _count(schema, "minItems", where), _count(schema, "maxItems", where, None)
        if high is not None and high < low:
            raise _fail(where, f"'maxItems' ({high}) is less than 'minItems' ({low})")
        g.repeat("item", low, high, where, ("'minItems'", "'maxItems'"))  # the bounds, checked and counted
        prefix = schema.get("prefixItems", [])
        items = schema.get("items", True)
        if isinstance(items, list):  # drafts 4-7 wrote tuples as a list of 'items'
            prefix, items = items, schema.get("additionalItems", True)
        if not isinstance(prefix, list):
            raise _fail(where, "'prefixItems' must be a list of schemas")
        if len(prefix) > g.limits.enum:
            raise _fail(where, f"'prefixItems' has more than {g.limits.enum} schemas")
        parts = [_grouped(self.visit(s, f"{where}.prefixItems[{i}]", depth + 1)) + " ws" for i, s in enumerate(prefix)]
        if items is False:
            if low > len(parts):
                raise _fail(where, f"'minItems' ({low}) is more than the {len(parts)} items 'prefixItems' allows")
            high = len(parts) if high is None else min(high, len(parts))
            element = None
        else:
            element = self.visit(items, f"{where}.items", depth + 1)
            element = g.rule(f"{where}-item", f"{_grouped(element)} ws", where)
        # after the prefix: the items beyond it, as many as the bounds leave
        tail = ""
        if element is not None and (high is None or high > len(parts)):
            more_low = max(0, low - len(parts))
            more_high = None if high is None else high - len(parts)
            if parts:
                tail = g.repeat(f'("," ws {element})', more_low, more_high, where, "'maxItems'")
            else:
                rest = g.repeat(f'("," ws {element})', max(0, more_low - 1),
                                None if more_high is None else more_high - 1, where, "'maxItems'")
                tail = f"{element} {rest}".strip()
                if more_low == 0:
                    tail = f"({tail})?"
        body = tail
        for i in range(len(parts) - 1, -1, -1):  # the prefix's items, each a rule of its own
            if high is not None and i >= high:
                continue
            item = ('"," ws ' if i else "") + parts[i] + (f" {body}" if body else "")
            body = g.rule(f"{where}-prefix", item, where)
            if i >= low:
                body += "?"
        return f'"[" ws {body} "]"' if body else '"[" ws "]"'


def _merge_all_of(schema: dict, root: Any, where: str, limits: Limits) -> dict:
    """``allOf`` of object schemas (or of one schema) as the one schema they make together."""
    parts = schema["allOf"]
    if not isinstance(parts, list) or not parts:
        raise _fail(where, "'allOf' must be a non-empty list of schemas")
    merged: dict = {k: v for k, v in schema.items() if k != "allOf"}
    for i, part in enumerate(parts):
        part = _resolved(part, root, f"{where}.allOf[{i}]", limits)
        if not isinstance(part, dict):
            raise _fail(f"{where}.allOf[{i}]", "must be a JSON Schema object")
        for key, value in part.items():
            if key in ANNOTATIONS:
                continue
            if key == "properties" and isinstance(value, dict):
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required" and isinstance(value, list):
                merged["required"] = [*merged.get("required", []), *value]
            elif key not in merged or merged[key] == value:
                merged[key] = value
            else:
                raise _fail(f"{where}.allOf[{i}]", f"'{_short(key)}' differs between the schemas "
                            "of 'allOf'; only object schemas (properties and required) are combined")
    return merged


def _resolved(schema: Any, root: Any, where: str, limits: Limits) -> Any:
    for _ in range(limits.depth):
        if not (isinstance(schema, dict) and isinstance(schema.get("$ref"), str)):
            return schema
        ref, target = schema["$ref"], root
        if not ref.startswith("#"):
            raise _fail(where, f"'$ref' to {_short(ref)}: only references inside the schema are supported")
        for part in ref[2:].split("/") if ref != "#" else []:
            if not isinstance(target, dict) or part not in target:
                raise _fail(where, f"'$ref' {_short(ref)} points at nothing in the schema")
            target = target[part]
        schema = target
    raise _fail(where, "'$ref's refer to each other in a loop")


def _string(g: Grammar, schema: dict, where: str) -> str:
    """A string: a format, a pattern, bounded lengths, or any."""
    quote = '"\\""'
    if "format" in schema:
        fmt = schema["format"]
        if fmt not in FORMATS:
            raise _fail(where, f"format '{_short(fmt)}' cannot be enforced (supported: {', '.join(FORMATS)})")
        if any(k in schema for k in ("pattern", "minLength", "maxLength")):
            raise _fail(where, "'format' with 'pattern' or a length cannot be enforced together; keep one")
        return f"{quote} {g.builtin(fmt)} {quote}"
    if "pattern" in schema:
        if any(k in schema for k in ("minLength", "maxLength")):
            raise _fail(where, "'pattern' with 'minLength'/'maxLength' cannot be enforced together; "
                        "put the length in the pattern")
        pattern = schema["pattern"]
        if not isinstance(pattern, str):
            raise _fail(where, "'pattern' must be a string")
        if len(pattern) > g.limits.pattern:
            raise _fail(where, f"'pattern' is {len(pattern)} characters; structured output allows "
                        f"{g.limits.pattern}")
        body = pattern_rule(pattern, g, f"{where}.pattern")
        return f"{quote} {body} {quote}" if body else f"{quote} {quote}"
    low, high = _count(schema, "minLength", where), _count(schema, "maxLength", where, None)
    if high is not None and high < low:
        raise _fail(where, f"'maxLength' ({high}) is less than 'minLength' ({low})")
    if (low, high) == (0, None):
        return g.builtin("string")
    chars = g.repeat(g.builtin("char"), low, high, where, ("'minLength'", "'maxLength'"))
    return f"{quote} {chars} {quote}".replace("  ", " ")


def _number(g: Grammar, schema: dict, kind: str, where: str) -> str:
    """An integer or a number, within its bounds."""
    low = _bound(schema, "minimum", "exclusiveMinimum", where)
    high = _bound(schema, "maximum", "exclusiveMaximum", where)
    if low is None and high is None:
        return g.builtin(kind)
    if kind == "integer":
        lo = None if low is None else (math.floor(low[0]) + 1 if low[1] else math.ceil(low[0]))
        hi = None if high is None else (math.ceil(high[0]) - 1 if high[1] else math.floor(high[0]))
        if lo is not None and hi is not None and lo > hi:
            raise _fail(where, "no integer lies within its 'minimum' and 'maximum'")
        _check_digits(lo, hi, where)
        return int_range(lo, hi)
    for bound in (low, high):
        if bound is not None and bound[0] != int(bound[0]):
            raise _fail(where, "a 'number' bound that is not a whole number cannot be enforced; use whole "
                        "bounds, or 'type': 'integer'")
    lo = None if low is None else (int(low[0]), low[1])
    hi = None if high is None else (int(high[0]), high[1])
    if lo is not None and hi is not None and (lo[0] > hi[0] or (lo[0] == hi[0] and (lo[1] or hi[1]))):
        raise _fail(where, "no number lies within its 'minimum' and 'maximum'")
    _check_digits(lo and lo[0], hi and hi[0], where)
    return number_range(lo, hi, g)


def _fail(where: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{where}: {message}")


def _grouped(expression: str) -> str:
    return expression if is_name(expression) or not any(c in expression for c in " |") else f"({expression})"


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


_IMPLIED = {"properties": "object", "additionalProperties": "object", "required": "object", "items": "array",
            "prefixItems": "array", "minItems": "array", "maxItems": "array", "pattern": "string",
            "format": "string", "minLength": "string", "maxLength": "string", "minimum": "number",
            "maximum": "number", "exclusiveMinimum": "number", "exclusiveMaximum": "number"}


def _implied_type(schema: dict) -> str | None:
    """The type a schema without ``type`` means by its keywords ("mixed" for several)."""
    kinds = {_IMPLIED[k] for k in schema if k in _IMPLIED}
    return kinds.pop() if len(kinds) == 1 else None if not kinds else "mixed"


def _type_allows(kind: Any, value: Any) -> bool:
    if kind is None:
        return True
    kinds = kind if isinstance(kind, list) else [kind]
    actual = ("null" if value is None else "boolean" if isinstance(value, bool) else
              "integer" if isinstance(value, int) or (isinstance(value, float) and value.is_integer()) else
              "number" if isinstance(value, float) else "string" if isinstance(value, str) else
              "array" if isinstance(value, list) else "object")
    return actual in kinds or (actual == "integer" and "number" in kinds)


def _count(schema: dict, key: str, where: str, default: int | None = 0) -> Any:
    value = schema.get(key, default)
    if value is default:
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"{where}: '{key}' must be a whole number of at least 0")
    return value


def _bound(schema: dict, key: str, exclusive_key: str, where: str) -> tuple[float, bool] | None:
    """``(bound, exclusive)`` from ``minimum``/``exclusiveMinimum`` (both drafts' forms)."""
    value, exclusive = schema.get(key), schema.get(exclusive_key)
    for name, v in ((key, value), (exclusive_key, exclusive)):
        if v is not None and not isinstance(v, bool) and not isinstance(v, (int, float)):
            raise InvalidRequest(f"{where}: '{name}' must be a number")
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidRequest(f"{where}: '{name}' must be a finite number")
    if isinstance(exclusive, bool):  # draft 4: a flag on minimum
        return None if value is None else (value, exclusive)
    candidates = [(b, e) for b, e in ((value, False), (exclusive, True)) if b is not None]
    if not candidates:
        return None
    tighter = max if key == "minimum" else min
    return tighter(candidates, key=lambda c: (c[0], c[1]) if key == "minimum" else (c[0], not c[1]))


def _check_digits(lo: int | None, hi: int | None, where: str) -> None:
    for bound in (lo, hi):
        if bound is not None and len(str(abs(bound))) > DIGITS:
            raise InvalidRequest(f"{where}: a bound of more than {DIGITS} digits cannot be enforced")
