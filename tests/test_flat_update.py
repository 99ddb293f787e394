"""The flat-buffer optimizer update (abot.optim.flat, abot.step): the same training as the per-leaf update, a
per-tensor checkpoint either way, and the per-leaf fallback for optimizers not declared elementwise."""

import abot  # noqa: F401
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from abot.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from abot.config import ModelConfig
from abot.losses import next_token
from abot.models.transformer import transformer
from abot.optim.adamw import adamw
from abot.optim.base import Optimizer
from abot.optim.flat import flat_opt_state, flatten, layout_of, tree_opt_state, unflatten
from abot.optim.muon_adamw import muon_adamw
from abot.optim.sgd import sgd
from abot.step import init_state, make_train_step
from abot.update import checkpoint_state, step_state, update_layout
from kill_resume import assert_bit_identical

# 1-D norm gains (never decayed) beside 2-D matrices (decayed): the decay split matters.
MODEL = transformer(ModelConfig(vocab_size=256, n_layers=2, d_model=32, n_heads=4, dropout=0.0, max_seq_len=64))
OPTIMIZERS = {"adamw": lambda: adamw(weight_decay=0.1),
              "sgd": lambda: sgd(weight_decay=0.1, momentum=0.9, nesterov=True),
              "sgd_plain": lambda: sgd(weight_decay=0.1)}


def batch(seed):
    return mx.random.randint(0, 256, (1, 4, 17), key=mx.random.key(seed))


def train(optimizer, flat, steps, state=None, clip=0.0, lanes=1, first=0):
    """`steps` compiled steps of MODEL from `state` (default: a fresh one, per tensor) -> the final state as the
    step carries it."""
    step = make_train_step(MODEL, next_token, optimizer, grad_accum_steps=1, max_grad_norm=clip, lanes=lanes,
                           flat_update=flat)
    state = state or init_state(MODEL.init(mx.random.key(0)), optimizer, mx.random.key(1))
    for i in range(first, first + steps):
        state, metrics = step(state, batch(i), mx.array(1e-2))
        mx.eval(state, metrics)
    return state


def per_tensor(state, optimizer, flat, lanes=1):
    return checkpoint_state(state, update_layout(optimizer, lanes, flat))


def mixed_tree():
    key = mx.random.key(7)
    return {"embed": mx.random.normal((12, 4), key=key),
            "blocks": [{"w": mx.random.normal((4, 4), key=mx.random.key(i)), "g": mx.ones((4,)) * i}
                       for i in range(12)],  # past ten: list order is numeric, not "10" < "2"
            "conv": mx.random.normal((2, 3, 4), key=key),
            "half": mx.random.normal((5, 3), key=key).astype(mx.bfloat16),
            "bias": (mx.arange(3, dtype=mx.float32),)}


@pytest.mark.parametrize("parts", [1, 3])
def test_flatten_then_unflatten_is_the_same_tree(parts):
    tree = mixed_tree()
    layout = layout_of(tree, parts)
    buffers = flatten(tree, layout)
    back = unflatten(buffers, layout)
    assert tree_map(lambda _: 0, back) == tree_map(lambda _: 0, tree)  # same structure: dicts, lists, tuples
    assert_bit_identical(back, tree, "unflatten(flatten(tree))")
    # One buffer per kind of leaf (dtype, decayed) and part; decayed groups are rows, so is_decayed holds.
    for g in layout.groups:
        assert buffers[g.name].shape == ((1, g.size) if g.decayed else (g.size,))
        assert {len(s.shape) >= 2 for s in g.slots} == {g.decayed}
    kinds = {(buffers[g.name].dtype, g.decayed) for g in layout.groups}
    assert kinds == {(mx.float32, True), (mx.float32, False), (mx.bfloat16, True)}
    assert len(layout.groups) <= parts * len(kinds)
    assert sum(g.size for g in layout.groups) == sum(v.size for _, v in tree_flatten(tree))


def test_optimizer_state_converts_to_flat_and_back():
    params = tree_map(lambda p: p.astype(mx.float32), MODEL.init(mx.random.key(0)))
    layout = layout_of(params, 2)
    state = adamw(weight_decay=0.1).init(params)
    state = {**state, "m": tree_map(lambda p: p * 3.0, params)}  # not zeros: the values must travel too
    flat = flat_opt_state(state, layout)
    assert sorted(flat["m"]) == sorted(g.name for g in layout.groups) and flat["count"] is state["count"]
    assert_bit_identical(flat_opt_state(flat, layout), flat, "opt_state (already flat)")
    assert_bit_identical(tree_opt_state(flat, layout), state, "opt_state")
    assert_bit_identical(tree_opt_state(state, layout), state, "opt_state (already per tensor)")


