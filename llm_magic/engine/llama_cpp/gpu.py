"""NVIDIA GPUs and llama-cpp-python's CUDA build: what the machine has, whether the installed
llama-cpp-python can use it, and how to install one that can (``llm-magic gpu``).

Everything here asks ``nvidia-smi`` and ``nvcc`` (with timeouts); it never imports llama_cpp
itself: the engine says whether the library offloads. Nothing here needs a GPU to be tested: a
fake ``nvidia-smi`` on PATH stands in for one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from llm_magic.engine.llama_cpp.cpu import NO_AMX_CMAKE_ARGS, advertises_amx

NVIDIA_PROC = Path("/proc/driver/nvidia")  # present when the NVIDIA kernel driver is loaded
WHEEL_INDEX = "https://abetlen.github.io/llama-cpp-python/whl/{tag}"
# CUDA versions llama-cpp-python publishes prebuilt wheels for (its wheel index, one per version;
# since 2026 the wheels are tagged py3-none, so one wheel serves every CPython 3.x, 3.13 included).
WHEEL_CUDA_VERSIONS = ("11.8", "12.1", "12.2", "12.3", "12.4", "12.5", "13.0", "13.2")
LLAMA_REQUIREMENT = "llama-cpp-python>=0.3.17"  # the engine needs llama_n_ctx_seq (0.3.17)
TIMEOUT = 10.0  # seconds for nvidia-smi or nvcc to answer
FIX = "llm-magic gpu --install"


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_cap: str  # "7.5" for a Tesla T4
    memory_used_mib: int | None = None
    memory_total_mib: int | None = None


def _run(argv: Sequence[str]) -> str | None:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def has_nvidia_gpu() -> bool:
    """Whether this machine has an NVIDIA GPU (its driver, or nvidia-smi)."""
    return NVIDIA_PROC.exists() or shutil.which("nvidia-smi") is not None


def nvidia_gpus() -> list[Gpu]:
    """The GPUs ``nvidia-smi`` lists (none when it is missing or fails)."""
    if shutil.which("nvidia-smi") is None:
        return []
    out = _run(["nvidia-smi", "--query-gpu=index,name,compute_cap,memory.used,memory.total",
                "--format=csv,noheader,nounits"])
    gpus = []
    for line in (out or "").splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5 or not fields[0].isdigit():
            continue
        used, total = (int(f) if f.isdigit() else None for f in fields[3:])
        gpus.append(Gpu(int(fields[0]), fields[1], fields[2], used, total))
    return gpus


def visible(gpus: Sequence[Gpu], cuda_visible_devices: str | None) -> list[Gpu] | None:
    """The GPUs llama.cpp sees, in its order (its CUDA0 first): nvidia-smi's, narrowed and
    reordered by ``CUDA_VISIBLE_DEVICES`` when set (``loading`` has CUDA number them in PCI bus
    order, as nvidia-smi does). None when it names GPUs in a way nvidia-smi's indices cannot
    match (UUIDs, MIG slices): then which GPU is which is unknown."""
    if cuda_visible_devices is None:
        return list(gpus)
    if not cuda_visible_devices.strip():
        return []  # set but empty: CUDA shows no GPU
    by_index = {g.index: g for g in gpus}
    seen: list[Gpu] = []
    for item in (i.strip() for i in cuda_visible_devices.split(",")):
        if not item.lstrip("-").isdigit():
            return None
        if int(item) not in by_index:
            break  # CUDA stops at the first entry that is no GPU: the rest stay hidden
        seen.append(by_index[int(item)])
    return seen


def llama_gpus() -> list[Gpu] | None:
    """The GPUs llama.cpp sees here, in its order (see ``visible``)."""
    return llama_gpus_of(nvidia_gpus())


def llama_gpus_of(gpus: Sequence[Gpu]) -> list[Gpu] | None:
    """``llama_gpus`` for a list already asked of nvidia-smi."""
    if os.environ.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID") != "PCI_BUS_ID":
        return None  # CUDA numbers them fastest first: nvidia-smi's order says nothing of its own
    return visible(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))


def driver_cuda_version() -> str | None:
    """The newest CUDA the driver supports ("CUDA Version: 12.4" in nvidia-smi's header)."""
    if shutil.which("nvidia-smi") is None:
        return None
    match = re.search(r"CUDA Version:\s*(\d+\.\d+)", _run(["nvidia-smi"]) or "")
    return match.group(1) if match else None


def toolkit_cuda_version() -> str | None:
    """The CUDA toolkit installed (``nvcc --version``), whose runtime libraries a wheel uses."""
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.access(p, os.X_OK)), None)
    if nvcc is None:
        return None
    match = re.search(r"release (\d+\.\d+)", _run([nvcc, "--version"]) or "")
    return match.group(1) if match else None


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def wheel_tag(toolkit: str | None, driver: str | None) -> str | None:
    """The wheel index (``cu124``, …) for this CUDA: the newest published version with the
    toolkit's major version (the wheel links its runtime libraries) that neither the toolkit
    nor the driver is older than. None when there is none, or nothing is known."""
    known = [_version(v) for v in (toolkit, driver) if v]
    if not known:
        return None
    major = known[0][0]  # the toolkit's when there is one
    limit = min(known)
    fitting = [v for v in map(_version, WHEEL_CUDA_VERSIONS) if v[0] == major and v <= limit]
    return f"cu{fitting[-1][0]}{fitting[-1][1]}" if fitting else None


