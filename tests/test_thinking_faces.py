"""A thinking model's reasoning as the client, the notebook and the conversation file show it,
without a model: the client's streams against a scripted ``/v1/chat/completions`` (as an
llm_magic host streams ``delta.reasoning_content``), the notebook's blocks and history as
bundles, ``--think``/``--no-think`` as request fields, and ``/api``'s usage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llm_magic.client import ChatSession, Delta
from llm_magic.client.conversation import load as load_conversation
from llm_magic.errors import InvalidRequest
from llm_magic.notebook import display as display_module
from llm_magic.notebook.chat_cell import think_fields
from llm_magic.notebook.display import Display
from llm_magic.notebook.magics import _chat_parser
from llm_magic.notebook.rendering import Thinking, folded_html, history_bundle, seconds_text
from llm_magic.wire.events import Completion
from llm_magic.wire.seed import api_answer

from .test_session import scripted  # noqa: F401  (a fixture)

THOUGHT = "The user greets me.\n\nI greet back <warmly>."


def thinking(reasoning: str, content: str) -> list[dict[str, Any]]:
    """A scripted reply that thinks in two deltas, then answers in two, with its usage."""
    r, c = len(reasoning) // 2, len(content) // 2
    deltas = [{"reasoning_content": reasoning[:r]}, {"reasoning_content": reasoning[r:]},
              {"content": content[:c]}, {"content": content[c:]}]
    chunks = [{"model": "scripted", "choices": [{"index": 0, "delta": d}]} for d in deltas]
    chunks[-1]["choices"][0]["finish_reason"] = "stop"
    chunks.append({"model": "scripted", "choices": [], "usage": {
        "prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17,
        "completion_tokens_details": {"reasoning_tokens": 7}}})
    return chunks


# -- the client --------------------------------------------------------------------------------

def test_a_stream_gives_reasoning_apart_from_text(scripted) -> None:  # noqa: F811
    script, client = scripted
    script.replies = [thinking(THOUGHT, "Hello!")]
    stream = client.chat_stream("hi")
    pieces = list(stream.deltas())
    assert [p.kind for p in pieces] == ["reasoning", "reasoning", "text", "text"]
    assert isinstance(pieces[0], Delta) and "".join(p.text for p in pieces if p.kind == "reasoning") == THOUGHT
    assert (stream.text, stream.reasoning) == ("Hello!", THOUGHT)
    answer = stream.answer
    assert (answer.text, answer.reasoning, answer.reasoning_tokens) == ("Hello!", THOUGHT, 7)

    script.replies = [thinking(THOUGHT, "Hello!")]
    stream = client.chat_stream("hi")
    assert "".join(stream) == "Hello!"  # iterating a stream is its text alone, as before
    assert stream.answer.reasoning == THOUGHT


def test_an_answer_without_reasoning_has_it_empty(scripted) -> None:  # noqa: F811
    script, client = scripted
    script.replies = [[{"model": "scripted", "choices": [{"index": 0, "delta": {"content": "Hi"},
                                                          "finish_reason": "stop"}]}]]
    stream = client.chat_stream("hi")
    assert list(stream.deltas()) == [Delta("text", "Hi")]
    assert stream.answer.reasoning == "" and stream.answer.reasoning_tokens == 0


def test_a_session_keeps_reasoning_with_each_turn_and_its_file_keeps_it(scripted, tmp_path: Path) -> None:  # noqa: F811
    script, client = scripted
    script.replies = [thinking(THOUGHT, "Hello!"), thinking("Again?", "Hi again.")]
    session = client.session()
    session.ask("hi")
    session.ask("hi again")
    assert session.messages[1] == {"role": "assistant", "content": "Hello!", "reasoning_content": THOUGHT}
    assert script.requests[1]["messages"][1]["reasoning_content"] == THOUGHT  # the host's template may read it
    path = session.save(tmp_path / "chat.json")
    loaded = ChatSession(client)
    loaded.load(path)
    assert loaded.messages == session.messages
    assert [m.get("reasoning_content") for m in loaded.messages] == [None, THOUGHT, None, "Again?"]


@pytest.mark.parametrize("message, problem", [
    ({"role": "assistant", "content": "x", "reasoning_content": 3}, "reasoning_content must be text"),
    ({"role": "user", "content": "x", "reasoning_content": "no"}, "on an assistant message"),
])
def test_a_file_with_bad_reasoning_is_refused(tmp_path: Path, message: dict, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"role": "user", "content": "hi"}, message]))
    with pytest.raises(InvalidRequest, match=problem):
        load_conversation(path)


# -- the notebook's blocks ---------------------------------------------------------------------

def test_the_thinking_block_streams_collapsed_then_says_how_long() -> None:
    block = Thinking("Step one.\nStep <two>")
    html = block._repr_html_()
    assert html.startswith("<details") and " open" not in html  # collapsed
    assert "<summary>Thinking… <span" in html and "Step one. Step &lt;two&gt;</span>" in html  # its latest words
    assert repr(block) == "Thinking…\n│ Step one.\n│ Step <two>"
    block.seconds = 3.24
    html = block._repr_html_()
    assert "<summary>Thought for 3.2 s</summary>" in html and "Step one.\nStep &lt;two&gt;</div>" in html
    assert repr(block).startswith("Thought for 3.2 s\n│ Step one.")
    assert (seconds_text(0.44), seconds_text(12.6)) == ("0.4 s", "13 s")


def test_history_folds_each_turns_reasoning() -> None:
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello!", "reasoning_content": THOUGHT},
                {"role": "user", "content": "and?"}, {"role": "assistant", "content": "Bye."}]
    bundle = history_bundle(messages)
    markdown, plain = bundle["text/markdown"], bundle["text/plain"]
    block = folded_html(THOUGHT)
    assert block in markdown and "\n" not in block  # one line: a blank line would end the HTML block
    assert block.startswith("<details><summary>Thinking</summary>") and "&lt;warmly&gt;" in block
    assert "<br><br>" in block and " open" not in block
    assert "**assistant**: Bye." in markdown and "**user**: hi" in markdown
    assert "**assistant**:\n▸ Thinking: The user greets me. I greet back <warmly>.\nHello!" in plain
    assert "<details" not in plain


class FakeStream:
    """What ``Display.stream`` reads: ``deltas()``, the text and reasoning so far, the answer."""

    def __init__(self, pieces: list[Delta]) -> None:
        self.pieces, self.text, self.reasoning, self.answer = pieces, "", "", None

    def deltas(self):
        for piece in self.pieces:
            if piece.kind == "text":
                self.text += piece.text
            else:
                self.reasoning += piece.text
            yield piece

    def __iter__(self):
        return (p.text for p in self.deltas() if p.kind == "text")


PIECES = [Delta("reasoning", "\nFirst,"), Delta("reasoning", " think.\nThen"), Delta("text", "The "),
          Delta("text", "answer.")]


def test_a_terminal_prints_the_thinking_indented_above_the_answer(capsys) -> None:
    text, finished = Display(None).stream(FakeStream(PIECES), "markdown", live=True)
    out = capsys.readouterr().out
    assert (text, finished) == ("The answer.", True)
    lines = out.splitlines()
    assert lines[:3] == ["Thinking…", "│ First, think.", "│ Then"]
    assert lines[3].startswith("Thought for ") and lines[3].endswith(" s") and lines[4] == "The answer."

    Display(None).stream(FakeStream(PIECES), "markdown", live=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Thought for ") and lines[1:] == ["│ First, think.", "│ Then", "The answer."]


class Handle:
    def __init__(self, shown: list) -> None:
        self.shown = shown

    def update(self, obj: Any) -> None:
        self.shown.append(("update", obj))


def test_jupyter_shows_a_collapsed_block_that_ends_before_the_answer(monkeypatch) -> None:
    shown: list[tuple[str, Any]] = []

    def fake_display(obj: Any, display_id: bool = False, raw: bool = False) -> Handle | None:
        shown.append(("display", obj))
        return Handle(shown) if display_id else None

    monkeypatch.setattr(display_module, "display", fake_display)
    monkeypatch.setattr(display_module, "UPDATE_INTERVAL", 0.0)
    rich = Display(type("Kernel", (), {"kernel": object()})())
    rich.stream(FakeStream(PIECES), "markdown", live=True)
    kinds = [(how, type(obj).__name__) for how, obj in shown]
    assert kinds[0] == ("display", "Thinking")  # the block comes first, so the answer is below it
    first_answer = kinds.index(("display", "Shown"))
    thinking_updates = [obj for how, obj in shown[:first_answer] if isinstance(obj, Thinking)]
    block = thinking_updates[-1]
    assert block.seconds is not None and block.text == "\nFirst, think.\nThen"  # ended at the answer's start
    assert "Thought for" in block._repr_html_()
    assert shown[-1][1].text == "The answer."


# -- the request fields and /api --------------------------------------------------------------

def test_think_and_no_think_become_request_fields() -> None:
    assert think_fields(None) == {}
    assert think_fields(True) == {"chat_template_kwargs": {"enable_thinking": True}}
    assert think_fields(False) == {"chat_template_kwargs": {"enable_thinking": False}, "thinking_budget_tokens": 0}
    parser = _chat_parser()
    assert [parser.parse_args(argv).think for argv in ([], ["--think"], ["--no-think"])] == [None, True, False]
    with pytest.raises(Exception, match="not allowed with"):
        parser.parse_args(["--think", "--no-think"])


def test_api_usage_counts_reasoning_tokens_as_v1_does() -> None:
    done = Completion("Four.", "m", "stop", 5, 9, reasoning="2+2 is 4.", reasoning_tokens=6)
    assert api_answer(done)["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14,
                                         "completion_tokens_details": {"reasoning_tokens": 6}}
    assert "completion_tokens_details" not in api_answer(Completion("x", "m", "stop", 1, 1))["usage"]


def test_client_chat_reads_reasoning_from_either_name() -> None:
    from llm_magic.client.client import reasoning_of

    assert reasoning_of({"reasoning_content": "a"}) == "a" and reasoning_of({"reasoning": "b"}) == "b"
    assert reasoning_of({"content": "c"}) == "" and reasoning_of({"reasoning_content": None}) == ""
