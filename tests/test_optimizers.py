"""Optimizers against independent numpy implementations of the published formulas."""

import math

import numpy as np
import pytest

import abot  # noqa: F401  (loads the BLAS shim before mlx.core)
import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from abot.errors import AbotError
from abot.optim.adamw import adamw
from abot.optim.muon import NS_COEFFICIENTS, muon, muon_cost, newton_schulz, newton_schulz_flops, update_scale
from abot.optim.muon_adamw import is_hidden_matrix, muon_adamw
from abot.optim.sgd import sgd
from abot.registry import optimizers

LR = 1e-2


def random_tree(seed, shapes):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def to_mx(tree):
    return tree_map(mx.array, tree)


def to_np(tree):
    return tree_map(lambda a: np.array(a, dtype=np.float64), tree)


def run(opt, params, grads_seq, lr=LR):
    """Apply `opt` to numpy params over a list of numpy grad trees; numpy result."""
    p = to_mx(params)
    state = opt.init(p)
    for grads in grads_seq:
        p, state = opt.update(to_mx(grads), state, p, mx.array(lr))
    mx.eval(p, state)
    return to_np(p)


def assert_trees_close(got, want, rtol, atol):
    got, want = dict(tree_flatten(got)), dict(tree_flatten(want))
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


SHAPES = {"w": (6, 4), "b": (4,)}
GRADS = [random_tree(s, SHAPES) for s in range(1, 5)]
PARAMS = random_tree(0, SHAPES)


# ---------------------------------------------------------------- AdamW

def numpy_adamw(params, grads_seq, lr, wd, b1, b2, eps):
    """torch.optim.AdamW's documented algorithm in float64, decay on ndim >= 2 only."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        for k in p:
            g = grads[k].astype(np.float64)
            if p[k].ndim >= 2:
                p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat = m[k] / (1 - b1 ** t)
            p[k] = p[k] - lr * m_hat / (np.sqrt(v[k]) / math.sqrt(1 - b2 ** t) + eps)
    return p


def test_adamw_matches_pytorch_formula():
    got = run(adamw(weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8), PARAMS, GRADS)
    want = numpy_adamw(PARAMS, GRADS, LR, 0.1, 0.9, 0.95, 1e-8)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


def test_adamw_matches_torch_if_installed():
    torch = pytest.importorskip("torch")
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in PARAMS.items()}
    # torch decays every parameter it is given, so give 1-D leaves their own group without decay
    opt = torch.optim.AdamW([{"params": [tp["w"]], "weight_decay": 0.1}, {"params": [tp["b"]], "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    for grads in GRADS:
        for k in tp:
            tp[k].grad = torch.tensor(grads[k])
        opt.step()
    got = run(adamw(weight_decay=0.1), PARAMS, GRADS)
    assert_trees_close(got, {k: v.detach().numpy() for k, v in tp.items()}, rtol=1e-6, atol=1e-7)


def test_adamw_decays_matrices_only_and_keeps_dtype():
    params = {"w": mx.ones((3, 3), dtype=mx.bfloat16), "g": mx.ones((3,))}
    zero = tree_map(mx.zeros_like, params)
    opt = adamw(weight_decay=0.5)
    new, state = opt.update(zero, opt.init(params), params, mx.array(0.1))
    assert new["w"].dtype == mx.bfloat16 and state["m"]["w"].dtype == mx.float32
    np.testing.assert_allclose(np.array(new["w"].astype(mx.float32)), 0.95, rtol=1e-2)
    np.testing.assert_array_equal(np.array(new["g"]), 1.0)
    assert state["count"].item() == 1


# ---------------------------------------------------------------- Muon

def numpy_newton_schulz(x, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315  # Keller Jordan's quintic coefficients
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 40), (16, 128)])  # Gram form: n >= 2m
def test_newton_schulz_singular_values_in_band(shape):
    # Measured over 100 Gaussian 64x32 / 32x64 matrices: singular values in [0.68, 1.14]. The quintic
    # trades exact orthogonality for speed (Keller Jordan), so assert a band, with margin: [0.6, 1.25].
    for seed in range(3):
        g = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        out = newton_schulz(mx.array(g))
        assert out.shape == shape and out.dtype == mx.float32
        s = np.linalg.svd(np.array(out), compute_uv=False)
        assert 0.6 <= s.min() and s.max() <= 1.25, s
        np.testing.assert_allclose(np.array(out), numpy_newton_schulz(g.astype(np.float64)), atol=1e-4)
    assert NS_COEFFICIENTS == (3.4445, -4.7750, 2.0315)


def test_gram_form_matches_the_direct_iteration_on_ill_conditioned_gradients():
    """The m x m (Gram) form multiplies polynomials of G = X X^T; small singular values get large factors
    in P, so check it on spectra spanning 6 decades and a rank-8 matrix plus noise, against float64.
    Measured: the Gram form is within 5e-4 of the largest entry (the direct float32 iteration: 1e-5), far
    inside the quintic's own approximation (singular values anywhere in ~[0.7, 1.2])."""
    rng = np.random.default_rng(1)
    decaying = (rng.standard_normal((64, 64)) * np.logspace(0, -6, 64)) @ rng.standard_normal((64, 256))
    low_rank = rng.standard_normal((64, 8)) @ rng.standard_normal((8, 256)) + 1e-3 * rng.standard_normal((64, 256))
    for g in (decaying, low_rank):
        out = np.array(newton_schulz(mx.array(g.astype(np.float32))))
        ref = numpy_newton_schulz(g)
        assert np.abs(out - ref).max() < 1e-3 * np.abs(ref).max(), np.abs(out - ref).max()


