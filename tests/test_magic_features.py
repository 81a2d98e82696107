"""%%llm's notebook features in a real IPython shell, against a real host and the embedded model:
cell references, %llm fix, code into a new cell, --json/--schema, --tools, save/load, restart."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import requests
from IPython.core.interactiveshell import InteractiveShell
from pydantic import BaseModel

from llm_magic.notebook.rendering import answer_code, copyable_code, fixed_cell

from .shell_fixtures import run


def stored(shell: InteractiveShell, cell: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run a cell as a numbered notebook cell (it gets an In[n]); return n and its output."""
    result = shell.run_cell(cell, store_history=True)
    return result.execution_count, capsys.readouterr().out


@pytest.fixture
def greedy(magics):
    magics.temperature = 0.0
    yield magics
    magics.temperature = None
    magics.confirm_tools, magics.max_tool_rounds = False, 5


def test_cells_and_errors_go_into_the_prompt(shell, greedy, hosted, capsys) -> None:
    ok, _ = stored(shell, "6 * 7", capsys)
    bad, out = stored(shell, "def area(r):\n    return 3.14 * r ** 2\narea('2')", capsys)
    assert "TypeError" in out
    out, err = run(shell, f"%%llm --max-tokens 5\nCell {{In[{bad}]}} gave {{Err[{bad}]}}; cell {ok} gave {{Out[{ok}]}}."
                          " Last: {Err}", capsys)
    assert not err
    sent = greedy.history[-2]["content"]
    assert sent.startswith("Cell def area(r):\n    return 3.14 * r ** 2\narea('2') gave ")
    assert "TypeError: unsupported operand type(s) for ** or pow(): 'str' and 'int'" in sent
    assert "----> 3 area('2')" in sent and "\x1b[" not in sent
    assert f"; cell {ok} gave 42." in sent
    assert sent.count("TypeError: unsupported operand") == 2  # {Err} is the same, last error
    for body, message in [(f"{{Out[{bad}]}}", f"cell {bad} has no result"),
                          (f"{{Err[{ok}]}}", f"cell {ok} raised no error"),
                          ("{In[100000]}", "there is no cell 100000")]:
        turns = len(greedy.history)
        _, err = run(shell, f"%%llm\n{body}", capsys)
        assert message in err and len(greedy.history) == turns  # nothing was sent


def test_relative_cell_references_count_from_the_cell_that_runs(shell, greedy, hosted, capsys) -> None:
    stored(shell, "side = 6\nside * 7", capsys)
    # a stored cell, as a kernel's execute_request runs every cell: -1 is the cell before it
    n, out = stored(shell, "%%llm --max-tokens 2\n{In[-1]} gave {Out[-1]}", capsys)
    assert "tokens" in out and greedy.history[-2]["content"] == "side = 6\nside * 7 gave 42"
    # a cell run without a number of its own (run_cell's default): -1 is the last numbered one
    stored(shell, "side * 8", capsys)
    _, err = run(shell, "%%llm --max-tokens 2\n{In[-1]} gave {Out[-1]}", capsys)
    assert not err and greedy.history[-2]["content"] == "side * 8 gave 48"


def test_relative_cell_references_do_not_depend_on_when_ipython_counts_up(shell, greedy, hosted, capsys) -> None:
    """IPython 9 counts ``execution_count`` up as a stored cell starts, IPython 8 once it ends:
    the cell here counts it up itself, so that whichever IPython runs it, it sees 9's numbers."""
    stored(shell, "side = 5\nside * 5", capsys)
    code = ("ip = get_ipython()\nip.execution_count += 1  # as IPython 9 has it while this cell runs\n"
            "try:\n    ip.run_cell_magic('llm', '--max-tokens 2', '{In[-1]} gave {Out[-1]}')\n"
            "finally:\n    ip.execution_count -= 1")
    result = shell.run_cell(code, store_history=True)
    capsys.readouterr()
    assert result.success, result.error_in_exec
    assert greedy.history[-2]["content"] == "side = 5\nside * 5 gave 25"


