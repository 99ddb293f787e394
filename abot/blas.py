"""Give MLX's Linux CPU build a fast BLAS before `mlx.core` is imported.

The Linux CPU wheel of MLX links a reference (netlib) BLAS: fp32 matmul runs 30-40x slower than
numpy on the same machine. numpy ships an optimised, CPU-dispatching OpenBLAS, but with prefixed
64-bit-integer symbols (`scipy_cblas_sgemm64_`) that MLX cannot bind. We compile, once, a tiny shim
exporting `cblas_sgemm`/`cblas_dgemm` that forwards to numpy's OpenBLAS, and load it with global
symbol scope so MLX's `cblas_*` calls resolve to it. Nothing is done on macOS (Accelerate) or on the
CUDA build. `ABOT_BLAS=off` disables it; `ABOT_BLAS=/path/libopenblas.so` loads that library instead.
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

# What was loaded, for `abot verify` and the start-up line: "numpy-openblas", a path, or a reason.
status = "not attempted"


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
