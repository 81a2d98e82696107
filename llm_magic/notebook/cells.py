"""The notebook's own cells as prompt material: ``{In[n]}``, ``{Out[n]}``, ``{Err[n]}`` and
``{Err}`` in a ``%%llm`` body, and the last failing cell for ``%llm fix``.

IPython keeps every cell's source (``In``) and result (``Out``) but not the traceback a cell
showed, so ``CellErrors`` records it from the ``post_run_cell`` event, as plain text.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from typing import Any

from llm_magic.errors import CellNotFound

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PLACEHOLDER = re.compile(
    r"\{\{|\}\}"
    r"|\{(?P<cell>In|Out|Err)\[(?P<n>-?\d+)\]\}"
    r"|\{(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\}")
ERRORS_KEPT = 100  # tracebacks of the latest failing cells; older ones are dropped
# Cells whose own failure is not worth asking about: our magics' usage errors.
_OWN_MAGICS = re.compile(r"^\s*%%?llm(_host)?\b")


@dataclass(frozen=True)
class CellError:
    """A cell that raised: its number, its source, and the traceback as the user saw it."""

    number: int
    source: str
    traceback: str


class CellErrors:
    """Keeps the traceback text of failing cells, by execution count."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.by_cell: dict[int, CellError] = {}

    def register(self) -> None:
        self.shell.events.register("post_run_cell", self.record)

    def unregister(self) -> None:
        try:
            self.shell.events.unregister("post_run_cell", self.record)
        except ValueError:  # never registered
            pass

    def record(self, result: Any) -> None:
        error = result.error_in_exec or result.error_before_exec
        source = getattr(result.info, "raw_cell", "") or ""
        if error is None or result.execution_count is None or _OWN_MAGICS.match(source):
            return
        self.by_cell[result.execution_count] = CellError(result.execution_count, source, self._text(error))
        while len(self.by_cell) > ERRORS_KEPT:
            del self.by_cell[min(self.by_cell)]

    def _text(self, error: BaseException) -> str:
        # For a syntax error, IPython's own compiler frames would come first: show what the user saw.
        syntax = isinstance(error, SyntaxError)
        tb = self.shell.SyntaxTB if syntax else self.shell.InteractiveTB
        try:
            text = tb.stb2text(tb.structured_traceback(type(error), error, None if syntax else error.__traceback__))
        except Exception:  # noqa: BLE001 — IPython's formatter failing must not lose the error itself
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        return _ANSI.sub("", text).strip("\n")

    def last(self) -> CellError | None:
        return self.by_cell[max(self.by_cell)] if self.by_cell else None


def current_cell(shell: Any) -> int:
    """The number of the cell that runs now, as ``In`` and ``Out`` count it.

    ``shell.execution_count`` cannot say: while a stored cell runs (a kernel's execute_request,
    ``run_cell(store_history=True)``), IPython 8 has it at this cell's number and IPython 9 at
    the next one (it counts up before the cell runs, not after). The running cell's own
    ``ExecutionResult`` (``displayhook.exec_result``) has its number in both. A cell that is not
    stored (``run_cell`` by default) has none, and counts from the next number: ``-1`` is then
    the last stored cell, in both versions."""
    result = getattr(getattr(shell, "displayhook", None), "exec_result", None)
    info = getattr(result, "info", None)
    if result is not None and result.execution_count is not None and getattr(info, "store_history", False):
        return result.execution_count
    return shell.execution_count


def _cell_number(shell: Any, text: str) -> int:
    """``-1`` is the cell before the one that runs, as in ``In[-1]`` (well, ``_i``)."""
    n = int(text)
    return current_cell(shell) + n if n < 0 else n


def cell_part(shell: Any, errors: CellErrors, part: str, number: int) -> str:
    """The text of ``In[number]``, ``Out[number]`` or ``Err[number]``; ``CellNotFound`` says
    what is missing."""
    inputs = shell.history_manager.input_hist_raw
    if not 0 < number < len(inputs):
        last = len(inputs) - 1
        raise CellNotFound(f"{{{part}[{number}]}}: there is no cell {number} (cells run so far: 1 to {last})")
    if part == "In":
        return inputs[number]
    if part == "Out":
        outputs = shell.user_ns.get("Out", {})
        if number not in outputs:
            raise CellNotFound(f"{{Out[{number}]}}: cell {number} has no result (its last line is not an expression)")
        data, _ = shell.display_formatter.format(outputs[number])
        return data.get("text/plain", repr(outputs[number]))
    if number not in errors.by_cell:
        raise CellNotFound(f"{{Err[{number}]}}: cell {number} raised no error")
    return errors.by_cell[number].traceback


def interpolate(text: str, namespace: dict[str, Any], shell: Any = None, errors: CellErrors | None = None) -> str:
    """Replace ``{name}`` (or ``{obj.attr}``) with its value from ``namespace``, in one pass:
    ``{{``/``}}`` give literal braces, and braces inside a value are never expanded again.
    A ``{name}`` that is not defined stays as it is (the text may be code).

    With a shell, ``{In[n]}``, ``{Out[n]}`` and ``{Err[n]}`` give the source, result and
    traceback of cell ``n`` (negative: counted back from this cell), and ``{Err}`` the last
    error, unless the notebook defines a variable ``Err``."""

    def replace(match: re.Match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        if match.group("cell"):
            if shell is None or errors is None:
                return token
            return cell_part(shell, errors, match.group("cell"), _cell_number(shell, match.group("n")))
        head, *attrs = match.group("name").split(".")
        if head == "Err" and not attrs and head not in namespace and errors is not None:
            last = errors.last()
            if last is None:
                raise CellNotFound("{Err}: no cell has raised an error yet")
            return last.traceback
        if head not in namespace:
            return token
        value = namespace[head]
        try:
            for attr in attrs:
                value = getattr(value, attr)
        except AttributeError:
            return token
        return str(value)

    return _PLACEHOLDER.sub(replace, text)
