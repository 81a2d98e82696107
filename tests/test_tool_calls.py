"""Tool-call formats, parsed from recorded model outputs without a model."""

from __future__ import annotations

import json

import pytest

from llm_magic.errors import InvalidRequest
from llm_magic.wire.tool_calls import (
    FORMATS, ToolRequest, ToolStream, call_schema, detect_format, generic_messages, parse_tool_request,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}

RECORDED = {
    "hermes": ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', "I will check."),
    "llama3": ('{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}', ""),
    "mistral": ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]', ""),
    "generic": ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]}', ""),
}


@pytest.mark.parametrize("name", RECORDED)
def test_each_format_parses_its_recorded_calls(name: str) -> None:
    text, content = RECORDED[name]
    got_content, calls = FORMATS[name].parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("name", RECORDED)
def test_streamed_in_small_pieces_gives_the_same(name: str) -> None:
    text, content = RECORDED[name]
    stream = ToolStream(FORMATS[name])
    passed = "".join(stream.feed(text[i:i + 3]) for i in range(0, len(text), 3))
    rest, calls = stream.finish()
    assert (passed + rest).strip() == content
    assert [c.name for c in calls] == ["get_weather", "get_time"]


@pytest.mark.parametrize("name", RECORDED)
def test_plain_text_stays_text(name: str) -> None:
    text = "The weather in Paris is mild. <tool"  # ends like the start of a marker, but is not one
    assert FORMATS[name].parse(text) == (text, [])
    stream = ToolStream(FORMATS[name])
    passed = "".join(stream.feed(ch) for ch in text)
    assert passed + stream.finish()[0] == text and stream.finish()[1] == []


def test_broken_calls_are_left_as_content() -> None:
    assert FORMATS["hermes"].parse("<tool_call>{not json</tool_call>") == ("<tool_call>{not json</tool_call>", [])
    assert FORMATS["generic"].parse('{"answer": 1}') == ('{"answer": 1}', [])


def test_formats_are_detected_from_templates() -> None:
    assert detect_format(None).name == "generic"
    assert detect_format("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}").name == "generic"
    assert detect_format("{% if tools %}<tools>{{ tools }}</tools> <tool_call>{% endif %}").name == "hermes"
    assert detect_format("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]").name == "mistral"
    assert detect_format("{% if tools %}Environment: ipython<|python_tag|>{% endif %}").name == "llama3"


def test_tool_requests() -> None:
    assert parse_tool_request(None, None, None) is None
    assert parse_tool_request([WEATHER], "none", None) is None
    request = parse_tool_request([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, False)
    assert request.choice == "required" and [t.name for t in request.callable] == ["get_time"] and not request.parallel
    for tools, choice, message in [([{"type": "code_interpreter"}], None, "functions only"),
                                   ([WEATHER, WEATHER], None, "offered twice"),
                                   ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "names no offered"),
                                   ([WEATHER], "sometimes", "'tool_choice' must be")]:
        with pytest.raises(InvalidRequest, match=message):
            parse_tool_request(tools, choice, None)


def test_call_schema_names_each_tool_and_its_arguments() -> None:
    request = parse_tool_request([WEATHER, TIME], "required", None)
    schema = call_schema(request, FORMATS["generic"])
    assert [o["properties"]["name"] for o in schema["anyOf"]] == [{"const": "get_weather"}, {"const": "get_time"}]
    assert call_schema(request, FORMATS["llama3"])["anyOf"][0]["required"] == ["name", "parameters"]


def test_generic_history_for_a_template_without_tools() -> None:
    request = ToolRequest(parse_tool_request([WEATHER], None, None).tools)
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    history = generic_messages((
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": calls}, {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
    ), request)
    assert history[0]["role"] == "system" and history[0]["content"].startswith("Be brief.")
    assert '"get_weather"' in history[0]["content"]
    assert json.loads(history[2]["content"]) == {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}
    assert history[3] == {"role": "user", "content": "Tool result (call_1): -3 C"}


