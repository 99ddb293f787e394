"""The CPU kernels with hand-written gradients against MLX's built-ins and autodiff."""

import math

import mlx.core as mx
import numpy as np
import pytest

from abot.ops.attention import causal_attention
from abot.ops.elementwise import silu_gate
from abot.ops.losses import token_logprobs


def reference_attention(q, k, v):
    n_q, n_k = q.shape[2], k.shape[2]
    s = (q @ k.swapaxes(-1, -2)) / math.sqrt(q.shape[-1])
    s = mx.where(mx.tril(mx.ones((n_q, n_k), dtype=mx.bool_), k=n_k - n_q), s, -mx.inf)
    return mx.softmax(s, axis=-1, precise=True) @ v


# (256, 256) and (300, 310): two causal query blocks, the second with a KV-cache offset (prompt prefill)
@pytest.mark.parametrize("n_q,n_k", [(16, 16), (5, 12), (1, 7), (256, 256), (300, 310)])
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


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_token_logprobs_gradient_matches_autodiff_of_the_float32_reference(dtype):
    """The hand-written gradient against autodiff of the float32 log-softmax."""
    keys = mx.random.split(mx.random.key(3), 3)
    logits = (4.0 * mx.random.normal((2, 5, 50), key=keys[0])).astype(dtype)
    targets = mx.random.randint(0, 50, (2, 5), key=keys[1])
    w = mx.random.normal((2, 5), key=keys[2])

    def reference(x):
        x = x.astype(mx.float32)
        return ((mx.take_along_axis(x, targets[..., None], -1)[..., 0] - mx.logsumexp(x, -1)) * w).sum()

    value, grad = mx.value_and_grad(lambda x: (token_logprobs(x, targets) * w).sum())(logits)
    ref_value, ref_grad = mx.value_and_grad(reference)(logits)
    assert grad.dtype == dtype
    np.testing.assert_allclose(value.item(), ref_value.item(), rtol=1e-6)
    tol = 1e-6 if dtype == mx.float32 else 1e-2  # bfloat16 keeps 8 bits: the gradient is rounded to them
    np.testing.assert_allclose(grad.astype(mx.float32), ref_grad.astype(mx.float32), atol=tol, rtol=tol)
    # Hand check: the gradients of one position's log p(target) sum to zero over the vocabulary.
    np.testing.assert_allclose(grad.astype(mx.float32).sum(-1), 0.0, atol=20 * tol)


def test_bfloat16_attention_keeps_float32_softmax_statistics():
    """On the CPU a bfloat16 model's attention runs in float32 and returns bfloat16."""
    keys = mx.random.split(mx.random.key(4), 3)
    q, k, v = (mx.random.normal((1, 2, 6, 8), key=key) for key in keys)
    out = causal_attention(*(x.astype(mx.bfloat16) for x in (q, k, v)))
    assert out.dtype == mx.bfloat16
    ref = reference_attention(*(x.astype(mx.bfloat16).astype(mx.float32) for x in (q, k, v)))
    np.testing.assert_allclose(out.astype(mx.float32), ref, atol=1e-2)  # one bfloat16 rounding of the output


def _step_peak(fn, *args) -> int:
    """Peak bytes above the inputs of one evaluation of fn(*args) (after a warm-up call)."""
    mx.eval(fn(*args))
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(fn(*args))
    return mx.get_peak_memory() - base


def test_compiled_gradient_keeps_no_more_per_layer_than_eager():
    """mx.compile merges identical expressions: a hand-written backward pass that rebuilt the forward's
    attention scores (or the gate's sigmoid) the same way would keep them alive from forward to backward,
    one seq x seq matrix per layer. Each extra layer must cost the same memory compiled as eager."""
    from abot.config import ModelConfig
    from abot.losses import next_token
    from abot.models.transformer import transformer

    tokens = mx.random.randint(0, 256, (4, 257), key=mx.random.key(1))
    peaks = {}
    for n_layers in (4, 8):
        cfg = ModelConfig(vocab_size=256, n_layers=n_layers, d_model=64, n_heads=2, dropout=0.0, max_seq_len=256)
        model = transformer(cfg)
        params = model.init(mx.random.key(0))
        grad = mx.grad(lambda p: next_token(model, p, tokens, None)[0])  # noqa: B023
        peaks[n_layers] = _step_peak(grad, params), _step_peak(mx.compile(grad), params)
    eager, compiled = ((peaks[8][i] - peaks[4][i]) / 4 for i in (0, 1))
    one_score_matrix = 4 * 2 * 256 * 256 * 4  # batch x heads x seq x seq, float32
    assert compiled <= eager + one_score_matrix / 4, (compiled, eager)
