"""Whether llama.cpp's AMX kernels, where this build has them, run here without crashing.

llama.cpp built on a CPU with Intel AMX (``-march=native``) moves the weights of most quantized
types into AMX buffers. Built with GCC 12, as Debian 12 and many notebook images have it, its
tile set-up is miscompiled: the stores that fill the tile configuration are dropped before
``ldtilecfg`` reads it, and the process dies at its first decode (SIGSEGV; llama.cpp issue
20824, also seen on cloud CI runners; found here with ``objdump`` on llama-server). Whatever
the cause, what matters is whether *this* build's AMX path survives a decode, so the probe
runs one in a child process, which is all that dies: a tiny model with llama.cpp's defaults,
a batch big enough for the tile kernels and a single token. Where it dies, the host loads
weights without llama.cpp's extra buffer types (``loading.py``): AMX and repacked weights
off, plain CPU buffers on. The verdict is kept per build in ``~/.cache/llm_magic``.

``scripts/test`` and ``benchmarks/llama_server.py`` build llama.cpp without AMX on CPUs that
advertise it (``cmake_args``), so that every llama.cpp in the suite runs, llama-cpp-python's
own server included. Standard library only (llama_cpp lazily): ``scripts/test`` runs this file
before anything is installed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

# Compiler flags that leave AMX out of a -march=native build of llama.cpp (GCC and Clang take
# an explicit -mno-X over what -march implies, wherever it stands).
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
NO_AMX_CMAKE_ARGS = f"-DCMAKE_C_FLAGS='{NO_AMX_FLAGS}' -DCMAKE_CXX_FLAGS='{NO_AMX_FLAGS}'"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm_magic"
PROBE_SECONDS = 120

# In a child: load the model at argv[1] on the CPU with llama.cpp's default buffers (extra
# buffer types on) and decode 64 prompt tokens, then one: exit 0 if both decodes ran.
_PROBE = r"""
import sys, llama_cpp as lib
lib.llama_backend_init()
model_params = lib.llama_model_default_params()
model_params.n_gpu_layers = 0  # the CPU's kernels are the question
model = lib.llama_model_load_from_file(sys.argv[1].encode(), model_params)
if not model:
    sys.exit(3)
params = lib.llama_context_default_params()
params.n_ctx, params.n_batch, params.n_ubatch, params.n_threads, params.n_threads_batch = 256, 64, 64, 2, 2
ctx = lib.llama_init_from_model(model, params)
if not ctx:
    sys.exit(3)
for n in (64, 1):
    tokens = (lib.llama_token * n)(*[1] * n)  # held: the batch only points at it
    batch = lib.llama_batch_get_one(tokens, n)
    if lib.llama_decode(ctx, batch) != 0:
        sys.exit(3)
    lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
sys.exit(0)
"""


def advertises_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU says it has AMX tiles (Linux on x86-64 only; False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and " amx_tile" in line for line in text.splitlines())


def build_uses_amx(system_info: str) -> bool:
    """Whether a llama.cpp build computes with AMX, from its ``llama_print_system_info()``."""
    return "AMX_INT8 = 1" in system_info


def probe_crashes(model: Path, python: str = sys.executable) -> bool | None:
    """Whether a decode with llama.cpp's default buffers kills a process with ``model`` loaded:
    True (killed by a signal), False (it ran), None (it could not tell: no model, no memory...)."""
    try:
        child = subprocess.run([python, "-c", _PROBE, str(model)], capture_output=True, timeout=PROBE_SECONDS)
    except (OSError, subprocess.SubprocessError):
        return None
    if child.returncode < 0:
        return True
    return False if child.returncode == 0 else None


def _build_id(library: Path) -> str:
    """A name for one llama.cpp build: its library's path, size and time."""
    stat = library.stat()
    return hashlib.sha256(f"{library.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


@functools.cache
def extra_buffers_crash(library: Path, model: Path) -> bool:
    """Whether the build whose library is ``library`` dies at a decode with its extra buffer
    types (its AMX kernels), probed once with ``model`` and then remembered per build."""
    verdict_file = CACHE / f"amx-probe-{_build_id(library)}.json"
    try:
        return bool(json.loads(verdict_file.read_text())["crashes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    crashes = probe_crashes(model)
    if crashes is None:
        return False  # it could not tell: llama.cpp's defaults stand
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        verdict_file.write_text(json.dumps({"crashes": crashes, "library": str(library)}))
    except OSError:
        pass  # probed again next time
    return crashes


def cmake_args() -> str:
    """CMAKE_ARGS that build llama.cpp without AMX on a CPU that advertises it, else ''."""
    return NO_AMX_CMAKE_ARGS if advertises_amx() else ""


def installed_build_uses_amx() -> bool:
    """Whether the installed llama-cpp-python's llama.cpp computes with AMX (False: none installed)."""
    try:
        import llama_cpp
    except ImportError:
        return False
    return build_uses_amx(llama_cpp.llama_print_system_info().decode(errors="replace"))


if __name__ == "__main__":
    if sys.argv[1:] == ["--cmake-args"]:
        print(cmake_args())
    elif sys.argv[1:] == ["--installed-uses-amx"]:  # exit status 0: yes
        sys.exit(0 if installed_build_uses_amx() else 1)
    else:
        print("usage: python cpu.py --cmake-args | --installed-uses-amx", file=sys.stderr)
        sys.exit(2)
