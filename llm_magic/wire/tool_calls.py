"""Tool calls: how a model writes them, and how they are read back out of its text.

One small class per format (as vLLM's tool parsers), chosen from the GGUF's chat template:

- ``hermes`` — Hermes, Qwen 2.5/3: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
- ``llama3`` — Llama 3.1+: a bare ``{"name": ..., "parameters": {...}}`` (or after ``<|python_tag|>``);
- ``mistral`` — ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]``;
- ``generic`` — for templates that know no tools (the embedded SmolLM2): the tools are described
  in the system turn and the reply is ``{"tool_calls": [{"name": ..., "arguments": {...}}]}``,
  constrained by a grammar (``grammars.tool_grammar``), so even a tiny model makes valid calls.

Each format parses a finished text, and a ``ToolStream`` reads one incrementally: text is passed
on until the format's marker shows up, then the rest is held and parsed at the end. An answer cut
short by ``max_tokens`` is read as OpenAI reports one: the calls written whole, then the one cut
off with the arguments written so far; the format's own syntax never reaches the client. Pure
Python: no llama_cpp, no Flask; tested without a model.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from llm_magic.errors import InvalidRequest
from llm_magic.wire.partial_json import Node, read_values


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolRequest:
    """The tools a request offers and how it wants them used."""

    tools: tuple[Tool, ...]
    choice: str = "auto"  # auto | required (a named function is required too, limited to it)
    named: str | None = None
    parallel: bool = True

    @property
    def callable(self) -> tuple[Tool, ...]:
        return tuple(t for t in self.tools if self.named is None or t.name == self.named)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])
    complete: bool = True  # False: cut off by max_tokens, ``arguments`` is what was written so far

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _calls_from(items: Any, key: str) -> list[ToolCall]:
    """Tool calls from decoded JSON: a call object or a list of them, arguments under ``key``."""
    items = items if isinstance(items, list) else [items]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError("not a tool call")
        arguments = item.get(key, item.get("arguments", {}))
        calls.append(ToolCall(item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments)))
    return calls


def _json_values(text: str) -> list[Any]:
    """Every JSON value in ``text``, one after another (separated by whitespace, ``;`` or ``,``)."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i >= len(text):
            return values
        value, i = decoder.raw_decode(text, i)
        values.append(value)


def _cut_calls(text: str, nodes: list[Node], key: str) -> list[ToolCall]:
    """Tool calls from call objects read by ``read_values``: whole ones as ``_calls_from``
    reads them; the one cut off with the name written whole, and its arguments so far."""
    calls: list[ToolCall] = []
    for node in nodes:
        if node.end is not None:
            calls += _calls_from(json.loads(text[node.start:node.end]), key)
            continue
        if node.kind != "object":
            raise ValueError("not a tool call")
        entries = dict(node.entries)
        name = entries.get("name")
        if name is None or name.kind != "string" or name.end is None:
            break  # its name is not written yet: nothing to report
        arguments = entries.get(key, entries.get("arguments"))
        if arguments is None:
            calls.append(ToolCall(name.value, "", complete=False))
        elif arguments.end is not None:  # cut after the arguments, before the call's closing brace
            calls += _calls_from({"name": name.value, key: json.loads(text[arguments.start:arguments.end])}, key)
        elif arguments.kind == "string":  # arguments written as a JSON string: its text so far
            calls.append(ToolCall(name.value, arguments.value, complete=False))
        else:
            calls.append(ToolCall(name.value, text[arguments.start:].rstrip(), complete=False))
        break
    return calls


