"""The Linux CPU platform wing: make MLX's Linux CPU backend fast. `prepare()` must run before `mlx.core` is
imported (abot/__init__.py calls it); nothing happens on macOS (Metal, Accelerate) or with MLX's CUDA build.

1. BLAS (blas.py). The Linux CPU wheel links a reference BLAS, 30-40x slower than numpy's OpenBLAS; a
   compiled shim forwards MLX's `cblas_sgemm` to numpy's. `ABOT_BLAS=off` / `=/path/lib.so`.
2. JIT flags (jit.py, kernels.py). A `g++` wrapper first on PATH compiles `mx.compile`'s fused kernels for
   x86-64-v3 and rewrites their sources so that their loops vectorise. `ABOT_JIT_FLAGS=off`.
3. Memory reuse (malloc.py). glibc keeps freed memory for MLX's large buffers instead of mapping fresh
   pages on every step. `ABOT_MALLOC=off`.
4. Evaluation order (eval_order.py). MLX evaluates graphs depth-first on the CPU: a lower peak memory.
5. Every core (lanes.py). MLX runs a CPU stream's elementwise kernels on one thread; a train step can split
   its micro-batch into parallel lanes, one MLX stream per core (`parallel_lanes`, called by whoever builds
   the step, not here). `ABOT_CPU_LANES=1` turns them off.

What the device is and how fast it multiplies, for the start-up line and `abot verify`: device.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from abot.platform.blas import ensure_fast_blas
from abot.platform.eval_order import ensure_eval_order
from abot.platform.jit import ensure_jit_flags
from abot.platform.malloc import ensure_malloc_reuse


@dataclass(frozen=True)
class PlatformStatus:
    """What `prepare()` did, in words, for the start-up line and `abot verify`."""

    blas: str  # "numpy-openblas", a library's path, or why not
    jit: str  # "-march=x86-64-v3, vectorised", or why not
    malloc: str  # "reuse", or why not
    eval_order: str  # as prepare() left it ("MLX_BFS_MAX_WIDTH=1"); parallel lanes widen it later


@functools.cache
def prepare() -> PlatformStatus:
    """Set up BLAS, the JIT's compiler, malloc and the evaluation order, once per process; what was done.

    Each step reads its environment variable and must run before `mlx.core` is imported: MLX binds its BLAS
    when it loads and reads MLX_BFS_MAX_WIDTH at its first evaluation.
    """
    return PlatformStatus(blas=ensure_fast_blas(), jit=ensure_jit_flags(), malloc=ensure_malloc_reuse(),
                          eval_order=ensure_eval_order())
