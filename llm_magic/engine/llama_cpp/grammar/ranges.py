"""Numeric ranges as GBNF: JSON integers between bounds, and numbers between whole bounds, as
digit-by-digit alternatives (the way a regular expression for a range is written). Pure Python.
"""

from __future__ import annotations

from llm_magic.errors import InvalidRequest
from llm_magic.engine.llama_cpp.grammar.gbnf import DIGITS, Grammar, literal


def _same_length(low: str, high: str) -> list[str]:
    """Alternatives matching the decimal numbers from ``low`` to ``high`` (same length)."""
    if low == high:
        return [literal(low)]
    common = 0
    while low[common] == high[common]:
        common += 1
    head = literal(low[:common]) + " " if common else ""
    a, b, rest = low[common], high[common], len(low) - common - 1
    if rest == 0:
        return [f"{head}[{a}-{b}]"]
    low_rest, high_rest = low[common + 1:], high[common + 1:]
    any_rest = "[0-9]" if rest == 1 else f"[0-9]{{{rest}}}"
    out = []
    if low_rest == "0" * rest:
        start = a
    else:
        out += [f"{head}{literal(a)} ({' | '.join(_same_length(low_rest, '9' * rest))})"]
        start = chr(ord(a) + 1)
    if high_rest == "9" * rest:
        end = b
    else:
        end = chr(ord(b) - 1)
    if start <= end:
        out.append(f"{head}[{start}-{end}] {any_rest}")
    if high_rest != "9" * rest:
        out += [f"{head}{literal(b)} ({' | '.join(_same_length('0' * rest, high_rest))})"]
    return out


def _digits_range(low: int, high: int) -> list[str]:
    """Alternatives for the whole numbers ``low``..``high`` (``0 <= low <= high``), written without
    leading zeros."""
    out = []
    for length in range(len(str(low)), len(str(high)) + 1):
        start = max(low, 0 if length == 1 else 10 ** (length - 1))
        end = min(high, 10 ** length - 1)
        if start <= end:
            out += _same_length(str(start), str(end))
    return out


def _at_least(low: int) -> list[str]:
    """Whole numbers from ``low`` (>= 0) up, up to ``DIGITS`` digits."""
    length = len(str(low))
    out = _digits_range(low, 10 ** length - 1)
    if length < DIGITS:
        out.append(f"[1-9] [0-9]{{{length},{DIGITS - 1}}}")
    return out


def int_range(lo: int | None, hi: int | None) -> str:
    """A GBNF expression for the JSON integers from ``lo`` to ``hi`` (None: unbounded)."""
    negative: list[str] = []  # alternatives for the magnitudes of the negative numbers
    positive: list[str] = []  # ... and for the numbers >= 0
    if lo is None or lo < 0:
        top = None if lo is None else -lo  # the largest magnitude
        bottom = 1 if hi is None or hi >= 0 else -hi
        negative = _at_least(bottom) if top is None else _digits_range(bottom, top)
    if hi is None or hi >= 0:
        start = 0 if lo is None or lo < 0 else lo
        positive = _at_least(start) if hi is None else _digits_range(start, hi)
    parts = []
    if negative:
        parts.append(f'"-" ({" | ".join(negative)})')
    parts += positive
    return " | ".join(f"({p})" if " | " in p else p for p in parts)


def number_range(lo: tuple[int, bool] | None, hi: tuple[int, bool] | None, g: Grammar) -> str:
    """JSON numbers between whole bounds ``(value, exclusive)``, written without an exponent: an
    integer part strictly inside takes any fraction; one at a bound only the fraction that keeps
    the number inside (none or zeros at an inclusive bound, a non-zero one past an exclusive)."""
    fraction = g.builtin("fraction")
    zeros = f'("." "0"{{1,{DIGITS}}})?'
    nonzero = f'"." [0-9]{{0,{DIGITS - 1}}} [1-9]'
    low, low_x = lo if lo is not None else (None, False)
    high, high_x = hi if hi is not None else (None, False)

    def side(bottom: int, strict: bool, top: int | None, top_x: bool) -> list[str]:
        """Magnitudes m with m >= bottom (> if strict) and m <= top (< if top_x; None: any)."""
        out = []
        first, last = (bottom + 1 if strict else bottom), (None if top is None else top - 1)
        if last is None or first <= last:
            out.append(f"({int_range(first, last)}) {fraction}?")
        if strict and (top is None or bottom < top):
            out.append(f"{literal(str(bottom))} {nonzero}")
        if top is not None and not top_x and (top > bottom or (top == bottom and not strict)):
            out.append(f"{literal(str(top))} {zeros}")
        return out

    parts = []
    if high is None or high > 0 or (high == 0 and not high_x):  # x >= 0
        bottom, strict = (0, False) if low is None or low < 0 else (low, low_x)
        parts += side(bottom, strict, high, high_x)
    if low is None or low < 0:  # x < 0: its magnitude, from -high (or 0) to -low
        bottom, strict = (0, high_x and high == 0) if high is None or high >= 0 else (-high, high_x)
        negative = side(bottom, strict, None if low is None else -low, low_x)
        if negative:
            parts.append(f'"-" ({" | ".join(negative)})')
    if not parts:
        raise InvalidRequest("no number lies within the bounds")
    return " | ".join(f"({p})" for p in parts)