def test_newton_schulz_of_transpose_is_transpose():
    g = mx.array(np.random.default_rng(0).standard_normal((16, 40)).astype(np.float32))
    np.testing.assert_allclose(np.array(newton_schulz(g.T)), np.array(newton_schulz(g)).T, atol=1e-6)


def test_update_scales():
    assert update_scale((64, 256), "moonshot") == pytest.approx(0.2 * 16)
    assert update_scale((256, 64), "moonshot") == pytest.approx(0.2 * 16)
    # abot stores (fan_in, fan_out): Keller's sqrt(max(1, fan_out/fan_in)) boosts the widening matrix
    assert update_scale((64, 256), "keller") == pytest.approx(2.0)
    assert update_scale((256, 64), "keller") == pytest.approx(1.0)


@pytest.mark.parametrize("scale", ["moonshot", "keller"])
def test_muon_two_steps_match_hand_computation(scale):
    shapes = {"w": (8, 24), "b": (24,)}
    params, g1, g2 = (random_tree(s, shapes) for s in (10, 11, 12))
    mu, wd = 0.95, 0.1
    got = run(muon(weight_decay=wd, momentum=mu, scale=scale), params, [g1, g2])

    factor = 0.2 * math.sqrt(24) if scale == "moonshot" else math.sqrt(24 / 8)
    want = {k: v.astype(np.float64) for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in want.items()}
    for grads in (g1, g2):
        for k in want:
            g = grads[k].astype(np.float64)
            buf[k] = mu * buf[k] + g
            step = g + mu * buf[k]  # Nesterov
            if k == "w":
                step = numpy_newton_schulz(step) * factor
                want[k] = want[k] * (1 - LR * wd)
            want[k] = want[k] - LR * step
    assert_trees_close(got, want, rtol=1e-5, atol=1e-5)


def test_muon_without_nesterov_steps_along_buffer():
    shapes = {"b": (5,)}
    params, g1, g2 = (random_tree(s, shapes) for s in (1, 2, 3))
    got = run(muon(momentum=0.9, nesterov=False), params, [g1, g2])
    want = params["b"] - LR * g1["b"] - LR * (0.9 * g1["b"] + g2["b"])
    np.testing.assert_allclose(got["b"], want, rtol=1e-6)


@pytest.mark.parametrize("momentum", [0.90, 0.95, 0.97])
def test_muon_accepts_usual_momenta(momentum):
    muon(momentum=momentum)
    muon_adamw(momentum=momentum)


@pytest.mark.parametrize("momentum", [1.5, 1.0, 0.0, -0.1])
def test_muon_rejects_momentum_outside_unit_interval(momentum):
    with pytest.raises(ValueError, match="momentum"):
        muon(momentum=momentum)


@pytest.mark.parametrize("factory", [muon, muon_adamw])
def test_muon_rejects_unknown_scale(factory):
    with pytest.raises(ValueError, match="'moonshot', 'keller'"):
        factory(scale="kellr")


# ---------------------------------------------------------------- Muon + AdamW

def test_is_hidden_matrix():
    m, v = mx.zeros((4, 4)), mx.zeros((4,))
    assert is_hidden_matrix("blocks.0.wq", m)
    assert not is_hidden_matrix("embed", m) and not is_hidden_matrix("head", m)
    assert not is_hidden_matrix("blocks.0.attn_norm", v)
    assert is_hidden_matrix("blocks.0.embedding_proj", m)  # only whole path components count


