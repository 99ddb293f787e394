"""The CPU kernels with hand-written gradients against MLX's built-ins and autodiff."""

import math

import mlx.core as mx
import numpy as np
import pytest

from abot.ops.attention import causal_attention
from abot.ops.elementwise import silu_gate


def reference_attention(q, k, v):
    n_q, n_k = q.shape[2], k.shape[2]
    s = (q @ k.swapaxes(-1, -2)) / math.sqrt(q.shape[-1])
    s = mx.where(mx.tril(mx.ones((n_q, n_k), dtype=mx.bool_), k=n_k - n_q), s, -mx.inf)
    return mx.softmax(s, axis=-1, precise=True) @ v


@pytest.mark.parametrize("n_q,n_k", [(16, 16), (5, 12), (1, 7)])
@pytest.mark.parametrize("compiled", [False, True])
def test_attention_values_and_gradients_match_autodiff_of_the_reference(n_q, n_k, compiled):
    keys = mx.random.split(mx.random.key(0), 4)
    q = 2.0 * mx.random.normal((2, 3, n_q, 8), key=keys[0])  # large enough that softmax is far from uniform
    k, v = (mx.random.normal((2, 3, n_k, 8), key=key) for key in keys[1:3])
    w = mx.random.normal((2, 3, n_q, 8), key=keys[3])

    def loss(fn):
        f = lambda q, k, v: (fn(q, k, v) * w).sum()  # noqa: E731
        g = mx.value_and_grad(f, argnums=(0, 1, 2))
        return mx.compile(g) if compiled else g

    (value, grads), (ref_value, ref_grads) = loss(causal_attention)(q, k, v), loss(reference_attention)(q, k, v)
    np.testing.assert_allclose(causal_attention(q, k, v), reference_attention(q, k, v), atol=1e-5)
    np.testing.assert_allclose(value.item(), ref_value.item(), rtol=1e-5)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=2e-5)


def test_silu_gate_matches_autodiff_and_stays_finite_at_extremes():
    a = mx.array([-1000.0, -88.5, -20.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 3.0, 20.0, 95.0])
    b = mx.linspace(-2.0, 2.0, a.size)
    w = mx.linspace(1.0, -1.0, a.size)

    def reference(a, b):
        return (a * mx.sigmoid(a) * b * w).sum()

    value, (ga, gb) = mx.value_and_grad(lambda a, b: (silu_gate(a, b) * w).sum(), argnums=(0, 1))(a, b)
    ref_value, (ref_ga, ref_gb) = mx.value_and_grad(reference, argnums=(0, 1))(a, b)
    assert np.isfinite(np.array(ga)).all() and np.isfinite(np.array(gb)).all()
    np.testing.assert_allclose(value.item(), ref_value.item(), rtol=1e-6)
    np.testing.assert_allclose(ga, ref_ga, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gb, ref_gb, rtol=1e-5, atol=1e-7)
    # Hand check at a = 0: silu'(0) = 1/2, so d/da = w * b / 2 there.
    i = 5
    assert ga[i].item() == pytest.approx(w[i].item() * b[i].item() / 2)
