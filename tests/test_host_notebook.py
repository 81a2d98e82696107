"""The Colab/Kaggle host notebook, run top to bottom in a real kernel as written, less the cells
tagged ``gpu`` (they need a GPU runtime) and ``install`` (this environment has the package):
its 7B model comes from a local stand-in for the hub (holding the tiny model under that repo's
file name) and its tunnel from the fake cloudflared."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.fakehub import FakeHub
from tests.test_notebooks import outputs
from tests.test_tunnel import FakeCloudflared

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "colab_host.ipynb"
SKIPPED = {"gpu", "install"}


def test_host_notebook_marks_its_gpu_and_install_cells() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = {c.source: set(c.metadata.get("tags", [])) for c in nb.cells if c.cell_type == "code"}
    assert tagged["!nvidia-smi"] == {"gpu"} and tagged["!llm-magic gpu --install"] == {"gpu"}
    installs = [source for source, tags in tagged.items() if "install" in tags]
    assert installs and all(source.startswith("!pip install") for source in installs)
    # anything that installs is tagged, so that the untagged rest runs on a CPU as written
    assert not [s for s, tags in tagged.items() if re.search(r"pip install|--install", s) and not tags & SKIPPED]


@pytest.mark.slow
def test_host_notebook_runs_top_to_bottom_on_a_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    model_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = next(c for c in nb.cells if c.source.startswith("%llm_host start"))
    repo, quant = re.search(r"--model (\S+):(\S+)", start.source).groups()
    nb.cells = [c for c in nb.cells if not set(c.metadata.get("tags", [])) & SKIPPED]
    FakeCloudflared(tmp_path, monkeypatch)  # a proxy on 127.0.0.1 standing in for Cloudflare
    with FakeHub({repo: {f"{repo.split('/')[1].removesuffix('-GGUF')}-{quant}.gguf": model_path}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)  # the kernel, and the server it starts, inherit these
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        NotebookClient(nb, timeout=180, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on any error
    by_source = {c.source.splitlines()[0]: c for c in nb.cells if c.cell_type == "code" and c.source}
    started = outputs(by_source[start.source])
    assert re.search(r"Public URL: http://127\.0\.0\.1:\d+", started)
    assert "Tunnel:     cloudflared (verified; streams)" in started
    assert "Device:     CPU; layers on the GPU: 0 (CPU only)" in started and "--token" in started
    assert f"llm_magic is serving {repo}:{quant}" in started
    assert "state             running" in outputs(by_source["%llm_host status"])
    answer = [o for o in by_source["%%llm --max-tokens 200"].outputs if o.output_type == "display_data"]
    assert answer and answer[0]["data"]["text/plain"].strip()
    assert "POST /v1/chat/completions 200" in outputs(by_source["%llm_host logs -n 20"])