def test_muon_adamw_partitions_hidden_matrices_to_muon():
    V, D = 12, 8
    rng = np.random.default_rng(0)

    def tree():
        return {"embed": rng.standard_normal((V, D)).astype(np.float32),
                "blocks": [{"wq": rng.standard_normal((D, D)).astype(np.float32),
                            "attn_norm": rng.standard_normal((D,)).astype(np.float32)}],
                "head": rng.standard_normal((D, V)).astype(np.float32)}

    params, grads = tree(), [tree(), tree(), tree()]
    options = dict(weight_decay=0.1)
    got = run(muon_adamw(**options), params, grads)

    def part(t, muon_part):
        wq = {"wq": t["blocks"][0]["wq"]}
        rest = {"embed": t["embed"], "attn_norm": t["blocks"][0]["attn_norm"], "head": t["head"]}
        return wq if muon_part else rest

    by_muon = run(muon(**options), part(params, True), [part(g, True) for g in grads])
    by_adamw = run(adamw(**options), part(params, False), [part(g, False) for g in grads])
    np.testing.assert_array_equal(got["blocks"][0]["wq"], by_muon["wq"])
    for k in ("embed", "head"):
        np.testing.assert_array_equal(got[k], by_adamw[k])
    np.testing.assert_array_equal(got["blocks"][0]["attn_norm"], by_adamw["attn_norm"])

    state = muon_adamw().init(to_mx(params))
    assert set(state["leaves"]["blocks"][0]["wq"]) == {"buf"}
    assert set(state["leaves"]["embed"]) == {"m", "v"}
    assert all(isinstance(a, mx.array) for _, a in tree_flatten(state))


# ---------------------------------------------------------------- SGD

@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_hand_computation(nesterov):
    mu, wd = 0.9, 0.1
    got = run(sgd(weight_decay=wd, momentum=mu, nesterov=nesterov), PARAMS, GRADS[:3])
    want = {k: v.astype(np.float64) for k, v in PARAMS.items()}
    buf = {k: np.zeros_like(v) for k, v in want.items()}
    for grads in GRADS[:3]:
        for k in want:
            g = grads[k].astype(np.float64)
            buf[k] = mu * buf[k] + g
            step = g + mu * buf[k] if nesterov else buf[k]
            decay = (1 - LR * wd) if want[k].ndim >= 2 else 1.0
            want[k] = want[k] * decay - LR * step
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


