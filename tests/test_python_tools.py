"""The pieces behind %%llm's notebook features, without a host: Python functions described as
tools and run from the model's JSON, code pulled out of answers, Markdown line breaks, cell
references, and conversation files."""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Literal, Optional

import pytest
from IPython.core.interactiveshell import InteractiveShell
from pydantic import BaseModel

from llm_magic.client import conversation
from llm_magic.notebook.cells import CellErrors, CellNotFound, interpolate
from llm_magic.errors import InvalidRequest
from llm_magic.client.python_tools import ToolBox, parse_docstring, schema_for
from llm_magic.notebook.rendering import answer_code, code_blocks, fixed_cell, keep_line_breaks


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


class Place(BaseModel):
    city: str
    country: str = "NO"


@dataclasses.dataclass
class Point:
    x: float
    y: float = 0.0


def weather(city: str, unit: Unit = Unit.C, days: int = 1, detail: Literal["short", "long"] = "short") -> dict:
    """Today's weather in a city.

    A second paragraph of the description.

    Args:
        city: the city's name,
            in English
        unit: celsius or fahrenheit
        days (int): how many days

    Returns:
        a dict
    """
    return {"city": city, "unit": unit.value, "days": days, "detail": detail}


def locate(place: Place, near: Optional[Point] = None, tags: tuple[str, ...] = ()) -> str:
    """Where a place is.

    :param place: the place
    :param near: a point it is near
    """
    return f"{place.city}/{place.country} near {near!r} tags={tags!r}"


def broken(n: int) -> int:
    raise ValueError(f"no luck with {n}")


def test_a_function_is_described_from_its_signature_hints_and_docstring() -> None:
    spec = ToolBox([weather]).specs[0]
    assert spec["type"] == "function"
    function = spec["function"]
    assert function["name"] == "weather"
    assert function["description"] == "Today's weather in a city.\n\nA second paragraph of the description."
    params = function["parameters"]
    assert params["required"] == ["city"]
    assert params["properties"]["city"] == {"type": "string", "description": "the city's name, in English"}
    assert params["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert params["properties"]["days"] == {"type": "integer", "description": "how many days", "default": 1}
    assert params["properties"]["detail"] == {"type": "string", "enum": ["short", "long"], "default": "short"}

    located = ToolBox([locate]).specs[0]["function"]
    props = located["parameters"]["properties"]
    assert props["place"]["properties"]["city"]["type"] == "string" and props["place"]["description"] == "the place"
    assert props["near"]["anyOf"][1] == {"type": "null"}
    assert props["near"]["anyOf"][0]["properties"] == {"x": {"type": "number"}, "y": {"type": "number"}}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "default": []}
    assert located["description"] == "Where a place is."


def test_schemas_for_common_hints() -> None:
    assert schema_for(list[int]) == {"type": "array", "items": {"type": "integer"}}
    assert schema_for(dict[str, float]) == {"type": "object", "additionalProperties": {"type": "number"}}
    assert schema_for(int | str) == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    assert schema_for(tuple[int, str])["prefixItems"] == [{"type": "integer"}, {"type": "string"}]
    assert schema_for(object) == {}


def test_docstring_styles() -> None:
    assert parse_docstring(None) == ("", {})
    assert parse_docstring("Add.\n\n:param a: first\n:param int b: second\n    continued\n:returns: sum") == \
        ("Add.", {"a": "first", "b": "second continued"})
    assert parse_docstring("Add.\n\nParameters:\n    a: first\n    b: second\n") == \
        ("Add.", {"a": "first", "b": "second"})


def test_calls_convert_json_back_to_the_annotated_types() -> None:
    box = ToolBox([weather, locate, broken])
    assert json.loads(box.run("weather", '{"city": "Oslo", "unit": "fahrenheit"}')) == \
        {"city": "Oslo", "unit": "fahrenheit", "days": 1, "detail": "short"}
    assert box.run("locate", '{"place": {"city": "Oslo"}, "near": {"x": 1}, "tags": ["a"]}') == \
        "Oslo/NO near Point(x=1.0, y=0.0) tags=('a',)"


def test_a_bad_call_becomes_an_error_text_for_the_model() -> None:
    box = ToolBox([weather, broken])
    assert box.run("broken", '{"n": 3}') == "Error: ValueError: no luck with 3"
    assert box.run("nope", "{}") == "Error: there is no tool named 'nope'; the tools are: weather, broken"
    assert box.run("weather", "{city").startswith("Error: the arguments are not valid JSON")
    assert box.run("weather", "[1]").startswith("Error: the arguments must be a JSON object")
    assert box.run("weather", '{"town": "Oslo"}') == \
        "Error: TypeError: weather() got unexpected argument(s): town; it takes: city, unit, days, detail"
    assert box.run("weather", '{"city": "Oslo", "unit": "kelvin"}').startswith("Error: ValueError: 'kelvin'")
    with pytest.raises(InvalidRequest, match="cannot be a tool name"):
        ToolBox({"two words": weather})


