"""The tiers' import rules (pyproject.toml's import-linter contracts) hold, and would catch a
planted upward import: the rules are a check, not a promise."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_CLASS_LINES = 250
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]


def lint(package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([*LINT, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=package_parent,
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_package_keeps_every_import_contract() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, planted, contract", [
    ("client/client.py", "from llm_magic.server import app", "The client side never loads the host side"),
    ("notebook/cells.py", "import llama_cpp", "The client side never loads the host side"),
    ("wire/seed.py", "from llm_magic.engine.llama_cpp import engine", "Each tier imports only the tiers below it"),
    ("engine/llama_cpp/decoding.py", "from llm_magic.server import app", "Each tier imports only the tiers below it"),
    ("server/app.py", "from llm_magic.supervisor import host", "The host side never imports the client side"),
])
def test_a_planted_upward_import_breaks_a_contract(tmp_path: Path, module: str, planted: str, contract: str) -> None:
    copy = tmp_path / "llm_magic"
    shutil.copytree(ROOT / "llm_magic", copy, ignore=shutil.ignore_patterns("__pycache__", "web"))
    target = copy / module
    target.write_text(target.read_text() + f"\n{planted}  # planted by the test\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken and module.replace("/", ".").removesuffix(".py") in broken


def _classes() -> list[tuple[int, str]]:
    rows = []
    for path in sorted((ROOT / "llm_magic").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.name}"))
    return rows


def test_no_class_is_past_about_250_lines() -> None:
    too_big = [f"{where} ({lines} lines)" for lines, where in _classes() if lines > MAX_CLASS_LINES]
    assert not too_big, "split these: " + ", ".join(too_big)


def test_every_error_class_is_in_the_one_tree() -> None:
    """Errors a user can meet are ``LLMMagicError``s, defined in errors.py; an exception class
    elsewhere is control flow that never leaves its tier (and says so in this list)."""
    import llm_magic.errors as errors

    control_flow = {"_Stop", "ClientGone"}
    for path in sorted((ROOT / "llm_magic").rglob("*.py")):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    ast.unparse(b).endswith(("Error", "Exception", "Interrupt")) for b in node.bases):
                assert node.name in control_flow, f"{path.relative_to(ROOT)}:{node.name} belongs in errors.py"
    for name in dir(errors):
        value = getattr(errors, name)
        if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == errors.__name__:
            assert issubclass(value, errors.LLMMagicError), name
