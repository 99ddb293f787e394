"""The default optimizer: Muon for hidden 2-D matrices, AdamW for everything else, one learning rate."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_map_with_path

from abot.models.roles import HIDDEN, ParamRole, conventional_role
from abot.optim.adamw import adamw_leaf, bias_corrections, check_adam_options
from abot.optim.base import Optimizer, Tree
from abot.optim.muon import check_muon_options, muon_cost, muon_leaf
from abot.optim.tree import map_leaves, zeros_like_f32

def is_hidden_matrix(path: str, leaf: mx.array, param_role: ParamRole = conventional_role) -> bool:
    """True for leaves Muon should own: 2-D and declared HIDDEN by the model (`Model.param_role`).

    Embeddings are lookup tables and the head maps to a vocabulary; Muon's orthogonalisation is meant for
    hidden linear maps (Keller Jordan, 2024). The default is the convention of abot.models.roles.
    """
    return leaf.ndim == 2 and param_role(path, leaf) == HIDDEN


def muon_adamw(weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
               scale: str = "moonshot", b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
               adamw_lr_scale: float = 1.0, param_role: ParamRole = conventional_role) -> Optimizer:
    """Muon on hidden matrices, AdamW on embeddings, head, norms and 1-D leaves (the default).

    `param_role` is the model's declaration of which leaves are hidden matrices (abot.build passes it).
    Both groups follow the schedule's learning rate, which is why Muon's update is Moonshot-scaled by default
    (its RMS matches AdamW's); `adamw_lr_scale` gives the AdamW leaves their own rate, lr * adamw_lr_scale
    (modded-nanogpt and nanochat tune the two groups separately). State: {"count": int32 scalar, "leaves": tree like params whose leaves are
    {"buf": ...} (Muon) or {"m": ..., "v": ...} (AdamW)}, all float32.
    """
    check_muon_options(momentum, ns_steps, scale, weight_decay)
    check_adam_options(b1, b2, eps, weight_decay)
    if adamw_lr_scale <= 0:
        raise ValueError(f"muon_adamw: adamw_lr_scale must be > 0, got {adamw_lr_scale}")
    if not callable(param_role):  # e.g. set in train.optimizer_args: it comes from the model, not the config
        raise TypeError("muon_adamw: param_role is the model's declaration (Model.param_role), not an option")

    def init_leaf(path: str, p: mx.array) -> dict:
        if is_hidden_matrix(path, p, param_role):
            return {"buf": zeros_like_f32(p)}
        return {"m": zeros_like_f32(p), "v": zeros_like_f32(p)}

    def init(params: Tree) -> Tree:
        return {"count": mx.array(0, dtype=mx.int32), "leaves": tree_map_with_path(init_leaf, params)}

    def update(grads: Tree, state: Tree, params: Tree, lr: mx.array) -> tuple[Tree, Tree]:
        count = state["count"] + 1
        corrections = bias_corrections(count, b1, b2)

        def step(path, p, g, s):
            if is_hidden_matrix(path, p, param_role):
                p, buf = muon_leaf(p, g, s["buf"], lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                   scale=scale, weight_decay=weight_decay)
                return p, {"buf": buf}
            p, m, v = adamw_leaf(p, g, s["m"], s["v"], lr * adamw_lr_scale if adamw_lr_scale != 1.0 else lr,
                                 corrections, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
            return p, {"m": m, "v": v}

        def cost(path, p, g, s):
            return muon_cost(p, ns_steps) if is_hidden_matrix(path, p, param_role) else p.size

        new_params, leaves = map_leaves(step, params, grads, state["leaves"], with_path=True, cost=cost)
        return new_params, {"count": count, "leaves": leaves}

    return Optimizer(init, update)
