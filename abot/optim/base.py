"""The optimizer contract shared by built-ins and plugins."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, NamedTuple

import mlx.core as mx

Tree = Any  # nested dicts / lists of mx.array


class Optimizer(NamedTuple):
    """A pair of pure functions, optax-style.

    init(params) -> state                       (a tree of mx.array, checkpointed as-is)
    update(grads, state, params, lr) -> (params, state)
        `lr` is a scalar mx.array from the schedule; everything inside is mx ops, so the whole
        update is traced into the compiled train step. An update that maps one function over the
        leaves can wrap it in `spread` (below) to use every core under parallel CPU shards.
    """

    init: Callable[[Tree], Tree]
    update: Callable[[Tree, Tree, Tree, mx.array], tuple[Tree, Tree]]


_LEAF_STREAMS: contextvars.ContextVar[tuple] = contextvars.ContextVar("abot_leaf_streams", default=())


@contextlib.contextmanager
def leaf_streams(streams):
    """Inside, `spread` hands an update's leaves out over these MLX streams (abot.step, parallel shards).

    A placement hint, nothing more: which stream computes a leaf never changes its value.
    """
    token = _LEAF_STREAMS.set(tuple(streams))
    try:
        yield
    finally:
        _LEAF_STREAMS.reset(token)


def spread(leaf_update: Callable) -> Callable:
    """`leaf_update` (mapped over the parameter tree) with each leaf on the least-loaded stream so far.

    On the CPU a stream runs on one core; with a train step's parallel shards each stream's BLAS gets one
    core too, so an update left on one stream (Muon's Newton-Schulz matmuls especially) would idle the
    rest. Load is counted in parameters; without `leaf_streams` this returns `leaf_update` unchanged.
    """
    streams = _LEAF_STREAMS.get()
    if not streams:
        return leaf_update
    load = [0] * len(streams)

    def placed(*args):
        i = load.index(min(load))
        load[i] += next(a.size for a in args if isinstance(a, mx.array))
        with mx.stream(streams[i]):
            return leaf_update(*args)

    return placed
