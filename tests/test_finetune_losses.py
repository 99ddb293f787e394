"""SFT, DPO and IPO losses against hand (numpy) computations; the reference model; padding isolation."""

import abot  # noqa: F401  (first: it sets up BLAS before anything imports mlx.core)

import math
from typing import NamedTuple

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from abot.config import ModelConfig
from abot.finetune.losses import dpo, ipo, sequence_logprobs, sft
from abot.finetune.reference import add_reference_logprobs, make_reference_fn
from abot.models.transformer import transformer
from abot.optim.base import Optimizer
from abot.step import init_state, make_train_step

V, B, L = 11, 3, 6


class Bigram(NamedTuple):
    """A model whose logits at a position are a table row picked by the token there: easy to compute by hand."""

    def apply(self, params, tokens, key=None):
        return params["table"][tokens]


BIGRAM = Bigram()
RNG = np.random.default_rng(0)
POLICY = {"table": RNG.normal(size=(V, V)).astype(np.float32)}
REFERENCE = {"table": RNG.normal(size=(V, V)).astype(np.float32)}


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_seq_logprobs(table, tokens, mask):
    """sum_t mask[t] * log softmax(table[tokens[t]])[tokens[t + 1]], per row."""
    logp = np_log_softmax(table[tokens[:, :-1]])
    picked = np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return (picked * mask).sum(-1)


def pair_batch():
    chosen = RNG.integers(0, V, (B, L + 1)).astype(np.int32)
    rejected = chosen.copy()
    rejected[:, 3:] = RNG.integers(0, V, (B, L - 2))  # same 3-token prompt, different responses
    cm = np.zeros((B, L), np.float32)
    rm = np.zeros((B, L), np.float32)
    cm[0, 2:6], cm[1, 2:4], cm[2, 2:5] = 1, 1, 1  # responses of different lengths, then padding
    rm[0, 2:3], rm[1, 2:6], rm[2, 2:6] = 1, 1, 1
    return {"chosen": chosen, "rejected": rejected, "chosen_mask": cm, "rejected_mask": rm}


def mx_tree(tree):
    return tree_map(mx.array, tree)


def with_reference(batch):
    out = dict(batch)
    out["ref_chosen"] = np_seq_logprobs(REFERENCE["table"], batch["chosen"], batch["chosen_mask"]).astype(np.float32)
    out["ref_rejected"] = np_seq_logprobs(REFERENCE["table"], batch["rejected"], batch["rejected_mask"]).astype(
        np.float32)
    return out


