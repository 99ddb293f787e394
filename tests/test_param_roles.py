"""Models declare their parameters' roles; muon_adamw and the memory estimate read the declaration."""

import abot  # noqa: F401  (loads the BLAS shim before mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from abot import memory
from abot.build import build_optimizer
from abot.config import config_from_dict
from abot.models.roles import EMBEDDING, HEAD, HIDDEN, NORM, OTHER, ROLES, conventional_role
from abot.models.transformer import Model, init_params, param_role
from abot.optim.adamw import adamw
from abot.optim.muon import muon
from abot.registry import models

V, D = 12, 8
# A plugin model laid out under other names than the transformer's: "tok" and "unembed" are no hidden matrices.
RENAMED_ROLES = {"tok": EMBEDDING, "mix": HIDDEN, "gain": NORM, "unembed": HEAD}


def renamed_params(key):
    k = mx.random.split(key, 3)
    return {"tok": mx.random.normal((V, D), key=k[0]), "unembed": mx.random.normal((D, V), key=k[1]),
            "layers": [{"mix": mx.random.normal((D, D), key=k[2]), "gain": mx.ones((D,))}]}


def renamed_model(cfg, gradient_checkpointing=False):
    """A model whose parameters are named otherwise."""
    return Model(init=renamed_params, apply=None, new_cache=list, config=cfg,
                 param_role=lambda path, leaf: RENAMED_ROLES[path.split(".")[-1]])


@pytest.fixture
def renamed(monkeypatch):
    monkeypatch.setattr(models, "_extra", {})
    models.register("renamed", renamed_model)
    return config_from_dict({"model": {"name": "renamed", "vocab_size": V, "d_model": D, "n_layers": 1,
                                       "n_heads": 2}})


def test_transformer_declares_every_leaf_and_muon_gets_what_the_convention_gave():
    for options in ({}, {"tie_embeddings": False}, {"ffn_activation": "gelu"}):
        cfg = config_from_dict({"model": {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, **options}})
        for path, leaf in tree_flatten(init_params(cfg.model, mx.random.key(0))):
            assert param_role(path, leaf) in ROLES
            # The declaration keeps the optimizer's split as it was: numbers do not change.
            assert (param_role(path, leaf) == HIDDEN) == (conventional_role(path, leaf) == HIDDEN), path


def test_conventional_roles_for_a_model_that_declares_none():
    m, v = mx.zeros((4, 4)), mx.zeros((4,))
    assert conventional_role("embed", m) == EMBEDDING and conventional_role("lm.head", m) == HEAD
    assert conventional_role("layers.0.proj", m) == HIDDEN and conventional_role("layers.0.scale", v) == OTHER
    assert Model(None, None, None, None).param_role is conventional_role


def test_declared_hidden_matrices_and_only_those_get_muon(renamed):
    model = models.get("renamed")(renamed.model)
    opt = build_optimizer(renamed, model)  # the default optimizer, muon_adamw
    params = model.init(mx.random.key(0))
    state = opt.init(params)
    muon_leaves = {path.rsplit(".", 1)[0] for path, _ in tree_flatten(state["leaves"]) if path.endswith(".buf")}
    assert muon_leaves == {"layers.0.mix"}

    grads = [model.init(mx.random.key(s)) for s in (1, 2)]
    p = params
    for g in grads:
        p, state = opt.update(g, state, p, mx.array(0.01))
    t = renamed.train
    hidden = lambda tree: {"mix": tree["layers"][0]["mix"]}  # noqa: E731
    rest = lambda tree: {k: tree[k] for k in ("tok", "unembed")}  # noqa: E731
    for part, alone in ((hidden, muon(weight_decay=t.weight_decay, momentum=t.momentum or 0.95)),
                        (rest, adamw(weight_decay=t.weight_decay))):
        q, s = part(params), alone.init(part(params))
        for g in grads:
            q, s = alone.update(part(g), s, q, mx.array(0.01))
        for k, x in q.items():
            np.testing.assert_array_equal(np.array(x), np.array(part(p)[k]), err_msg=k)


def test_optimizers_that_take_no_roles_are_built_as_before(renamed):
    cfg = config_from_dict({"model": vars(renamed.model), "train": {"optimizer": "adamw"}})
    model = models.get("renamed")(cfg.model)
    assert set(build_optimizer(cfg, model).init(model.init(mx.random.key(0)))) == {"count", "m", "v"}


def test_memory_groups_parameters_by_declared_role(renamed):
    assert memory.model_shapes(renamed).groups == {EMBEDDING: V * D, HEAD: D * V, HIDDEN: D * D, NORM: D}
    cfg = config_from_dict({"model": {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4}})
    groups = memory.model_shapes(cfg).groups
    f = 4 * 32  # mlp_multiple 4
    assert groups == {EMBEDDING: 64 * 32, HIDDEN: 2 * (4 * 32 * 32 + 3 * 32 * f), NORM: (2 * 2 + 1) * 32}
    assert memory.model_shapes(cfg).opt_bytes == 4 * (groups[HIDDEN] + 2 * (groups[EMBEDDING] + groups[NORM])) + 4


def test_param_role_is_not_a_config_option():
    from abot.optim.muon_adamw import muon_adamw

    with pytest.raises(TypeError, match="model's declaration"):
        muon_adamw(param_role="hidden")
