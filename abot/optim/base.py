"""The optimizer contract shared by built-ins and plugins."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import mlx.core as mx

from abot.optim.placement import leaf_streams  # noqa: F401  (abot.update enters it around an update)

Tree = Any  # nested dicts / lists of mx.array


class Optimizer(NamedTuple):
    """A pair of pure functions, optax-style.

    init(params) -> state                       (a tree of mx.array, checkpointed as-is)
    update(grads, state, params, lr) -> (params, state)
        `lr` is a scalar mx.array from the schedule; everything inside is mx ops, so the whole
        update is traced into the compiled train step. `abot.optim.tree.map_leaves` maps a per-leaf
        step over the trees and returns one tree per result.
    elementwise: True when `update` treats each leaf on its own, by its values and `is_decayed(leaf)` only,
        the state's per-leaf parts are trees shaped like the parameters and its other leaves (a step count)
        depend on no leaf (adamw, sgd). abot.update may then run it on a few flat buffers (abot.optim.flat),
        one call per buffer, instead of the tree's leaves; False (the default, plugins' `Optimizer(init,
        update)` included) keeps the per-leaf update.
    """

    init: Callable[[Tree], Tree]
    update: Callable[[Tree, Tree, Tree, mx.array], tuple[Tree, Tree]]
    elementwise: bool = False
