"""The contract of an adapter kind, and what LoRA and DoRA share: the low-rank pair and its scaled update."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import mlx.core as mx

from abot.ops.dropout import dropout as drop
from abot.ops.linear import base_matmul, dequantize, is_quantized, weight_shape


class AdapterKind(NamedTuple):
    """One adapter kind's pure functions over one projection, with its options bound by its factory.

    init(base, key) -> adapter: the adapter's leaves (a dict of arrays) for a base leaf: an (in, out) weight
        or a quantized one (abot.ops.linear.quantize); at init the adapted projection equals the base.
    apply(x, base, adapter, key=None) -> y: the adapted projection of x; key: dropout's, None in eval mode.
    merge(weight, adapter) -> weight: the (in, out) float weight that computes the same as base + adapter.
    """

    init: Callable[[Any, mx.array], dict]
    apply: Callable[..., mx.array]
    merge: Callable[[mx.array, dict], mx.array]


def float_weight(base: Any) -> mx.array:
    """The (in, out) float weight of a base leaf, dequantized when it is quantized."""
    return dequantize(base) if is_quantized(base) else base


def low_rank_pair(base: Any, rank: int, key: mx.array) -> dict:
    """LoRA's A (in, r) ~ U(-1/sqrt(in), 1/sqrt(in)) and B (r, out) = 0 (Hu et al. 2021: B = 0, so the update
    starts at zero; PEFT's kaiming-uniform A and mlx-lm's draw A from this same range)."""
    d_in, d_out = weight_shape(base)
    bound = 1.0 / math.sqrt(d_in)
    return {"lora_a": mx.random.uniform(-bound, bound, (d_in, rank), key=key), "lora_b": mx.zeros((rank, d_out))}


def low_rank_adapted(x: mx.array, base, adapter: dict, scale: float, rate: float,
                     key: mx.array | None) -> mx.array:
    """x W + scale * (dropout(x) A) B: a projection with LoRA's update (dropout only with a key).

    One fused `addmm` adds the scaled update to the base's output, saving a pass over the (tokens, out)
    output against scale-then-add (measured ~3% of a LoRA projection's forward and backward on the CPU).
    """
    return mx.addmm(base_matmul(x, base), drop(x, rate, key) @ adapter["lora_a"], adapter["lora_b"], alpha=scale)


def low_rank_delta(adapter: dict, scale: float) -> mx.array:
    """scale * A B: the low-rank update as an (in, out) weight."""
    return scale * (adapter["lora_a"] @ adapter["lora_b"])
