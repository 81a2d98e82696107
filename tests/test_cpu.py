"""llama.cpp's AMX kernels: where a build's crash at a decode, the host loads weights without
them (engine/llama_cpp/cpu.py)."""

from __future__ import annotations

import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest

from llm_magic.engine.llama_cpp import cpu, loading
from llm_magic.engine.llama_cpp.loading import ModelKey, model_params
from llm_magic.models import embedded_model_path

CPU_FILE = Path(cpu.__file__)


def interpreter(tmp_path: Path, body: str) -> str:
    """A stand-in for Python that ignores its arguments and runs ``body`` (sh)."""
    path = tmp_path / "python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_the_cpu_says_whether_it_has_amx_tiles(tmp_path: Path) -> None:
    with_amx, without = tmp_path / "with", tmp_path / "without"
    with_amx.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    if sys.platform.startswith("linux"):
        assert cpu.advertises_amx(with_amx)
    assert not cpu.advertises_amx(without)
    assert not cpu.advertises_amx(tmp_path / "missing")


def test_a_probe_killed_by_a_signal_means_a_crash_and_one_that_cannot_tell_says_so(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    assert cpu.probe_crashes(model, interpreter(tmp_path, "kill -SEGV $$")) is True
    assert cpu.probe_crashes(model, interpreter(tmp_path, "exit 0")) is False
    assert cpu.probe_crashes(model, interpreter(tmp_path, "exit 3")) is None
    assert cpu.probe_crashes(model, str(tmp_path / "no-such-python")) is None


def test_the_real_probe_decodes_with_this_build() -> None:
    """The child's script runs against the installed llama-cpp-python: on a build without AMX
    its decodes run; with AMX it gives a verdict either way, never 'could not tell'."""
    import llama_cpp

    verdict = cpu.probe_crashes(embedded_model_path())
    if cpu.build_uses_amx(llama_cpp.llama_print_system_info().decode()):
        assert verdict is not None
    else:
        assert verdict is False


def test_the_verdict_is_probed_once_per_build_and_remembered(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cpu, "CACHE", tmp_path / "cache")
    probes = []
    monkeypatch.setattr(cpu, "probe_crashes", lambda model: probes.append(model) or True)
    library = tmp_path / "libggml-cpu.so"
    library.write_bytes(b"one build")
    cpu.extra_buffers_crash.cache_clear()
    try:
        assert cpu.extra_buffers_crash(library, Path("m.gguf")) is True
        cpu.extra_buffers_crash.cache_clear()  # a new process: the file remembers
        assert cpu.extra_buffers_crash(library, Path("m.gguf")) is True
        assert len(probes) == 1
        library.write_bytes(b"another build, rebuilt")  # a new build is probed afresh
        cpu.extra_buffers_crash.cache_clear()
        cpu.extra_buffers_crash(library, Path("m.gguf"))
        assert len(probes) == 2
    finally:
        cpu.extra_buffers_crash.cache_clear()


def test_a_probe_that_cannot_tell_leaves_llama_cpp_its_defaults(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cpu, "CACHE", tmp_path)
    monkeypatch.setattr(cpu, "probe_crashes", lambda model: None)
    library = tmp_path / "lib.so"
    library.write_bytes(b"x")
    cpu.extra_buffers_crash.cache_clear()
    try:
        assert cpu.extra_buffers_crash(library, Path("m.gguf")) is False
        assert not list(tmp_path.glob("amx-probe-*"))  # asked again next time
    finally:
        cpu.extra_buffers_crash.cache_clear()


def fake_llama_cpp(system_info: bytes) -> types.SimpleNamespace:
    import llama_cpp

    return types.SimpleNamespace(llama_model_default_params=llama_cpp.llama_model_default_params,
                                 llama_print_system_info=lambda: system_info, __file__=llama_cpp.__file__)


@pytest.mark.parametrize("system_info, crashes, extra", [
    (b"CPU : AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 |", True, False),  # AMX that crashes: off
    (b"CPU : AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 |", False, True),  # AMX that runs: kept
    (b"CPU : AVX2 = 1 | REPACK = 1 |", True, True),  # no AMX in the build: never probed
])
def test_weights_go_to_plain_buffers_only_where_the_amx_kernels_crash(monkeypatch, caplog, system_info,
                                                                      crashes, extra) -> None:
    asked = []
    monkeypatch.setattr(loading, "extra_buffers_crash", lambda library, model: asked.append(model) or crashes)
    monkeypatch.setattr(loading, "_amx_warned", False)
    key = ModelKey(path=Path("/models/big.gguf"), ctx_length=512, gpu_layers=0)
    params = model_params(fake_llama_cpp(system_info), key)
    assert params.use_extra_bufts is extra
    assert bool(asked) == (b"AMX" in system_info)
    assert asked in ([], [embedded_model_path()])  # the tiny model probes, not the one being loaded
    if not extra:
        assert "AMX kernels crash" in caplog.text and cpu.NO_AMX_FLAGS in caplog.text


def test_scripts_test_builds_without_amx_only_on_a_cpu_that_advertises_it(monkeypatch) -> None:
    here = cpu.NO_AMX_CMAKE_ARGS if cpu.advertises_amx() else ""
    monkeypatch.setattr(cpu, "advertises_amx", lambda: True)
    args = shlex.split(cpu.cmake_args())
    assert args == [f"-DCMAKE_C_FLAGS={cpu.NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={cpu.NO_AMX_FLAGS}"]
    monkeypatch.setattr(cpu, "advertises_amx", lambda: False)
    assert cpu.cmake_args() == ""
    # run as scripts/test runs it: a file, before the package is installed
    out = subprocess.run([sys.executable, str(CPU_FILE), "--cmake-args"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == here