def test_fix_explains_the_last_error_and_offers_the_cell(shell, greedy, hosted, capsys) -> None:
    shell.rl_next_input = None
    bad, _ = stored(shell, "numbers = [1, 2, 3]\nprint(sum(numbers) / len(numbrs))", capsys)
    out, err = run(shell, "%llm fix", capsys)
    assert not err
    asked = greedy.history[-2]["content"]
    assert f"Cell [{bad}] of my Jupyter notebook failed" in asked
    assert "print(sum(numbers) / len(numbrs))" in asked and "NameError: name 'numbrs' is not defined" in asked
    answer = greedy.history[-1]["content"]
    assert answer == shell.user_ns["_llm"] and "tokens/s" in out
    code = fixed_cell(answer)
    assert code, answer  # the model gave a cell ...
    assert f"The fixed cell [{bad}] is at the next prompt, not run yet." in out
    assert shell.rl_next_input == code  # ... and it is offered as the next input


def test_fix_with_no_error_since_loading(capsys) -> None:
    from llm_magic.notebook.magics import LLMMagics

    fresh = InteractiveShell()
    own = LLMMagics(shell=fresh)
    fresh.register_magics(own)
    own.client = object()  # connected, as far as the check goes: the error comes before any request
    result = fresh.run_cell("%llm fix")
    assert "no cell has failed since llm_magic was loaded" in str(result.error_in_exec)


def test_format_code_puts_the_code_in_the_next_cell_and_markdown_keeps_lines(shell, greedy, hosted,
                                                                             capsys) -> None:
    shell.rl_next_input = None
    out, err = run(shell, "%%llm --new --format code --max-tokens 80\n"
                          "Write a Python function add(a, b) that returns a + b.", capsys)
    assert not err and "The answer's code is at the next prompt, not run yet." in out
    assert shell.rl_next_input == answer_code(shell.user_ns["_llm"]) and "def " in shell.rl_next_input


def test_on_colab_the_code_comes_with_a_copy_button_instead(shell, greedy, hosted, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    shell.rl_next_input = None
    out, err = run(shell, "%%llm --new --format code --max-tokens 40\nWrite print('hi') in Python.", capsys)
    assert not err and shell.rl_next_input is None  # Colab would ignore a new cell: none is asked for
    assert "The answer's code (Colab cannot open a new cell: copy it)" in out
    assert answer_code(shell.user_ns["_llm"]) in out
    bundle = copyable_code("x = '<b>'", "note")
    assert "navigator.clipboard.writeText" in bundle["text/html"] and "x = &#x27;&lt;b&gt;&#x27;" in bundle["text/html"]


class City(BaseModel):
    name: str
    country: str
    population: int


def test_schema_gives_a_validated_object(shell, greedy, hosted, capsys) -> None:
    shell.user_ns["City"] = City
    out, err = run(shell, "%%llm --new --schema City --max-tokens 80 -o paris\nDescribe Paris.", capsys)
    assert not err, err
    city = shell.user_ns["_llm"]
    assert isinstance(city, City) and city is shell.user_ns["paris"] and city.name
    assert json.dumps(city.model_dump(), indent=2, ensure_ascii=False) in out  # shown pretty
    assert json.loads(greedy.history[-1]["content"]) == city.model_dump()  # the conversation keeps the text

    shell.user_ns["point"] = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                              "required": ["x", "y"], "additionalProperties": False}
    _, err = run(shell, "%%llm --new --schema point --max-tokens 40\nA point on a grid.", capsys)
    assert not err and sorted(shell.user_ns["_llm"]) == ["x", "y"]
    assert all(isinstance(v, int) for v in shell.user_ns["_llm"].values())

    _, err = run(shell, "%%llm --new --json --max-tokens 60\nGive a JSON object with keys a and b.", capsys)
    assert not err and isinstance(shell.user_ns["_llm"], dict)


