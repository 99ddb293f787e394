import abot  # noqa: F401
import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from abot.config import ModelConfig
from abot.finetune.losses import sft
from abot.losses import next_token
from abot.models.transformer import transformer
from abot.optim.base import Optimizer
from abot.step import init_state, make_eval_step, make_train_step
from abot.update import global_norm

# Plain gradient descent: the update is exactly -lr * (processed) gradient, so tests can read it back.
descent = Optimizer(init=lambda p: {}, update=lambda g, s, p, lr: (tree_map(lambda w, d: w - lr * d, p, g), s))
MODEL = transformer(ModelConfig(vocab_size=256, n_layers=2, d_model=32, n_heads=4, dropout=0.0, max_seq_len=64))


def fresh_state(precision="float32"):
    return init_state(MODEL.init(mx.random.key(0)), descent, mx.random.key(1), precision)


def tokens(shape, seed=0):
    return mx.random.randint(0, 256, shape, key=mx.random.key(seed))


def applied_update(before, after):
    """The processed gradient the optimizer received (lr = 1)."""
    return tree_map(lambda b, a: b - a, before["params"], after["params"])


def run(batch, accum, clip=0.0, compile=False, loss=next_token, precision="float32", state=None, lanes=1):
    step = make_train_step(MODEL, loss, descent, grad_accum_steps=accum, max_grad_norm=clip,
                           precision=precision, compile=compile, lanes=lanes)
    state = state or fresh_state(precision)
    new, metrics = step(state, batch, mx.array(1.0))
    mx.eval(new, metrics)
    return state, new, metrics


def assert_trees_close(a, b, atol):
    for (ka, x), (kb, y) in zip(tree_flatten(a), tree_flatten(b)):
        assert ka == kb
        np.testing.assert_allclose(np.array(x), np.array(y), atol=atol, err_msg=ka)


def test_accumulating_k_micro_batches_equals_one_batch_of_k():
    data = tokens((4, 17))
    s0, one, m1 = run(data.reshape(1, 4, 17), accum=1)
    _, four, m4 = run(data.reshape(4, 1, 17), accum=4)
    assert_trees_close(applied_update(s0, one), applied_update(s0, four), atol=1e-6)
    assert abs(m1["loss"].item() - m4["loss"].item()) < 1e-5


@pytest.mark.parametrize("compile", [False, True])
def test_a_batch_with_too_few_micro_batches_is_an_error_not_a_crash(compile):
    with pytest.raises(ValueError, match="holds 1 micro-batches on its leading axis.*grad_accum_steps=4"):
        run(tokens((1, 2, 17)), accum=4, compile=compile)


@pytest.mark.parametrize("compile", [False, True])
def test_parallel_lanes_equal_one_batch(compile):
    """A micro-batch split over two MLX streams gives the unsplit batch's loss and update."""
    batch = tokens((2, 4, 17))
    s0, whole, m1 = run(batch, accum=2, clip=1.0, compile=compile)
    _, in_lanes, m2 = run(batch, accum=2, clip=1.0, compile=compile, lanes=2)
    assert_trees_close(applied_update(s0, whole), applied_update(s0, in_lanes), atol=1e-6)
    assert m2["loss"].item() == pytest.approx(m1["loss"].item(), abs=1e-6)


def test_parallel_lanes_weigh_masked_losses_by_their_token_counts():
    """SFT's loss is a mean over assistant tokens: lanes holding 3 and 16 of them weigh 3:16, not 1:1."""
    counts = mx.array([3, 3, 16, 16])[:, None]
    batch = {"tokens": tokens((1, 4, 17)), "mask": (mx.arange(16)[None] < counts).astype(mx.int32)[None]}
    s0, whole, m1 = run(batch, accum=1, loss=sft)
    _, in_lanes, m2 = run(batch, accum=1, loss=sft, lanes=2)
    assert_trees_close(applied_update(s0, whole), applied_update(s0, in_lanes), atol=1e-6)
    assert m2["loss"].item() == pytest.approx(m1["loss"].item(), abs=1e-6)
    assert "loss_weight" not in m2  # how lanes are weighed, not a metric


@pytest.mark.parametrize("compile", [False, True])
def test_eval_step_in_parallel_lanes_equals_one_batch(compile):
    """Held-out losses split over two streams: the plain mean, and SFT's weighted by assistant tokens (3:16)."""
    params = fresh_state()["params"]
    counts = mx.array([3, 3, 16, 16])[:, None]
    masked = {"tokens": tokens((4, 17)), "mask": (mx.arange(16)[None] < counts).astype(mx.int32)}
    for loss, micro in [(next_token, tokens((4, 17), seed=3)), (sft, masked)]:
        whole, whole_metrics = make_eval_step(MODEL, loss, compile)(params, micro)
        split, split_metrics = make_eval_step(MODEL, loss, compile, lanes=2)(params, micro)
        assert split.item() == pytest.approx(whole.item(), abs=1e-6)
        assert "loss_weight" not in split_metrics and whole_metrics.keys() == split_metrics.keys()
    odd = tokens((3, 17))  # a batch the lanes do not divide runs whole
    assert make_eval_step(MODEL, next_token, compile, lanes=2)(params, odd)[0].item() == \
        pytest.approx(make_eval_step(MODEL, next_token, compile)(params, odd)[0].item(), abs=1e-6)