def test_update_layout_cuts_each_kind_into_lanes_and_bounded_buffers(monkeypatch):
    params = MODEL.init(mx.random.key(0))
    total = sum(v.size for _, v in tree_flatten(params))
    assert update_layout(adamw(), lanes=1, flat_update=False) is None
    one = update_layout(adamw(), lanes=1)(params)
    assert [g.decayed for g in one.groups] == [True, False]  # a small model: one buffer per kind
    assert len(update_layout(adamw(), lanes=2)(params).groups) == 4
    monkeypatch.setattr("abot.update.MIN_BUFFER", 1)
    many = update_layout(adamw(), lanes=1)(params)
    biggest = max(v.size for _, v in tree_flatten(params))
    assert len(many.groups) > 8 and all(g.size <= max(total // 8, biggest) for g in many.groups)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("lanes,buffers", [(1, "few"), (2, "few"), (2, "many")])
def test_flat_update_trains_exactly_as_the_per_leaf_one(name, lanes, buffers, monkeypatch):
    """Without clipping the update is the same elementwise arithmetic on the same values: bit for bit, with one
    buffer per kind of leaf and lane or with each kind cut into eight (updated a stream's buffer at a time)."""
    if buffers == "many":
        monkeypatch.setattr("abot.update.MIN_BUFFER", 1)
    optimizer = OPTIMIZERS[name]()
    per_leaf = train(optimizer, False, 3, lanes=lanes)
    flat = train(optimizer, True, 3, lanes=lanes)
    layout = update_layout(optimizer, lanes)(flat["params"])
    moments = [v for v in flat["opt_state"].values() if isinstance(v, dict)]
    assert all(sorted(m) == sorted(g.name for g in layout.groups) for m in moments)  # carried flat
    assert_bit_identical(per_tensor(flat, optimizer, True, lanes), per_leaf, "state")
    assert not mx.array_equal(flat["params"]["blocks"][0]["wq"], MODEL.init(mx.random.key(0))["blocks"][0]["wq"])


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_flat_update_with_clipping_stays_within_float_rounding(name):
    """The global norm sums the gradients in another order (one sum per buffer, not per tensor): it differs
    in its last bits, so the clipped update does too, by far less than 1e-6 after three steps."""
    optimizer = OPTIMIZERS[name]()
    per_leaf = train(optimizer, False, 3, clip=0.05)
    flat = per_tensor(train(optimizer, True, 3, clip=0.05), optimizer, True)
    for (k, a), (_, b) in zip(tree_flatten(flat), tree_flatten(per_leaf)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=1e-6, err_msg=k)


def test_a_non_finite_step_leaves_the_flat_state_as_it_was():
    optimizer = adamw(weight_decay=0.1)
    state = step_state(init_state(MODEL.init(mx.random.key(0)), optimizer, mx.random.key(1)),
                       update_layout(optimizer))
    broken = make_train_step(MODEL, lambda *a: (mx.array(float("nan")) * next_token(*a)[0], {}), optimizer,
                             grad_accum_steps=1, max_grad_norm=1.0)
    after, metrics = broken(state, batch(0), mx.array(1e-2))
    mx.eval(after, metrics)
    assert metrics["finite"].item() == 0.0
    assert_bit_identical({k: after[k] for k in ("params", "opt_state")},
                         {k: state[k] for k in ("params", "opt_state")}, "state")


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_checkpoints_are_per_tensor_and_resume_across_the_two_updates(tmp_path, name):
    """4 steps, saved after 2 by one update and resumed by the other, are bit-identical to 4 steps of either."""
    optimizer = OPTIMIZERS[name]()
    whole = train(optimizer, False, 4)
    for first, then in [(True, False), (False, True)]:
        half = train(optimizer, first, 2)
        path = tmp_path / f"{first}.ckpt"
        save_checkpoint(path, {"state": per_tensor(half, optimizer, first)}, 2)
        saved = load_checkpoint(path).trees["state"]
        fresh = init_state(MODEL.init(mx.random.key(0)), optimizer, mx.random.key(1))
        assert [(k, v.shape, v.dtype) for k, v in tree_flatten(saved)] == \
               [(k, v.shape, v.dtype) for k, v in tree_flatten(fresh)]  # per tensor, as the per-leaf update's
        resumed = train(optimizer, then, 2, state=step_state(saved, update_layout(optimizer, 1, then)), first=2)
        assert_bit_identical(per_tensor(resumed, optimizer, then), whole, f"written flat={first}, resumed flat={then}")


def test_an_optimizer_not_declared_elementwise_keeps_the_per_leaf_update():
    """A plugin's `Optimizer(init, update)`: its update sees the parameter tree itself, and it trains."""
    seen = []

    def update(grads, state, params, lr):
        seen.append([k for k, _ in tree_flatten(grads)])
        return tree_map(lambda p, g: p - lr * g, params, grads), {"steps": state["steps"] + 1}

    plugin = Optimizer(init=lambda params: {"steps": mx.array(0)}, update=update)
    assert update_layout(plugin) is None and update_layout(muon_adamw()) is None
    before = init_state(MODEL.init(mx.random.key(0)), plugin, mx.random.key(1))
    after = train(plugin, True, 2, state=before)
    assert seen and seen[0] == [k for k, _ in tree_flatten(before["params"])]
    assert after["opt_state"]["steps"].item() == 2
    assert not mx.array_equal(after["params"]["embed"], before["params"]["embed"])


def test_muon_adamw_is_unchanged_by_the_flat_update_switch():
    optimizer = muon_adamw(weight_decay=0.1)
    on, off = train(optimizer, True, 2), train(optimizer, False, 2)
    assert_bit_identical(on, off, "muon_adamw state")
    fresh = init_state(MODEL.init(mx.random.key(0)), optimizer, mx.random.key(1))
    assert [k for k, _ in tree_flatten(on["opt_state"])] == [k for k, _ in tree_flatten(fresh["opt_state"])]


ROOT = Path(__file__).resolve().parent.parent
ARGS = ["model.vocab_size=1000", "model.n_layers=2", "model.d_model=64", "model.n_heads=4",
        "model.dropout=0.1", "data.seq_len=64", "train.micro_batch_size=4", "train.warmup_steps=2",
        "train.eval_steps=0", "train.optimizer=adamw", "train.optimizer_args={}", "train.weight_decay=0.1",
        "train.total_steps=6", "train.ckpt_interval=3", "train.ckpt_keep=5"]


def cli(*args, cwd):
    out = subprocess.run([sys.executable, "-m", "abot", *args], capture_output=True, text=True, cwd=cwd,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.slow
def test_abot_train_writes_per_tensor_checkpoints_and_resumes_bit_identically(tmp_path):
    """`abot train` with adamw (the flat update): its checkpoints hold per-tensor moments, and a run resumed
    from its step-3 checkpoint writes the same step-6 checkpoint as the run that went straight through."""
    tok, tiny = tmp_path / "tok.model", str(ROOT / "configs" / "tiny.yaml")
    cli("tokenizer", "train", tiny, "model.vocab_size=1000", f"train.tokenizer_path={tok}", cwd=tmp_path)
    args = ["train", tiny, *ARGS, f"train.tokenizer_path={tok}"]
    cli(*args, f"train.save_dir={tmp_path / 'whole'}", cwd=tmp_path)
    saved = dict(list_checkpoints(tmp_path / "whole"))
    state = load_checkpoint(saved[3]).trees["state"]
    params = [k for k, _ in tree_flatten(state["params"])]
    assert [k for k, _ in tree_flatten(state["opt_state"]["m"])] == params
    assert [k for k, _ in tree_flatten(state["opt_state"]["v"])] == params
    cli(*args, f"train.save_dir={tmp_path / 'resumed'}", f"train.checkpoint_path={saved[3]}", cwd=tmp_path)
    resumed = load_checkpoint(dict(list_checkpoints(tmp_path / "resumed"))[6])
    whole = load_checkpoint(saved[6])
    assert_bit_identical(resumed.trees["state"], whole.trees["state"], "state")
    assert json.dumps(resumed.meta["data_state"]) == json.dumps(whole.meta["data_state"])


PEAK = r"""
import json, sys
import abot
import mlx.core as mx
from abot.config import config_from_dict
from abot.run import build_step
from abot.stage import PRETRAIN, random_batch
cfg = config_from_dict(json.loads(sys.argv[1]))
parts = build_step(cfg, PRETRAIN, 1, flat_update=sys.argv[2] == "flat")
state = parts.fresh_state(parts.model.init(mx.random.key(0)), mx.random.key(1))
tokens = random_batch(PRETRAIN, cfg, mx.random.key(2))
mx.eval(state, tokens)
mx.clear_cache()
mx.reset_peak_memory()
state, metrics = parts.step(state, tokens, mx.array(1e-4))
mx.eval(state, metrics)
print(mx.get_peak_memory())
"""


@pytest.mark.slow
def test_flat_update_peak_memory_stays_near_the_per_leaf_one():
    """At batch 1 the update phase is the step's peak. The flat copies cost about one parameter size more
    (5.6x -> 7.0x the parameters' bytes); whole-model buffers held every temporary at once (12x)."""
    raw = {"model": {"vocab_size": 8000, "n_layers": 6, "d_model": 256, "n_heads": 8, "dropout": 0.0},
           "data": {"seq_len": 64}, "train": {"optimizer": "adamw", "weight_decay": 0.1, "micro_batch_size": 1,
                                              "grad_accum_steps": 1, "max_grad_norm": 1.0}}
    peaks = {}
    for update in ("per-leaf", "flat"):
        out = subprocess.run([sys.executable, "-c", PEAK, json.dumps(raw), update], capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[update] = int(out.stdout.strip().splitlines()[-1])
    assert peaks["flat"] < 1.35 * peaks["per-leaf"], peaks
