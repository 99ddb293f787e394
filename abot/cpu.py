"""Make MLX's Linux CPU backend fast; must run before `mlx.core` is imported. Nothing happens on
macOS (Metal, Accelerate) or with MLX's CUDA build.

1. BLAS. The Linux CPU wheel links a reference (netlib) BLAS: fp32 matmul runs 30-40x slower than
   numpy. numpy ships an optimised, CPU-dispatching OpenBLAS, but with prefixed 64-bit-integer symbols
   (`scipy_cblas_sgemm64_`) that MLX cannot bind. We compile, once, a tiny shim exporting
   `cblas_sgemm`/`cblas_dgemm` that forwards to it, and load it with global symbol scope so MLX's
   `cblas_*` calls resolve there. `ABOT_BLAS=off` disables this; `ABOT_BLAS=/path/lib.so` loads that
   library instead.
2. JIT flags. `mx.compile` builds fused elementwise kernels with `g++ -O3` for baseline x86-64, where
   `fma()` in MLX's exp/sigmoid polynomials is a slow software routine, and no kernel loop that calls
   exp is vectorised. On CPUs with AVX2+FMA we put a `g++` first on PATH that adds `-march=x86-64-v3`
   (a fixed level, not -march=native, so kernels cached under /tmp stay valid on any AVX2 machine) and
   the flags that let GCC vectorise those loops (see `_JIT_FLAGS`). Measured on a tiny-model step:
   a fused exp 4x faster from -march, SwiGLU's gate 11x and the whole step 1.5x from vectorising.
   The wrapper also rewrites MLX's "strided" kernels (an input broadcast along a row) so that their
   inner loop vectorises too, and casts of comparisons to numbers, which stop any loop vectorising
   (abot/cpu_kernels.py). `ABOT_JIT_FLAGS=off` disables both.
3. Memory reuse. MLX's CPU allocator is plain malloc, and glibc hands out every block above 32 MiB
   (a batch's logits, the attention scores of longer sequences) as a fresh mmap: zero-filled pages,
   one page fault per 4 KiB, on every step. We tell glibc to keep freed memory for reuse instead
   (see `ensure_malloc_reuse`). `ABOT_MALLOC=off` disables it.
4. Every core. MLX runs a CPU stream's elementwise kernels on one thread; a train step can split its
   micro-batch over one stream per core (see `parallel_shards`). `ABOT_CPU_SHARDS=1` disables it.
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

from abot import cpu_kernels
from abot.device import installed_backends

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
malloc_status = "not attempted"
eval_order_status = "not attempted"


def _linux_cpu_build() -> bool:
    """True for MLX's Linux CPU build (CUDA builds run matmuls through cuBLAS; macOS uses Accelerate)."""
    if not sys.platform.startswith("linux"):
        return False
    backends = installed_backends()
    return "mlx-cpu" in backends and not any(n.startswith("mlx-cuda") for n in backends)


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
    elif not _linux_cpu_build():
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
    """Have MLX's CPU JIT compile for x86-64-v3 when the CPU supports it (see the module docstring)."""
    global jit_status
    import platform

    if os.environ.get("ABOT_JIT_FLAGS", "auto") == "off":
        jit_status = "disabled (ABOT_JIT_FLAGS=off)"
    elif platform.machine() != "x86_64" or not _linux_cpu_build():
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
            script = _WRAPPER.format(real=real, flags=_JIT_FLAGS, python=sys.executable,
                                     rewrite=cpu_kernels.__file__)
            if not wrapper.exists() or wrapper.read_text() != script:
                wrapper_dir.mkdir(parents=True, exist_ok=True)
                tmp = wrapper.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(script)
                tmp.chmod(0o755)
                os.replace(tmp, wrapper)
            os.environ["PATH"] = f"{wrapper_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        _retire_stale_kernels(_mlx_kernel_dir(), f"{_JIT_FLAGS} kernel-rewrite-{cpu_kernels.VERSION}")
        jit_status = f"-march={_JIT_LEVEL}, vectorised"
    return jit_status


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