def offload_warning(offload_supported: bool | None) -> str | None:
    """One line when the machine has an NVIDIA GPU that the installed llama-cpp-python cannot
    use (built without CUDA), else None."""
    if offload_supported is not False or not has_nvidia_gpu():
        return None
    gpus = nvidia_gpus()
    name = f" ({gpus[0].name})" if gpus else ""
    return (f"this machine has an NVIDIA GPU{name}, but the installed llama-cpp-python was built without GPU "
            f"support, so the model runs on the CPU; fix: {FIX} (a prebuilt CUDA build, about a minute), "
            "then start the host again")


def device_name(offloaded_layers: int, devices: Sequence[int] = ()) -> str:
    """What the model runs on: ``CUDA0 Tesla T4``, ``CUDA0 Tesla T4 + CUDA1 Tesla T4`` (llama.cpp's
    numbers, nvidia-smi's names), ``GPU``, or ``CPU``. ``devices``: the GPUs the model was placed
    on (``placement.Placement.devices``; none given: llama.cpp's first)."""
    if offloaded_layers <= 0:
        return "CPU"
    gpus = llama_gpus() or []
    used = [i for i in devices or (0,) if i < len(gpus)]
    return " + ".join(f"CUDA{i} {gpus[i].name}" for i in used) if used else "GPU"


def gpu_memory_text(devices: Sequence[int] = ()) -> str | None:
    """``GPU memory in use: 6120 of 15360 MiB`` (all processes), when known: of the GPUs the
    model was placed on, each named when there are several (``CUDA0 6120 of 15360 MiB, …``)."""
    gpus = llama_gpus() or []
    used = [(i, gpus[i]) for i in devices or (0,) if i < len(gpus)]
    if not used or any(g.memory_used_mib is None or g.memory_total_mib is None for _, g in used):
        return None
    if len(used) == 1:
        return f"GPU memory in use: {used[0][1].memory_used_mib} of {used[0][1].memory_total_mib} MiB"
    return "GPU memory in use: " + ", ".join(f"CUDA{i} {g.memory_used_mib} of {g.memory_total_mib} MiB" for i, g in used)


# ---------------------------------------------------------------------------------------------
# Installing a llama-cpp-python that uses the GPU


@dataclass(frozen=True)
class Step:
    what: str
    argv: list[str]
    env: dict[str, str]
    expected: str  # how long it takes, as reported on Colab and Kaggle