@pytest.mark.parametrize("cell, message", [
    ("%%llm --schema Nowhere\nx", "--schema Nowhere: no such name in the notebook"),
    ("%%llm --schema number\nx", "expected a pydantic model class or a JSON-schema dict, not a int"),
    ("%%llm --schema badschema\nx", "--schema badschema is not a valid JSON schema"),
    ("%%llm --json --schema City\nx", "not allowed with argument"),
    ("%%llm --complete --json\nx", "--complete is a raw completion"),
    ("%%llm --tools nothing_here\nx", "--tools nothing_here: no such function in the notebook"),
    ("%%llm --tools number\nx", "--tools number: a int, not a function"),
    ("%%llm --tools ,\nx", "--tools: name the functions"),
])
def test_schema_and_tool_mistakes_are_one_clear_line(shell, greedy, hosted, capsys, cell, message) -> None:
    shell.user_ns.update(number=5, badschema={"type": 12}, City=City)
    _, err = run(shell, cell, capsys)
    assert message in err


def test_json_cut_short_keeps_the_text(shell, greedy, hosted, capsys) -> None:
    shell.user_ns["City"] = City
    _, err = run(shell, "%%llm --new --schema City --max-tokens 4\nDescribe Paris.", capsys)
    assert "the answer is not valid JSON (it stopped at max tokens: raise --max-tokens); its text is in _llm" in err
    assert shell.user_ns["_llm"].startswith("{")


def secret_number(name: str) -> int:
    """The secret number of a person.

    Args:
        name: the person's first name
    """
    CALLS.append(name)
    return 7391


def failing_lookup(name: str) -> str:
    """Look a person up."""
    raise LookupError(f"nobody called {name}")


CALLS: list[str] = []


def test_tools_run_in_the_notebook_and_the_result_reaches_the_model(shell, greedy, hosted, capsys) -> None:
    CALLS.clear()
    shell.user_ns["secret_number"] = secret_number
    out, err = run(shell, "%%llm --new --tools secret_number --tool-choice required --max-tokens 60\n"
                          "What is Ada's secret number?", capsys)
    assert not err, err
    assert CALLS  # the function really ran, in this process
    history = greedy.history
    assert history[0] == {"role": "user", "content": "What is Ada's secret number?"}
    call = history[1]["tool_calls"][0]
    assert history[1]["role"] == "assistant" and call["function"]["name"] == "secret_number"
    assert json.loads(call["function"]["arguments"])["name"] == CALLS[0]  # a valid call under the grammar
    assert history[2] == {"role": "tool", "tool_call_id": call["id"], "content": "7391"}
    assert history[-1]["role"] == "assistant" and "tool_calls" not in history[-1]  # the last turn is text
    assert "🔧 secret_number(name=" in out and "→ 7391" in out
    # every later request carried the result: the final turn was answered with it in view
    assert greedy.last_answer.usage["prompt_tokens"] > 0

    out, _ = run(shell, "%llm history", capsys)
    assert "→ calls `secret_number(" in out and "**tool** (secret_number): 7391" in out


class Secret(BaseModel):
    person: str
    number: int


def test_tools_then_data_the_result_of_the_call_becomes_a_validated_object(shell, greedy, hosted, capsys) -> None:
    CALLS.clear()
    shell.user_ns.update(secret_number=secret_number, Secret=Secret)
    out, err = run(shell, "%%llm --new --tools secret_number --tool-choice required --schema Secret --max-tokens 60\n"
                          "What is Ada's secret number?", capsys)
    assert not err, err
    assert CALLS and "🔧 secret_number(name=" in out
    secret = shell.user_ns["_llm"]
    assert isinstance(secret, Secret)
    roles = [m["role"] for m in greedy.history]
    assert roles[:3] == ["user", "assistant", "tool"] and roles[-1] == "assistant"
    assert greedy.history[2]["content"] == "7391"  # the result was in the conversation the data came from
    assert Secret.model_validate_json(greedy.history[-1]["content"]) == secret


