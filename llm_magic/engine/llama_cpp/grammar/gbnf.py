"""GBNF, llama.cpp's grammar language, written safely: literals escaped, rules named and
deduplicated, repetitions and size counted against ``Limits``. The building blocks of
``json_grammar``; pure Python.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from llm_magic.errors import InvalidRequest

DIGITS = 16  # the most digits an integer part (or a fraction) has: JSON numbers a double can hold


@dataclass(frozen=True)
class Limits:
    """What one schema may ask of the grammar. llama.cpp refuses repetitions past 2,000 and
    recurses once per nested group while compiling; each token's check costs in proportion to
    the alternatives alive at that point."""

    repeat: int = 1000  # one bound: minLength/maxLength, minItems/maxItems, a pattern's {m,n}
    repeats: int = 5000  # all bounds of one grammar together (llama.cpp expands each into rules)
    depth: int = 32  # schemas nested in schemas (and $ref hops)
    enum: int = 256  # values of one enum
    literal_bytes: int = 16384  # the JSON text of one enum, const or key set
    pattern: int = 512  # characters of one pattern
    grammar_bytes: int = 128 * 1024  # the whole grammar


LIMITS = Limits()

_JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
_BUILTIN = {
    "ws": '" "?',
    "char": _JSON_CHAR,
    "string": '"\\"" char* "\\""',
    "uint": f'"0" | [1-9] [0-9]{{0,{DIGITS - 1}}}',
    "integer": '"-"? uint',
    "fraction": f'"." [0-9]{{1,{DIGITS}}}',
    "exponent": f'[eE] [-+]? [0-9]{{1,{DIGITS}}}',
    "number": '"-"? uint fraction? exponent?',
    "boolean": '"true" | "false"',
    "null": '"null"',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" ws (string ":" ws value ws ("," ws string ":" ws value ws)*)? "}"',
    "array": '"[" ws (value ws ("," ws value ws)*)? "]"',
    # real dates only (February up to the 28th: the 29th is a date one year in four)
    "date": '[1-9] [0-9]{3} "-" (("0" [13578] | "1" [02]) "-" ("0" [1-9] | [12] [0-9] | "3" [01]) | '
            '("0" [469] | "11") "-" ("0" [1-9] | [12] [0-9] | "30") | "02-" ("0" [1-9] | "1" [0-9] | "2" [0-8]))',
    "time": '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? '
            '("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])',
    "date-time": 'date "T" time',
    "uuid": '[0-9a-f]{8} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{12}',
}
_DEPENDS = {"string": ["char"], "integer": ["uint"], "number": ["uint", "fraction", "exponent"],
            "value": ["object", "array", "string", "number", "boolean", "null"],
            "object": ["ws", "string", "value"], "array": ["ws", "value"], "date-time": ["date", "time"]}
_NAME_CHARS = re.compile(r"[^a-zA-Z0-9-]+")
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')  # literals and classes in a rule body
_RULE_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9-]*")


def literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


class Grammar:
    """A grammar being built: named rules, deduplicated by body."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.rules: dict[str, str] = {}
        self._by_body: dict[str, str] = {}
        self.repeats = 0
        self.size = 0
        self.texts: set[str] = set()  # exact text the answer must hold (keys, constants): can the model write it?

    def exact(self, value: Any) -> str:
        """The literal of ``value``'s JSON text, noted as text the answer must hold."""
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        self.texts.add(text)
        return literal(text)

    def builtin(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = _BUILTIN[name]
            for dep in _DEPENDS.get(name, ()):
                self.builtin(dep)
        return name

    def reserve(self, hint: str) -> str:
        """A fresh rule name (its body given later with ``define``)."""
        base = _NAME_CHARS.sub("-", hint).strip("-")[:40] or "rule"
        base = base if base[0].isalpha() else "r-" + base
        name, i = base, 1
        while name in self.rules or name in _BUILTIN:
            name, i = f"{base}-{i}", i + 1
        self.rules[name] = ""
        return name

    def define(self, name: str, body: str, where: str) -> None:
        self.rules[name] = body
        self.size += len(name) + len(body) + 6
        if self.size > self.limits.grammar_bytes:
            raise InvalidRequest(f"{where}: the schema needs a grammar of more than {self.limits.grammar_bytes} "
                                 "bytes; make it smaller (fewer properties, enum values or alternatives)")

    def rule(self, hint: str, body: str, where: str) -> str:
        """A rule for ``body``: an existing one with the same body, or a new one."""
        if body in self._by_body:
            return self._by_body[body]
        name = self.reserve(hint)
        self.define(name, body, where)
        self._by_body[body] = name
        return name

    def repeat(self, element: str, low: int, high: int | None, where: str, what: str | tuple[str, str]) -> str:
        """``element`` ``low`` to ``high`` (None: any number of) times; ``what`` names the bounds
        in errors (one name, or the lower's and the upper's)."""
        names = (what, what) if isinstance(what, str) else what
        for bound, name in zip((low, high), names):
            if bound is not None and bound > self.limits.repeat:
                raise InvalidRequest(f"{where}: {name} of {bound} is more than structured output allows "
                                     f"({self.limits.repeat}); lower it")
        self.repeats += max(low, high or 0)
        if self.repeats > self.limits.repeats:
            raise InvalidRequest(f"{where}: the schema's bounds add up to more than {self.limits.repeats} "
                                 "repetitions; lower them")
        if high == 0:
            return ""
        if (low, high) == (0, None):
            return f"{element}*"
        if (low, high) == (1, None):
            return f"{element}+"
        if (low, high) == (0, 1):
            return f"{element}?"
        if low == high:
            return f"{element}{{{low}}}" if low != 1 else element
        return f"{element}{{{low},{'' if high is None else high}}}"

    def text(self, root: str = "root") -> str:
        """The grammar, its rules reachable from ``root`` only; the root renamed to ``root``."""
        reachable, todo = set(), ["root"]
        while todo:
            name = todo.pop()
            if name not in reachable:
                reachable.add(name)
                todo += [n for n in _RULE_NAME.findall(_STRINGS.sub(" ", self.rules[name])) if n in self.rules]
        return "".join(f"{root if name == 'root' else name} ::= {body}\n"
                       for name, body in self.rules.items() if name in reachable)


def is_name(expression: str) -> bool:
    """Whether a GBNF expression is one rule's name."""
    return bool(_RULE_NAME.fullmatch(expression))
