"""A thinking model's reasoning through the real server and the embedded model (served under a
template that opens ``<think>``, with a small budget, as in test_reasoning_model): ``Client``'s
answers and streams, ``/api``'s usage, and ``%%llm`` in a real IPython shell — the thinking
block above the answer in a terminal and in a Jupyter-like front end, ``--no-think``,
``%llm history`` and a ``%llm save``/``load`` round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import requests
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from llm_magic.client import Client
from llm_magic.notebook.magics import LLMMagics
from llm_magic.supervisor.host import ApiHost

from .shell_fixtures import run
from .test_reasoning_model import ASK, BUDGET, thinking_host  # noqa: F401  (a fixture)

GREEDY = {"temperature": 0, "max_tokens": 48}
CELL = "%%llm --max-tokens 48 --temperature 0\n" + ASK[0]["content"]


@pytest.fixture(scope="module")
def thinking_client(thinking_host: ApiHost) -> Iterator[Client]:  # noqa: F811
    client = Client(thinking_host.url, retries=0)
    yield client
    client.close()


def test_answers_carry_the_reasoning_apart_from_the_text(thinking_client: Client) -> None:
    answer = thinking_client.chat(ASK, **GREEDY)
    assert answer.reasoning.strip() and answer.text.strip()
    assert "think>" not in answer.text + answer.reasoning
    assert 0 < answer.reasoning_tokens <= BUDGET

    stream = thinking_client.chat_stream(ASK, **GREEDY)
    pieces = list(stream.deltas())
    kinds = [p.kind for p in pieces]
    assert "reasoning" in kinds and "text" in kinds
    assert kinds.index("text") > kinds.index("reasoning")  # it thought first
    assert "".join(p.text for p in pieces if p.kind == "reasoning") == answer.reasoning
    assert "".join(p.text for p in pieces if p.kind == "text") == answer.text
    assert (stream.answer.reasoning, stream.answer.reasoning_tokens) == (answer.reasoning, answer.reasoning_tokens)

    off = thinking_client.chat(ASK, **GREEDY, chat_template_kwargs={"enable_thinking": False},
                               thinking_budget_tokens=0)
    assert off.reasoning == "" and off.text.strip() and off.reasoning_tokens == 0


def test_a_session_keeps_the_reasoning_of_each_turn(thinking_client: Client) -> None:
    session = thinking_client.session(**GREEDY)
    first = session.ask(ASK[0]["content"])
    session.ask("And at sunset?")  # the host takes the earlier turn's reasoning back
    turns = [m for m in session.messages if m["role"] == "assistant"]
    assert turns[0]["reasoning_content"] == first.reasoning and turns[1]["reasoning_content"].strip()


def test_api_usage_counts_the_reasoning_tokens(thinking_host: ApiHost) -> None:  # noqa: F811
    body = {"inputs": ASK, "parameters": GREEDY}
    data = requests.post(thinking_host.url + "/api", json=body, timeout=120).json()
    assert data["answer"]["reasoning_content"].strip()
    assert 0 < data["usage"]["completion_tokens_details"]["reasoning_tokens"] <= BUDGET


# -- %%llm in a real IPython shell ----------------------------------------------------------------

@pytest.fixture
def thinking_magics(shell: InteractiveShell, magics: LLMMagics, thinking_host: ApiHost,  # noqa: F811
                    capsys: pytest.CaptureFixture) -> Iterator[LLMMagics]:
    before = magics.client
    run(shell, f"%llm connect {thinking_host.url}", capsys)
    yield magics
    magics.client, magics.think, magics.temperature = before, None, None


def test_a_cell_shows_its_thinking_then_the_answer_in_a_terminal(shell, thinking_magics, capsys) -> None:
    out, err = run(shell, CELL, capsys)
    assert not err
    turn = thinking_magics.history[-1]
    reasoning, answer = turn["reasoning_content"], turn["content"]
    assert reasoning.strip() and answer.strip()
    head, _, rest = out.partition("Thinking…\n│ ")
    assert not head.strip() and rest, out  # the block first
    thought, _, after = rest.partition("\nThought for ")
    assert thought.replace("\n│ ", "\n").strip() == reasoning.strip()
    assert after.split("\n", 1)[1].startswith(answer.strip())  # the answer below it
    assert " thinking)" in out  # the footer counts the reasoning's tokens
    assert shell.user_ns["_llm"] == answer and thinking_magics.last_answer.reasoning == reasoning


def test_a_cell_shows_a_collapsed_block_in_a_jupyter_front_end(shell, thinking_magics, capsys) -> None:
    shell.kernel = object()  # what Display reads as a Jupyter kernel; output goes to display_pub
    try:
        with capture_output() as captured:
            result = shell.run_cell(CELL)
    finally:
        del shell.kernel
    assert result.success, result.error_in_exec
    outputs = [o.data for o in captured.outputs]
    blocks = [d["text/html"] for d in outputs if "<details class=\"llm-thinking\"" in d.get("text/html", "")]
    answers = [d["text/markdown"] for d in outputs if "text/markdown" in d and "<sub>" not in d["text/markdown"]]
    assert blocks and answers, outputs
    first_block = next(i for i, d in enumerate(outputs) if "llm-thinking" in d.get("text/html", ""))
    first_answer = next(i for i, d in enumerate(outputs) if d.get("text/markdown") in answers)
    assert first_block < first_answer  # the block is above the answer
    assert "<summary>Thought for " in blocks[-1] and " open" not in blocks[-1]  # ended, collapsed
    turn = thinking_magics.history[-1]
    assert turn["content"].strip() and turn["content"].strip() in answers[-1].replace("  \n", "\n")
    assert turn["reasoning_content"].split()[0] in blocks[-1]


def test_no_think_answers_without_a_block_and_think_asks_for_one(shell, thinking_magics, capsys) -> None:
    out, err = run(shell, CELL.replace("%%llm", "%%llm --no-think"), capsys)
    assert not err and "Thinking…" not in out and "Thought for" not in out
    assert "reasoning_content" not in thinking_magics.history[-1] and thinking_magics.history[-1]["content"].strip()

    run(shell, "%config LLMMagics.think = False", capsys)  # the notebook's default
    out, _ = run(shell, CELL.replace("%%llm", "%%llm --new"), capsys)
    assert "Thinking…" not in out
    out, _ = run(shell, CELL.replace("%%llm", "%%llm --new --think"), capsys)  # a cell's flag wins
    assert "Thinking…" in out and thinking_magics.history[-1]["reasoning_content"].strip()
    _, err = run(shell, "%%llm --complete --think\nOnce upon", capsys)
    assert "need a chat turn" in err


def test_history_folds_the_reasoning_and_save_load_keeps_it(shell, thinking_magics, capsys, tmp_path: Path) -> None:
    run(shell, CELL, capsys)
    reasoning = thinking_magics.history[-1]["reasoning_content"]
    out, _ = run(shell, "%llm history", capsys)
    assert "**assistant**:\n▸ Thinking: " + " ".join(reasoning.split())[:40] in out

    saved = [dict(m) for m in thinking_magics.history]
    path = tmp_path / "thinking.json"
    run(shell, f"%llm save {path}", capsys)
    assert json.loads(path.read_text())["messages"][-1]["reasoning_content"] == reasoning
    run(shell, "%llm reset", capsys)
    out, err = run(shell, f"%llm load {path}", capsys)
    assert not err and thinking_magics.history == saved
    out, err = run(shell, "%%llm --max-tokens 24 --temperature 0\nAnd at sunset?", capsys)  # it continues
    assert not err and thinking_magics.history[:2] == saved and len(thinking_magics.history) == 4
