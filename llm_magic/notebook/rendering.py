"""How answers look in a notebook: Markdown that keeps the model's line breaks, code pulled out
of fenced blocks, collapsible tool calls and thinking, the conversation's history, and code
offered for copying where a front end cannot open a new cell."""

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


THINKING_TAIL = 80  # characters of the latest reasoning shown beside "Thinking…" while it streams
THINKING_STYLE = "white-space: pre-wrap; opacity: .75; border-left: 2px solid #8888; padding-left: .6em"


def seconds_text(seconds: float) -> str:
    """"0.4 s", "3.2 s", "12 s": tenths only where they matter."""
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def one_line(text: str, limit: int, tail: bool = False) -> str:
    """``text`` on one line, cut to ``limit`` characters at its start (or, ``tail``, its end)."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    return "…" + flat[-limit:] if tail else flat[:limit] + "…"


class Thinking:
    """A thinking model's reasoning, collapsed under one line: "Thinking…" with its latest words
    while it streams (``seconds`` None), "Thought for N s" once the answer began. Jupyter shows
    a ``<details>`` block; a terminal prints the summary and the reasoning indented under it."""

    def __init__(self, text: str, seconds: float | None = None) -> None:
        self.text, self.seconds = text, seconds

    @property
    def summary(self) -> str:
        return "Thinking…" if self.seconds is None else f"Thought for {seconds_text(self.seconds)}"

    def _repr_html_(self) -> str:
        # collapsed, so while it streams the summary line carries its latest words
        tail = ""
        if self.seconds is None and self.text.strip():
            tail = f" <span style=\"opacity: .6\">{html.escape(one_line(self.text, THINKING_TAIL, tail=True))}</span>"
        return (f"<details class=\"llm-thinking\"><summary>{self.summary}{tail}</summary>"
                f"<div style=\"{THINKING_STYLE}\">{html.escape(self.text.strip())}</div></details>")

    def __repr__(self) -> str:
        return self.summary + "".join("\n" + indent(line) for line in self.text.strip().split("\n"))


def indent(line: str) -> str:
    """A line of reasoning as a terminal shows it, under its summary."""
    return "│ " + line


def history_bundle(messages: list[dict[str, Any]]) -> dict[str, str]:
    """The conversation as ``%llm history`` shows it: each message after its role, tool calls and
    their results, and each assistant turn's reasoning folded (a ``<details>`` block in
    Markdown, one line of it in plain text)."""
    names = {call.get("id"): call["function"]["name"] for m in messages for call in m.get("tool_calls") or []}
    markdown, plain = [], []
    for m in messages:
        if m["role"] == "tool":
            line = f"**tool** ({names.get(m.get('tool_call_id'), '?')}): {m['content']}"
            markdown.append(line)
            plain.append(line)
            continue
        calls = [f"`{c['function']['name']}({c['function'].get('arguments', '')})`" for c in m.get("tool_calls") or []]
        text = m.get("content") or ""
        if not isinstance(text, str):
            text = json.dumps(text, ensure_ascii=False)  # content parts, as other tools save them
        said = text + (" → calls " + ", ".join(calls) if calls else "")
        thought = m.get("reasoning_content") or ""
        if thought.strip():
            markdown.append(f"**{m['role']}**:\n\n{folded_html(thought)}\n\n{said}")
            plain.append(f"**{m['role']}**:\n▸ Thinking: {one_line(thought, THINKING_TAIL)}\n{said}")
        else:
            markdown.append(f"**{m['role']}**: {said}")
            plain.append(f"**{m['role']}**: {said}")
    return {"text/plain": "\n\n".join(plain), "text/markdown": keep_line_breaks("\n\n".join(markdown))}


def folded_html(reasoning: str) -> str:
    """Reasoning as a collapsed block inside Markdown: one line of HTML (a blank line would end
    Markdown's HTML block), its line breaks as ``<br>``."""
    body = "<br>".join(html.escape(line) for line in reasoning.strip().split("\n"))
    return f"<details><summary>Thinking</summary><div style=\"{THINKING_STYLE}\">{body}</div></details>"
