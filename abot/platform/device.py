"""Which MLX device this process runs on and how fast it multiplies, for the start-up line and `abot verify`."""

from __future__ import annotations

import os
import time
from typing import Callable

import mlx.core as mx

from abot.platform import PlatformStatus, prepare
from abot.platform.eval_order import current as current_eval_order


def float32_matmul() -> str:
    """How MLX runs float32 matmuls on a GPU: TF32 tensor cores unless MLX_ENABLE_TF32=0 (MLX's default: 1)."""
    return "full float32" if os.environ.get("MLX_ENABLE_TF32", "1") == "0" else "TF32"


def describe(status: PlatformStatus | None = None) -> str:
    """"gpu: NVIDIA H100 80GB HBM3 (CUDA, float32 matmuls in TF32)" or "cpu: <model>, BLAS: ...".

    `status` is what `abot.platform.prepare()` did (by default, its memoised result).
    """
    status = status or prepare()
    name = mx.device_info().get("device_name", "")
    if mx.default_device() == mx.gpu:
        if mx.metal.is_available():
            return f"gpu: {name or 'Apple GPU'} (Metal)"
        return f"gpu: {name or 'NVIDIA GPU'} (CUDA, float32 matmuls in {float32_matmul()})"
    return (f"cpu: {name or 'unknown'}, BLAS: {status.blas}, JIT: {status.jit}, malloc: {status.malloc}, "
            f"eval: {current_eval_order()}")


def _gflops(matmul: Callable[[], object], n: int, min_time: float) -> float:
    """GFLOP/s of `matmul` (one finished n^3 product per call), after 2 warm-up calls, over >= 3 calls and min_time."""
    for _ in range(2):
        matmul()
    reps, start = 0, time.perf_counter()
    while True:
        matmul()
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time and reps >= 3:
            return 2 * n**3 * reps / elapsed / 1e9


def sgemm_gflops(n: int = 512, min_time: float = 0.2) -> float:
    """Measured float32 matmul speed (n^3 sgemm) on MLX's default device, GFLOP/s."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)
    return _gflops(lambda: mx.eval(a @ b), n, min_time)


def numpy_sgemm_gflops(n: int = 512, min_time: float = 0.2) -> float:
    """The same sgemm through numpy (its bundled OpenBLAS): what this CPU gives a good BLAS right now."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    return _gflops(lambda: a @ a, n, min_time)
