"""A JSON Schema ``pattern`` (a regular expression) as GBNF for a JSON string's characters.
Pure Python.
"""

from __future__ import annotations

import json
import re

from llm_magic.errors import InvalidRequest
from llm_magic.engine.llama_cpp.grammar.gbnf import Grammar, is_name, literal


_CLASS_ESCAPES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " "}
_NEGATED_ESCAPES = {"D": "0-9", "W": "a-zA-Z0-9_", "S": " "}
_EXCLUDED = '"\\\\\\x00-\\x1F\\x7F'  # in a GBNF class: quote, backslash, control characters
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}


class _Regex:
    """A JSON Schema ``pattern`` as GBNF for the string's characters, matched whole (a whole
    match is also what an unanchored pattern accepts). Characters the JSON text would have to
    escape (quote, backslash, control characters) are never produced; lookarounds and
    backreferences cannot be enforced and are refused."""

    def __init__(self, pattern: str, grammar: Grammar, where: str) -> None:
        self.p, self.i, self.g, self.where = pattern, 0, grammar, where

    def fail(self, message: str) -> InvalidRequest:
        return InvalidRequest(f"{self.where}: {message} (at character {self.i} of the pattern)")

    def convert(self) -> str:
        p = self.p
        if p.startswith("^"):
            self.i = 1
        body = self._alternatives(top=True)
        if self.i < len(p):
            raise self.fail("unbalanced ')'")
        return body

    def _alternatives(self, top: bool = False) -> str:
        options = [self._sequence(top)]
        while self.i < len(self.p) and self.p[self.i] == "|":
            self.i += 1
            options.append(self._sequence(top))
        if len(options) == 1:
            return options[0]
        if any(not o for o in options):
            return "(" + " | ".join(f"({o})" for o in options if o) + ")?"
        return " | ".join(f"({o})" for o in options)

    def _sequence(self, top: bool) -> str:
        items: list[str] = []
        p = self.p
        while self.i < len(p) and p[self.i] not in "|)":
            if p[self.i] == "$" and (self.i == len(p) - 1 or p[self.i + 1] in "|)"):
                self.i += 1
                continue
            if p[self.i] == "^" and not items:
                self.i += 1
                continue
            atom = self._atom()
            items.append(self._quantified(atom))
        return " ".join(i for i in items if i)

    def _atom(self) -> str:
        p, c = self.p, self.p[self.i]
        if c == "(":
            self.i += 1
            if p.startswith("?:", self.i):
                self.i += 2
            elif p.startswith("?", self.i):
                raise self.fail("lookarounds and named groups cannot be enforced")
            inner = self._alternatives()
            if self.i >= len(p) or p[self.i] != ")":
                raise self.fail("a group is not closed")
            self.i += 1
            return self.g.rule("pattern", inner, self.where) if inner else ""
        if c == "[":
            return self._class()
        if c == ".":
            self.i += 1
            return f"[^{_EXCLUDED}]"
        if c == "\\":
            return self._escape()
        if c in "*+?{":
            if c == "{" and not re.match(r"\{\d+(,\d*)?\}", p[self.i:]):
                self.i += 1
                return literal("{")
            raise self.fail(f"'{c}' has nothing to repeat")
        self.i += 1
        return _json_char(c, self.g)

    def _escape(self) -> str:
        self.i += 1
        if self.i >= len(self.p):
            raise self.fail("the pattern ends with a backslash")
        c = self.p[self.i]
        self.i += 1
        if c in _CLASS_ESCAPES:
            return f"[{_CLASS_ESCAPES[c]}]"
        if c in _NEGATED_ESCAPES:
            return f"[^{_NEGATED_ESCAPES[c]}{_EXCLUDED}]"
        if c.isdigit() or c in "bBAZzkpPuxcG":
            if c == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", self.p[self.i:self.i + 4]):
                ch = chr(int(self.p[self.i:self.i + 4], 16))
                self.i += 4
                return _json_char(ch, self.g)
            raise self.fail(f"'\\{c}' cannot be enforced")
        if c in _SIMPLE_ESCAPES:
            return _json_char(_SIMPLE_ESCAPES[c], self.g)
        return _json_char(c, self.g)

    def _class(self) -> str:
        p = self.p
        self.i += 1
        negated = p.startswith("^", self.i)
        if negated:
            self.i += 1
        parts: list[str] = []
        first = True
        while self.i < len(p) and (p[self.i] != "]" or first):
            first = False
            c = p[self.i]
            if c == "\\":
                self.i += 1
                if self.i >= len(p):
                    break
                e = p[self.i]
                self.i += 1
                if e in _CLASS_ESCAPES and not negated:
                    parts.append(_CLASS_ESCAPES[e])
                    continue
                if e in _CLASS_ESCAPES or e in _NEGATED_ESCAPES:
                    raise self.fail(f"'\\{e}' inside this class cannot be enforced")
                c = _SIMPLE_ESCAPES.get(e, e)
            else:
                self.i += 1
            if self.i + 1 < len(p) and p[self.i] == "-" and p[self.i + 1] != "]":
                self.i += 1
                end = p[self.i]
                self.i += 1
                if end == "\\":
                    end = _SIMPLE_ESCAPES.get(p[self.i], p[self.i]) if self.i < len(p) else end
                    self.i += 1
                if end < c:
                    raise self.fail("a range in a class runs backwards")
                parts.append(_range_chars(c, end))
            else:
                parts.append(_class_char(c))
        if self.i >= len(p):
            raise self.fail("a class '[...]' is not closed")
        self.i += 1
        body = "".join(x for x in parts if x)
        if negated:
            return f"[^{body}{_EXCLUDED}]"
        if not body:
            raise self.fail("the class allows only characters JSON must escape")
        return f"[{body}]"

    def _quantified(self, atom: str) -> str:
        p = self.p
        if self.i >= len(p) or not atom:
            return atom
        c = p[self.i]
        low: int
        high: int | None
        if c in "*+?":
            self.i += 1
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{" and (m := re.match(r"\{(\d+)(,(\d*))?\}", p[self.i:])):
            self.i += m.end()
            low = int(m.group(1))
            high = low if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
            if high is not None and high < low:
                raise self.fail("a repetition {m,n} has n < m")
        else:
            return atom
        if self.i < len(p) and p[self.i] in "?+":  # lazy/possessive: the same strings
            self.i += 1
        element = atom if is_name(atom) or (atom.startswith("[") and atom.endswith("]") and " " not in atom) \
            else f"({atom})"
        return self.g.repeat(element, low, high, self.where, "a repetition")


def _json_char(ch: str, grammar: Grammar) -> str:
    """The GBNF for one character of the pattern inside a JSON string: itself, or its escape."""
    text = json.dumps(ch, ensure_ascii=False)[1:-1]
    grammar.texts.add(text)
    return literal(text)


def _class_char(ch: str) -> str:
    """``ch`` inside a GBNF class; '' for a character JSON would have to escape."""
    if ch in '"\\' or ord(ch) < 0x20 or ord(ch) == 0x7F:
        return ""
    return "\\" + ch if ch in "]-^[" else ch


def _range_chars(start: str, end: str) -> str:
    """A class range without the characters JSON must escape."""
    pieces, lo = [], ord(start)
    for bad in sorted({0x22, 0x5C, 0x7F, *range(0x20)}):
        if lo <= bad <= ord(end):
            if lo < bad:
                pieces.append((lo, bad - 1))
            lo = bad + 1
    if lo <= ord(end):
        pieces.append((lo, ord(end)))
    return "".join(_class_char(chr(a)) if a == b else f"{_class_char(chr(a))}-{_class_char(chr(b))}" for a, b in pieces)


def pattern_rule(pattern: str, grammar: Grammar, where: str) -> str:
    """The GBNF for the characters of a JSON string that ``pattern`` matches whole."""
    return _Regex(pattern, grammar, where).convert()
