"""llama.cpp's own C++ server (``llama-server``), built for the benchmark from the llama.cpp
source vendored in the installed llama-cpp-python release, so that both run the same llama.cpp.

    python benchmarks/llama_server.py      # build (or find) it and print its path

The source comes from that release's sdist on PyPI (``pip download``, the registry being the one
place this machine may fetch from); the build is cached under ``~/.cache/llm_magic/`` and takes
about 5 minutes on 2 cores the first time. Needs cmake and a C++ compiler, as building
llama-cpp-python itself does.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from llm_magic.engine.llama_cpp.cpu import cmake_args

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm_magic"


def llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def build(version: str | None = None, quiet: bool = False) -> Path:
    """The path of a ``llama-server`` binary built from llama-cpp-python ``version``'s llama.cpp."""
    version = version or llama_cpp_version()
    no_amx = shlex.split(cmake_args())  # as scripts/test builds llama-cpp-python here (cpu.py)
    binary = CACHE / f"llama-server-{version}{'-no-amx' if no_amx else ''}" / "llama-server"
    if binary.exists():
        return binary
    out = subprocess.DEVNULL if quiet else None
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(work)], check=True, stdout=out, timeout=600)
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if "/vendor/llama.cpp/" in m.name]
            archive.extractall(work, members=members, filter="data")
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build_dir = work / "build"
        subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                        "-DBUILD_SHARED_LIBS=OFF", *no_amx], check=True, stdout=out, timeout=600)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                       check=True, stdout=out, timeout=3600)
        built = next(build_dir.glob("**/bin/llama-server"))
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, binary)
    return binary


if __name__ == "__main__":
    print(build())
