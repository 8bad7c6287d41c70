"""Kernels compiled for the machine they run on: C++ next to this file (`csrc/`), built at first use with the
compiler torch's extension loader finds (`torch.utils.cpp_extension.load`, `-O3 -march=native`), kept in
`$LLAMA_DIST_NATIVE_CACHE` (default `${LLAMA_DIST_CACHE:-~/.cache/llama_dist}/native`)`/<hash of source, torch,
CPU>/` so that the next start only loads the library, and registered as `torch.ops.llama_dist.*`.

    int8_rows_available()      # builds or loads once per process; False where it cannot (no compiler, ...)
    torch.ops.llama_dist.int8_rows(x, qweight, scale)

Only the measured kernel choice (`kernel_choice`) offers them as candidates, and keeps them only where they win:
the static rule and CUDA never need a compiler. LLAMA_DIST_NATIVE_KERNELS=0 turns them off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from llama_dist.config import cache_dir
from llama_dist.dist.groups import print0

SOURCES = Path(__file__).parent / "csrc"
ENABLE_ENV = "LLAMA_DIST_NATIVE_KERNELS"
DIR_ENV = "LLAMA_DIST_NATIVE_CACHE"
_LIBRARY_NAME = "llama_dist_int8_rows"


@functools.cache
def cpu_info() -> dict[str, str]:
    """The fields of the first CPU in /proc/cpuinfo ("model name", "flags", ...); {} where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n", 1)[0]
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}


def _cpu_identity() -> str:
    """The CPU's model and feature flags (what -march=native compiles for), else what platform knows of it."""
    info = cpu_info()
    fields = [f"{key}: {info[key]}" for key in ("model name", "flags", "Features", "CPU part") if key in info]
    return "\n".join(fields) or platform.processor() or platform.machine()


def build_key(source: Path) -> str:
    """What a built library depends on: its source, torch's version, the CPU it was compiled for."""
    digest = hashlib.sha256()
    for part in (source.read_bytes(), torch.__version__.encode(), _cpu_identity().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def library_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or cache_dir() / "native")


def build_and_load(source: Path, target: Path, march: str = "native") -> None:
    """Compile `source` for the CPU `march` (gcc's -march) in a private directory, load it into this process, and
    copy it to the shared library `target` whole: ranks (or jobs) building at once never see each other's
    half-written files, and the last copy in wins with an identical library."""
    from torch.utils.cpp_extension import load

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} not found (set CXX)")
    cflags = ["-O3", f"-march={march}"]
    ldflags = []
    if torch._C.has_openmp:  # at::parallel_for's body is OpenMP in the header: the same runtime torch loaded
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    target.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger("torch.utils.cpp_extension")  # its compiler-ABI banner: not for our users
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as work:
            built = load(_LIBRARY_NAME, [str(source)], extra_cflags=cflags, extra_ldflags=ldflags, build_directory=work,
                         is_python_module=False, verbose=False)  # also loads it (torch.ops.load_library)
            staged = Path(work) / (target.name + ".staged")
            shutil.copyfile(built, staged)
            os.replace(staged, target)
    finally:
        quiet.setLevel(level)


def _first_error(message: str) -> str:
    """The line of a build's output that says what went wrong (a compiler's first "error"), else its first line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.startswith("Error building")]
    return (errors or lines or [""])[0][:300]


def _registered() -> bool:
    # Loading the library twice would register its operators twice, which aborts the process.
    try:
        torch.ops.llama_dist.int8_rows
        return True
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def int8_rows_available() -> bool:
    """Whether torch.ops.llama_dist.int8_rows is loaded in this process: built (once per machine) or loaded from
    the cache now if need be. False, with one line on rank 0 saying why, where it cannot be."""
    if os.environ.get(ENABLE_ENV, "1").strip() == "0":
        return False
    if _registered():
        return True
    source = SOURCES / "int8_rows.cpp"
    try:
        target = library_dir() / build_key(source) / f"{_LIBRARY_NAME}.so"
        if target.exists():
            torch.ops.load_library(str(target))
        else:
            print0(f"Building the int8 one-row kernel for this CPU (once; kept in {target.parent}) ...")
            build_and_load(source, target)
        return True
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a read-only cache: the library kernels remain
        reason = _first_error(str(exc)) or type(exc).__name__
        print0(f"The int8 one-row kernel is not available ({reason}); int8 weights use the library kernels")
        return False
