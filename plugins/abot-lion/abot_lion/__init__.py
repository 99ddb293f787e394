"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms") as an abot optimizer plugin."""

import mlx.core as mx
from mlx.utils import tree_map

from abot.optim.base import Optimizer


def lion(weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.99) -> Optimizer:
    """Lion: the sign of interpolated momentum; use an lr 3-10x below AdamW's."""
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"b1 and b2 must be in [0, 1), got {b1}, {b2}")

    def init(params):
        return {"m": tree_map(lambda p: mx.zeros(p.shape, dtype=mx.float32), params)}

    def update(grads, state, params, lr):
        def leaf(p, g, m):
            step = mx.sign(b1 * m + (1 - b1) * g)
            decay = weight_decay * p if p.ndim >= 2 else 0.0  # decoupled, matrices only (as abot's adamw)
            return p - lr * (step + decay), b2 * m + (1 - b2) * g

        pairs = tree_map(leaf, params, grads, state["m"])
        is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
        new_params = tree_map(lambda t: t[0], pairs, is_leaf=is_pair)
        new_m = tree_map(lambda t: t[1], pairs, is_leaf=is_pair)
        return new_params, {"m": new_m}

    return Optimizer(init, update)
