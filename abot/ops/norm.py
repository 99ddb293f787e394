"""RMSNorm (Zhang & Sennrich, 2019): x / rms(x) * weight, without mean-centring or bias."""

import mlx.core as mx


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """Normalise the last axis; MLX's fused kernel accumulates in float32 whatever the input dtype."""
    return mx.fast.rms_norm(x, weight, eps)
