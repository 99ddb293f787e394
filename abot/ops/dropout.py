"""Dropout driven by an explicit PRNG key, so a compiled step stays a pure function of its inputs."""

import mlx.core as mx


def dropout(x: mx.array, rate: float, key: mx.array | None) -> mx.array:
    """Inverted dropout: zero each element with probability `rate`, scale the rest by 1/(1-rate).

    key=None (evaluation, generation) or rate=0 is the identity.
    """
    if key is None or rate == 0.0:
        return x
    # stop_gradient: the key is an input of checkpointed blocks, and random bits have no derivative.
    keep = mx.random.bernoulli(1.0 - rate, x.shape, key=mx.stop_gradient(key))
    return mx.where(keep, x / (1.0 - rate), mx.zeros_like(x))
