"""The package declares Python 3.10 to 3.13: the code uses nothing newer than 3.10 (vermin reads
its syntax and standard-library use) and nothing that 3.12 or 3.13 removed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SOURCES = [ROOT / "llm_magic", ROOT / "tests", ROOT / "benchmarks"]
MINIMUM = "3.10"

# PEP 594's dead batteries and the other removals of 3.12 and 3.13 (What's New in each).
REMOVED_MODULES = {
    "asynchat", "asyncore", "distutils", "imp", "smtpd",  # 3.12
    "aifc", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "lib2to3", "mailcap", "msilib", "nis",
    "nntplib", "ossaudiodev", "pipes", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib",  # 3.13
}
REMOVED_NAMES = {  # (module, name) removed in 3.12 or 3.13
    ("configparser", "SafeConfigParser"), ("configparser", "readfp"), ("ssl", "wrap_socket"),
    ("ssl", "match_hostname"), ("unittest", "makeSuite"), ("unittest", "findTestCases"),
    ("unittest", "getTestCaseNames"), ("pkgutil", "ImpImporter"), ("pkgutil", "ImpLoader"),
    ("locale", "resetlocale"), ("typing", "io"), ("typing", "re"), ("gzip", "GzipFile.filename"),
    ("importlib.resources", "path"), ("importlib.resources", "open_text"),  # deprecated, gone in 3.13's plan
}


def python_files() -> list[Path]:
    return sorted(p for folder in SOURCES for p in folder.rglob("*.py"))


def vermin(*paths: Path) -> subprocess.CompletedProcess:
    run_vermin = "import sys; from vermin.main import main; sys.exit(main())"  # it has no __main__
    return subprocess.run([sys.executable, "-c", run_vermin, f"--target={MINIMUM}-", "--violations", "--no-tips",
                           "--eval-annotations", "--backport", "typing_extensions", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


def test_nothing_newer_than_the_minimum_python(tmp_path: Path) -> None:
    result = vermin(*SOURCES)
    assert result.returncode == 0, result.stdout + result.stderr
    # the check itself can fail: 3.11's tomllib and except* are caught
    (tmp_path / "newer.py").write_text("import tomllib\ntry:\n    pass\nexcept* ValueError:\n    pass\n")
    result = vermin(tmp_path / "newer.py")
    assert result.returncode != 0 and "tomllib" in result.stdout


def used_names(tree: ast.AST) -> set[tuple[str, str]]:
    """(module, name) for ``import m``/``from m import n``/``m.n`` in one file."""
    aliases: dict[str, str] = {}
    found: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add((alias.name, ""))
                top = alias.name.split(".")[0]
                aliases[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add((node.module, ""))
            found.update((node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            found.add((aliases[node.value.id], node.attr))
    return found


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_that_python_3_12_or_3_13_removed(path: Path) -> None:
    used = used_names(ast.parse(path.read_text(), str(path)))
    modules = {module.split(".")[0] for module, _ in used}
    assert not modules & REMOVED_MODULES
    assert not used & REMOVED_NAMES


def test_the_scan_sees_what_it_looks_for() -> None:
    tree = ast.parse("import imp\nimport ssl as s\nfrom configparser import SafeConfigParser\ns.wrap_socket(x)\n")
    used = used_names(tree)
    assert ("imp", "") in used and ("ssl", "wrap_socket") in used and ("configparser", "SafeConfigParser") in used
