"""Small pure utilities over parameter trees (nested dicts / lists of mx.array), after optax.tree_utils."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from abot.optim.base import Tree
from abot.optim.placement import spread


def _is_tuple(x) -> bool:
    return isinstance(x, tuple)


def zeros_like_f32(tree: Tree) -> Tree:
    """Float32 zeros shaped like each leaf of `tree` (a lone array too): optimizer moments stay float32
    whatever the parameter dtype."""
    return tree_map(lambda leaf: mx.zeros(leaf.shape, dtype=mx.float32), tree)


def unzip(tree: Tree, n: int) -> tuple[Tree, ...]:
    """A tree whose leaves are n-tuples -> n trees of the same structure."""
    return tuple(tree_map(lambda t, i=i: t[i], tree, is_leaf=_is_tuple) for i in range(n))


def map_leaves(fn: Callable[..., tuple], *trees: Tree, with_path: bool = False,
               cost: Callable[..., float] | None = None) -> tuple[Tree, ...]:
    """fn over the leaves of `trees` (same structure) -> one tree per element of fn's result tuple.

    with_path=True passes each leaf's `tree_flatten` path ("blocks.0.wq") first. The leaves may run on
    different cores (abot.optim.placement), balanced by `cost` (fn's arguments -> the leaf's work; default:
    its size): a placement hint that never changes a value. `trees` must have at least one leaf, whose
    result tells how many trees come back.
    """
    mapper = tree_map_with_path if with_path else tree_map
    results = mapper(spread(fn, cost), *trees)
    flat = tree_flatten(results, is_leaf=_is_tuple)
    if not flat:
        raise ValueError("map_leaves: the trees have no leaves")
    return unzip(results, len(flat[0][1]))