def test_clipping_yields_the_configured_global_norm():
    batch = tokens((1, 2, 17))
    s0, _, unclipped = run(batch, accum=1)
    raw = unclipped["grad_norm"].item()
    s0, new, metrics = run(batch, accum=1, clip=raw / 10)
    assert metrics["grad_norm"].item() == pytest.approx(raw, rel=1e-5)  # reported before clipping
    assert global_norm(applied_update(s0, new)).item() == pytest.approx(raw / 10, rel=1e-3)


def test_zero_max_grad_norm_turns_clipping_off():
    s0, new, metrics = run(tokens((1, 2, 17)), accum=1, clip=0.0)
    assert global_norm(applied_update(s0, new)).item() == pytest.approx(metrics["grad_norm"].item(), rel=1e-4)
    assert metrics["grad_norm"].item() > 0


def test_compiled_step_equals_uncompiled():
    batch = tokens((2, 2, 17))
    _, eager, me = run(batch, accum=2, clip=1.0, compile=False)
    _, compiled, mc = run(batch, accum=2, clip=1.0, compile=True)
    assert_trees_close(eager, compiled, atol=1e-6)
    assert abs(me["loss"].item() - mc["loss"].item()) < 1e-6


def test_nonfinite_loss_skips_the_update():
    def poisoned(model, params, batch, key):
        loss, aux = next_token(model, params, batch, key)
        return loss * mx.array(float("nan")), aux

    s0, new, metrics = run(tokens((1, 2, 17)), accum=1, loss=poisoned)
    assert metrics["finite"].item() == 0.0
    assert_trees_close(s0["params"], new["params"], atol=0)


def test_float16_loss_scale_halves_on_overflow_and_masters_stay_float32():
    def overflowing(model, params, batch, key):
        loss, aux = next_token(model, params, batch, key)
        return loss * 1e30, aux  # inf in float32 once scaled

    s0, new, metrics = run(tokens((1, 2, 17)), accum=1, loss=overflowing, precision="float16")
    assert metrics["finite"].item() == 0.0
    assert new["loss_scale"].item() == s0["loss_scale"].item() / 2
    s0, new, metrics = run(tokens((1, 2, 17)), accum=1, precision="float16")
    assert metrics["finite"].item() == 1.0
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(new["params"]))


def test_bfloat16_compute_is_close_to_float32():
    batch = tokens((1, 2, 17))
    _, _, m32 = run(batch, accum=1)
    _, new, m16 = run(batch, accum=1, precision="bfloat16")
    assert abs(m32["loss"].item() - m16["loss"].item()) < 0.05
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(new["params"]))


def test_key_advances_and_is_an_explicit_output():
    s0, new, _ = run(tokens((1, 2, 17)), accum=1)
    assert not mx.array_equal(s0["key"], new["key"]).item()


ACCUMULATION_MEMORY = r"""
import abot, json
import mlx.core as mx
from abot.config import ModelConfig
from abot.losses import next_token
from abot.models.transformer import transformer
from abot.optim.base import Optimizer
from mlx.utils import tree_map
from abot.step import init_state, make_train_step

descent = Optimizer(init=lambda p: {}, update=lambda g, s, p, lr: (tree_map(lambda w, d: w - lr * d, p, g), s))
model = transformer(ModelConfig(vocab_size=4000, n_layers=2, d_model=64, n_heads=4, dropout=0.0, max_seq_len=128))
peaks = []
for accum in (1, 4):
    state = init_state(model.init(mx.random.key(0)), descent, mx.random.key(1))
    batch = mx.random.randint(0, 4000, (accum, 8, 129), key=mx.random.key(2))
    mx.eval(state, batch)
    step = make_train_step(model, next_token, descent, grad_accum_steps=accum, max_grad_norm=1.0, lanes=2)
    for _ in range(2):  # the first call also builds the kernels, which changes how the two streams overlap
        mx.reset_peak_memory()
        mx.eval(step(state, batch, mx.array(0.1)))
    peaks.append(mx.get_peak_memory())
print(json.dumps(peaks))
"""


def test_accumulated_micro_batches_run_one_after_another_in_parallel_lanes():
    """Accumulation bounds memory to one micro-batch's activations, also in the breadth-first order lanes use."""
    env = {**os.environ, "MLX_BFS_MAX_WIDTH": "100000", "ABOT_BFS_WIDTH": ""}
    out = subprocess.run([sys.executable, "-c", ACCUMULATION_MEMORY], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    one, four = json.loads(out.stdout.strip().splitlines()[-1])
    assert four < 1.3 * one, (one, four)  # every micro-batch's activations at once would be ~4x
