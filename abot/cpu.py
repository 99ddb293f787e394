"""Make MLX's Linux CPU backend fast; must run before `mlx.core` is imported. Nothing happens on
macOS (Metal, Accelerate) or with MLX's CUDA build.

1. BLAS. The Linux CPU wheel links a reference (netlib) BLAS: fp32 matmul runs 30-40x slower than
   numpy. numpy ships an optimised, CPU-dispatching OpenBLAS, but with prefixed 64-bit-integer symbols
   (`scipy_cblas_sgemm64_`) that MLX cannot bind. We compile, once, a tiny shim exporting
   `cblas_sgemm`/`cblas_dgemm` that forwards to it, and load it with global symbol scope so MLX's
   `cblas_*` calls resolve there. `ABOT_BLAS=off` disables this; `ABOT_BLAS=/path/lib.so` loads that
   library instead.
2. JIT flags. `mx.compile` builds fused elementwise kernels with `g++ -O3` for baseline x86-64, where
   `fma()` in MLX's exp/sigmoid polynomials is a slow software routine. On CPUs with AVX2+FMA we put a
   `g++` first on PATH that adds `-march=x86-64-v3` (a fixed level, not -march=native, so kernels
   cached under /tmp stay valid on any AVX2 machine). Measured: a fused exp 4x faster. `ABOT_JIT_FLAGS=off`
   disables it.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

_SHIM_C = r"""
#include <stdint.h>
void scipy_cblas_sgemm64_(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t);
void scipy_cblas_dgemm64_(int, int, int, int64_t, int64_t, int64_t, double, const double*, int64_t,
                          const double*, int64_t, double, double*, int64_t);
void cblas_sgemm(int o, int ta, int tb, int m, int n, int k, float al, const float* a, int lda,
                 const float* b, int ldb, float be, float* c, int ldc)
{ scipy_cblas_sgemm64_(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
void cblas_dgemm(int o, int ta, int tb, int m, int n, int k, double al, const double* a, int lda,
                 const double* b, int ldb, double be, double* c, int ldc)
{ scipy_cblas_dgemm64_(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
"""

# What was done, for `abot verify` and the start-up line.
status = "not attempted"  # BLAS: "numpy-openblas", a path, or a reason
jit_status = "not attempted"


def _needs_shim() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions() if d.metadata["Name"]}
    if any(n.startswith("mlx-cuda") or n.startswith("mlx_cuda") for n in names):
        return False  # CUDA build: matmuls run on the GPU through cuBLAS
    return "mlx-cpu" in names or "mlx_cpu" in names


def _numpy_openblas() -> str | None:
    import numpy

    libs = Path(numpy.__file__).parent.parent / "numpy.libs"
    found = sorted(glob.glob(str(libs / "libscipy_openblas64_*.so*")))
    return found[0] if found else None


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "abot" / "blas"


def _build_shim(openblas: str) -> Path:
    """Compile the forwarding shim against `openblas`, cached by the library's path and content id."""
    tag = hashlib.sha256((_SHIM_C + openblas + str(os.stat(openblas).st_mtime_ns)).encode()).hexdigest()[:16]
    out = _cache_dir() / f"libabot_blas_{tag}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (install gcc, or set ABOT_BLAS to an OpenBLAS library)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "shim.c"
        src.write_text(_SHIM_C)
        tmp_out = Path(tmp) / out.name
        cmd = [cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(tmp_out), openblas,
               f"-Wl,-rpath,{Path(openblas).parent}"]
        subprocess.run(cmd, check=True, capture_output=True)
        os.replace(tmp_out, out)  # atomic: concurrent processes never see a half-written library
    return out


def ensure_fast_blas() -> str:
    """Load a fast BLAS into the process if MLX would otherwise use the reference one; return status."""
    global status
    choice = os.environ.get("ABOT_BLAS", "auto")
    if choice == "off":
        status = "disabled (ABOT_BLAS=off)"
    elif "mlx.core" in sys.modules:
        status = "skipped: mlx.core was imported before abot"
    elif choice != "auto":
        ctypes.CDLL(choice, mode=os.RTLD_GLOBAL)
        status = choice
    elif not _needs_shim():
        status = "not needed (native backend)"
    else:
        try:
            openblas = _numpy_openblas()
            if openblas is None:
                raise RuntimeError("numpy's bundled OpenBLAS was not found")
            ctypes.CDLL(openblas, mode=os.RTLD_GLOBAL)
            ctypes.CDLL(str(_build_shim(openblas)), mode=os.RTLD_GLOBAL)
            status = "numpy-openblas"
        except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
            status = f"reference BLAS (slow): {err}"
            warnings.warn(f"abot: could not load a fast BLAS for MLX, matmuls will be ~30x slower: {err}. "
                          "Install gcc, or set ABOT_BLAS=/path/to/libopenblas.so.", stacklevel=2)
    return status


_JIT_LEVEL = "x86-64-v3"
# The g++ abot puts first on PATH. Besides the -march flag, it writes the library MLX asked for (-o) to a
# temporary name and renames it into place: MLX's kernel cache under /tmp is shared by every process, and
# two runs compiling the same kernel at once could otherwise load a half-written file.
_WRAPPER = """#!/bin/sh
prev=""
out=""
for a do
  shift
  if [ "$prev" = "-o" ]; then out=$a; set -- "$@" "$a.tmp$$"; else set -- "$@" "$a"; fi
  prev=$a
done
"{real}" -march={level} "$@" || exit $?
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
    """Have MLX's CPU JIT compile for x86-64-v3 when the CPU supports it (see the module docstring)."""
    global jit_status
    import platform

    if os.environ.get("ABOT_JIT_FLAGS", "auto") == "off":
        jit_status = "disabled (ABOT_JIT_FLAGS=off)"
    elif platform.machine() != "x86_64" or not _needs_shim():
        jit_status = "not needed"
    elif not _V3_FLAGS <= _cpu_flags():
        jit_status = "baseline x86-64 (CPU lacks AVX2/FMA)"
    else:
        real = shutil.which("g++")
        if real is None:
            jit_status = "no g++ on PATH (mx.compile needs it)"
            return jit_status
        wrapper_dir = _cache_dir() / f"jit-{_JIT_LEVEL}"
        wrapper = wrapper_dir / "g++"
        if real != str(wrapper):
            script = _WRAPPER.format(real=real, level=_JIT_LEVEL)
            if not wrapper.exists() or wrapper.read_text() != script:
                wrapper_dir.mkdir(parents=True, exist_ok=True)
                tmp = wrapper.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(script)
                tmp.chmod(0o755)
                os.replace(tmp, wrapper)
            os.environ["PATH"] = f"{wrapper_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        jit_status = f"-march={_JIT_LEVEL}"
    return jit_status
