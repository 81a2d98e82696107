"""JSON that may end anywhere: an answer cut short by ``max_tokens`` in the middle of a value.

``read_values`` reads such a text into ``Node``s that say where each value starts and ends (or
that the text ended inside it) and what it holds so far, so that a caller can take the values
written whole and the raw text of the one cut off. Pure Python, no dependencies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Node:
    """One JSON value in a text that may end anywhere: where it starts, where it ends (None:
    the text ended inside it), and what it holds so far."""

    start: int
    end: int | None
    value: Any = None  # a string's text so far, a complete scalar's value
    entries: list = field(default_factory=list)  # an object's (key, Node); an array's Node
    kind: str = "scalar"  # object | array | string | scalar


_SCALAR = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")
_WHITESPACE = " \t\r\n"


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _read_value(text: str, i: int) -> Node | None:
    """The JSON value at ``i`` (after whitespace), complete or cut off; None at the end of the
    text. ``ValueError`` where the text is not JSON."""
    i = _skip(text, i)
    if i >= len(text):
        return None
    if text[i] == '"':
        return _read_string(text, i)
    if text[i] in "{[":
        return _read_container(text, i)
    match = _SCALAR.match(text, i)
    if match is not None:
        tail = text[match.end():]
        if not tail or (match.group()[0] in "-0123456789" and re.fullmatch(r"[\d.eE+-]+", tail)):
            return Node(i, None)  # the end may have cut it: 12 of 123, 1. of 1.5
        return Node(i, match.end(), json.loads(match.group()))
    rest = text[i:]
    if rest == "-" or any(word.startswith(rest) for word in ("true", "false", "null")):
        return Node(i, None)
    raise ValueError("not JSON")


def _read_string(text: str, i: int) -> Node:
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text[j] == '"':
            return Node(i, j + 1, json.loads(text[i:j + 1]), kind="string")
        else:
            j += 1
    body = re.sub(r"\\(u[0-9a-fA-F]{0,3})?$", "", text[i + 1:])  # an escape the end cut in two
    try:
        so_far = json.loads('"' + body + '"')
    except ValueError:
        so_far = body
    return Node(i, None, so_far, kind="string")


def _read_container(text: str, i: int) -> Node:
    node = Node(i, None, kind="object" if text[i] == "{" else "array")
    closer = "}" if node.kind == "object" else "]"
    j = _skip(text, i + 1)
    if j < len(text) and text[j] == closer:
        node.end = j + 1
        return node
    while j < len(text):
        key = None
        if node.kind == "object":
            if text[j] != '"':
                raise ValueError("not JSON")
            key = _read_string(text, j)
            if key.end is None:
                return node
            j = _skip(text, key.end)
            if j >= len(text):
                return node
            if text[j] != ":":
                raise ValueError("not JSON")
            j += 1
        value = _read_value(text, j)
        if value is None:
            return node
        node.entries.append((key.value, value) if key is not None else value)
        if value.end is None:
            return node
        j = _skip(text, value.end)
        if j >= len(text):
            return node
        if text[j] == closer:
            node.end = j + 1
            return node
        if text[j] != ",":
            raise ValueError("not JSON")
        j = _skip(text, j + 1)
    return node


def read_values(text: str) -> list[Node]:
    """The JSON values in ``text`` one after another (separated by whitespace, ``;`` or ``,``),
    the last of which may be cut off; reading stops at text that is not JSON after a complete
    value. ``ValueError`` where the first is not JSON."""
    values: list[Node] = []
    i = 0
    while True:
        while i < len(text) and text[i] in _WHITESPACE + ";,":
            i += 1
        if i >= len(text):
            return values
        try:
            node = _read_value(text, i)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
            if values:
                return values
            raise ValueError("not JSON") from None
        if node is None:
            return values
        values.append(node)
        if node.end is None:
            return values
        i = node.end
