"""Causal multi-head self-attention on (batch, heads, seq, head_dim) arrays."""

import math

import mlx.core as mx

from abot.ops.elementwise import fused_kernels, softmax


def causal_attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """softmax(q k^T / sqrt(d) + causal mask) v.

    The mask is aligned bottom-right, so with a KV cache (k, v longer than q) query i sees keys up to
    position len(k) - len(q) + i; masked scores are -inf. On GPUs this is MLX's fused kernel; on the CPU,
    two matmuls around a softmax that `mx.compile` fuses (MLX's CPU attention falls back to a slower
    precompiled softmax, see abot/ops/elementwise.py).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    n_q, n_k = q.shape[2], k.shape[2]
    if fused_kernels():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if n_q > 1 else None)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if n_q > 1:
        scores = scores + mx.triu(mx.full((n_q, n_k), -mx.inf, dtype=scores.dtype), k=n_k - n_q + 1)
    return softmax(scores) @ v
