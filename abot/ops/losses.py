"""Cross-entropy over the vocabulary, in float32 whatever the compute precision."""

import mlx.core as mx

from abot.ops.elementwise import logsumexp


def token_logprobs(logits: mx.array, targets: mx.array) -> mx.array:
    """log p(target) at every position: logits (..., V), targets (...) -> (...), float32."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - logsumexp(logits, axis=-1)


def cross_entropy(logits: mx.array, targets: mx.array, mask: mx.array | None = None) -> mx.array:
    """Mean negative log-likelihood of `targets`; with `mask`, the mean over positions where mask is 1."""
    nll = -token_logprobs(logits, targets)
    if mask is None:
        return nll.mean()
    mask = mask.astype(mx.float32)
    return (nll * mask).sum() / mx.maximum(mask.sum(), 1.0)
