import math

import abot  # noqa: F401  (loads the BLAS shim before mlx)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from abot.config import ModelConfig
from abot.models.transformer import count_params, hidden_size, transformer
from abot.ops.losses import cross_entropy


def small_cfg(**kw):
    base = dict(vocab_size=512, n_layers=2, d_model=64, n_heads=4, dropout=0.0, max_seq_len=128)
    return ModelConfig(**{**base, **kw})


def expected_count(c: ModelConfig) -> int:
    d, h = c.d_model, hidden_size(c)
    mlp = (3 if c.ffn_activation == "silu" else 2) * d * h
    head = 0 if c.tie_embeddings else d * c.vocab_size
    return c.vocab_size * d + c.n_layers * (4 * d * d + mlp + 2 * d) + d + head


@pytest.mark.parametrize("d,layers,heads", [(256, 6, 8), (768, 12, 12)])
def test_first_loss_is_near_log_vocab(d, layers, heads):
    cfg = ModelConfig(vocab_size=32000, n_layers=layers, d_model=d, n_heads=heads, dropout=0.0)
    model = transformer(cfg)
    params = model.init(mx.random.key(0))
    tokens = mx.random.randint(0, cfg.vocab_size, (2, 33), key=mx.random.key(1))
    loss = cross_entropy(model.apply(params, tokens[:, :-1]), tokens[:, 1:]).item()
    assert abs(loss - math.log(cfg.vocab_size)) < 0.2


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False}, {"ffn_activation": "gelu"}])
def test_parameter_count_matches_formula(kw):
    cfg = small_cfg(**kw)
    assert count_params(transformer(cfg).init(mx.random.key(0))) == expected_count(cfg)


def test_guide_sizes_are_reported_truthfully():
    # NOTES.md: tiny ~14.5M, small ~50M at vocab 32000 (not the guide's 7M/30M).
    tiny = ModelConfig(vocab_size=32000, n_layers=6, d_model=256, n_heads=8)
    small = ModelConfig(vocab_size=32000, n_layers=8, d_model=512, n_heads=8)
    assert round(expected_count(tiny) / 1e6, 1) == 14.5
    assert round(expected_count(small) / 1e6) == 50


def test_tied_embedding_is_one_leaf_and_gets_both_gradients():
    cfg = small_cfg()
    model = transformer(cfg)
    params = model.init(mx.random.key(0))
    names = [k for k, _ in tree_flatten(params)]
    assert "head" not in params and names.count("embed") == 1
    tokens = mx.array([[1, 2, 3, 4, 5]])
    grads = mx.grad(lambda p: cross_entropy(model.apply(p, tokens[:, :-1]), tokens[:, 1:]))(params)
    g = np.array(grads["embed"])
    # Rows of tokens never seen as input still get gradient through the output head.
    assert np.abs(g[100]).sum() > 0 and np.abs(g[1]).sum() > 0


def test_untied_head_is_its_own_leaf():
    params = transformer(small_cfg(tie_embeddings=False)).init(mx.random.key(0))
    assert params["head"].shape == (64, 512)


def test_logits_are_causal():
    model = transformer(small_cfg())
    params = model.init(mx.random.key(0))
    a = mx.random.randint(0, 512, (1, 16), key=mx.random.key(3))
    b = mx.concatenate([a[:, :10], mx.random.randint(0, 512, (1, 6), key=mx.random.key(4))], axis=1)
    la, lb = model.apply(params, a), model.apply(params, b)
    assert mx.allclose(la[:, :10], lb[:, :10], atol=1e-5).item()
    assert not mx.allclose(la[:, 10:], lb[:, 10:], atol=1e-3).item()


def test_dropout_follows_the_key():
    model = transformer(small_cfg(dropout=0.2))
    params = model.init(mx.random.key(0))
    tokens = mx.array([[1, 2, 3, 4, 5, 6]])
    k1 = model.apply(params, tokens, key=mx.random.key(7))
    assert mx.array_equal(k1, model.apply(params, tokens, key=mx.random.key(7))).item()
    assert not mx.allclose(k1, model.apply(params, tokens, key=mx.random.key(8))).item()
    assert mx.array_equal(model.apply(params, tokens), model.apply(params, tokens)).item()


def test_kv_cache_gives_the_same_logits():
    model = transformer(small_cfg())
    params = model.init(mx.random.key(0))
    tokens = mx.random.randint(0, 512, (2, 12), key=mx.random.key(5))
    full = model.apply(params, tokens)
    cache = model.new_cache()
    first, cache = model.apply(params, tokens[:, :7], cache=cache)
    rest = [first]
    for i in range(7, 12):
        logits, cache = model.apply(params, tokens[:, i:i + 1], cache=cache)
        rest.append(logits)
    assert mx.allclose(mx.concatenate(rest, axis=1), full, atol=1e-4).item()


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = small_cfg(dropout=0.1)
    tokens = mx.random.randint(0, 512, (2, 9), key=mx.random.key(6))
    grads = []
    for ckpt in (False, True):
        model = transformer(cfg, gradient_checkpointing=ckpt)
        params = model.init(mx.random.key(0))
        loss = lambda p: cross_entropy(model.apply(p, tokens[:, :-1], key=mx.random.key(2)), tokens[:, 1:])  # noqa
        grads.append(mx.grad(loss)(params))
    for (_, a), (_, b) in zip(tree_flatten(grads[0]), tree_flatten(grads[1])):
        assert mx.allclose(a, b, atol=1e-6).item()