def test_sft_loss_is_the_mean_nll_over_assistant_targets():
    tokens = RNG.integers(0, V, (B, L + 1)).astype(np.int32)
    mask = (RNG.random((B, L)) < 0.5).astype(np.float32)
    mask[0, 0] = 1
    loss, _ = sft(BIGRAM, mx_tree(POLICY), {"tokens": mx.array(tokens), "mask": mx.array(mask)}, None)
    logp = np_log_softmax(POLICY["table"][tokens[:, :-1]])
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    assert loss.item() == pytest.approx((nll * mask).sum() / mask.sum(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_rewards_match_a_hand_computation(beta):
    batch = with_reference(pair_batch())
    loss, m = dpo(BIGRAM, mx_tree(POLICY), mx_tree(batch), None, beta=beta)
    pc = np_seq_logprobs(POLICY["table"], batch["chosen"], batch["chosen_mask"])
    pr = np_seq_logprobs(POLICY["table"], batch["rejected"], batch["rejected_mask"])
    rc, rr = batch["ref_chosen"], batch["ref_rejected"]
    chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
    margin = chosen_reward - rejected_reward
    expected = np.mean([-math.log(1.0 / (1.0 + math.exp(-x))) for x in margin])  # -log sigmoid, plainly
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["reward_chosen"].item() == pytest.approx(chosen_reward.mean(), rel=1e-5, abs=1e-6)
    assert m["reward_rejected"].item() == pytest.approx(rejected_reward.mean(), rel=1e-5, abs=1e-6)
    assert m["reward_margin"].item() == pytest.approx(margin.mean(), rel=1e-5, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx((margin > 0).mean())


def test_ipo_loss_matches_a_hand_computation():
    beta = 0.25
    batch = with_reference(pair_batch())
    loss, m = ipo(BIGRAM, mx_tree(POLICY), mx_tree(batch), None, beta=beta)
    pc = np_seq_logprobs(POLICY["table"], batch["chosen"], batch["chosen_mask"])
    pr = np_seq_logprobs(POLICY["table"], batch["rejected"], batch["rejected_mask"])
    h = (pc - batch["ref_chosen"]) - (pr - batch["ref_rejected"])
    assert loss.item() == pytest.approx(np.mean((h - 1 / (2 * beta)) ** 2), rel=1e-5)
    assert m["reward_margin"].item() == pytest.approx(beta * h.mean(), rel=1e-5, abs=1e-6)


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    # The reference model at the start of DPO is the policy: same params, same computation, exact ties.
    batch = add_reference_logprobs(make_reference_fn(BIGRAM, compile=False), mx_tree(POLICY), mx_tree(pair_batch()))
    loss, m = dpo(BIGRAM, mx_tree(POLICY), batch, None)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert abs(m["reward_margin"].item()) < 1e-5 and m["accuracy"].item() == 0.0  # a tie is not a win


def test_reference_params_are_an_input_of_the_compiled_function_and_get_no_gradient():
    ref_fn = make_reference_fn(BIGRAM, compile=True)
    batch = mx_tree(pair_batch())
    for table in (POLICY, REFERENCE):  # same compiled function, two parameter trees: nothing captured
        out = add_reference_logprobs(ref_fn, mx_tree(table), batch)
        expected = np_seq_logprobs(table["table"], np.array(batch["chosen"]), np.array(batch["chosen_mask"]))
        np.testing.assert_allclose(np.array(out["ref_chosen"]), expected, rtol=1e-5)
    grad = mx.grad(lambda p: ref_fn(p, batch["chosen"], batch["chosen_mask"]).sum())(mx_tree(REFERENCE))
    assert mx.abs(grad["table"]).max().item() == 0.0
    # With a leading grad_accum axis (a step's batch) the shapes follow.
    stacked = tree_map(lambda x: mx.stack([x, x]), batch)
    out = add_reference_logprobs(ref_fn, mx_tree(REFERENCE), stacked)
    assert out["ref_chosen"].shape == (2, B) and out["ref_rejected"].shape == (2, B)


MODEL = transformer(ModelConfig(vocab_size=40, n_layers=2, d_model=16, n_heads=2, dropout=0.0, max_seq_len=32))


def test_right_padding_and_other_rows_never_change_a_sequence_logprob():
    params = MODEL.init(mx.random.key(0))
    seq = np.array([5, 9, 12, 7, 30, 3, 8], np.int32)
    mask = np.array([0, 0, 1, 1, 1, 1], np.float32)

    def padded(length, filler):
        t = np.full(length + 1, filler, np.int32)
        t[:7] = seq
        m = np.zeros(length, np.float32)
        m[:6] = mask
        return t, m

    alone = [sequence_logprobs(MODEL, params, mx.array(t[None]), mx.array(m[None])).item()
             for t, m in (padded(6, 0), padded(12, 0), padded(20, 17))]
    assert alone == pytest.approx([alone[0]] * 3, abs=1e-5)
    other = RNG.integers(0, 40, 13).astype(np.int32)
    t, m = padded(12, 0)
    both = sequence_logprobs(MODEL, params, mx.array(np.stack([t, other])),
                             mx.array(np.stack([m, np.ones(12, np.float32)])))
    assert both[0].item() == pytest.approx(alone[0], abs=1e-5)


def test_reference_fn_in_parallel_lanes_equals_one_batch():
    params = MODEL.init(mx.random.key(1))
    rows = mx.array(np.random.default_rng(2).integers(0, 40, (4, 9)).astype(np.int32))
    mask = mx.array(np.tile((np.arange(8) >= 3).astype(np.float32), (4, 1)))
    whole = make_reference_fn(MODEL)(params, rows, mask)
    split = make_reference_fn(MODEL, lanes=2)(params, rows, mask)
    np.testing.assert_allclose(np.array(split), np.array(whole), atol=1e-5)


def test_dpo_through_the_compiled_train_step_with_accumulation():
    descent = Optimizer(init=lambda p: {}, update=lambda g, s, p, lr: (tree_map(lambda w, d: w - lr * d, p, g), s))
    params = MODEL.init(mx.random.key(1))
    ref_fn = make_reference_fn(MODEL)
    rng = np.random.default_rng(1)
    chosen = rng.integers(0, 40, (2, 4, 9)).astype(np.int32)
    rejected = chosen.copy()
    rejected[..., 5:] = rng.integers(0, 40, (2, 4, 4))
    mask = np.zeros((2, 4, 8), np.float32)
    mask[..., 4:] = 1
    batch = add_reference_logprobs(ref_fn, params, mx_tree({"chosen": chosen, "rejected": rejected,
                                                            "chosen_mask": mask, "rejected_mask": mask}))
    step = make_train_step(MODEL, dpo, descent, grad_accum_steps=2, max_grad_norm=0.0)
    state = init_state(params, descent, mx.random.key(2))
    margins = []
    for _ in range(5):
        state, m = step(state, batch, mx.array(0.5))
        margins.append(m["reward_margin"].item())
    assert m["finite"].item() == 1.0 and margins[0] == pytest.approx(0.0, abs=1e-6)
    assert margins[-1] > margins[1] > 0 and m["accuracy"].item() > 0.5


def test_reference_in_lanes_is_the_policy_bit_for_bit_at_equal_parameters():
    """DPO's first evaluation (policy == reference) must show margins of exactly 0, not rounding noise: the
    reference's rows go through the same lanes, in the same order, as the policy's inside the eval step."""
    from abot.platform import prepare
    from abot.platform.blas import NUMPY_OPENBLAS, set_blas_threads
    from abot.platform.lanes import usable_cores
    from abot.step import make_eval_step

    model = transformer(ModelConfig(vocab_size=1000, n_layers=2, d_model=64, n_heads=4, dropout=0.0,
                                    max_seq_len=64))
    params = model.init(mx.random.key(3))
    rng = np.random.default_rng(3)
    chosen, rejected = (rng.integers(0, 1000, (8, 41)).astype(np.int32) for _ in range(2))
    mask = (np.arange(40) >= 10).astype(np.float32) * np.ones((8, 1), np.float32)
    batch = mx_tree({"chosen": chosen, "rejected": rejected, "chosen_mask": mask, "rejected_mask": mask})
    one_thread = prepare().blas == NUMPY_OPENBLAS  # as lanes run their matmuls (where the rows' order showed)
    if one_thread:
        set_blas_threads(1)
    try:
        batch = add_reference_logprobs(make_reference_fn(model, lanes=2), params, batch, lanes=2)
        _, metrics = make_eval_step(model, dpo, lanes=2)(params, batch)
        mx.eval(metrics)
    finally:
        if one_thread:
            set_blas_threads(usable_cores())
    assert metrics["reward_margin"].item() == 0.0 and metrics["accuracy"].item() == 0.0