def ensure_malloc_reuse() -> str:
    """Make glibc reuse freed memory for MLX's large CPU buffers instead of mapping fresh pages each time.

    M_MMAP_MAX=0: no block is served by mmap (their threshold cannot exceed 32 MiB); M_TRIM_THRESHOLD:
    up to 1 GiB of freed memory stays mapped. Measured: exp over 2048 x 8000 floats 52 -> 11 ms; a
    tiny-model step 15% faster. The cost: the process keeps its peak memory mapped, as a caching
    allocator does (MLX's peak-memory figures are unchanged).
    """
    global malloc_status
    if os.environ.get("ABOT_MALLOC", "auto") == "off":
        malloc_status = "disabled (ABOT_MALLOC=off)"
    elif not _linux_cpu_build():
        malloc_status = "not needed"
    else:
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(-4, 0) and libc.mallopt(-1, 1 << 30)  # M_MMAP_MAX, M_TRIM_THRESHOLD
            malloc_status = "reuse" if ok else "default (mallopt refused)"
        except (OSError, AttributeError):
            malloc_status = "default (not glibc)"
    return malloc_status


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parallel_shards(micro_batch_size: int, max_shards: int | None = None) -> int:
    """How many parallel shards a train step should split a micro-batch into on this CPU; configures MLX for it.

    MLX's CPU backend runs each stream's elementwise and reduction kernels on one thread; only the BLAS
    matmuls use every core. Split across one MLX stream per core (abot.step's `shards`), a step keeps
    every core busy through softmax, exp and the optimizer update too. Each stream's matmuls then get
    cores / shards BLAS threads (one on two cores), so the streams do not oversubscribe the CPU, and MLX
    orders the graph breadth-first without limit, so the shards' identical graphs interleave op by op and
    each stream finds work while the other runs (MLX dispatches at most ~100 ops ahead). Measured on 2
    cores (one run, alternating): tiny's step 987 -> 856 ms, small's 3794 -> 3271 ms. Not with gradient
    checkpointing: breadth-first order recomputes every block up front and keeps it, which undoes the
    checkpointing (small: 0.86 -> 1.66 GB), and depth-first order runs the shards one after the other.

    The count is the largest divisor of the micro-batch up to the core count (or `max_shards`);
    ABOT_CPU_SHARDS=n sets the limit, =1 turns shards off. BLAS threads and the evaluation order are
    process-wide, and MLX reads MLX_BFS_MAX_WIDTH once, at its first evaluation: call this first. Once MLX
    has allocated memory it is too late to change the order, and this returns 1 (shards left in depth-first
    order would run one after the other, each on a share of the cores).
    """
    import mlx.core as mx

    forced = os.environ.get("ABOT_CPU_SHARDS", "auto")
    if forced == "1" or status != "numpy-openblas" or not _linux_cpu_build() or usable_cores() == 1:
        return 1
    limit = min(int(forced) if forced.isdigit() else usable_cores(), max_shards or micro_batch_size)
    shards = max(n for n in range(1, min(limit, micro_batch_size) + 1) if micro_batch_size % n == 0)
    if mx.get_peak_memory() > 0 and _user_eval_width is None:
        shards = 1
    set_blas_threads(max(1, usable_cores() // shards))
    _set_eval_width(100_000 if shards > 1 else 1)
    return shards


def set_blas_threads(n: int) -> None:
    """Set the thread count of numpy's OpenBLAS, which MLX's CPU matmuls run on (see ensure_fast_blas)."""
    lib = ctypes.CDLL(_numpy_openblas())
    lib.scipy_openblas_set_num_threads64_(ctypes.c_int(n))


# A width the user chose. One that abot set (recorded in ABOT_BFS_WIDTH) and a child process inherited is not.
_user_eval_width = os.environ.get("MLX_BFS_MAX_WIDTH")
if _user_eval_width is not None and _user_eval_width == os.environ.get("ABOT_BFS_WIDTH"):
    _user_eval_width = None


def _set_eval_width(width: int) -> None:
    """Set MLX_BFS_MAX_WIDTH (read once, at MLX's first evaluation) unless the user set it."""
    global eval_order_status
    if _user_eval_width is None:
        os.environ["MLX_BFS_MAX_WIDTH"] = os.environ["ABOT_BFS_WIDTH"] = str(width)
    eval_order_status = f"MLX_BFS_MAX_WIDTH={os.environ['MLX_BFS_MAX_WIDTH']}"


def ensure_eval_order() -> str:
    """On the CPU, have MLX evaluate graphs depth-first (MLX_BFS_MAX_WIDTH=1) unless the user chose a width.

    MLX walks a graph breadth-first, up to 20 independent branches at a time by default, and keeps their
    intermediates alive together. Measured on a compiled float32 step (d768 x 6, 4k tokens): peak memory
    5.20 -> 4.79 GB, tokens/s no lower. Not on GPUs: there the same change measured 19.9 -> 21.0 GB
    (medium, bfloat16, H200). Parallel shards change it again (see `parallel_shards`).
    """
    global eval_order_status
    if not _linux_cpu_build():
        eval_order_status = "MLX default"
    else:
        _set_eval_width(1)
    return eval_order_status
