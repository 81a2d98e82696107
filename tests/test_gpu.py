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
from llm_magic.engine.llama_cpp.cpu import NO_AMX_CMAKE_ARGS, advertises_amx
from llm_magic.engine.llama_cpp.gpu import Gpu, device_name, gpu_memory_text, install_plan, llama_gpus, run_step, \
    visible, wheel_tag
from llm_magic.engine.llama_cpp.placement import GIB, DEFAULT, SplitFlags, choose, kv_bytes_per_cell

from .test_cli import Serve, run_cli

# The GPUs it lists are the lines of gpus.csv beside it (index, name, compute capability, MiB used, total).
NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *--query-gpu*) cat "$(dirname "$0")/gpus.csv" ;;
  *) echo "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4 |" ;;
esac
"""
T4 = "0, Tesla T4, 7.5, 2310, 15360"


@pytest.fixture
def fake_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """nvidia-smi for a Tesla T4 (driver for CUDA 12.4) and nvcc 12.5 first on PATH; write other
    lines into its ``gpus.csv`` for other GPUs (``two_gpus``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(NVIDIA_SMI)
    (bin_dir / "gpus.csv").write_text(T4 + "\n")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
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
    assert "GPU 0:              Tesla T4, compute capability 7.5, memory 2310 of 15360 MiB used" in shown.stdout
    assert "CUDA (driver):      12.4" in shown.stdout and "CUDA (toolkit):     12.5" in shown.stdout
    assert "prebuilt wheel:     https://abetlen.github.io/llama-cpp-python/whl/cu124" in shown.stdout
    assert "warning: this machine has an NVIDIA GPU" in shown.stdout
    planned = run_cli("gpu", "--install", "--dry-run").stdout
    wheel, build = [line for line in planned.splitlines() if "pip install" in line]
    assert "--only-binary=llama-cpp-python --index-url https://abetlen.github.io/llama-cpp-python/whl/cu124" in wheel
    no_amx = f" {NO_AMX_CMAKE_ARGS}" if advertises_amx() else ""  # the CPU side too, on an AMX CPU
    assert build.startswith(f'CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=75{no_amx}"')
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


# ---------------------------------------------------------------------------------------------
# Several GPUs: one when the model fits, all of them when it does not, the owner's flags first

def two_gpus(bin_dir: Path, used0: int, used1: int, total: int = 15360) -> None:
    """The fake nvidia-smi lists two Tesla T4s with ``used0`` and ``used1`` MiB in use."""
    (bin_dir / "gpus.csv").write_text(f"0, Tesla T4, 7.5, {used0}, {total}\n1, Tesla T4, 7.5, {used1}, {total}\n")


T4S = [Gpu(0, "Tesla T4", "7.5", 10240, 15360), Gpu(1, "Tesla T4", "7.5", 1024, 15360)]  # 5 and 14 GiB free


def never() -> int:
    raise AssertionError("the model's size was asked for a choice that does not depend on it")


def test_with_one_gpu_or_none_llama_cpp_keeps_its_defaults() -> None:
    assert choose(SplitFlags(), T4S[:1], never) == DEFAULT
    assert choose(SplitFlags(), [], never) == DEFAULT
    assert DEFAULT.split_mode is None and not DEFAULT.reason  # nothing set, nothing said


def test_a_model_that_fits_one_gpu_goes_on_the_freer_one_alone() -> None:
    placed = choose(SplitFlags(), T4S, lambda: 8 * GIB)
    assert (placed.split_mode, placed.main_gpu, placed.tensor_split, placed.devices) == ("none", 1, None, (1,))
    assert placed.reason.startswith("on CUDA1 alone (split mode none): the model needs about 8.0 GiB")
    assert "CUDA1 has 14.0 GiB free" in placed.reason
    freer_first = choose(SplitFlags(), list(reversed(T4S)), lambda: 8 * GIB)  # llama.cpp's order counts
    assert (freer_first.split_mode, freer_first.main_gpu) == ("none", 0)


def test_a_model_too_big_for_one_gpu_is_split_by_layers_over_both_by_free_memory() -> None:
    placed = choose(SplitFlags(), T4S, lambda: 16 * GIB)
    assert (placed.split_mode, placed.main_gpu, placed.devices) == ("layer", None, (0, 1))
    assert placed.tensor_split == (5120.0, 14336.0)  # MiB free: about a quarter on CUDA0
    assert "more than the freest GPU has (14.0 GiB)" in placed.reason and "may not load" not in placed.reason
    too_big = choose(SplitFlags(), T4S, lambda: 40 * GIB)
    assert too_big.split_mode == "layer"
    assert "it may not load (lower --ctx, --parallel or --gpu-layers)" in too_big.reason


def test_the_owners_flags_win_over_the_automatic_choice() -> None:
    fits = lambda: 1 * GIB  # noqa: E731 - alone it would go on CUDA1
    layered = choose(SplitFlags(split_mode="layer"), T4S, never)
    assert (layered.split_mode, layered.tensor_split) == ("layer", (5120.0, 14336.0))  # the ratio filled in
    assert layered.reason == "split mode layer (as asked), tensor split 5120,14336 (MiB free)"
    on_zero = choose(SplitFlags(main_gpu=0), T4S, fits)
    assert (on_zero.split_mode, on_zero.main_gpu, on_zero.devices) == ("none", 0, (0,))
    given = choose(SplitFlags(tensor_split=(3.0, 1.0)), T4S, fits)
    assert (given.split_mode, given.tensor_split) == ("layer", (3.0, 1.0))
    row = choose(SplitFlags(split_mode="row", main_gpu=0, tensor_split=(1.0, 1.0)), T4S, fits)
    assert (row.split_mode, row.main_gpu, row.tensor_split) == ("row", 0, (1.0, 1.0))
    assert row.reason == "split mode row (as asked), main GPU 0 (as asked), tensor split 1,1 (as asked)"
    none = choose(SplitFlags(split_mode="none"), T4S, never)
    assert (none.main_gpu, none.reason) == (1, "split mode none (as asked), main GPU 1 (the most memory free)")


def test_gpus_are_numbered_as_llama_cpp_sees_them() -> None:
    assert visible(T4S, None) == T4S
    assert visible(T4S, "1") == [T4S[1]]  # nvidia-smi's GPU 1 is llama.cpp's CUDA0
    assert visible(T4S, "1,0") == [T4S[1], T4S[0]]
    assert visible(T4S, "") == [] and visible(T4S, "-1") == []
    assert visible(T4S, "GPU-8f2c61e5-0a1b") is None  # a UUID: which is which is unknown
    assert choose(SplitFlags(), None, never).split_mode is None


def test_the_kv_cache_is_estimated_as_llama_cpp_sizes_it() -> None:
    """The estimate's KV cache is the one the host reports once the model is loaded (SmolLM2:
    30 layers, 3 KV heads of 64: 360 MiB for 4 slots of 4096 tokens)."""
    smollm2 = {"general.architecture": "llama", "llama.block_count": "30", "llama.embedding_length": "576",
               "llama.attention.head_count": "9", "llama.attention.head_count_kv": "3"}
    assert kv_bytes_per_cell(smollm2) * 4 * 4096 == 360 * 2**20
    assert kv_bytes_per_cell({**smollm2, "llama.attention.head_count_kv": "[3, 3, 9]"}) == 30 * 9 * 128 * 2
    assert kv_bytes_per_cell({"general.architecture": "llama"}) is None


def test_the_real_model_goes_on_one_gpu_when_it_fits_and_over_both_when_not(fake_gpu: Path) -> None:
    """``place`` as a load runs it: nvidia-smi asked, the tiny model's size read from its file
    and metadata (92 MiB + 360 MiB KV cache + 96 MiB logits + 1 GiB)."""
    from llm_magic.engine.llama_cpp.loading import HostSettings, ModelKey, model_needs, place
    from llm_magic.models import ModelSpec, resolve_model

    key, settings = ModelKey(resolve_model(ModelSpec.parse(None)), 4096, -1), HostSettings(4096, 2, 4)
    weights, kv, logits = key.path.stat().st_size, 360 * 2**20, 512 * 49152 * 4
    assert model_needs(key.path, 4 * 4096, 512) == weights + kv + logits + GIB
    assert model_needs(key.path, 4 * 4096, 512, gpu_layers=15) == weights * 15 // 31 + kv * 15 // 31 + logits + GIB
    two_gpus(fake_gpu, used0=14000, used1=13000)  # 1.3 and 2.3 GiB free
    placed = place(key, settings)
    assert (placed.split_mode, placed.main_gpu) == ("none", 1) and "needs about 1.5 GiB" in placed.reason
    two_gpus(fake_gpu, used0=14400, used1=14500)  # 0.9 and 0.8 GiB free: too little on either
    assert place(key, settings).tensor_split == (960.0, 860.0)
    cpu = place(ModelKey(key.path, 4096, 0), HostSettings(4096, 2, 4, split=SplitFlags(split_mode="row")))
    assert cpu.split_mode is None and cpu.reason.startswith("on the CPU:")


def test_the_device_and_its_memory_name_the_gpus_the_model_is_on(fake_gpu: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    two_gpus(fake_gpu, used0=2310, used1=120)
    assert device_name(29, (1,)) == "CUDA1 Tesla T4"
    assert device_name(29, (0, 1)) == "CUDA0 Tesla T4 + CUDA1 Tesla T4"
    assert device_name(0, (0, 1)) == "CPU"
    assert gpu_memory_text((1,)) == "GPU memory in use: 120 of 15360 MiB"
    assert gpu_memory_text((0, 1)) == "GPU memory in use: CUDA0 2310 of 15360 MiB, CUDA1 120 of 15360 MiB"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [g.index for g in llama_gpus() or []] == [1] and device_name(29) == "CUDA0 Tesla T4"
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")  # the owner's: CUDA's numbers are then its own
    assert llama_gpus() is None


def test_gpu_command_lists_every_gpu_on_a_line_of_its_own(fake_gpu: Path) -> None:
    two_gpus(fake_gpu, used0=2310, used1=120)
    lines = run_cli("gpu").stdout.splitlines()
    assert lines[:2] == ["GPU 0:              Tesla T4, compute capability 7.5, memory 2310 of 15360 MiB used",
                         "GPU 1:              Tesla T4, compute capability 7.5, memory 120 of 15360 MiB used"]
    assert lines[2] == "CUDA (driver):      12.4"
    hidden = run_cli("gpu", env={"CUDA_VISIBLE_DEVICES": "1"}).stdout.splitlines()
    assert hidden[0].endswith("used (hidden by CUDA_VISIBLE_DEVICES)") and hidden[1].endswith("(llama.cpp's CUDA0)")


@pytest.mark.parametrize("args, message", [
    (["--main-gpu", "2"], "error: '--main-gpu' is 2, but llama.cpp sees 2 GPUs (CUDA0, CUDA1); `llm-magic gpu` "
                          "lists them"),
    (["--tensor-split", "1,1,1"], "error: '--tensor-split' has 3 entries, but llama.cpp sees 2 GPUs (CUDA0, CUDA1)"),
    (["--split-mode", "none", "--tensor-split", "3,1"], "error: '--tensor-split' splits the model over GPUs, but "
                                                       "'--split-mode none' keeps it on one"),
])
def test_split_flags_that_do_not_fit_the_gpus_stop_serve_with_one_line(fake_gpu: Path, args: list[str],
                                                                        message: str) -> None:
    two_gpus(fake_gpu, used0=2310, used1=120)
    result = run_cli("serve", "--port", "0", *args)
    assert result.returncode == 1 and result.stderr.strip().startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_more_proportions_than_llama_cpp_takes_is_a_clear_error() -> None:
    import llama_cpp

    too_many = ",".join(["1"] * (llama_cpp.LLAMA_MAX_DEVICES + 1))
    result = run_cli("serve", "--port", "0", "--tensor-split", too_many, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert (f"error: '--tensor-split' has {llama_cpp.LLAMA_MAX_DEVICES + 1} entries, but llama.cpp takes at most "
            f"{llama_cpp.LLAMA_MAX_DEVICES} GPUs") in result.stderr


def test_llama_cpp_takes_the_split_params_on_this_cpu_build() -> None:
    """The model params as a GPU host sets them, given to the real llama.cpp: it loads."""
    import gc

    from llm_magic.engine.llama_cpp.loading import ModelKey, load_model
    from llm_magic.engine.llama_cpp.placement import Placement
    from llm_magic.models import ModelSpec, resolve_model

    path = resolve_model(ModelSpec.parse(None))
    for placed in (Placement("layer", 0, (1.0, 1.0)), Placement("row", 1, (3.0, 1.0))):
        model = load_model(ModelKey(path, 512, -1), placed)
        try:
            gc.collect()  # the proportions must outlive the call that built them
            params = model.params
            assert (params.split_mode, params.main_gpu) == ({"layer": 1, "row": 2}[placed.split_mode], placed.main_gpu)
            assert list(params.tensor_split[:3]) == [*placed.tensor_split, 0.0]
            assert model.n_vocab() == 49152
        finally:
            model.close()


def test_a_host_with_split_flags_on_the_cpu_still_answers() -> None:
    with ApiHost(use_token=False, port=0, tunnel="none",
                 extra_args=["--split-mode", "layer", "--tensor-split", "1,1", "--main-gpu", "0"]) as host:
        body = requests.post(host.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}).json()
        health = requests.get(host.url + "/health", timeout=10).json()
    assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] <= 4
    assert health["device"] == "CPU"
    assert health["engine"]["placement"] == "on the CPU: --split-mode, --tensor-split and --main-gpu change nothing"
