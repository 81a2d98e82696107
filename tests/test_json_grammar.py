"""The JSON-Schema-to-grammar converter, without a model: what its grammars accept, checked by
brute force against Python's own reading of the same schema (jsonschema) and of the same
pattern (re), and that llama.cpp compiles each of them."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from llm_magic.errors import InvalidRequest
from llm_magic.engine.llama_cpp.grammar.json_schema import schema_to_gbnf

from .gbnf import compiles, to_regex


def accepts(schema: dict) -> re.Pattern:
    grammar = schema_to_gbnf(schema)
    assert compiles(grammar), grammar
    return to_regex(grammar)


def valid(schema: dict, text: str) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(json.loads(text))


@pytest.mark.parametrize("lo, hi", [(5, 7), (-37, 1234), (None, 0), (0, None), (-5, None), (None, -12), (10, 10),
                                    (-1000, -999), (99, 101), (7, 1_000_000)])
def test_integer_bounds_accept_exactly_the_integers_within(lo: int | None, hi: int | None) -> None:
    schema: dict = {"type": "integer"}
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    grammar = accepts(schema)
    for n in [*range(-1300, 1300), -10**15 + 1, 10**15 - 1, 999_999, 1_000_000, 1_000_001]:
        inside = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert bool(grammar.fullmatch(str(n))) == inside, (schema, n)
    for form in ("01", "-0", "00", "+1", "1.0", ""):
        assert not grammar.fullmatch(form), (schema, form)


def test_random_integer_and_number_bounds_never_let_a_value_outside_through() -> None:
    rng = random.Random(7)
    samples = ["0", "0.5", "-0.5", "1", "1.0", "2.25", "-3.75", "29.9", "30", "30.0", "30.01", "-30", "-30.5",
               "-29.99", "12", "-12.000", "100", "-100", "7.1", "-7.1", "0.01", "-0.01", "1e3"]
    for _ in range(150):
        kind = rng.choice(["integer", "number"])
        lo, hi = rng.choice([None, rng.randint(-30, 30)]), rng.choice([None, rng.randint(-30, 30)])
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
        schema: dict = {"type": kind}
        if lo is not None:
            schema[rng.choice(["minimum", "exclusiveMinimum"])] = lo
        if hi is not None:
            schema[rng.choice(["maximum", "exclusiveMaximum"])] = hi
        try:
            grammar = accepts(schema)
        except InvalidRequest as exc:  # only when nothing lies between the bounds
            assert "no integer" in exc.message or "no number" in exc.message
            continue
        for text in samples:
            matched, ok = bool(grammar.fullmatch(text)), valid(schema, text)
            assert not matched or ok, (schema, text)  # nothing outside gets through
            if kind == "number" and "e" not in text:
                assert matched or not ok, (schema, text)  # and a value inside can be written


def test_number_bounds_that_are_not_whole_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="not a whole number"):
        schema_to_gbnf({"type": "number", "minimum": 0.5})


@pytest.mark.parametrize("key", ["a\\b", "a\\q", "end\\", "line\nbreak", "tab\there", "quote\"d", "😀", "", "nul\u0000x",
                                 "a\"b", "sp ace", "ünï", "\u007f"])
def test_keys_and_constants_are_written_as_exact_json(key: str) -> None:
    schema = {"type": "object", "properties": {key: {"const": key}, "n": {"type": "integer"}},
              "required": [key, "n"]}
    grammar = accepts(schema)
    value = {key: key, "n": 3}
    assert grammar.fullmatch(json.dumps(value, ensure_ascii=False))
    assert not grammar.fullmatch(json.dumps({key + "x": key, "n": 3}, ensure_ascii=False))


def test_strings_hold_no_raw_control_characters() -> None:
    grammar = accepts({"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]})
    assert grammar.fullmatch('{"code": "def add(a, b):\\n    return a + b"}')
    assert not grammar.fullmatch('{"code": "def add(a, b):\n    return a + b"}')  # a raw newline
    assert not grammar.fullmatch('{"code": "tab\there"}')
    assert not grammar.fullmatch('{"code": "bad \\q escape"}')


def test_optional_properties_keep_their_order_and_commas() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"},
                                               "c": {"type": "integer"}}, "required": ["b"]}
    grammar = accepts(schema)
    for text in ['{"b": 1}', '{"a": 1, "b": 2}', '{"b": 2, "c": 3}', '{"a": 1, "b": 2, "c": 3}']:
        assert grammar.fullmatch(text), text
    for text in ['{}', '{"a": 1}', '{"a": 1,"b": 2,}', '{, "b": 2}', '{"b": 2 "c": 3}']:
        assert not grammar.fullmatch(text), text
    none_required = accepts({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}})
    for text in ['{}', '{"a": 1}', '{"b": 2}', '{"a": 1, "b": 2}']:
        assert none_required.fullmatch(text), text
    assert not none_required.fullmatch('{"b": 2, "a": 1}')  # the order given


def test_array_bounds_and_tuples() -> None:
    bounded = accepts({"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3})
    assert [bool(bounded.fullmatch(t)) for t in ["[]", "[true]", "[true, false]", "[true, false, true]",
                                                 "[true, true, true, true]"]] == [False, False, True, True, False]
    pair = accepts({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False,
                    "minItems": 1})
    assert [bool(pair.fullmatch(t)) for t in ['[1]', '[1, "a"]', '[1, "a", 2]', '["a"]', "[]"]] == [
        True, True, False, False, False]


@pytest.mark.parametrize("pattern, samples", [
    ("^[a-z]{2,4}$", ["ab", "abcd", "a", "abcde", "AB", "a1"]),
    (r"^\d{3}-\d{4}$", ["555-1234", "5551234", "55-1234"]),
    (r"^(foo|bar)+baz?$", ["foobarba", "foobaz", "baz", "foofoo", "ba"]),
    (r"^[A-Z][a-z]*( [A-Z][a-z]*)*$", ["Ada Lovelace", "ada", "Ada  L", "A"]),
    (r"^\w+@\w+\.(com|org)$", ["me@x.com", "me@x.net", "@x.com"]),
    (r"^[^0-9]{1,3}$", ["abc", "a1", "!!", ""]),
    (r"^a.c$", ["abc", "a-c", "ac"]),
    (r"colou?r", ["color", "colour", "colr"]),
])
def test_patterns_accept_only_matching_strings(pattern: str, samples: list[str]) -> None:
    grammar = accepts({"type": "string", "pattern": pattern})
    for s in samples:
        text = json.dumps(s)
        if grammar.fullmatch(text):
            assert re.search(pattern, s), (pattern, s)  # nothing that fails the pattern gets through
        elif re.fullmatch(pattern.strip("^$"), s) and not any(c in s for c in '"\\'):
            raise AssertionError(f"{pattern} refuses {s!r}, which it matches whole")


@pytest.mark.parametrize("schema, named", [
    ({"type": "string", "maxLength": 20000}, "'maxLength' of 20000"),
    ({"type": "string", "pattern": "^[a-z]{0,30000}$"}, "a repetition of 30000"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 20000}, "'maxItems' of 20000"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 10_000_000}, "'minItems' of 10000000"),
    ({"enum": [f"value-{i}" for i in range(10_000)]}, "'enum' has 10000 values"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}, "'b', which is not in"),
    ({"type": "object", "properties": {f"k{i}": {"type": "string", "maxLength": 900} for i in range(10)}},
     "add up to more than"),
    ({"type": "string", "pattern": "(" * 300 + "a" + ")" * 300}, "characters"),
    ({"type": "string", "pattern": "^(?=a)a$"}, "lookarounds"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer"),
    ({"not": {"type": "string"}}, "'not'"),
])
def test_schemas_past_the_limits_or_unenforceable_are_refused_naming_the_part(schema: dict, named: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        schema_to_gbnf(schema, "'response_format' schema")
    assert named in caught.value.message and caught.value.message.startswith("'response_format' schema")


def test_deep_nesting_is_refused() -> None:
    schema: dict = {"type": "integer"}
    for _ in range(40):
        schema = {"type": "array", "items": schema}
    with pytest.raises(InvalidRequest, match="nest more than"):
        schema_to_gbnf(schema)


def test_references_and_recursion() -> None:
    schema = {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                                  "next": {"anyOf": [{"$ref": "#/$defs/node"},
                                                                                     {"type": "null"}]}},
                                 "required": ["v", "next"]}},
              "$ref": "#/$defs/node"}
    grammar = schema_to_gbnf(schema)
    assert compiles(grammar)
    assert "ref-node ::=" in grammar


def test_pydantic_models_convert(tmp_path) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Address(pydantic.BaseModel):
        street: str
        zip: str = pydantic.Field(pattern=r"^\d{5}$")

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=40)
        age: int = pydantic.Field(ge=0, le=130)
        height: float = pydantic.Field(gt=0)
        tags: list[str] = []
        address: Address | None = None
        scores: dict[str, int] = {}

    schema = Person.model_json_schema()
    assert compiles(schema_to_gbnf(schema))