def test_results_the_model_reads() -> None:
    box = ToolBox({"many": lambda: "x" * 30_000, "data": lambda: {"p": Point(1, 2), "u": Unit.F, "s": {1}},
                   "obj": lambda: object()})
    assert box.run("many", "{}").endswith("… (cut: 30000 characters in all)")
    assert json.loads(box.run("data", "{}")) == {"p": {"x": 1, "y": 2}, "u": "fahrenheit", "s": [1]}
    assert box.run("obj", "{}").startswith("<object object at")


def test_code_is_taken_from_answers() -> None:
    answer = "Here:\n```python\nx = 1\n```\nand a shell line\n```bash\nls\n```\nthen\n```\ny = 2\n```\nDone."
    assert code_blocks(answer) == [("python", "x = 1"), ("bash", "ls"), ("", "y = 2")]
    assert answer_code(answer) == "x = 1\n\ny = 2"
    assert fixed_cell(answer) == "y = 2"
    assert answer_code("print(1)\n") == "print(1)"
    assert answer_code("```bash\nls -l\n```") == "ls -l"
    cut = "cut short:\n```python\nfor i in range(3):\n    pri"
    assert code_blocks(cut) == [("python", "for i in range(3):\n    pri")]
    assert fixed_cell("no code here") is None


def test_markdown_keeps_the_models_line_breaks() -> None:
    poem = "Roses are red,\nviolets are blue.\n\nNew stanza\n```python\na = 1\nb = 2\n```\n| a | b |\n|---|---|"
    shown = keep_line_breaks(poem)
    assert shown == ("Roses are red,  \nviolets are blue.\n\nNew stanza\n```python\na = 1\nb = 2\n```\n"
                     "| a | b |\n|---|---|")


def test_cell_references(tmp_path: Path) -> None:
    shell = InteractiveShell.instance()
    errors = CellErrors(shell)
    errors.register()
    try:
        with pytest.raises(CellNotFound, match="no cell has raised an error yet"):
            interpolate("why {Err}", {}, shell, errors)
        ok = shell.run_cell("21 * 2", store_history=True).execution_count
        bad = shell.run_cell("def f():\n    return {}['k']\nf()", store_history=True).execution_count
        syntax = shell.run_cell("print(1", store_history=True).execution_count
        text = interpolate(f"{{In[{bad}]}} | {{Out[{ok}]}} | {{Err[{bad}]}} | {{{{In[{ok}]}}}}", {}, shell, errors)
        source, out, trace, literal = text.split(" | ")
        assert source == "def f():\n    return {}['k']\nf()"
        assert out == "42"
        assert "KeyError" in trace and "return {}['k']" in trace and "\x1b[" not in trace
        assert literal == f"{{In[{ok}]}}"
        assert interpolate("{Err}", {}, shell, errors).startswith("  Cell In[")  # the syntax error, the last one
        assert "SyntaxError" in interpolate(f"{{Err[{syntax}]}}", {}, shell, errors)
        assert interpolate("{Err}", {"Err": "mine"}, shell, errors) == "mine"  # a variable named Err wins
        assert interpolate("{In[-1]}", {}, shell, errors) == "print(1"
        for placeholder, message in [(f"{{Out[{bad}]}}", f"cell {bad} has no result"),
                                     (f"{{Err[{ok}]}}", f"cell {ok} raised no error"),
                                     ("{In[9999]}", "there is no cell 9999")]:
            with pytest.raises(CellNotFound, match=message):
                interpolate(placeholder, {}, shell, errors)
    finally:
        errors.unregister()


def test_conversations_round_trip_and_bad_files_are_refused(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "4"}, {"role": "assistant", "content": "4"}]
    path = conversation.save(tmp_path / "chat.json", messages, "m", {"temperature": 0.2, "max_tokens": None})
    assert conversation.load(path) == (messages, "m", {"temperature": 0.2})
    (tmp_path / "list.json").write_text(json.dumps(messages[1:2]))
    assert conversation.load(tmp_path / "list.json") == (messages[1:2], None, {})
    for content, message in [("{", "is not JSON"), ('{"a": 1}', "is not a saved conversation"),
                             ('[{"role": "robot", "content": "x"}]', "role must be one of"),
                             ('[{"role": "tool", "content": "x"}]', "needs its tool_call_id"),
                             ('[{"role": "user"}]', "neither content nor tool_calls"),
                             ('{"format": "other", "messages": []}', "is not one this llm_magic reads")]:
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(InvalidRequest, match=message):
            conversation.load(tmp_path / "bad.json")
    with pytest.raises(InvalidRequest, match="no such file"):
        conversation.load(tmp_path / "missing.json")
    with pytest.raises(InvalidRequest, match="does not exist"):
        conversation.save(tmp_path / "no" / "where.json", messages, None, {})
