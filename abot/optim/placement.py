"""Where an update's leaves run: a placement hint that spreads them over the per-core MLX streams.

abot.update enters `leaf_streams` around `optimizer.update`; `abot.optim.tree.map_leaves` applies `spread`,
so an optimizer written with `map_leaves` uses every core without knowing about cores. Work is counted in
parameter-equivalents: one parameter's elementwise update (AdamW, momentum) is 1.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import mlx.core as mx

# One core updates a parameter elementwise (AdamW: about 4 ns, memory-bound) in about the time it does 300 FLOPs
# of matmul (about 75 GFLOP/s): measured on a 2-core AMD EPYC. The rate at which matmul work (Muon's Newton-Schulz)
# counts against elementwise work when leaves are spread; only the balance depends on it, never a value.
MATMUL_FLOPS_PER_PARAM = 300

_LEAF_STREAMS: contextvars.ContextVar[tuple] = contextvars.ContextVar("abot_leaf_streams", default=())


@contextlib.contextmanager
def leaf_streams(streams):
    """Inside, `spread` hands an update's leaves out over these MLX streams (abot.step, parallel lanes).

    A placement hint, nothing more: which stream computes a leaf never changes its value.
    """
    token = _LEAF_STREAMS.set(tuple(streams))
    try:
        yield
    finally:
        _LEAF_STREAMS.reset(token)


def spread(leaf_update: Callable, cost: Callable[..., float] | None = None) -> Callable:
    """`leaf_update` (mapped over the parameter tree) with each leaf on the least-loaded stream so far.

    On the CPU a stream runs on one core; with a train step's parallel lanes each stream's BLAS gets one
    core too, so an update left on one stream (Muon's Newton-Schulz matmuls especially) would idle the
    rest. `cost(*args)` is a leaf's work in parameter-equivalents, called with `leaf_update`'s arguments
    (default: the first array's size). Without `leaf_streams` this returns `leaf_update` unchanged.
    """
    streams = _LEAF_STREAMS.get()
    if not streams:
        return leaf_update
    load = [0] * len(streams)

    def placed(*args):
        i = load.index(min(load))
        load[i] += cost(*args) if cost else next(a.size for a in args if isinstance(a, mx.array))
        with mx.stream(streams[i]):
            return leaf_update(*args)

    return placed
