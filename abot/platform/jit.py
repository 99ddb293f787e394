"""Have MLX's CPU JIT compile vectorised kernels for x86-64-v3 when the CPU supports it.

`mx.compile` builds fused elementwise kernels with `g++ -O3` for baseline x86-64, where `fma()` in MLX's
exp/sigmoid polynomials is a slow software routine, and no kernel loop that calls exp is vectorised. On
CPUs with AVX2+FMA we put a `g++` first on PATH that adds `-march=x86-64-v3` (a fixed level, not
-march=native, so kernels cached under /tmp stay valid on any AVX2 machine) and the flags that let GCC
vectorise those loops (see `_JIT_FLAGS`). Measured on a tiny-model step: a fused exp 4x faster from
-march, SwiGLU's gate 11x and the whole step 1.5x from vectorising. The wrapper also rewrites MLX's
"strided" kernels (an input broadcast along a row) so that their inner loop vectorises too, and casts of
comparisons to numbers, which stop any loop vectorising (abot/platform/kernels.py). `ABOT_JIT_FLAGS=off`
disables both.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from pathlib import Path

from abot.platform import kernels
from abot.platform.backends import linux_cpu_build
from abot.platform.blas import cache_dir

_JIT_LEVEL = "x86-64-v3"
# MLX's scalar exp() is a polynomial plus range checks written as selects. GCC leaves it out of line and,
# under the default -ftrapping-math, will not if-convert the checks, so every loop that calls exp stays
# scalar ("control flow in loop"). Inlining it and -fno-trapping-math (MLX never enables FP traps) let
# the loop vectorise, 8 lanes at a time; the arithmetic, hence every result, is unchanged. PyTorch builds
# its own CPU kernels with the same two -fno-* flags.
_JIT_FLAGS = f"-march={_JIT_LEVEL} -fno-trapping-math -fno-math-errno -finline-limit=1000"
# The g++ abot puts first on PATH. Besides adding the flags, it writes the library MLX asked for (-o) to a
# temporary name and renames it into place: MLX's kernel cache under /tmp is shared by every process, and
# two runs compiling the same kernel at once could otherwise load a half-written file.
_WRAPPER = """#!/bin/sh
prev=""
out=""
for a do
  shift
  if [ "$prev" = "-o" ]; then out=$a; set -- "$@" "$a.tmp$$"; else set -- "$@" "$a"; fi
  case "$a" in *.cpp) "{python}" "{rewrite}" "$a" ;; esac
  prev=$a
done
"{real}" {flags} "$@" || exit $?
if [ -n "$out" ]; then mv -f "$out.tmp$$" "$out"; fi
"""
_V3_FLAGS = {"avx2", "fma", "bmi2", "f16c", "movbe"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def ensure_jit_flags() -> str:
    """Have MLX's CPU JIT compile for x86-64-v3 when the CPU supports it (see the module docstring).

    Returns what was done, for the start-up line.
    """
    if os.environ.get("ABOT_JIT_FLAGS", "auto") == "off":
        return "disabled (ABOT_JIT_FLAGS=off)"
    if platform.machine() != "x86_64" or not linux_cpu_build():
        return "not needed"
    if not _V3_FLAGS <= _cpu_flags():
        return "baseline x86-64 (CPU lacks AVX2/FMA)"
    real = shutil.which("g++")
    if real is None:
        return "no g++ on PATH (mx.compile needs it)"
    wrapper_dir = cache_dir() / f"jit-{_JIT_LEVEL}"
    if real != str(wrapper_dir / "g++"):
        _write_wrapper(wrapper_dir / "g++", real)
        os.environ["PATH"] = f"{wrapper_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    _retire_stale_kernels(_mlx_kernel_dir(), f"{_JIT_FLAGS} kernel-rewrite-{kernels.VERSION}")
    return f"-march={_JIT_LEVEL}, vectorised"


def _write_wrapper(wrapper: Path, real: str) -> None:
    """Write the g++ wrapper around `real` unless it is there already (atomic: other processes may run it)."""
    script = _WRAPPER.format(real=real, flags=_JIT_FLAGS, python=sys.executable, rewrite=kernels.__file__)
    if wrapper.exists() and wrapper.read_text() == script:
        return
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    tmp = wrapper.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(script)
    tmp.chmod(0o755)
    os.replace(tmp, wrapper)


def _mlx_kernel_dir() -> Path:
    """Where MLX caches CPU JIT kernels: std::filesystem::temp_directory_path() / mlx / <version> / cpu."""
    base = next((os.environ[v] for v in ("TMPDIR", "TMP", "TEMP", "TEMPDIR") if os.environ.get(v)), "/tmp")
    return Path(base) / "mlx" / importlib.metadata.version("mlx") / "cpu"


def _retire_stale_kernels(kernel_dir: Path, flags: str) -> None:
    """Set aside cached kernels built with other flags (plain MLX, an older abot), once.

    MLX names a cached kernel by its graph, not by how it was compiled, and never rebuilds one it finds,
    so without this a machine keeps its slow kernels. A stamp file records the flags; the stale folder
    is renamed (atomic) before it is deleted, so no process ever loads a half-deleted kernel by name.
    """
    stamp = kernel_dir / "abot-jit-flags"
    try:
        if stamp.read_text() == flags:
            return
    except OSError:
        pass
    try:
        if kernel_dir.exists():
            stale = kernel_dir.with_name(f"{kernel_dir.name}.stale-{os.getpid()}")
            os.replace(kernel_dir, stale)
            shutil.rmtree(stale, ignore_errors=True)
        kernel_dir.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_name(f"{stamp.name}.tmp{os.getpid()}")
        tmp.write_text(flags)
        os.replace(tmp, stamp)
    except OSError:
        pass  # an unwritable temp folder: kernels stay as they are (slower, never wrong)
