"""GPU detection and the CUDA build of llama-cpp-python, with a fake nvidia-smi and nvcc on PATH
(no GPU here; this machine's llama-cpp-python is a CPU build, as on a GPU runtime where the
CUDA build was forgotten)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import requests

from llm_magic import ApiHost
from llm_magic.engine.llama_cpp.gpu import install_plan, run_step, wheel_tag

from .test_cli import Serve, run_cli

NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *--query-gpu*) echo "0, Tesla T4, 7.5, 2310, 15360" ;;
  *) echo "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4 |" ;;
esac
"""


@pytest.fixture
def fake_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """nvidia-smi for a Tesla T4 (driver for CUDA 12.4) and nvcc 12.5 first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(NVIDIA_SMI)
    (bin_dir / "nvcc").write_text('#!/bin/sh\necho "Cuda compilation tools, release 12.5, V12.5.82"\n')
    for tool in ("nvidia-smi", "nvcc"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


@pytest.mark.parametrize("toolkit, driver, tag", [
    ("12.5", "12.4", "cu124"),  # the driver is older than the toolkit: it decides
    ("12.8", "12.8", "cu125"),  # newer than any wheel: the newest wheel of that major version
    ("13.1", "13.2", "cu130"),
    ("11.8", "12.4", "cu118"),  # the toolkit's runtime libraries are CUDA 11's
    (None, "12.2", "cu122"),  # no nvcc: the driver's
    ("12.0", "12.0", None),  # older than every CUDA 12 wheel: build from source
    (None, None, None),
])
def test_the_wheel_index_matches_the_runtimes_cuda(toolkit, driver, tag) -> None:
    assert wheel_tag(toolkit, driver) == tag


def test_serve_on_a_gpu_machine_with_a_cpu_build_says_so_in_one_line(fake_gpu: Path) -> None:
    s = Serve("--no-token")
    try:
        warnings = [line for line in s.output.splitlines() if line.startswith("warning:")]
        assert warnings == [
            "warning: this machine has an NVIDIA GPU (Tesla T4), but the installed llama-cpp-python was built "
            "without GPU support, so the model runs on the CPU; fix: llm-magic gpu --install (a prebuilt CUDA "
            "build, about a minute), then start the host again"]
        assert ("  Device:     CPU; layers on the GPU: 0 (CPU only); "
                "92 MiB model + 360 MiB KV cache (4 slots of 4096 tokens)") in s.output
        health = requests.get(s.url + "/health", timeout=10).json()
        assert (health["device"], health["gpu_layers"]) == ("CPU", "0 (CPU only)")
    finally:
        s.stop()
    quiet = Serve("--no-token", "--gpu-layers", "0")  # the CPU was asked for: nothing to warn of
    try:
        assert "warning:" not in quiet.output
    finally:
        quiet.stop()


def test_no_gpu_no_warning_and_the_host_shows_device_layers_and_memory() -> None:
    with ApiHost(port=0, tunnel="none") as host:
        status = host.status()
        block = host.connection_text()
    assert "warning:" not in block and "Device:     CPU" in block
    assert status["device"] == "CPU" and status["gpu_layers"] == "0 (CPU only)"
    assert status["memory"] == "92 MiB model + 360 MiB KV cache (4 slots of 4096 tokens)"


def test_the_notebook_host_passes_the_warning_on(fake_gpu: Path) -> None:
    with ApiHost(port=0, tunnel="none", extra_args=["--parallel", "1"]) as host:
        assert host.warnings and "llm-magic gpu --install" in host.warnings[0]
        block = host.connection_text()
        assert host.status()["memory"] == "92 MiB model + 90 MiB KV cache (1 slot of 4096 tokens)"
    assert "warning: this machine has an NVIDIA GPU (Tesla T4)" in block


def test_gpu_command_shows_what_it_sees_and_plans_a_wheel_then_a_build(fake_gpu: Path) -> None:
    shown = run_cli("gpu")
    assert shown.returncode == 0
    assert "GPU:                Tesla T4 (compute capability 7.5)" in shown.stdout
    assert "CUDA (driver):      12.4" in shown.stdout and "CUDA (toolkit):     12.5" in shown.stdout
    assert "prebuilt wheel:     https://abetlen.github.io/llama-cpp-python/whl/cu124" in shown.stdout
    assert "warning: this machine has an NVIDIA GPU" in shown.stdout
    planned = run_cli("gpu", "--install", "--dry-run").stdout
    wheel, build = [line for line in planned.splitlines() if "pip install" in line]
    assert "--only-binary=llama-cpp-python --index-url https://abetlen.github.io/llama-cpp-python/whl/cu124" in wheel
    assert build.startswith('CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=75"')
    assert "--no-binary=llama-cpp-python" in build and "--no-deps" in build


def test_a_machine_without_a_gpu_is_told_how_to_get_one() -> None:
    result = run_cli("gpu", "--install", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and "error: no NVIDIA GPU here" in result.stderr


def test_a_long_build_reports_its_progress(fake_gpu: Path, tmp_path: Path) -> None:
    step = install_plan()[-1]
    build = ("import time\nfor i in range(1, 4):\n    print(f'[{i}/3] Building CUDA object ggml-cuda/x{i}.cu.o', "
             "flush=True)\n    time.sleep(0.4)\n")
    step = type(step)(step.what, [sys.executable, "-c", build], {}, step.expected)
    said: list[str] = []
    assert run_step(step, tmp_path / "build.log", say=said.append, every=0.1)
    assert said[0].startswith("Installing llama-cpp-python: a source build with CUDA for sm_75")
    assert any(line.endswith("of 3 build steps") for line in said) and said[-1].startswith("  done in")


def test_install_tries_the_wheel_then_the_build_until_llama_cpp_offloads(
        fake_gpu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from llm_magic import cli
    from llm_magic.engine.llama_cpp import gpu

    # what a fresh process imports after the install: a llama_cpp with GPU offload
    fake = tmp_path / "site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '9.9.9+cu124'\n"
                                      "def llama_supports_gpu_offload():\n    return True\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    steps = [gpu.Step("the prebuilt CUDA wheel", [sys.executable, "-c", "raise SystemExit(1)"], {}, "a minute"),
             gpu.Step("a source build", [sys.executable, "-c", "print('[1/1] built')"], {}, "ten minutes")]
    monkeypatch.setattr(gpu, "install_plan", lambda: steps)
    assert cli.main(["gpu", "--install", "--log", str(tmp_path / "install.log")]) == 0
    out = capsys.readouterr().out
    assert "Installing llama-cpp-python: the prebuilt CUDA wheel (a minute)" in out
    assert "that did not give a llama-cpp-python with GPU offload; trying the next way" in out
    assert "Installing llama-cpp-python: a source build (ten minutes)" in out
    assert "llama-cpp-python 9.9.9+cu124 uses the GPU now" in out
