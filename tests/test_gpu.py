"""The GPU paths (fused attention, low-memory cross-entropy, mixed precision) against float32 references.

Skipped without a GPU (CI has none); run on Metal or CUDA with `python -m pytest tests/test_gpu.py`.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from abot.config import ModelConfig
from abot.losses import next_token
from abot.models.transformer import transformer
from abot.ops.attention import causal_attention
from abot.ops.losses import token_logprobs
from abot.registry import optimizers
from abot.step import init_state, make_train_step

pytestmark = pytest.mark.skipif(mx.default_device() != mx.gpu, reason="needs a GPU (Metal or CUDA)")


def f32(x):
    return np.array(x.astype(mx.float32))


def test_fused_bfloat16_attention_matches_float32_values_and_gradients():
    keys = mx.random.split(mx.random.key(0), 4)
    q, k, v, w = (mx.random.normal((2, 4, 256, 64), key=key) for key in keys)

    def reference(q, k, v):
        s = (q @ k.swapaxes(-1, -2)) / math.sqrt(q.shape[-1])
        s = mx.where(mx.tril(mx.ones((256, 256), dtype=mx.bool_)), s, -mx.inf)
        return mx.softmax(s, axis=-1, precise=True) @ v

    def loss(fn, dtype):
        return mx.value_and_grad(lambda *x: (fn(*(t.astype(dtype) for t in x)).astype(mx.float32) * w).sum(),
                                 argnums=(0, 1, 2))(q, k, v)

    (value, grads), (ref_value, ref_grads) = loss(causal_attention, mx.bfloat16), loss(reference, mx.float32)
    assert value.item() == pytest.approx(ref_value.item(), rel=2e-2, abs=1.0)
    for g, ref in zip(grads, ref_grads):
        assert np.abs(f32(g) - f32(ref)).max() < 0.05 * np.abs(f32(ref)).max()


def test_low_memory_cross_entropy_on_the_gpu_matches_float32():
    keys = mx.random.split(mx.random.key(1), 2)
    logits = 3.0 * mx.random.normal((4, 128, 32000), key=keys[0])
    targets = mx.random.randint(0, 32000, (4, 128), key=keys[1])
    loss = lambda x: -token_logprobs(x, targets).mean()  # noqa: E731
    value, grad = mx.value_and_grad(loss)(logits.astype(mx.bfloat16))
    ref_value, ref_grad = mx.value_and_grad(loss)(logits.astype(mx.bfloat16).astype(mx.float32))
    assert grad.dtype == mx.bfloat16
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    np.testing.assert_allclose(f32(grad), f32(ref_grad), atol=1e-8, rtol=1e-2)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_steps_train_and_keep_float32_master_weights(precision):
    cfg = ModelConfig(vocab_size=512, n_layers=2, d_model=128, n_heads=2, dropout=0.0, max_seq_len=256)
    model = transformer(cfg)
    opt = optimizers.get("adamw")(weight_decay=0.0)
    state = init_state(model.init(mx.random.key(0)), opt, mx.random.key(1), precision)
    step = make_train_step(model, next_token, opt, grad_accum_steps=1, max_grad_norm=1.0, precision=precision)
    batch = mx.random.randint(0, 512, (1, 4, 257), key=mx.random.key(2))
    ref_loss = next_token(model, state["params"], batch[0], None)[0].item()  # the float32 model
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch, mx.array(3e-3))
        losses.append(metrics["loss"].item())
        assert metrics["finite"].item() == 1.0
    assert losses[0] == pytest.approx(ref_loss, abs=0.05)  # the same model, computed in low precision
    assert losses[-1] < losses[0] - 1.0  # a fixed batch is being learned
    assert all(p.dtype == mx.float32 for p in (state["params"]["embed"], state["opt_state"]["m"]["embed"]))
