"""How answers look in a notebook: Markdown that keeps the model's line breaks, code pulled out
of fenced blocks, collapsible tool calls, and code offered for copying where a front end cannot
open a new cell."""

from __future__ import annotations

import html
import json
import re
from typing import Any

_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_BLOCK = re.compile(r"^\s{0,3}(?P<fence>```|~~~)(?P<lang>[^\n`]*)\n(?P<code>.*?)(?:^\s{0,3}(?P=fence)[ \t]*$|\Z)",
                    re.MULTILINE | re.DOTALL)
PYTHON_LANGS = {"", "python", "py", "python3", "ipython", "ipython3", "pycon"}


def keep_line_breaks(markdown: str) -> str:
    """Markdown joins lines of a paragraph into one; a model's poem or address means its line
    breaks. End every line that continues a paragraph with a hard break (two spaces), leaving
    code blocks and blank lines alone."""
    lines = markdown.split("\n")
    in_fence = False
    for i, line in enumerate(lines[:-1]):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        following = lines[i + 1]
        if not in_fence and line.strip() and following.strip() and not _FENCE.match(following) \
                and not line.lstrip().startswith("|") and not line.endswith("  "):
            lines[i] = line + "  "
    return "\n".join(lines)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of an answer as (language, code); an unclosed last block (an
    answer cut at max tokens) counts too."""
    return [(m.group("lang").strip().lower(), m.group("code").rstrip("\n")) for m in _BLOCK.finditer(text)]


def answer_code(text: str) -> str:
    """The code an answer gives: its Python (or untagged) fenced blocks joined; a whole answer
    without fences is taken as code."""
    blocks = code_blocks(text)
    if not blocks:
        return text.strip()
    python = [code for lang, code in blocks if lang in PYTHON_LANGS]
    return "\n\n".join(python or [code for _, code in blocks]).strip()


def fixed_cell(text: str) -> str | None:
    """The corrected cell in a ``%llm fix`` answer: its last Python block, if any."""
    python = [code for lang, code in code_blocks(text) if lang in PYTHON_LANGS]
    return python[-1].strip() if python else None


class Shown:
    """An answer as Jupyter shows it (Markdown, text or a code block) and a terminal prints it."""

    def __init__(self, text: str, fmt: str) -> None:
        self.text, self.fmt = text, fmt

    def _repr_markdown_(self) -> str | None:
        if self.fmt == "text":
            return None
        if self.fmt == "code":
            return f"```python\n{answer_code(self.text)}\n```"
        if self.fmt == "json":
            return f"```json\n{self.text}\n```"
        return keep_line_breaks(self.text)

    def __repr__(self) -> str:
        return self.text


def copyable_code(code: str, note: str) -> dict[str, str]:
    """A display bundle: the code with a Copy button (for front ends that cannot open a new
    cell, such as Colab), plain text elsewhere."""
    escaped = html.escape(code)
    button = ("<button onclick=\"navigator.clipboard.writeText(this.parentElement.querySelector('pre')"
              ".textContent);this.textContent='Copied'\">Copy</button>")
    return {"text/plain": f"{note}\n{code}",
            "text/html": f"<div><p>{html.escape(note)} {button}</p><pre>{escaped}</pre></div>"}


def tool_call_bundle(name: str, arguments: str, result: str, declined: bool = False) -> dict[str, str]:
    """One tool call and its result, collapsed under a one-line summary."""
    try:
        args = ", ".join(f"{k}={v!r}" for k, v in json.loads(arguments).items())
    except (ValueError, AttributeError):
        args = arguments
    call = f"{name}({args})"
    outcome = "declined" if declined else ("error" if result.startswith("Error:") else "ran")
    summary = f"🔧 {call} — {outcome}"
    short = result if len(result) <= 200 else result[:200] + "…"
    return {"text/plain": f"{summary}\n  → {short}",
            "text/html": f"<details><summary><code>{html.escape(call)}</code> — {outcome}</summary>"
                         f"<pre>{html.escape(result)}</pre></details>"}


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)
