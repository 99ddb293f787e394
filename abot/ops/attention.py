"""Causal multi-head and grouped-query self-attention on (batch, heads, seq, head_dim) arrays."""

import math

import mlx.core as mx

from abot.ops.elementwise import fused_kernels, row_sum, softmax


def causal_attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """softmax(q k^T / sqrt(d) + causal mask) v.

    k and v may have fewer heads than q (grouped-query attention, Ainslie et al., 2023): query head i
    attends with kv head i // (q heads / kv heads), the grouping of Hugging Face's `repeat_kv`. The mask
    is aligned bottom-right, so with a KV cache (k, v longer than q) query i sees keys up to position
    len(k) - len(q) + i; masked scores are -inf. On GPUs in bfloat16/float16 this is MLX's fused kernel
    (cuDNN's flash attention on CUDA, forward and backward). Elsewhere (CPUs, float32 on a GPU, which MLX
    would run unfused and keep every seq x seq probability matrix for backward) it is matmuls around
    elementwise kernels that `mx.compile` fuses, with a hand-written backward pass when there is a mask
    to apply (training, prompt prefill); scores and softmax statistics in float32.
    """
    n_q = q.shape[2]
    if fused_kernels() and (n_q == 1 or q.dtype != mx.float32):  # takes fewer kv heads as they are
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]),
                                                    mask="causal" if n_q > 1 else None)
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return _unfused_attention(q, k, v)
    # Grouped: q as (batch, kv_heads, groups, seq, head_dim) against k, v with a size-1 group axis, which
    # the matmuls broadcast. k and v are never repeated, so what backward keeps of them is kv-head sized.
    b, h, _, d = q.shape
    out = _unfused_attention(q.reshape(b, k.shape[1], groups, n_q, d), k[:, :, None], v[:, :, None])
    return out.reshape(b, h, n_q, -1)


def _unfused_attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """`causal_attention` in matmuls and elementwise kernels; sequence on axis -2, any leading axes."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    n_q, n_k = q.shape[-2], k.shape[-2]
    dtype = q.dtype
    if dtype != mx.float32:
        q, k, v = (x.astype(mx.float32) for x in (q, k, v))
    if n_q == 1:  # one new token (KV-cached decoding) sees every key
        return (softmax((q * scale) @ k.swapaxes(-1, -2)) @ v).astype(dtype)
    q = q * scale
    mask = mx.triu(mx.full((n_q, n_k), -mx.inf, dtype=mx.float32), k=n_k - n_q + 1)
    # Causal block skipping: query block i sees only keys up to its own last position, so the scores above
    # the diagonal blocks (and their exp, softmax and gradient passes) are never built: with n blocks,
    # (n + 1) / 2n of the full square. Measured on the CPU (one run, alternating): tiny's step (seq 256,
    # 2 blocks) 1045-1144 -> 1014-1037 ms; small's (seq 512, 4 blocks) 4104 -> 3713 ms.
    n_blocks = _query_blocks(n_q)
    size, past = n_q // n_blocks, n_k - n_q
    outs = []
    for i in range(n_blocks):
        rows, end = slice(i * size, (i + 1) * size), past + (i + 1) * size
        outs.append(_masked_attention(q[..., rows, :], k[..., :end, :], v[..., :end, :], mask[rows, :end])[0])
    out = outs[0] if n_blocks == 1 else mx.concatenate(outs, axis=-2)
    return out if dtype == mx.float32 else out.astype(dtype)


def _query_blocks(n_q: int, min_rows: int = 128) -> int:
    """The most equal query blocks of at least `min_rows` rows each: fewer, larger matmuls below that."""
    return max(n for n in range(1, n_q // min_rows + 1) if n_q % n == 0) if n_q >= 2 * min_rows else 1


@mx.custom_function
def _masked_attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """(softmax(q k^T + mask) v, the rows' log-sum-exp); q is already scaled."""
    s = q @ k.swapaxes(-1, -2) + mask
    m = s.max(-1, keepdims=True)
    e = mx.exp(s - m)
    total = row_sum(e)
    return (e @ v) * (1.0 / total), m + mx.log(total)  # normalise the (seq, head_dim) output, not the scores


@_masked_attention.vjp
def _masked_attention_vjp(primals, cotangents, outputs):
    # FlashAttention's backward pass (Dao et al., 2022, algorithm 4): rebuild the probabilities from the
    # saved log-sum-exp instead of keeping the (seq x seq) matrix from the forward pass, and use
    # rowsum(dP * P) = rowsum(dO * O), a sum over head_dim. Memory: no seq^2 activation per layer.
    q, k, v, mask = primals
    d_out = cotangents[0]
    out, lse = outputs
    # Rebuilt transposed, (keys x queries), as k q^T: an expression the forward pass never computed. Under
    # mx.compile, an identical q k^T + mask would be merged with the forward's scores (common subexpression
    # elimination) and that seq x seq matrix kept alive until backward, one per layer.
    # The mask is rebuilt transposed too: mask.T would be a strided view, which the fused kernel reads one
    # element at a time instead of in vectors.
    n_q, n_k = mask.shape
    mask_t = mx.tril(mx.full((n_k, n_q), -mx.inf, dtype=mask.dtype), k=n_q - n_k - 1)
    p_t = mx.exp(k @ q.swapaxes(-1, -2) + mask_t - lse.swapaxes(-1, -2))
    d_s_t = p_t * (v @ d_out.swapaxes(-1, -2) - (d_out * out).sum(-1, keepdims=True).swapaxes(-1, -2))
    d_k, d_v = _sum_to_shape(d_s_t @ q, k.shape), _sum_to_shape(p_t @ d_out, v.shape)
    return d_s_t.swapaxes(-1, -2) @ k, d_k, d_v, mx.zeros_like(mask)


def _sum_to_shape(grad: mx.array, shape) -> mx.array:
    """The gradient of a broadcast operand: summed over the axes it was broadcast along (grouped-query k, v
    serve every query head of their group). Unchanged when the shapes already agree."""
    axes = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(axis=axes, keepdims=True) if axes else grad
