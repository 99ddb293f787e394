"""Rotary position embeddings (Su et al., 2021)."""

import mlx.core as mx


def apply_rope(x: mx.array, theta: float, offset: int = 0) -> mx.array:
    """Rotate (batch, heads, seq, head_dim) by position; `offset` is the first position (KV-cached decoding).

    Layout: "rotate half" (traditional=False): dimension i pairs with i + head_dim/2, the layout of
    Hugging Face's Llama, so exported q/k weights need no permutation.
    """
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=theta, scale=1.0, offset=offset)
