"""DoRA (Liu et al. 2024): W' = m * V / ||V||_c with V = W + (alpha / r) A B, m initialised to ||W||_c.

In abot's (in, out) layout ||.||_c is the norm over the input dimension of each output column (axis 0), one
magnitude per output feature, as in PEFT's (out, in) `weight.norm(dim=1)`. Following the paper (section 4.3)
the norm is treated as a constant in the backward pass (stop_gradient), which saves its gradient's memory.
x W' = (m / ||V||_c) * (x W + (alpha / r) (x A) B): the base's matmul stays as it is (quantized for QLoRA);
only the norm needs V itself, which for a quantized base is its dequantized weight plus the update.
"""

from __future__ import annotations

import mlx.core as mx

from abot.adapters.kind import AdapterKind, float_weight, low_rank_adapted, low_rank_delta, low_rank_pair


def column_norm(w: mx.array) -> mx.array:
    """||w||_c: the norm over the input dimension of each output column of an (in, out) weight -> (out,)."""
    return mx.sqrt(mx.sum(mx.square(w.astype(mx.float32)), axis=0)).astype(w.dtype)


def dora(rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> AdapterKind:
    """DoRA: LoRA's update for the direction, a trained magnitude per output feature."""
    scale = alpha / rank

    def init(base, key: mx.array) -> dict:
        return {**low_rank_pair(base, rank, key), "magnitude": column_norm(float_weight(base))}

    def apply(x: mx.array, base, adapter: dict, key: mx.array | None = None) -> mx.array:
        norm = mx.stop_gradient(column_norm(float_weight(base) + low_rank_delta(adapter, scale)))
        y = low_rank_adapted(x, base, adapter, scale, dropout, key)
        return y * (adapter["magnitude"] / norm)

    def merge(weight: mx.array, adapter: dict) -> mx.array:
        direction = weight + low_rank_delta(adapter, scale)
        return direction * (adapter["magnitude"] / column_norm(direction))

    return AdapterKind(init=init, apply=apply, merge=merge)