class ToolFormat:
    """How one model family writes tool calls."""

    name = ""
    marker = ""  # text that starts the tool calls; "" for formats that start with JSON
    argument_key = "arguments"
    native = True  # the chat template receives the tools itself

    def split(self, text: str) -> tuple[str, str] | None:
        """``(content before the calls, the calls' text)``, or None if ``text`` holds none."""
        if self.marker:
            at = text.find(self.marker)
            return None if at < 0 else (text[:at], text[at + len(self.marker):])
        stripped = text.lstrip()
        return ("", stripped) if stripped.startswith(("{", "[")) else None

    def parse_calls(self, text: str) -> list[ToolCall]:
        return [call for value in _json_values(text) for call in _calls_from(value, self.argument_key)]

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The content and the tool calls of a finished answer. Text that looks like calls but
        does not parse is left as content: the client sees what the model wrote."""
        parts = self.split(text)
        if parts is None:
            return text, []
        try:
            calls = self.parse_calls(parts[1])
        except ValueError:
            return text, []
        return parts[0].strip(), calls

    def parse_cut_calls(self, text: str) -> list[ToolCall] | None:
        """The calls in the calls' text of an answer cut short: those written whole, then the
        one cut off (see ``_cut_calls``); None where the text is no tool calls at all."""
        try:
            nodes = read_values(text)
        except ValueError:
            return None
        calls_nodes: list[Node] = []
        for node in nodes:  # a list of calls (mistral) counts as its calls
            calls_nodes += node.entries if node.kind == "array" else [node]
        try:
            return _cut_calls(text, calls_nodes, self.argument_key)
        except ValueError:
            return None

    def cut_at(self, text: str) -> tuple[int, list[ToolCall]] | None:
        """For an answer cut short by ``max_tokens``: where its calls begin and the calls (see
        ``parse_cut_calls``); None where it holds none. What follows the format's marker is
        calls, whole or not, and never content."""
        parts = self.split(text)
        if parts is None:
            return None
        calls = self.parse_cut_calls(parts[1])
        if calls is None and not self.surely_calls(parts[1]):
            return None  # JSON the model wrote as its answer
        return len(parts[0]), calls or []

    def parse_cut(self, text: str) -> tuple[str, list[ToolCall]]:
        """The content and the tool calls of an answer cut short by ``max_tokens``; a marker
        cut in two at the very end is dropped too."""
        found = self.cut_at(text)
        if found is None:
            return text[:len(text) - self.holds_back(text)], []
        return text[:found[0]].strip(), found[1]

    def surely_calls(self, text: str) -> bool:
        """Whether text that starts like this format's calls is calls even if it does not read
        as them (a format whose calls start with a marker, or that a grammar holds to them)."""
        return bool(self.marker)

    def holds_back(self, text: str) -> int:
        """How many characters at the end of streamed ``text`` could start the marker."""
        for k in range(min(len(self.marker) - 1, len(text)), 0, -1):
            if text.endswith(self.marker[:k]):
                return k
        return 0


class Hermes(ToolFormat):
    name, marker = "hermes", "<tool_call>"

    def parse_calls(self, text: str) -> list[ToolCall]:
        blocks = re.findall(r"(.*?)(?:</tool_call>|$)\s*(?:<tool_call>|$)", text, re.DOTALL)
        return [call for block in blocks if block.strip()
                for value in _json_values(block) for call in _calls_from(value, "arguments")]

    def parse_cut_calls(self, text: str) -> list[ToolCall] | None:
        calls: list[ToolCall] = []
        for block in re.split(r"</?tool_call>", text):  # one call per block, the last maybe cut
            if block.strip():
                found = super().parse_cut_calls(block)
                if found is None:
                    return calls or None
                calls += found
                if not found or not found[-1].complete:
                    break
        return calls


PYTHON_TAG = "<|python_tag|>"


class Llama3(ToolFormat):
    name, argument_key = "llama3", "parameters"

    def split(self, text: str) -> tuple[str, str] | None:
        if PYTHON_TAG in text:
            before, _, after = text.partition(PYTHON_TAG)
            return before, after
        return super().split(text)

    def parse_cut_calls(self, text: str) -> list[ToolCall] | None:
        calls = super().parse_cut_calls(text)
        if not calls:  # a bare JSON object is a call only once it reads as one: a "name" key
            try:
                nodes = read_values(text)
            except ValueError:
                return None
            first = nodes[0] if nodes else None
            keys = [k for k, _ in first.entries] if first is not None and first.kind == "object" else []
            if keys and "name" not in keys and keys != ["type"]:
                return None
        return calls


class Mistral(ToolFormat):
    name, marker = "mistral", "[TOOL_CALLS]"


class Generic(ToolFormat):
    name, native = "generic", False

    def parse_calls(self, text: str) -> list[ToolCall]:
        value = json.loads(text)
        if not isinstance(value, dict) or not isinstance(value.get("tool_calls"), list):
            raise ValueError("not a tool call")
        return _calls_from(value["tool_calls"], "arguments")

    def parse_cut_calls(self, text: str) -> list[ToolCall] | None:
        try:
            nodes = read_values(text)
        except ValueError:
            return None
        top = nodes[0] if nodes else None
        calls = dict(top.entries).get("tool_calls") if top is not None and top.kind == "object" else None
        if calls is None or calls.kind != "array":
            return []
        try:
            return _cut_calls(text, calls.entries, "arguments")
        except ValueError:
            return None

    def surely_calls(self, text: str) -> bool:
        return True  # the grammar lets a reply start with "{" only as the calls

    def system_prompt(self, request: ToolRequest) -> str:
        tools = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in request.callable]
        how = ("You must call a tool now." if request.choice == "required" else
               "If a tool helps, call it; otherwise answer in plain text.")
        return (f"You can call these tools:\n{json.dumps(tools, indent=1)}\n{how} To call tools, reply with "
                'only a JSON object: {"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}. '
                "Tool results come back in messages that start with 'Tool result'.")


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (Hermes(), Llama3(), Mistral(), Generic())}


def read_answer(tool_format: str, text: str, cut: bool) -> tuple[str, list[ToolCall]]:
    """The content and tool calls of a finished answer in ``tool_format``; ``cut``: it was cut
    short by ``max_tokens`` (then the last call may be incomplete)."""
    fmt = FORMATS[tool_format]
    return fmt.parse_cut(text) if cut else fmt.parse(text)


def detect_format(template: str | None) -> ToolFormat:
    """The tool-call format a chat template uses; ``generic`` when it knows no tools."""
    template = template or ""
    if "tools" not in template:
        return FORMATS["generic"]
    if "<tool_call>" in template:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in template:
        return FORMATS["mistral"]
    if PYTHON_TAG in template or "ipython" in template:
        return FORMATS["llama3"]
    return FORMATS["generic"]


def generic_messages(messages: tuple[dict, ...], request: ToolRequest | None) -> list[dict]:
    """A chat history for a template that knows no tools: the tools described in the system
    turn, earlier calls written as the JSON the model is asked for, results as user turns."""
    out: list[dict] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _loads_or_text(c["function"]["arguments"])}
                     for c in message["tool_calls"]]
            content = json.dumps({"tool_calls": calls})
        if role == "tool":
            role, content = "user", f"Tool result ({message.get('tool_call_id') or 'call'}): {content}"
        if out and out[-1]["role"] == role == "user":  # strict templates alternate roles
            out[-1]["content"] += "\n\n" + content
            continue
        out.append({"role": role, "content": content})
    if request is not None:
        prompt = FORMATS["generic"].system_prompt(request)  # type: ignore[attr-defined]
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _loads_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def call_schema(request: ToolRequest, tool_format: ToolFormat) -> dict:
    """The JSON schema of one call in ``tool_format`` to one of the callable tools."""
    options = [{"type": "object", "properties": {"name": {"const": t.name}, tool_format.argument_key: t.parameters},
                "required": ["name", tool_format.argument_key]} for t in request.callable]
    return options[0] if len(options) == 1 else {"anyOf": options}


class ToolStream:
    """Reads a streamed answer: ``feed`` returns the text to pass on now (held back while it
    could be the start of tool calls); ``finish`` returns the rest of the content and the calls."""

    def __init__(self, tool_format: ToolFormat) -> None:
        self.format = tool_format
        self.text = ""  # everything so far
        self.sent = 0  # characters passed on as content
        self.in_calls = False

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.in_calls:
            return ""
        fmt = self.format
        if fmt.marker:
            at = self.text.find(fmt.marker, self.sent)
            if at >= 0:
                self.in_calls = True
                return self._pass_on(at)
            return self._pass_on(len(self.text) - fmt.holds_back(self.text))
        if self.sent == 0:  # calls would start the answer: decide at its first visible character
            stripped = self.text.lstrip()
            if not stripped:
                return ""
            if stripped[0] in "{[" or stripped.startswith(PYTHON_TAG):
                self.in_calls = True
                return ""
            if PYTHON_TAG.startswith(stripped):  # could still become the tag
                return ""
        return self._pass_on(len(self.text))

    def _pass_on(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return out

    def finish(self, cut: bool = False) -> tuple[str, list[ToolCall]]:
        """The content not yet passed on, and the tool calls (none if they do not parse).
        ``cut``: the answer was cut short by ``max_tokens`` (see ``ToolFormat.parse_cut``)."""
        if cut:
            found = self.format.cut_at(self.text)
            if found is None:
                return self.text[self.sent:len(self.text) - self.format.holds_back(self.text)], []
            return self.text[self.sent:found[0]].rstrip(), found[1]
        parts = self.format.split(self.text) if self.in_calls else None
        if parts is not None:
            try:
                return parts[0][self.sent:].rstrip(), self.format.parse_calls(parts[1])
            except ValueError:
                pass
        return self.text[self.sent:], []


def parse_tool_request(tools: Any, tool_choice: Any, parallel: Any) -> ToolRequest | None:
    """OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls``; None when no tool may
    be called (no tools, or ``tool_choice: "none"``)."""
    if tools is None or tools == [] or tool_choice == "none":
        return None
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}")
    parsed, names = [], set()
    for i, item in enumerate(tools):
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(item, dict) or item.get("type") != "function" or not isinstance(function, dict):
            raise InvalidRequest(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\", "
                                 "\"description\", \"parameters\"}}}}: this host calls functions only")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise InvalidRequest(f"'tools[{i}].function.name' must be 1 to 64 letters, digits, '_', '.' or '-'")
        if name in names:
            raise InvalidRequest(f"'tools[{i}].function.name': '{name}' is offered twice")
        names.add(name)
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"'tools[{i}].function.parameters' must be a JSON Schema object")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise InvalidRequest(f"'tools[{i}].function.description' must be a string")
        parsed.append(Tool(name, description, parameters))
    choice, named = "auto", None
    if isinstance(tool_choice, dict):
        named = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
        if named not in names:
            raise InvalidRequest("'tool_choice' names no offered function: use {\"type\": \"function\", "
                                 f"\"function\": {{\"name\": ...}}}} with one of {', '.join(sorted(names))}")
        choice = "required"
    elif tool_choice in (None, "auto", "required"):
        choice = tool_choice or "auto"
    else:
        raise InvalidRequest(f"'tool_choice' must be auto, none, required or a named function, got {json.dumps(tool_choice)}")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("'parallel_tool_calls' must be true or false")
    return ToolRequest(tuple(parsed), choice, named, parallel is not False)