def test_plain_sgd():
    got = run(sgd(), PARAMS, GRADS[:1])
    assert_trees_close(got, {k: PARAMS[k] - LR * GRADS[0][k] for k in PARAMS}, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- all optimizers

@pytest.mark.parametrize("name, options", [("adamw", {"weight_decay": 0.1}), ("muon", {"weight_decay": 0.1}),
                                           ("muon_adamw", {"weight_decay": 0.1}),
                                           ("sgd", {"momentum": 0.9, "nesterov": True}), ("sgd", {})])
def test_update_compiles_to_the_same_result(name, options):
    opt = optimizers.get(name)(**options)
    params = to_mx({"embed": PARAMS["w"], "blocks": [{"w": PARAMS["w"].T, "b": PARAMS["b"]}]})
    grads = tree_map(lambda a: a * 0.5 + 0.1, params)
    compiled = mx.compile(opt.update)
    outs = []
    for update in (opt.update, compiled):
        p, s = params, opt.init(params)
        for _ in range(2):
            p, s = update(grads, s, p, mx.array(LR))
        mx.eval(p, s)
        outs.append((to_np(p), to_np(s)))
    assert_trees_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_registry_finds_optimizers_and_suggests_names():
    assert optimizers.get("adamw") is adamw
    for name in ("adamw", "muon", "muon_adamw", "sgd"):
        assert optimizers.entry(name).summary
    with pytest.raises(AbotError, match="did you mean 'adamw'"):
        optimizers.get("adamww")


def test_spread_places_leaves_on_the_least_loaded_stream_without_changing_the_update():
    from abot.optim.placement import leaf_streams, spread

    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    leaves = {"a": mx.ones((100,)), "b": mx.ones((60,)), "c": mx.ones((30,)), "d": mx.ones((20,))}
    placed = []

    def record(p):
        placed.append(mx.default_stream(mx.cpu))
        return p * 2

    with leaf_streams(streams):
        doubled = tree_map(spread(record), leaves)
    # Greedy by size: a (100) -> 0, then b (60), c (30) and d (20) -> 1, whose load stays below 100 until d.
    assert placed == [streams[0], streams[1], streams[1], streams[1]]
    assert all(mx.array_equal(doubled[k], leaves[k] * 2).item() for k in leaves)
    assert spread(record) is record  # outside leaf_streams: untouched

    params = {"w": mx.random.normal((8, 16), key=mx.random.key(0)), "n": mx.ones((16,))}
    grads = {"w": mx.random.normal((8, 16), key=mx.random.key(1)), "n": mx.ones((16,)) * 0.1}
    opt = optimizers.get("muon_adamw")(weight_decay=0.1)
    plain = opt.update(grads, opt.init(params), params, mx.array(0.01))
    with leaf_streams(streams):
        spread_out = opt.update(grads, opt.init(params), params, mx.array(0.01))
    for (k, x), (_, y) in zip(tree_flatten(plain), tree_flatten(spread_out)):
        assert mx.array_equal(x, y).item(), k


def test_newton_schulz_flops_count_each_form_by_hand():
    # Direct (256 x 256, 3 steps): per step G = X X^T, G G and (bG + cG^2) X, each 2 * 256^3.
    assert newton_schulz_flops((256, 256), 3) == 3 * 3 * 2 * 256 ** 3
    # Gram (a 1024 x 256 MLP weight is transposed to 256 x 1024): G and P X_0 are 2 * 256^2 * 1024 each; per step
    # G G, then P <- q P from the second step and G <- q (q G) up to the second-to-last, all 256 x 256.
    assert newton_schulz_flops((1024, 256), 3) == 2 * 2 * 256 ** 2 * 1024 + 2 * 256 ** 3 * (3 + 2 + 2 * 2)
    # The docstring of _newton_schulz_gram: 4 m^2 n + 34 m^3 for 5 steps.
    assert newton_schulz_flops((512, 2048), 5) == 4 * 512 ** 2 * 2048 + 34 * 512 ** 3


def test_muon_adamw_spreads_newton_schulz_work_evenly(monkeypatch):
    """tiny's tree (embedding 8000 x 256, then 6 blocks of 4 square and 2 wide matrices) over 2 streams: by size
    the embedding filled the first stream and 10.6 of Newton-Schulz's 14.1 GFLOP ran on the second."""
    import abot.optim.muon_adamw as module
    from abot.optim.placement import leaf_streams

    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    work = [0.0, 0.0]  # per stream
    real_muon_leaf, real_adamw_leaf = module.muon_leaf, module.adamw_leaf

    def muon_leaf(p, *args, **kw):
        work[streams.index(mx.default_stream(mx.cpu))] += muon_cost(p, 3)
        return real_muon_leaf(p, *args, **kw)

    def adamw_leaf(p, *args, **kw):
        work[streams.index(mx.default_stream(mx.cpu))] += p.size
        return real_adamw_leaf(p, *args, **kw)

    monkeypatch.setattr(module, "muon_leaf", muon_leaf)
    monkeypatch.setattr(module, "adamw_leaf", adamw_leaf)
    block = {"wq": (256, 256), "wk": (256, 256), "wv": (256, 256), "wo": (256, 256), "w_up": (256, 1024),
             "w_down": (1024, 256), "attn_norm": (256,), "mlp_norm": (256,)}
    params = {"embed": mx.zeros((8000, 256)), "blocks": [{k: mx.zeros(s) for k, s in block.items()}] * 6,
              "final_norm": mx.ones((256,))}
    opt = muon_adamw(ns_steps=3)
    with leaf_streams(streams):
        opt.update(params, opt.init(params), params, mx.array(0.01))
    wide = muon_cost(params["blocks"][0]["w_up"], 3)
    assert abs(work[0] - work[1]) <= wide  # within one leaf's work of even
    assert sum(work) == pytest.approx(
        8000 * 256 + 13 * 256 + 6 * (4 * muon_cost(mx.zeros((256, 256)), 3) + 2 * wide))


def test_muon_adamw_adamw_lr_scale_moves_only_the_adamw_leaves():
    """adamw_lr_scale s: the AdamW leaves take AdamW's step at lr * s, the hidden matrices Muon's at lr."""
    from abot.optim.adamw import adamw
    from abot.optim.muon_adamw import muon_adamw

    params = {"embed": mx.random.normal((16, 8), key=mx.random.key(0)),
              "blocks": [{"wq": mx.random.normal((8, 8), key=mx.random.key(1)), "attn_norm": mx.ones((8,))}]}
    grads = tree_map(lambda p: mx.random.normal(p.shape, key=mx.random.key(p.size)), params)
    lr, s = mx.array(0.01), 0.25

    def one_step(opt, rate):
        return opt.update(grads, opt.init(params), params, rate)[0]

    scaled, plain = one_step(muon_adamw(adamw_lr_scale=s), lr), one_step(muon_adamw(), lr)
    reference = one_step(adamw(), lr * s)
    assert mx.array_equal(scaled["blocks"][0]["wq"], plain["blocks"][0]["wq"]).item()
    for leaf in (lambda t: t["embed"], lambda t: t["blocks"][0]["attn_norm"]):
        assert mx.allclose(leaf(scaled), leaf(reference), atol=1e-7).item()
    with pytest.raises(ValueError, match="adamw_lr_scale"):
        muon_adamw(adamw_lr_scale=0.0)
