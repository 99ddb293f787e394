"""LoRA (Hu et al. 2021): y = x W + (alpha / r) (x A) B, with A random and B zero, so step 0 is the base.

Over a quantized base (QLoRA, Dettmers et al. 2023) x W is `mx.quantized_matmul` (on the CPU, a matmul with
a transient dequantized weight: abot.ops.linear.dequantized_matmul): no float copy of the base is kept; A and B
stay float.
"""

from __future__ import annotations

import mlx.core as mx

from abot.adapters.kind import AdapterKind, low_rank_adapted, low_rank_delta, low_rank_pair


def lora(rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> AdapterKind:
    """LoRA: a low-rank update (alpha / rank) A B beside each targeted projection."""
    scale = alpha / rank

    def apply(x: mx.array, base, adapter: dict, key: mx.array | None = None) -> mx.array:
        return low_rank_adapted(x, base, adapter, scale, dropout, key)

    def merge(weight: mx.array, adapter: dict) -> mx.array:
        return weight + low_rank_delta(adapter, scale)

    return AdapterKind(init=lambda base, key: low_rank_pair(base, rank, key), apply=apply, merge=merge)
