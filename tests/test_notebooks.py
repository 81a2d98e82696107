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


@pytest.mark.parametrize("name", ["quickstart.ipynb", "client.ipynb", "colab_host.ipynb"])
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
