"""AdamW with decoupled weight decay, as torch.optim.AdamW computes it (muon_adamw reuses its leaf step)."""

from __future__ import annotations

import mlx.core as mx

from abot.optim.base import Optimizer, Tree
from abot.optim.tree import map_leaves, zeros_like_f32
from abot.optim.weight_decay import decoupled_weight_decay


def bias_corrections(count: mx.array, b1: float, b2: float) -> tuple[mx.array, mx.array]:
    """(1 - b1^t, 1 - b2^t) for the 1-based step t = count, as float32 scalars."""
    t = count.astype(mx.float32)
    return 1.0 - mx.power(mx.array(b1, mx.float32), t), 1.0 - mx.power(mx.array(b2, mx.float32), t)


def adamw_leaf(param: mx.array, grad: mx.array, m: mx.array, v: mx.array, lr: mx.array,
               corrections: tuple[mx.array, mx.array], *, b1: float, b2: float, eps: float,
               weight_decay: float) -> tuple[mx.array, mx.array, mx.array]:
    """One AdamW step of one leaf -> (param, m, v); moments and arithmetic in float32, param keeps its dtype."""
    g = grad.astype(mx.float32)
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * (g * g)
    bc1, bc2 = corrections
    # torch.optim.AdamW (single-tensor path): denom = sqrt(v) / sqrt(1 - b2^t) + eps, step = lr / (1 - b1^t).
    # eps sits outside the bias correction, so it is not the same as eps added to sqrt(v_hat) elsewhere.
    direction = m / (mx.sqrt(v) / mx.sqrt(bc2) + eps)
    p = decoupled_weight_decay(param.astype(mx.float32), lr, weight_decay)
    p = p - (lr / bc1) * direction
    return p.astype(param.dtype), m, v


def check_adam_options(b1: float, b2: float, eps: float, weight_decay: float) -> None:
    """Reject values that make Adam diverge or divide by zero, naming the option."""
    for name, beta in (("b1", b1), ("b2", b2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"adamw: {name} must be in [0, 1), got {beta}")
    if eps <= 0.0:
        raise ValueError(f"adamw: eps must be > 0, got {eps}")
    if weight_decay < 0.0:
        raise ValueError(f"adamw: weight_decay must be >= 0, got {weight_decay}")


def adamw(weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8) -> Optimizer:
    """AdamW (PyTorch's formula): bias-corrected Adam with decoupled weight decay on matrices only.

    Weight decay applies only to leaves with ndim >= 2; norm gains and biases (1-D) are not decayed.
    State: {"count": int32 scalar (steps taken), "m": tree, "v": tree}, moments in float32.
    """
    check_adam_options(b1, b2, eps, weight_decay)

    def init(params: Tree) -> Tree:
        return {"count": mx.array(0, dtype=mx.int32), "m": zeros_like_f32(params),
                "v": zeros_like_f32(params)}

    def update(grads: Tree, state: Tree, params: Tree, lr: mx.array) -> tuple[Tree, Tree]:
        count = state["count"] + 1
        corrections = bias_corrections(count, b1, b2)

        def step(p, g, m, v):
            return adamw_leaf(p, g, m, v, lr, corrections, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

        new_params, m, v = map_leaves(step, params, grads, state["m"], state["v"])
        return new_params, {"count": count, "m": m, "v": v}

    return Optimizer(init, update, elementwise=True)