# Each format's calls, cut by max_tokens after the first call and inside the second's arguments.
CUT = {
    "hermes": ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Eu', "I will check."),
    "llama3": ('{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"zone": "Eu', ""),
    "mistral": ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
                '"arguments": {"zone": "Eu', ""),
    "generic": ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
                '"arguments": {"zone": "Eu', ""),
}


@pytest.mark.parametrize("name", CUT)
def test_calls_cut_short_keep_the_whole_ones_and_the_cut_ones_arguments_so_far(name: str) -> None:
    text, content = CUT[name]
    got_content, calls = FORMATS[name].parse_cut(text)
    assert got_content == content
    assert [(c.name, c.arguments, c.complete) for c in calls] == [
        ("get_weather", '{"city": "Paris"}', True), ("get_time", '{"zone": "Eu', False)]
    stream = ToolStream(FORMATS[name])
    passed = "".join(stream.feed(text[i:i + 3]) for i in range(0, len(text), 3))
    rest, streamed = stream.finish(cut=True)
    assert (passed + rest).strip() == content  # nothing of the format passed on as text
    assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("text, content, calls", [
    ('{ "tool_calls": [{"', "", []),  # no name yet: nothing to report, nothing shown
    ('{"tool_calls": [{"name": "get_wea', "", []),  # a name cut in two is no name
    ('{"tool_calls": [{"name": "f", "arguments": {"n": 1.', "", [("f", '{"n": 1.', False)]),
    ('{"tool_calls": [{"name": "f", "arguments": {"n": 1}', "", [("f", '{"n": 1}', True)]),  # cut before "}"
    ('{"tool_calls": [{"name": "f", "arguments": {"s": "a\\u00', "", [("f", '{"s": "a\\u00', False)]),
])
def test_generic_calls_cut_anywhere(text: str, content: str, calls: list) -> None:
    got_content, got = FORMATS["generic"].parse_cut(text)
    assert (got_content, [(c.name, c.arguments, c.complete) for c in got]) == (content, calls)


def test_cut_text_that_is_no_call_stays_text() -> None:
    assert FORMATS["hermes"].parse_cut("The answer is <tool_") == ("The answer is ", [])  # a marker cut in two
    assert FORMATS["llama3"].parse_cut('{"answer": 42, "why": "bec') == ('{"answer": 42, "why": "bec', [])
    assert FORMATS["generic"].parse_cut("Paris is") == ("Paris is", [])


def test_cut_calls_read_whatever_the_text() -> None:
    from llm_magic.wire.partial_json import read_values

    deep = '{"tool_calls": [{"name": "f", "arguments": ' + '[' * 100_000
    assert FORMATS["generic"].parse_cut(deep) == ("", [])  # too deep to read: no call, and no text either
    assert [(n.start, n.end) for n in read_values('{"a": 1} [2, 3] "x')] == [(0, 8), (9, 15), (16, None)]
    assert read_values('{"a": tru')[0].entries[0][1].end is None
    assert FORMATS["mistral"].parse_cut("[TOOL_CALLS]not json at all") == ("", [])


def test_tool_parameters_lose_the_keywords_no_grammar_enforces() -> None:
    """Claude Code describes a tool with ``propertyNames``: its grammar leaves such keywords out
    (at every depth), where a response format with them is a 400."""
    from llm_magic.engine.llama_cpp.grammar.constraints import grammar_for, tool_grammar
    from llm_magic.errors import InvalidRequest
    from llm_magic.wire.tool_calls import FORMATS, Tool, ToolRequest
    from llm_magic.wire.types import ResponseFormat

    schema = {"type": "object", "properties": {
        "metadata": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}, "additionalProperties": {"type": "string"}},
        "tags": {"type": "array", "items": {"type": "string", "not": {"const": "x"}}, "uniqueItems": True},
        "url": {"type": "string", "format": "uri"}},
        "required": ["tags"]}
    constraint = tool_grammar(ToolRequest((Tool("TaskCreate", "", schema),), "required"), FORMATS["generic"])
    assert constraint is not None and "tags" in constraint.grammar
    with pytest.raises(InvalidRequest, match="cannot enforce|cannot be enforced"):
        grammar_for(ResponseFormat(schema))
