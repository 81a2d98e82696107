from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests

from llm_magic.supervisor.host import ApiHost
from llm_magic.models import embedded_model_path

from .fakehub import FakeHub

pytest_plugins = ["tests.shell_fixtures"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """``closing(client)`` returns the client and closes it when the test ends, however it ends:
    an SDK client left to the garbage collector leaves its keep-alive socket open."""
    opened: list[Any] = []

    def register(thing: Any) -> Any:
        opened.append(thing)
        return thing

    yield register
    for thing in opened:
        thing.close()


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test sees the developer's tokens, URLs or Hugging Face cache."""
    for name in list(os.environ):
        if name.startswith("LLM_MAGIC_") or name in ("HF_TOKEN", "HF_ENDPOINT"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def model_path() -> Path:
    return embedded_model_path()


@pytest.fixture(scope="session")
def host() -> Iterator[ApiHost]:
    """A real server process with a token, on the embedded model."""
    h = ApiHost(port=0, token="test-token-" + "x" * 20).start()
    yield h
    h.stop()


@pytest.fixture(scope="session")
def open_host() -> Iterator[ApiHost]:
    """A real server process without a token."""
    h = ApiHost(use_token=False, port=0).start()
    yield h
    h.stop()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_path: Path) -> Iterator[FakeHub]:
    """A local hub holding real GGUF files; huggingface_hub in this process and in child
    processes is pointed at it, with an empty cache."""
    import huggingface_hub.constants as constants

    gguf = model_path
    repos = {
        "test-org/SmolLM2-GGUF": {
            "SmolLM2.Q4_1.gguf": gguf,
            "SmolLM2.Q8_0.gguf": gguf,
            "mmproj-SmolLM2.Q4_1.gguf": b"GGUF-projector",
            "README.md": b"# a model card",
        },
        "test-org/split-GGUF": {
            "big-Q4_K_M-00001-of-00002.gguf": b"GGUF" + b"\0" * 64,
            "big-Q4_K_M-00002-of-00002.gguf": b"GGUF" + b"\1" * 64,
        },
        "test-org/not-gguf": {"model.bin": b"PK\3\4 not a gguf", "fake.gguf": b"PK\3\4 not a gguf"},
        "test-org/empty": {"README.md": b"nothing here"},
    }
    cache = tmp_path / "hub-cache"
    with FakeHub(repos) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}")
        yield fake


@pytest.fixture
def model_copy(tmp_path: Path, model_path: Path) -> Path:
    """The embedded model under another path: a second, distinct local model."""
    return Path(shutil.copy(model_path, tmp_path / "copy.Q4_1.gguf"))


@pytest.fixture
def fresh_magics():
    """A new LLMMagics registered on IPython's shell for one test; the instance registered
    before is put back afterwards, and the new one's host is stopped."""
    from IPython.core.interactiveshell import InteractiveShell

    from llm_magic.notebook.magics import LLMMagics

    shell = InteractiveShell.instance()
    before = shell.magics_manager.registry.get("LLMMagics")
    magics = LLMMagics(shell=shell)
    shell.register_magics(magics)
    yield shell, magics
    if magics.host is not None:
        magics.host.stop()
    if before is not None:
        shell.register_magics(before)


@pytest.fixture(scope="module")
def llama_cpp_server(model_path: Path) -> Iterator[str]:
    """llama-cpp-python's own OpenAI-compatible server on the same model, named ``smollm2``."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model_path),
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                             "--model_alias", "smollm2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/v1/models", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        else:
            pytest.fail("llama_cpp.server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
