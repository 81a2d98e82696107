"""The notebooks that need no GPU or network run headless in a real kernel."""

from __future__ import annotations

import os
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


# A Python with another IPython (9.x, say) to run a second kernel with; read here, before the
# tests' own environment (conftest.isolated_env) leaves out every LLM_MAGIC_ variable.
OTHER_KERNEL_PYTHON = os.environ.get("LLM_MAGIC_KERNEL_PYTHON")


@pytest.mark.parametrize("kernel", ["python3", "other"] if OTHER_KERNEL_PYTHON else ["python3"])
def test_relative_cell_references_in_a_kernel_count_from_the_cell_that_runs(kernel, host, tmp_path,
                                                                            monkeypatch) -> None:
    """A kernel stores every cell (execute_request), and IPython 9 counts a stored cell up before
    it runs: ``{In[-1]}``/``{Out[-1]}`` must still be the cell before, not the cell itself.
    With $LLM_MAGIC_KERNEL_PYTHON set, also in a kernel of that Python."""
    import json

    from nbformat.v4 import new_code_cell, new_notebook

    if kernel == "other":
        spec = tmp_path / "kernels" / "other"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({"argv": [OTHER_KERNEL_PYTHON, "-m", "ipykernel_launcher", "-f",
                                                               "{connection_file}"],
                                                      "display_name": "other", "language": "python"}))
        monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    nb = new_notebook(cells=[
        new_code_cell("%load_ext llm_magic"),
        new_code_cell(f"%llm connect {host.url} --token {host.token}"),
        new_code_cell("import IPython\nside = 6\nside * 7"),
        new_code_cell("%%llm --max-tokens 2\n{In[-1]} gave {Out[-1]}"),
        new_code_cell("print(IPython.__version__)\n"
                      "print(get_ipython().magics_manager.registry['LLMMagics'].history[-2]['content'])"),
    ])
    NotebookClient(nb, timeout=120, kernel_name=kernel).execute()  # raises on any error
    version, *sent = outputs(nb.cells[4]).splitlines()
    assert sent == ["import IPython", "side = 6", "side * 7 gave 42"], (version, sent)