def install_plan() -> list[Step]:
    """The ways to a CUDA llama-cpp-python here, to try in order: the prebuilt wheel for this
    CUDA (when one is published), then a source build for this GPU's architecture alone."""
    pip = [sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps", "--no-cache-dir"]
    steps = []
    tag = wheel_tag(toolkit_cuda_version(), driver_cuda_version())
    if tag:
        steps.append(Step(f"the prebuilt CUDA wheel from llama-cpp-python's {tag} index",
                          [*pip, "--only-binary=llama-cpp-python", "--index-url", WHEEL_INDEX.format(tag=tag),
                           LLAMA_REQUIREMENT], {}, "about 1-2 minutes"))
    gpus = nvidia_gpus()
    archs = sorted({g.compute_cap.replace(".", "") for g in gpus if g.compute_cap.replace(".", "").isdigit()})
    cmake = "-DGGML_CUDA=on" + (f" -DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}" if archs else "")
    if advertises_amx():  # the CPU side without AMX kernels, which GCC 12 miscompiles (cpu.py)
        cmake += " " + NO_AMX_CMAKE_ARGS
    steps.append(Step(f"a source build with CUDA for {'sm_' + ', sm_'.join(archs) if archs else 'every architecture'}",
                      [*pip, "--no-binary=llama-cpp-python", "--verbose", LLAMA_REQUIREMENT],
                      {"CMAKE_ARGS": cmake, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)},
                      "about 10-20 minutes on 2 cores for one architecture (30+ for all)"))
    return steps


_PROGRESS = re.compile(rb"\[(\d+)/(\d+)\]")  # ninja's and make's "[12/345] Building CUDA object …"


def run_step(step: Step, log_path: Path, say: Callable[[str], None] = print, every: float = 30.0) -> bool:
    """Run one install step, its output into ``log_path``; say how far it is every ``every`` s
    (a CUDA build prints thousands of lines, too many for a notebook cell)."""
    say(f"Installing llama-cpp-python: {step.what} ({step.expected}); log: {log_path}")
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(step.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **step.env})
        stop = threading.Event()

        def report() -> None:
            while not stop.wait(every):
                done = _PROGRESS.findall(log_path.read_bytes()[-65536:])
                where = f", {int(done[-1][0])} of {int(done[-1][1])} build steps" if done else ""
                say(f"  ... still working: {(time.monotonic() - started) / 60:.0f} min{where}")

        reporter = threading.Thread(target=report, daemon=True)
        reporter.start()
        try:
            code = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            stop.set()
            reporter.join(5)
    minutes = (time.monotonic() - started) / 60
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
    say(f"  done in {minutes:.1f} min" if code == 0 else f"  failed after {minutes:.1f} min: {tail[0][-300:]}")
    return code == 0


def describe(offload_supported: bool | None, llama_version: str | None) -> str:
    """What ``llm-magic gpu`` sees, one fact per line: each GPU on a line of its own."""
    gpus = nvidia_gpus()
    driver, toolkit = driver_cuda_version(), toolkit_cuda_version()
    lines = [_gpu_line(g, gpus) for g in gpus] or [
        f"GPU:                {'an NVIDIA driver, but nvidia-smi lists none' if has_nvidia_gpu() else 'none'}"]
    lines += [f"CUDA (driver):      {driver or 'unknown'}",
              f"CUDA (toolkit):     {toolkit or 'no nvcc found'}",
              f"llama-cpp-python:   {llama_version or 'not installed'}"
              + ("" if offload_supported is None else (", with GPU offload" if offload_supported else ", CPU only"))]
    tag = wheel_tag(toolkit, driver)
    if gpus or has_nvidia_gpu():
        lines.append(f"prebuilt wheel:     {WHEEL_INDEX.format(tag=tag) if tag else 'none for this CUDA'}")
    return "\n".join(lines)


def _gpu_line(gpu: Gpu, gpus: Sequence[Gpu]) -> str:
    """``GPU 0:  Tesla T4, compute capability 7.5, memory 2310 of 15360 MiB used``, and which
    CUDA number llama.cpp gives it when that differs (or that it does not see it)."""
    memory = (f"memory {gpu.memory_used_mib} of {gpu.memory_total_mib} MiB used"
              if gpu.memory_used_mib is not None and gpu.memory_total_mib is not None else "memory unknown")
    seen = llama_gpus_of(gpus)
    where = "" if seen is None or seen == list(gpus) else (
        f" (llama.cpp's CUDA{seen.index(gpu)})" if gpu in seen else " (hidden by CUDA_VISIBLE_DEVICES)")
    return f"{f'GPU {gpu.index}:':<20}{gpu.name}, compute capability {gpu.compute_cap}, {memory}{where}"

