"""Compiles cpu_kernels.cc into a shared library for this machine: at install (setup.py's build_ext, so that a first
start has nothing to compile) and, where no installed library fits, at first use into a cache (native.py).

Standard library only: setup.py loads this file in pip's build environment, where neither jax nor this package is
importable.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
PARTS = 2  # translation units of cpu_kernels.cc (its NOVALLM_PART), compiled side by side
INSTALLED_PREFIX = "_cpu_kernels_"  # + key: the library setup.py builds into this package


def switched_off(variable: str) -> bool:
    """Whether an on-by-default environment switch is set to 0, false, no or off."""
    return os.environ.get(variable, "1").lower() in ("0", "false", "no", "off")


def turned_off() -> bool:
    return switched_off("NOVALLM_NATIVE_KERNELS")


def compiler() -> str | None:
    """The C++ compiler to build with; None where the kernels are turned off or none is installed."""
    if turned_off():
        return None
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def extra_flags() -> list[str]:
    return shlex.split(os.environ.get("NOVALLM_KERNEL_FLAGS", ""))


def cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


def key(compiler: str, jaxlib_version: str) -> str:
    """What a built library depends on: the source, the compiler, jaxlib's FFI headers, the CPU and extra flags."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    parts = [SOURCE.read_text(), version, jaxlib_version, cpu_signature(), *extra_flags()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def compile_library(compiler: str, include_dir: str, out: Path) -> Path:
    """Builds the library at `out` (beside it first, then renamed: a concurrent reader never loads half a file).
    Raises RuntimeError with the compiler's message on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        # The source's parts (see NOVALLM_PART in it) compile side by side, then link into one library.
        objects = [os.path.join(tmp, f"part{i}.o") for i in range(PARTS)]
        base = [compiler, "-O3", "-march=native", *extra_flags(), "-std=c++17", "-fPIC", "-w", f"-I{include_dir}"]
        compiles = [[*base, f"-DNOVALLM_PART={i}", "-c", str(SOURCE), "-o", o] for i, o in enumerate(objects)]
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in compiles]
        errors = [p.communicate()[1] for p in procs]
        for p, err in zip(procs, errors):
            if p.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {err.strip()[-2000:]}")
        library = os.path.join(tmp, "cpu_kernels.so")
        result = subprocess.run([compiler, "-shared", *objects, "-o", library], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to link: {result.stderr.strip()[-2000:]}")
        os.replace(library, out)
    return out
