"""A real IPython shell with llm_magic loaded, and a host started from it (a pytest plugin, so
that every magics test module shares these fixtures)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from llm_magic.notebook.magics import LLMMagics


@pytest.fixture(scope="module")
def shell() -> Iterator[InteractiveShell]:
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "llm_magic")
    yield sh
    magics = sh.magics_manager.registry["LLMMagics"]
    if magics.host is not None:
        magics.host.stop()


@pytest.fixture
def magics(shell: InteractiveShell) -> Iterator[LLMMagics]:
    m = shell.magics_manager.registry["LLMMagics"]
    m.history.clear()
    yield m
    m.history.clear()
    m.max_tokens, m.system = 512, ""


def run(shell: InteractiveShell, cell: str, capsys: pytest.CaptureFixture) -> tuple[str, str]:
    """Run a cell as a user would; return its stdout and the error line it showed, if any."""
    result = shell.run_cell(cell)
    out = capsys.readouterr()
    if result.error_in_exec is not None:
        assert isinstance(result.error_in_exec, UsageError), f"not a clean error: {result.error_in_exec!r}"
        assert "Traceback" not in out.out + out.err
        return out.out, str(result.error_in_exec)
    assert result.success, out
    return out.out, ""


@pytest.fixture(scope="module")
def hosted(shell: InteractiveShell) -> Iterator[LLMMagics]:
    """A host started from the shell with %llm_host start."""
    result = shell.run_cell("%llm_host start --tunnel none --port 0")
    assert result.success
    yield shell.magics_manager.registry["LLMMagics"]
    shell.run_cell("%llm_host stop")
