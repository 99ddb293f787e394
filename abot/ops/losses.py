"""Cross-entropy over the vocabulary, in float32 whatever the compute precision."""

import mlx.core as mx

from abot.ops.elementwise import logsumexp


@mx.custom_function
def token_logprobs(logits: mx.array, targets: mx.array) -> mx.array:
    """log p(target) at every position: logits (..., V), targets (...) -> (...), float32.

    The log-sum-exp is taken in float32 whatever the logits' dtype; the hand-written gradient below keeps
    nothing but the logits themselves for backward.
    """
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(mx.float32)
    return picked - logsumexp(logits.astype(mx.float32), axis=-1)


@token_logprobs.vjp
def _token_logprobs_vjp(primals, cotangent, output):
    # d logp(t) / d logits = onehot(t) - softmax(logits). The log-sum-exp comes back from the output
    # (lse = logit[t] - logp), so the backward pass reads the saved low-precision logits once and writes
    # the gradient in their dtype: at medium's shape (16k tokens x 32k vocab) that is 1 GiB of bfloat16
    # where autodiff keeps a 2 GiB float32 copy and builds 2 GiB float32 gradients. The whole gradient is
    # one fused kernel (the one-hot is a comparison inside it); autodiff would also fill a zero array of
    # the logits' size and scatter the picked entries into it.
    logits, targets = primals
    n_vocab = logits.shape[-1]
    # Flattened first: a cast the forward never computed, so mx.compile cannot merge it with the forward's
    # (common subexpression elimination; see abot/ops/attention.py). On the CPU the peak measured the same
    # either way; this is the form measured on the GPU.
    flat = logits.reshape(-1, n_vocab)
    picked = mx.take_along_axis(flat, targets.reshape(-1, 1), axis=-1).astype(mx.float32)
    lse = picked - output.reshape(-1, 1)
    onehot = mx.arange(n_vocab) == targets.reshape(-1, 1)
    d_logits = cotangent.reshape(-1, 1) * (onehot.astype(mx.float32) - mx.exp(flat.astype(mx.float32) - lse))
    return d_logits.astype(logits.dtype).reshape(logits.shape), mx.zeros_like(targets)


def cross_entropy(logits: mx.array, targets: mx.array, mask: mx.array | None = None) -> mx.array:
    """Mean negative log-likelihood of `targets`; with `mask`, the mean over positions where mask is 1."""
    nll = -token_logprobs(logits, targets)
    if mask is None:
        return nll.mean()
    mask = mask.astype(mx.float32)
    return (nll * mask).sum() / mx.maximum(mask.sum(), 1.0)