def test_tool_errors_declines_and_the_round_limit(shell, greedy, hosted, capsys, monkeypatch) -> None:
    shell.user_ns["failing_lookup"] = failing_lookup
    out, err = run(shell, "%%llm --new --tools failing_lookup --tool-choice required --max-tokens 60\n"
                          "Look up Ada.", capsys)
    assert not err
    results = [m["content"] for m in greedy.history if m["role"] == "tool"]
    assert results[0].startswith("Error: LookupError: nobody called")
    assert "— error" in out

    CALLS.clear()
    shell.user_ns["secret_number"] = secret_number
    greedy.confirm_tools = True
    asked: list[str] = []
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or "n")
    out, err = run(shell, "%%llm --new --tools secret_number --tool-choice required --max-tokens 60\n"
                          "What is Ada's secret number?", capsys)
    assert not err and asked and asked[0].startswith("Run secret_number(") and CALLS == []
    assert greedy.history[2]["content"] == "Error: the user declined to run this call."

    greedy.confirm_tools, greedy.max_tool_rounds = False, 1
    out, err = run(shell, "%%llm --new --tools secret_number --tool-choice required --max-tokens 60\n"
                          "What is Ada's secret number?", capsys)
    assert not err and "(after 1 round of tool calls the model must answer in text" in out
    assert [m["role"] for m in greedy.history] == ["user", "assistant", "tool", "assistant"]


def test_save_and_load_keep_a_conversation(shell, greedy, hosted, capsys, tmp_path: Path) -> None:
    run(shell, "%%llm --new --system 'Be brief.' --max-tokens 8\nMy name is Ada.", capsys)
    saved = list(greedy.history)
    path = tmp_path / "chat.json"
    out, err = run(shell, f"%llm save {path}", capsys)
    assert not err and f"Saved 3 messages to {path}" in out
    data = json.loads(path.read_text())
    assert data["messages"] == saved and data["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert data["settings"] == {"temperature": 0.0, "max_tokens": 512}

    run(shell, "%llm reset", capsys)
    greedy.temperature = 0.7
    out, err = run(shell, f"%llm load {path}", capsys)
    assert not err and "Loaded 3 messages (1 turns), held with SmolLM2-135M-Instruct.Q4_1" in out
    assert greedy.history == saved and greedy.temperature == 0.0
    run(shell, "%%llm --max-tokens 4\nWhat is my name?", capsys)
    assert greedy.history[:3] == saved and len(greedy.history) == 5  # the next cell continued it

    before = list(greedy.history)
    path.write_text('{"messages": [{"role": "robot", "content": "beep"}]}')
    _, err = run(shell, f"%llm load {path}", capsys)
    assert "messages[0].role must be one of" in err and greedy.history == before  # nothing lost
    _, err = run(shell, "%llm load", capsys)
    assert "give a file: %llm load PATH" in err


def test_restart_keeps_the_token_and_the_port(shell, magics, hosted, capsys) -> None:
    url, token, pid = hosted.host.url, hosted.host.token, hosted.host.pid
    out, err = run(shell, "%llm_host restart", capsys)
    assert not err and url in out
    assert (hosted.host.url, hosted.host.token) == (url, token) and hosted.host.pid != pid
    answer = requests.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, timeout=60,
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert answer.status_code == 200  # a client holding the old URL and token carries on


def test_help_is_truthful_about_the_tunnel_and_new_features(shell) -> None:
    host_doc = shell.find_line_magic("llm_host").__doc__
    help_text = " ".join(host_doc.split())
    assert "%llm_host start defaults to cloudflared" in help_text and "`llm-magic serve` defaults to none" in help_text
    cell_doc = shell.find_cell_magic("llm").__doc__
    for text in ("{Err[3]}", "%llm fix", "--schema NAME", "--tools F,G", "%llm save PATH", "Colab cannot"):
        assert text in cell_doc
