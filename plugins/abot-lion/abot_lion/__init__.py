"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms") as an abot optimizer plugin."""

import mlx.core as mx

from abot.optim.base import Optimizer
from abot.optim.tree import map_leaves, zeros_like_f32
from abot.optim.weight_decay import is_decayed


def lion(weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.99) -> Optimizer:
    """Lion: the sign of interpolated momentum; use an lr 3-10x below AdamW's."""
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"b1 and b2 must be in [0, 1), got {b1}, {b2}")

    def init(params):
        return {"m": zeros_like_f32(params)}

    def update(grads, state, params, lr):
        def leaf(p, g, m):
            step = mx.sign(b1 * m + (1 - b1) * g)
            decay = weight_decay * p if is_decayed(p) else 0.0  # decoupled, matrices only (as abot's adamw)
            return p - lr * (step + decay), b2 * m + (1 - b2) * g

        new_params, new_m = map_leaves(leaf, params, grads, state["m"])
        return new_params, {"m": new_m}

    return Optimizer(init, update)
