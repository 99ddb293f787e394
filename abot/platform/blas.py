"""A fast BLAS for MLX's Linux CPU build, which links a reference (netlib) one.

fp32 matmul on the reference BLAS runs 30-40x slower than numpy. numpy ships an optimised,
CPU-dispatching OpenBLAS, but with prefixed 64-bit-integer symbols (`scipy_cblas_sgemm64_`) that MLX
cannot bind. We compile, once, a tiny shim exporting `cblas_sgemm`/`cblas_dgemm` that forwards to it,
and load it with global symbol scope so MLX's `cblas_*` calls resolve there. `ABOT_BLAS=off` disables
this; `ABOT_BLAS=/path/lib.so` loads that library instead. It must run before `mlx.core` is imported.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from abot.platform.backends import linux_cpu_build

NUMPY_OPENBLAS = "numpy-openblas"  # the status of the shim loaded: the one BLAS whose threads abot can set

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


def _numpy_openblas() -> str | None:
    import numpy

    libs = Path(numpy.__file__).parent.parent / "numpy.libs"
    found = sorted(glob.glob(str(libs / "libscipy_openblas64_*.so*")))
    return found[0] if found else None


def cache_dir() -> Path:
    """Where abot keeps what it builds for the platform: the shim here, the JIT's g++ wrapper below it."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "abot" / "blas"


def _build_shim(openblas: str) -> Path:
    """Compile the forwarding shim against `openblas`, cached by the library's path and content id."""
    tag = hashlib.sha256((_SHIM_C + openblas + str(os.stat(openblas).st_mtime_ns)).encode()).hexdigest()[:16]
    out = cache_dir() / f"libabot_blas_{tag}.so"
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
    """Load a fast BLAS into the process if MLX would otherwise use the reference one; return what was done."""
    choice = os.environ.get("ABOT_BLAS", "auto")
    if choice == "off":
        return "disabled (ABOT_BLAS=off)"
    if "mlx.core" in sys.modules:
        return "skipped: mlx.core was imported before abot"
    if choice != "auto":
        ctypes.CDLL(choice, mode=os.RTLD_GLOBAL)
        return choice
    if not linux_cpu_build():
        return "not needed (native backend)"
    try:
        openblas = _numpy_openblas()
        if openblas is None:
            raise RuntimeError("numpy's bundled OpenBLAS was not found")
        ctypes.CDLL(openblas, mode=os.RTLD_GLOBAL)
        ctypes.CDLL(str(_build_shim(openblas)), mode=os.RTLD_GLOBAL)
        return NUMPY_OPENBLAS
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
        warnings.warn(f"abot: could not load a fast BLAS for MLX, matmuls will be ~30x slower: {err}. "
                      "Install gcc, or set ABOT_BLAS=/path/to/libopenblas.so.", stacklevel=2)
        return f"reference BLAS (slow): {err}"


def set_blas_threads(n: int) -> None:
    """Set the thread count of numpy's OpenBLAS, which MLX's CPU matmuls run on (see ensure_fast_blas)."""
    lib = ctypes.CDLL(_numpy_openblas())
    lib.scipy_openblas_set_num_threads64_(ctypes.c_int(n))
