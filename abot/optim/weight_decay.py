"""Decoupled weight decay, the rule every built-in optimizer shares (Loshchilov & Hutter 2019)."""

from __future__ import annotations

import mlx.core as mx


def is_decayed(leaf: mx.array) -> bool:
    """Weight decay applies to matrices (ndim >= 2) only: norm gains and biases are never decayed."""
    return leaf.ndim >= 2


def decoupled_weight_decay(param: mx.array, lr: mx.array, weight_decay: float) -> mx.array:
    """p * (1 - lr * wd) on decayed leaves (Loshchilov & Hutter 2019, torch.optim.AdamW's order)."""
    if weight_decay == 0.0 or not is_decayed(param):
        return param
    return param * (1.0 - lr * weight_decay)
