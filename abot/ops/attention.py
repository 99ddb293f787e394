"""Causal multi-head self-attention on (batch, heads, seq, head_dim) arrays."""

import math

import mlx.core as mx


def causal_attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """softmax(q k^T / sqrt(d) + causal mask) v through MLX's fused kernel.

    The mask is aligned bottom-right, so with a KV cache (k, v longer than q) query i sees keys up
    to position len(k) - len(q) + i. Masked scores are -inf, never a boolean added to the scores.
    """
    mask = "causal" if q.shape[2] > 1 else None
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), mask=mask)
