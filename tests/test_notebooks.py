"""The notebooks that need no GPU or network run headless in a real kernel."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def outputs(cell) -> str:
    return "\n".join(str(o.get("data", {}).get("text/plain", "")) + o.get("text", "") for o in cell.outputs)


def test_quickstart_runs_top_to_bottom() -> None:
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()  # raises on any error
    code = [c for c in nb.cells if c.cell_type == "code"]
    by_source = {c.source.splitlines()[0]: c for c in code if c.source}
    assert "Local URL:  http://127.0.0.1:" in outputs(by_source["%llm_host start --tunnel none --port 0"])
    chats = [c for c in code if c.source.startswith("%%llm")]
    assert len(chats) == 5
    for cell in chats:
        answers = [o for o in cell.outputs if o.output_type == "display_data"]
        # one answer display, updated in place while streaming, then the footer
        assert len(answers) == 2, cell.outputs
        assert answers[0]["data"]["text/plain"].strip()
        assert "tokens/s" in answers[1]["data"]["text/plain"]
    assert "the same as _llm: True" in outputs(by_source['print(len(poem), "characters; the same as _llm:", poem == _llm)'])
    assert "state             running" in outputs(by_source["%llm_host status"])
    assert "The host stopped." in outputs(by_source["%llm_host stop"])


def test_superpowers_runs_top_to_bottom() -> None:
    """Cells, errors, fix, code cells, schemas, tools, save/load in a real kernel: what a user sees."""
    nb = nbformat.read(NOTEBOOKS / "superpowers.ipynb", as_version=4)
    next_inputs: dict[int, str] = {}

    def collect(cell, cell_index, execute_reply) -> None:
        for payload in execute_reply["content"].get("payload", []):
            if payload.get("source") == "set_next_input":
                assert payload["replace"] is False  # a new cell, never the user's own
                next_inputs[cell_index] = payload["text"]

    NotebookClient(nb, timeout=180, kernel_name="python3", on_cell_executed=collect).execute()
    cells = {c.source.splitlines()[0]: (i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source}

    _, failing = cells['basket = ["apple", "banana"]']
    assert failing.outputs[0]["ename"] == "KeyError"  # the one cell that fails, on purpose

    index, fix = cells["%llm fix"]
    assert "is in a new cell below, not run yet." in outputs(fix)
    assert next_inputs[index].strip()  # the front end was sent the fixed cell
    index, code = cells["%%llm --new --format code --max-tokens 80"]
    assert "The answer's code is in a new cell below" in outputs(code) and next_inputs[index].strip()

    assert "('City', 'Paris')" in outputs(cells["type(paris).__name__, paris.name"][1])
    tools = outputs(cells["%%llm --new --tools exchange_rate --tool-choice required --max-tokens 80"][1])
    assert "🔧 exchange_rate(currency=" in tools and "ran" in tools
    priced = outputs(cells["%%llm --new --tools exchange_rate --tool-choice required --schema Price "
                           "--max-tokens 60"][1])
    assert "🔧 exchange_rate(currency=" in priced
    assert outputs(cells["_llm"][1]).startswith("Price(currency=")  # tools first, then a validated object
    history = outputs(cells["%llm history"][1])
    assert "→ calls `exchange_rate(" in history and "**tool** (exchange_rate): " in history
    saved = outputs(cells["%llm save {path}"][1])
    assert saved.startswith("Saved ") and "llm-magic-conversation.json" in saved
    count = saved.split()[1]
    assert f"Loaded {count} messages" in outputs(cells["%llm reset"][1])  # the same conversation came back
    assert "Local URL:  http://127.0.0.1:" in outputs(cells["%llm_host restart"][1])
    assert "The host stopped." in outputs(cells["%llm_host stop"][1])


@pytest.mark.parametrize("name", ["quickstart.ipynb", "client.ipynb", "colab_host.ipynb", "superpowers.ipynb"])
def test_notebooks_are_valid_and_stored_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert any("%load_ext llm_magic" in c.source for c in nb.cells)


def test_host_ends_with_the_kernel() -> None:
    import os
    import time

    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[
        new_code_cell("%load_ext llm_magic"),
        new_code_cell("%llm_host start --tunnel none --port 0"),
        new_code_cell("print('PID', get_ipython().magics_manager.registry['LLMMagics'].host.pid)"),
    ])
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()  # shuts the kernel down after
    pid = int(outputs(nb.cells[2]).split()[-1])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail(f"the server (pid {pid}) outlived its kernel")
