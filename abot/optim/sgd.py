"""SGD with optional (Nesterov) momentum, PyTorch's momentum form, and decoupled weight decay."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_map

from abot.optim.base import Optimizer, Tree
from abot.optim.tree import map_leaves, zeros_like_f32
from abot.optim.weight_decay import decoupled_weight_decay


def sgd_leaf(param: mx.array, grad: mx.array, buf: mx.array | None, lr: mx.array, *, momentum: float,
             nesterov: bool, weight_decay: float) -> tuple[mx.array, mx.array | None]:
    """One SGD step of one leaf -> (param, momentum buffer or None when momentum is 0)."""
    g = grad.astype(mx.float32)
    step = g
    if momentum:
        # torch.optim.SGD with dampening 0: buf = mu*buf + g (buf starts at 0, so the first buf is g);
        # Nesterov steps along g + mu*buf.
        buf = momentum * buf + g
        step = g + momentum * buf if nesterov else buf
    p = decoupled_weight_decay(param.astype(mx.float32), lr, weight_decay)
    return (p - lr * step).astype(param.dtype), buf


def sgd(weight_decay: float = 0.0, momentum: float = 0.0, nesterov: bool = False) -> Optimizer:
    """SGD, optionally with (Nesterov) momentum as torch.optim.SGD; decoupled weight decay on matrices.

    Weight decay (p *= 1 - lr*wd) applies only to leaves with ndim >= 2. State: {"buf": tree} of float32
    momentum buffers, or {} when momentum is 0.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"sgd: momentum must be in [0, 1), got {momentum}")
    if nesterov and momentum == 0.0:
        raise ValueError("sgd: nesterov needs momentum > 0 (as in torch.optim.SGD)")
    if weight_decay < 0.0:
        raise ValueError(f"sgd: weight_decay must be >= 0, got {weight_decay}")

    def init(params: Tree) -> Tree:
        return {"buf": zeros_like_f32(params)} if momentum else {}

    def update(grads: Tree, state: Tree, params: Tree, lr: mx.array) -> tuple[Tree, Tree]:
        def step(p, g, buf=None):
            return sgd_leaf(p, g, buf, lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)

        if not momentum:
            return tree_map(lambda p, g: step(p, g)[0], params, grads), state
        new_params, bufs = map_leaves(step, params, grads, state["buf"])
        return new_params, {"buf": bufs}

    return Optimizer(init, update, elementwise=True)
