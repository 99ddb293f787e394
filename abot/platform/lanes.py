"""Parallel lanes: each micro-batch split over one MLX stream per core, so that every core has work.

MLX's CPU backend runs each stream's elementwise and reduction kernels on one thread; only the BLAS matmuls
use every core. abot.step runs the lanes; this module decides how many there are and configures MLX for them.
"""

from __future__ import annotations

import os

import mlx.core as mx

from abot.platform import prepare
from abot.platform.backends import linux_cpu_build
from abot.platform.blas import NUMPY_OPENBLAS, set_blas_threads
from abot.platform.eval_order import set_eval_width, user_eval_width


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _lane_limit() -> str:
    """ABOT_CPU_LANES ("auto", or the most lanes; 1 turns them off), or its old name ABOT_CPU_SHARDS."""
    return os.environ.get("ABOT_CPU_LANES") or os.environ.get("ABOT_CPU_SHARDS") or "auto"


def parallel_lanes(micro_batch_size: int, max_lanes: int | None = None) -> int:
    """How many parallel lanes a train step should split a micro-batch into on this CPU; configures MLX for it.

    Split across one MLX stream per core (abot.step's `lanes`), a step keeps every core busy through
    softmax, exp and the optimizer update too. Each stream's matmuls then get cores / lanes BLAS threads
    (one on two cores), so the streams do not oversubscribe the CPU, and MLX orders the graph breadth-first
    without limit, so the lanes' identical graphs interleave op by op and each stream finds work while the
    other runs (MLX dispatches at most ~100 ops ahead). Measured on 2 cores (one run, alternating): tiny's
    step 987 -> 856 ms, small's 3794 -> 3271 ms. Not with gradient checkpointing: breadth-first order
    recomputes every block up front and keeps it, which undoes the checkpointing (small: 0.86 -> 1.66 GB),
    and depth-first order runs the lanes one after the other.

    The count is the largest divisor of the micro-batch up to the core count (or `max_lanes`);
    ABOT_CPU_LANES=n sets the limit, =1 turns lanes off. BLAS threads and the evaluation order are
    process-wide, and MLX reads MLX_BFS_MAX_WIDTH once, at its first evaluation: call this first. Once MLX
    has allocated memory it is too late to change the order, and this returns 1 (lanes left in depth-first
    order would run one after the other, each on a share of the cores).
    """
    forced = _lane_limit()
    if forced == "1" or prepare().blas != NUMPY_OPENBLAS or not linux_cpu_build() or usable_cores() == 1:
        return 1
    limit = min(int(forced) if forced.isdigit() else usable_cores(), max_lanes or micro_batch_size)
    lanes = max(n for n in range(1, min(limit, micro_batch_size) + 1) if micro_batch_size % n == 0)
    if mx.get_peak_memory() > 0 and user_eval_width() is None:
        lanes = 1
    set_blas_threads(max(1, usable_cores() // lanes))
    set_eval_width(100_000 if lanes > 1 else 1)
    return lanes
