"""Test helpers for GBNF grammars: a non-recursive grammar as a Python regular expression (to
check the converter's output against brute force), and a compile check by llama.cpp itself."""

from __future__ import annotations

import re
from functools import lru_cache

_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(\[(?:[^\]\\]|\\.)*\])|([a-zA-Z][a-zA-Z0-9-]*)'
                    r'|(\{\d*(?:,\d*)?\})|([()|?*+]))')
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "[": "[", "]": "]", "-": "-"}


def _unescape(body: str) -> str:
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            e = body[i + 1]
            if e == "x":
                out.append(chr(int(body[i + 2:i + 4], 16)))
                i += 4
                continue
            out.append(_ESCAPES[e])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def to_regex(grammar: str) -> re.Pattern:
    """``grammar`` (no recursion) as a compiled regex for ``fullmatch``."""
    rules = {}
    for line in grammar.strip().splitlines():
        name, _, body = line.partition(" ::= ")
        rules[name.strip()] = body

    @lru_cache(maxsize=None)
    def expand(name: str, depth: int = 0) -> str:
        assert depth < 50, "recursive grammar"
        body, out, i = rules[name], [], 0
        while i < len(body):
            m = _TOKEN.match(body, i)
            if not m:
                assert not body[i:].strip(), f"cannot read {body[i:]!r}"
                break
            i = m.end()
            lit, cls, ref, rep, op = m.groups()
            if lit is not None:
                out.append("(?:" + re.escape(_unescape(lit[1:-1])) + ")")
            elif cls is not None:
                out.append(cls)
            elif ref is not None:
                out.append("(?:" + expand(ref, depth + 1) + ")")
            elif rep is not None:
                out.append(rep)
            else:
                out.append("(?:" if op == "(" else op)
        return "".join(out)

    return re.compile(expand("root"), re.DOTALL)


@lru_cache(maxsize=1)
def _vocab():
    import llama_cpp
    from llm_magic.models import embedded_model_path

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(embedded_model_path()).encode(), params)
    assert model
    return model, llama_cpp.llama_model_get_vocab(model)


def compiles(grammar: str) -> bool:
    """Whether llama.cpp accepts ``grammar`` (parses it and finds no left recursion)."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(_vocab()[1], grammar.encode("utf-8"), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True
