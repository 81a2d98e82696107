"""The package as it ships: ``python -m build`` makes a wheel and an sdist that ``twine check``
accepts, holding the chat page's files and licences; the wheel installs into a fresh virtual
environment with the base dependencies only and works there (import, ``%load_ext``, the
command, the web assets) — without llama-cpp-python, so nothing is compiled."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
WEB_FILES = ["index.html", "app.js", "app.css", "favicon.ico", "vendor/marked.umd.js", "vendor/purify.min.js",
             "vendor/highlight.min.js", "vendor/hljs-light.min.css", "vendor/hljs-dark.min.css",
             "vendor/LICENSE.marked", "vendor/LICENSE.dompurify", "vendor/LICENSE.highlight.js", "vendor/README.md"]
BUILD_OUTPUTS = (".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache",
                 ".import_linter_cache", ".venv*", "node_modules")

SMOKE = r"""
import importlib.resources, subprocess, sys
from pathlib import Path

import llm_magic
assert Path(llm_magic.__file__).is_relative_to(Path(sys.prefix)), llm_magic.__file__  # this venv's copy
web = importlib.resources.files("llm_magic.server") / "web"
missing = [name for name in sys.argv[1:] if not (web / name).is_file()]
assert not missing, missing

from IPython.core.interactiveshell import InteractiveShell
from IPython.core.error import UsageError

shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "llm_magic")
assert "llm" in shell.magics_manager.magics["cell"] and "llm_host" in shell.magics_manager.magics["line"]
try:
    shell.run_line_magic("llm", "status")
except UsageError as exc:  # one line that says what to do
    assert "not connected" in str(exc), exc
else:
    raise AssertionError("%llm status without a host should say it is not connected")
assert not {"flask", "llama_cpp"} & set(sys.modules)
print("smoke test passed", llm_magic.__version__)
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # Built from a copy without build outputs: a stale build/ folder in a working tree would
    # otherwise slip modules that no longer exist into the wheel and hide a missing one.
    tree = tmp_path_factory.mktemp("tree") / "src"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*BUILD_OUTPUTS))
    built = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(tree)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


@pytest.mark.slow
def test_wheel_and_sdist_hold_everything_and_pass_twine(dist: Path) -> None:
    wheel, = dist.glob("llm_magic-*.whl")
    sdist, = dist.glob("llm_magic-*.tar.gz")
    checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    wheel_files = set(zipfile.ZipFile(wheel).namelist())
    assert {f"llm_magic/server/web/{name}" for name in WEB_FILES} <= wheel_files
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in wheel_files)
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "llm_magic").rglob("*.py")}
    assert modules == {name for name in wheel_files if name.endswith(".py")}  # every module, nothing stale
    assert not any(name.startswith(("tests/", "notebooks/")) for name in wheel_files)
    top = sdist.name.removesuffix(".tar.gz")
    sdist_files = {name.removeprefix(top + "/") for name in tarfile.open(sdist).getnames()}
    assert {f"llm_magic/server/web/{name}" for name in WEB_FILES} <= sdist_files
    assert {"LICENSE", "README.md", "docs/architecture.md", "notebooks/colab_host.ipynb", "tests/fake_cloudflared.py",
            "scripts/test"} <= sdist_files


def _runs(python: str) -> bool:  # a pyenv shim for a version not selected fails
    try:
        return subprocess.run([python, "-c", "import venv, ensurepip"], capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


def interpreters() -> list[str]:
    """This Python, and each other CPython from 3.10 to 3.13 on the machine (PATH or pyenv)."""
    import glob
    import shutil

    found = {f"{sys.version_info.major}.{sys.version_info.minor}": sys.executable}
    for minor in range(10, 14):
        version = f"3.{minor}"
        candidates = [*sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}"))),
                      shutil.which(f"python{version}")]
        found.setdefault(version, next((c for c in candidates if c and _runs(c)), None))
    return [found[v] for v in sorted(found) if found[v]]


@pytest.mark.slow
@pytest.mark.parametrize("python", interpreters(), ids=lambda p: Path(p).name)
def test_the_wheel_installs_into_a_fresh_venv_and_works(dist: Path, tmp_path: Path, python: str) -> None:
    wheel, = dist.glob("llm_magic-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    python, command = venv / "bin" / "python", venv / "bin" / "llm-magic"
    # the base install, as `pip install llm_magic` gives it: requests and IPython, no llama-cpp-python
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    smoke = subprocess.run([str(python), "-c", SMOKE, *WEB_FILES], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path)
    assert smoke.returncode == 0 and "smoke test passed" in smoke.stdout, smoke.stdout + smoke.stderr
    helped = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "serve" in helped.stdout and "gpu" in helped.stdout
    served = subprocess.run([str(command), "serve", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert served.returncode == 1 and "serving needs the host extra" in served.stderr
    assert "Traceback" not in served.stderr


SOURCE = "git+https://github.com/OWNER/llm_magic"  # the one placeholder the maintainer fills


def install_lines() -> list[tuple[str, str]]:
    import nbformat

    texts = [("README.md", (ROOT / "README.md").read_text())]
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        texts += [(path.name, cell.source) for cell in nbformat.read(path, as_version=4).cells]
    return [(name, line) for name, text in texts for line in text.splitlines()
            if "pip install" in line and "llm_magic" in line]


def test_every_install_line_names_the_repository_or_a_clone() -> None:
    lines = install_lines()
    assert {name for name, _ in lines} >= {"README.md", "quickstart.ipynb", "client.ipynb", "colab_host.ipynb",
                                         "superpowers.ipynb"}
    for name, line in lines:
        from_repo = f"llm_magic @ {SOURCE}" in line or f"llm_magic[host] @ {SOURCE}" in line \
            or f"llm_magic[host,tiny] @ {SOURCE}" in line
        from_clone = any(f'pip install {where}' in line for where in ('"./llm_magic', '".[', '-e "'))
        assert from_repo or from_clone, f"{name}: {line}"
