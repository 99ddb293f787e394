"""SFT, DPO, IPO, ORPO and SimPO losses against hand (numpy) computations; the reference model; padding isolation."""

import abot  # noqa: F401  (first: it sets up BLAS before anything imports mlx.core)

import math
from typing import NamedTuple

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from abot.config import ModelConfig
from abot.finetune.losses import dpo, ipo, log_odds, orpo, sequence_logprobs, sft, simpo
from abot.finetune.reference import add_reference_logprobs, make_reference_fn
from abot.models.transformer import transformer
from abot.optim.adamw import adamw
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


# --- ORPO and SimPO: reference-free ------------------------------------------------------------------------

def np_mean_logprobs(table, batch):
    """(1/|y|) log pi(y|x) of chosen and rejected responses, |y| the response's token count."""
    pc = np_seq_logprobs(table, batch["chosen"], batch["chosen_mask"]) / batch["chosen_mask"].sum(-1)
    pr = np_seq_logprobs(table, batch["rejected"], batch["rejected_mask"]) / batch["rejected_mask"].sum(-1)
    return pc, pr


def neg_log_sigmoid(x):
    return -math.log(1.0 / (1.0 + math.exp(-x)))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_loss_matches_the_papers_formula(beta):
    # Hong et al. 2024: L = L_SFT(y_w) + lambda * -log sigmoid(log odds(y_w) - log odds(y_l)), odds = P / (1 - P),
    # P = exp(mean per-token log-prob); the batch has no reference log-probs.
    batch = pair_batch()
    loss, m = orpo(BIGRAM, mx_tree(POLICY), mx_tree(batch), None, beta=beta)
    pc, pr = np_mean_logprobs(POLICY["table"], batch)
    odds = [(math.exp(c) / (1 - math.exp(c)), math.exp(r) / (1 - math.exp(r))) for c, r in zip(pc, pr)]
    ratios = [math.log(ow / ol) for ow, ol in odds]
    expected = np.mean(-pc) + beta * np.mean([neg_log_sigmoid(x) for x in ratios])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["nll"].item() == pytest.approx(np.mean(-pc), rel=1e-5)
    assert m["log_odds_ratio"].item() == pytest.approx(np.mean(ratios), rel=1e-4, abs=1e-5)
    assert m["reward_chosen"].item() == pytest.approx(beta * pc.mean(), rel=1e-5)
    assert m["reward_margin"].item() == pytest.approx(beta * (pc - pr).mean(), rel=1e-4, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx((pc > pr).mean())


@pytest.mark.parametrize("beta, gamma", [(2.0, 1.0), (2.5, 0.0)])
def test_simpo_loss_matches_the_papers_formula(beta, gamma):
    # Meng et al. 2024: L = -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma).
    batch = pair_batch()
    loss, m = simpo(BIGRAM, mx_tree(POLICY), mx_tree(batch), None, beta=beta, gamma=gamma)
    pc, pr = np_mean_logprobs(POLICY["table"], batch)
    expected = np.mean([neg_log_sigmoid(beta * c - beta * r - gamma) for c, r in zip(pc, pr)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["reward_chosen"].item() == pytest.approx(beta * pc.mean(), rel=1e-5)
    assert m["reward_rejected"].item() == pytest.approx(beta * pr.mean(), rel=1e-5)
    assert m["reward_margin"].item() == pytest.approx(beta * (pc - pr).mean(), rel=1e-4, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx((pc > pr).mean())


def test_simpo_defaults_are_the_papers():
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(simpo).parameters.items() if k in ("beta", "gamma")}
    assert defaults == {"beta": 2.0, "gamma": 1.0}
    assert inspect.signature(orpo).parameters["beta"].default == 0.1
    assert (orpo.needs_reference, simpo.needs_reference, dpo.needs_reference, ipo.needs_reference) == (
        False, False, True, True)


def test_log_odds_is_finite_near_certainty_and_exact_elsewhere():
    m = np.array([-50.0, -3.0, -0.7, -0.5, -1e-3, -1e-5], np.float32)
    expected = [x - math.log(-math.expm1(x)) for x in m.astype(np.float64)]
    np.testing.assert_allclose(np.array(log_odds(mx.array(m))), expected, rtol=1e-5)
    at_one = mx.array([0.0, -1e-9])  # P = 1 (a mean log-prob that rounds to 0): capped, not infinite
    value, grad = mx.value_and_grad(lambda x: log_odds(x).sum())(at_one)
    assert np.isfinite(np.array(value)).all() and np.isfinite(np.array(grad)).all()


def leaves(tree):
    return [v for _, v in tree_flatten(tree)]


def char_pairs(n: int, seq_len: int, seed: int):
    """`n` synthetic preference pairs (abot.finetune.synthetic) encoded with a one-id-per-character tokenizer."""
    from abot.finetune.batches import encode_pair
    from abot.finetune.synthetic import preference_rows

    class Chars:
        def encode(self, text):
            return [100 + ord(c) % 100 for c in text]

    encoded = [encode_pair(row, Chars(), seq_len)[0] for row in preference_rows(n, seed=seed)]
    return {k: np.stack([e[k] for e in encoded]) for k in encoded[0]}


@pytest.mark.parametrize("loss_fn", [orpo, simpo], ids=["orpo", "simpo"])
def test_reference_free_losses_make_chosen_more_likely_than_rejected(loss_fn):
    """A few steps on the synthetic pairs (chosen: the list's last word; rejected: it spelled backwards)."""
    model = transformer(ModelConfig(vocab_size=200, n_layers=1, d_model=32, n_heads=2, dropout=0.0, max_seq_len=64))
    params = model.init(mx.random.key(4))
    optimizer = adamw(weight_decay=0.0)
    pairs = char_pairs(16, 60, seed=3)
    step_batch = tree_map(lambda x: mx.array(x.reshape(2, 8, *x.shape[1:])), pairs)  # grad_accum 2 x 8 pairs
    trained, held_out = mx_tree(pairs), mx_tree(char_pairs(32, 60, seed=4))
    step = make_train_step(model, loss_fn, optimizer, grad_accum_steps=2, max_grad_norm=1.0)
    state = init_state(params, optimizer, mx.random.key(5))
    _, before = loss_fn(model, params, trained, None)
    for _ in range(20):
        state, m = step(state, step_batch, mx.array(1e-2))
    assert m["finite"].item() == 1.0
    moved = any(not mx.array_equal(a, b).item() for a, b in zip(leaves(params), leaves(state["params"])))
    _, after = loss_fn(model, state["params"], trained, None)
    _, unseen = loss_fn(model, state["params"], held_out, None)
    assert moved and after["reward_margin"].item() > max(before["reward_margin"].item(), 0.0)
    assert after["accuracy"].item() >= 0.9 and unseen["accuracy"].item() > 0.5
