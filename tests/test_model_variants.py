"""The model keys for Llama / Mistral / Qwen2 / Qwen3 shapes (issue 21): n_kv_heads, head_dim, qkv_bias,
attn_out_bias, qk_norm, rope_scaling, mlp_hidden.

Logits are held to an independent reference written here in plain mx ops (explicit cos/sin RoPE,
kv heads repeated with mx.repeat, an explicit softmax), not to the model's own kernels.
"""

from __future__ import annotations

import abot  # noqa: F401  (first: BLAS before mlx.core)

import dataclasses
import itertools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from abot.config import ModelConfig, config_from_dict
from abot.errors import AbotError, ConfigError
from abot.memory import estimate_memory, transformer_param_count
from abot.models.roles import BIAS, EMBEDDING, NORM
from abot.models.transformer import count_params, param_role, transformer
from abot.ops.rope import inverse_frequencies, llama3_inverse_frequencies

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(vocab_size=64, n_layers=2, d_model=32, n_heads=4, dropout=0.0, max_seq_len=512)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def build(**options):
    cfg = ModelConfig(**{**SMALL, **options})
    model = transformer(cfg)
    params = model.init(mx.random.key(0))
    # Biases start at zero and norm gains at one: make them random so the tests see them act.
    params["blocks"] = [{name: (mx.random.normal(w.shape, key=mx.random.key(i)) * 0.5 + (name.endswith("norm"))
                                if w.ndim == 1 else w) for name, w in block.items()}
                        for i, block in enumerate(params["blocks"])]
    return cfg, model, params


def tokens(seq=20, batch=2):
    return mx.random.randint(0, SMALL["vocab_size"], (batch, seq), key=mx.random.key(7))


# ------------------------------------------------------------------ the independent reference

def reference_logits(cfg: ModelConfig, params, toks, inv_freq=None):
    """Pre-norm decoder in a few plain ops: Hugging Face Llama / Qwen2 / Qwen3's forward pass."""
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    kv = cfg.n_kv_heads or cfg.n_heads
    b, t = toks.shape
    inv = mx.array(inv_freq if inv_freq is not None else inverse_frequencies(hd, cfg.rope_theta))
    angles = mx.arange(t, dtype=mx.float32)[:, None] * inv[None]
    cos, sin = (mx.concatenate([f(angles)] * 2, axis=-1) for f in (mx.cos, mx.sin))

    def rope(x):  # rotate-half: pair i with i + hd/2
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return x * cos + mx.concatenate([-x2, x1], axis=-1) * sin

    def norm(x, w):
        return x * mx.rsqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * w

    def heads(y, n):
        return y.reshape(b, t, n, hd).transpose(0, 2, 1, 3)

    mask = mx.triu(mx.full((t, t), -mx.inf), k=1)
    x = params["embed"][toks]
    for p in params["blocks"]:
        h = norm(x, p["attn_norm"])
        q, k, v = h @ p["wq"] + p.get("bq", 0), h @ p["wk"] + p.get("bk", 0), h @ p["wv"] + p.get("bv", 0)
        if "value_embed" in p:  # model.value_embeds: the block's own table, looked up by token, added to v
            v = v + p["value_embed"][toks]
        q, k, v = heads(q, cfg.n_heads), heads(k, kv), heads(v, kv)
        if cfg.qk_norm:
            q, k = norm(q, p["q_norm"]), norm(k, p["k_norm"])
        q, k = rope(q), rope(k)
        k, v = mx.repeat(k, cfg.n_heads // kv, axis=1), mx.repeat(v, cfg.n_heads // kv, axis=1)
        s = mx.softmax(q @ k.swapaxes(-1, -2) / math.sqrt(hd) + mask, axis=-1)
        a = (s @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        x = x + a @ p["wo"] + p.get("bo", 0)
        h = norm(x, p["mlp_norm"])
        if cfg.ffn_activation == "relu2":  # Primer / modded-nanogpt: relu(h W_up)^2 W_down
            x = x + mx.square(mx.maximum(h @ p["w_up"], 0.0)) @ p["w_down"]
        else:
            g = h @ p["w_gate"]
            x = x + (g * mx.sigmoid(g) * (h @ p["w_up"])) @ p["w_down"]
    x = norm(x, params["final_norm"])
    logits = x @ (params["embed"].T if cfg.tie_embeddings else params["head"])
    return logits if cfg.logit_softcap is None else cfg.logit_softcap * mx.tanh(logits / cfg.logit_softcap)


# ------------------------------------------------------------------ defaults are today's model

def test_default_tree_shapes_and_init_are_unchanged():
    cfg = ModelConfig(**SMALL)
    params = transformer(cfg).init(mx.random.key(3))
    shapes = {k: v.shape for k, v in tree_flatten(params)}
    block = {"attn_norm": (32,), "wq": (32, 32), "wk": (32, 32), "wv": (32, 32), "wo": (32, 32),
             "mlp_norm": (32,), "w_gate": (32, 128), "w_up": (32, 128), "w_down": (128, 32)}
    want = {"embed": (64, 32), **{f"blocks.{i}.{k}": s for i in range(2) for k, s in block.items()},
            "final_norm": (32,)}
    assert list(shapes) == list(want) and shapes == want
    # GPT-2 init from one split of the key, drawn in leaf order (wq, wk, wv, wo, gate, up, down per block).
    keys = mx.random.split(mx.random.key(3), 2 + 7 * 2)
    assert mx.array_equal(params["blocks"][0]["wq"], mx.random.normal((32, 32), key=keys[0]) * 0.02)
    assert mx.array_equal(params["blocks"][1]["w_up"], mx.random.normal((32, 128), key=keys[12]) * 0.02)
    assert mx.array_equal(params["embed"], mx.random.normal((64, 32), key=keys[14]) * 0.02)


@pytest.mark.parametrize("options", [{}, {"tie_embeddings": False, "norm_eps": 1e-6, "rope_theta": 500.0}])
def test_default_logits_equal_a_plain_multi_head_reference(options):
    cfg, model, params = build(**options)
    toks = tokens()
    got = model.apply(params, toks)
    assert mx.abs(got - reference_logits(cfg, params, toks)).max().item() < 1e-5


# ------------------------------------------------------------------ grouped-query attention

def repeated_kv(params, cfg):
    """MHA parameters equal to a GQA model's: each kv head's columns copied to every query head it serves."""
    hd, kv = cfg.d_model // cfg.n_heads, cfg.n_kv_heads
    group = cfg.n_heads // kv

    def widen(w):
        return mx.repeat(w.reshape(cfg.d_model, kv, hd), group, axis=1).reshape(cfg.d_model, -1)

    return {**params, "blocks": [{**p, "wk": widen(p["wk"]), "wv": widen(p["wv"])} for p in params["blocks"]]}


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_gqa_equals_mha_with_repeated_kv_weights(n_kv_heads):
    cfg, model, params = build(n_kv_heads=n_kv_heads)
    assert params["blocks"][0]["wk"].shape == (32, n_kv_heads * 8) and params["blocks"][0]["wq"].shape == (32, 32)
    mha = transformer(ModelConfig(**SMALL))
    toks = tokens(seq=300)  # past 256: the CPU attention's causal query blocks
    want = mha.apply(repeated_kv(params, cfg), toks)
    assert mx.abs(model.apply(params, toks) - want).max().item() < 1e-5
    assert mx.abs(reference_logits(cfg, params, toks) - want).max().item() < 1e-5


def test_gqa_gradients_equal_the_reference_through_the_hand_written_backward():
    cfg, model, params = build(n_kv_heads=2)
    toks = tokens(seq=300)

    def loss(apply):
        return lambda p: (apply(p) ** 2).mean()

    got = mx.grad(loss(lambda p: model.apply(p, toks)))(params)
    want = mx.grad(loss(lambda p: reference_logits(cfg, p, toks)))(params)
    for (name, g), (_, w) in zip(tree_flatten(got), tree_flatten(want)):
        assert g.shape == w.shape, name
        assert mx.abs(g - w).max().item() < 1e-6 + 1e-4 * mx.abs(w).max().item(), name


@pytest.mark.parametrize("options", [{"n_kv_heads": 2}, {"n_kv_heads": 1, "head_dim": 12, "qk_norm": True,
                                                         "qkv_bias": True, "rope_scaling": LLAMA3}])
def test_kv_cached_generation_matches_uncached_logits_and_caches_kv_heads(options):
    cfg, model, params = build(**options)
    toks = tokens(seq=12)
    full = model.apply(params, toks)
    logits, cache = model.apply(params, toks[:, :7], cache=model.new_cache())
    steps = [logits]
    for i in range(7, 12):
        logits, cache = model.apply(params, toks[:, i:i + 1], cache=cache)
        steps.append(logits)
    assert cache[0][0].shape == (2, cfg.n_kv_heads, 12, cfg.head_dim or 8)  # kv heads, not repeated copies
    assert mx.abs(mx.concatenate(steps, axis=1) - full).max().item() < 1e-5


# ------------------------------------------------------------------ head_dim, biases, q/k norm, rope scaling

@pytest.mark.parametrize("options", [
    {"head_dim": 12},  # Qwen3-style: n_heads * head_dim (48) != d_model (32)
    {"qkv_bias": True, "n_kv_heads": 2},  # Qwen2
    {"qkv_bias": True, "attn_out_bias": True},  # Llama attention_bias
    {"qk_norm": True, "head_dim": 16, "n_kv_heads": 2},  # Qwen3
    {"rope_scaling": LLAMA3, "n_kv_heads": 2, "tie_embeddings": False, "mlp_hidden": 40},  # Llama 3
], ids=["head_dim", "qwen2", "llama-bias", "qwen3", "llama3"])
def test_variant_shapes_and_logits_equal_the_reference(options):
    cfg, model, params = build(**options)
    hd, kv = cfg.head_dim or 8, cfg.n_kv_heads or 4
    block = params["blocks"][0]
    assert (block["wq"].shape, block["wk"].shape, block["wv"].shape, block["wo"].shape) == \
        ((32, 4 * hd), (32, kv * hd), (32, kv * hd), (4 * hd, 32))
    assert ("bq" in block, "bo" in block, "q_norm" in block) == (cfg.qkv_bias, cfg.attn_out_bias, cfg.qk_norm)
    if cfg.qkv_bias:
        assert (block["bq"].shape, block["bk"].shape, block["bv"].shape) == ((4 * hd,), (kv * hd,), (kv * hd,))
    if cfg.qk_norm:
        assert block["q_norm"].shape == block["k_norm"].shape == (hd,)
    if cfg.mlp_hidden:
        assert block["w_up"].shape == (32, cfg.mlp_hidden)
    inv = None if cfg.rope_scaling is None else llama3_inverse_frequencies(hd, cfg.rope_theta, **{
        k: v for k, v in cfg.rope_scaling.items() if k != "rope_type"})
    toks = tokens(seq=40)
    assert mx.abs(model.apply(params, toks) - reference_logits(cfg, params, toks, inv)).max().item() < 1e-5


def test_llama3_inverse_frequencies_equal_the_hand_formula():
    # head_dim 8, theta 10000: f = 1, 0.1, 0.01, 0.001; wavelengths 2 pi / f = 6.28, 62.8, 628, 6283.
    # L = 1024, low 1, high 4: below L/4 = 256 kept, above L/1 = 1024 divided by the factor 8, between blended.
    got = llama3_inverse_frequencies(8, 10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=1024)
    s = (1024 / (2 * math.pi / 0.01) - 1.0) / (4.0 - 1.0)  # 0.2099...
    want = [1.0, 0.1, (1 - s) * 0.01 / 8 + s * 0.01, 0.001 / 8]
    assert 0.2 < s < 0.22
    assert np.allclose(got, want, rtol=1e-12, atol=0)


def test_rope_scaling_changes_the_logits_but_not_at_position_zero():
    cfg, model, params = build(rope_scaling=LLAMA3)
    plain = transformer(ModelConfig(**SMALL))
    toks = tokens(seq=30)
    assert mx.abs(model.apply(params, toks) - plain.apply(params, toks)).max().item() > 1e-4
    assert mx.abs(model.apply(params, toks[:, :1]) - plain.apply(params, toks[:, :1])).max().item() == 0  # pos 0


# ------------------------------------------------------------------ config checks

@pytest.mark.parametrize("model, message", [
    ({"n_heads": 4, "n_kv_heads": 3}, "model.n_heads (4) must be divisible by model.n_kv_heads (3)"),
    ({"n_kv_heads": 0}, "model.n_kv_heads must be positive"),
    ({"head_dim": 7}, "model.head_dim must be positive and even"),
    ({"mlp_hidden": 0}, "model.mlp_hidden must be positive"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "model.rope_scaling: rope_type 'yarn' is not supported; supported: llama3"),
    ({"rope_scaling": {"factor": 4.0}}, "model.rope_scaling: rope_type None is not supported"),
    ({"rope_scaling": {**LLAMA3, "factr": 2}}, "model.rope_scaling.factr: unknown key"),
    ({"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "factor"}}, "model.rope_scaling.factor: required"),
    ({"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}}, "must be greater than low_freq_factor"),
])
def test_config_refuses_bad_attention_and_rope_settings(model, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"d_model": 32, **model}})
    assert message in str(err.value)


def test_head_dim_frees_d_model_from_n_heads():
    cfg = config_from_dict({"model": {"d_model": 30, "n_heads": 4, "head_dim": 8}})
    assert cfg.model.head_dim == 8
    with pytest.raises(ConfigError, match="divisible by model.n_heads"):
        config_from_dict({"model": {"d_model": 30, "n_heads": 4}})


def test_a_stored_config_without_the_new_keys_gets_the_defaults():
    stored = {"model": {k: v for k, v in ModelConfig(**SMALL).__dict__.items()
                        if k not in ("n_kv_heads", "head_dim", "qkv_bias", "attn_out_bias", "qk_norm",
                                     "rope_scaling", "mlp_hidden")}, "data": {"seq_len": 64}}
    assert config_from_dict(stored, stored=True).model == ModelConfig(**SMALL)


def test_resume_refuses_a_new_key_the_old_checkpoint_lacks():
    from abot.restore import check_model_fits

    stored = {k: v for k, v in ModelConfig(**SMALL).__dict__.items() if k != "rope_scaling"}
    check_model_fits(stored, {**ModelConfig(**SMALL).__dict__}, "ckpt", "fix")
    with pytest.raises(AbotError, match="model.rope_scaling: checkpoint None"):
        check_model_fits(stored, {**ModelConfig(**SMALL).__dict__, "rope_scaling": LLAMA3}, "ckpt", "fix")


# ------------------------------------------------------------------ counts, roles, memory

VARIANTS = [dict(zip(("n_kv_heads", "head_dim", "qkv_bias", "attn_out_bias", "qk_norm", "tie_embeddings",
                      "ffn_activation", "mlp_hidden"), values))
            for values in itertools.product((None, 2, 1), (None, 12), (False, True), (False, True), (False, True),
                                            (True, False), ("silu", "gelu"), (None, 40))]


def test_param_count_formula_and_roles_for_every_combination():
    for options in VARIANTS:
        cfg = ModelConfig(**{**SMALL, **options})
        params = transformer(cfg).init(mx.random.key(0))  # lazy: shapes only
        assert transformer_param_count(cfg) == count_params(params), options
        for path, leaf in tree_flatten(params):
            role = param_role(path, leaf)
            name = path.split(".")[-1]
            if name in ("bq", "bk", "bv", "bo"):
                assert role == BIAS
            if name in ("q_norm", "k_norm"):
                assert role == NORM


def test_memory_estimate_is_smaller_for_gqa_by_the_kv_activations():
    def estimate(**model):
        raw = {"model": {"vocab_size": 8000, "n_layers": 4, "d_model": 256, "n_heads": 8, "dropout": 0.0, **model},
               "data": {"seq_len": 256},
               "train": {"micro_batch_size": 4, "grad_accum_steps": 1, "gradient_checkpointing": False}}
        return estimate_memory(config_from_dict(raw))

    mha, gqa = estimate(), estimate(n_kv_heads=2)
    tokens_ = 4 * 256
    kv_saved = 2 * tokens_ * (8 - 2) * 32 * 4  # k and v: 6 fewer heads of width 32, float32
    kv_weights = 4 * 2 * 256 * (8 - 2) * 32 * 4  # wk, wv of 4 layers
    assert mha.params - gqa.params == kv_weights
    # Each of the 4 blocks' saved sets and the active block's (its cotangents, as large as its saved set).
    assert mha.activations - gqa.activations == (4 + 1) * kv_saved
    assert gqa.peak < mha.peak


# ------------------------------------------------------------------ export

def export_folder(tmp_path, **options):
    from abot.export import hf_config, hf_tensors

    cfg, model, params = build(**options)
    full = config_from_dict({"model": {**SMALL, **options}, "data": {"seq_len": 64}})
    out = tmp_path / "hf"
    out.mkdir()
    tensors = hf_tensors(params, full)
    mx.save_safetensors(str(out / "model.safetensors"), tensors)
    config = hf_config(full)
    (out / "config.json").write_text(json.dumps(config))
    return cfg, model, params, config, tensors, out


@pytest.mark.parametrize("options, architecture", [
    ({}, "LlamaForCausalLM"),
    ({"n_kv_heads": 2, "rope_scaling": LLAMA3, "tie_embeddings": False, "norm_eps": 1e-6, "mlp_hidden": 40},
     "LlamaForCausalLM"),
    ({"qkv_bias": True, "attn_out_bias": True}, "LlamaForCausalLM"),
    ({"qkv_bias": True, "n_kv_heads": 2}, "Qwen2ForCausalLM"),
    ({"qk_norm": True, "head_dim": 16, "n_kv_heads": 1}, "Qwen3ForCausalLM"),
    ({"ffn_activation": "relu2", "n_kv_heads": 2, "tie_embeddings": False}, "ArceeForCausalLM"),
    ({"ffn_activation": "gelu", "qkv_bias": True, "attn_out_bias": True}, "ArceeForCausalLM"),
], ids=["default", "llama3-gqa-untied", "llama-bias", "qwen2", "qwen3", "arcee-relu2", "arcee-gelu-bias"])
def test_export_writes_the_architecture_and_fields(tmp_path, options, architecture):
    cfg, model, params, config, tensors, out = export_folder(tmp_path, **options)
    hd, kv = cfg.head_dim or 8, cfg.n_kv_heads or 4
    assert config["architectures"] == [architecture]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, kv, hd)
    assert (config["intermediate_size"], config["rms_norm_eps"], config["tie_word_embeddings"]) == \
        (cfg.mlp_hidden or 128, cfg.norm_eps, cfg.tie_embeddings)
    assert config["rope_scaling"] == cfg.rope_scaling and config["rope_theta"] == cfg.rope_theta
    if architecture != "Qwen2ForCausalLM":
        assert config["attention_bias"] is cfg.qkv_bias
    layer = "model.layers.0.self_attn."
    assert tensors[layer + "q_proj.weight"].shape == (4 * hd, 32)
    assert tensors[layer + "k_proj.weight"].shape == tensors[layer + "v_proj.weight"].shape == (kv * hd, 32)
    assert tensors[layer + "o_proj.weight"].shape == (32, 4 * hd)
    assert (layer + "q_proj.bias" in tensors, layer + "o_proj.bias" in tensors, layer + "q_norm.weight" in tensors) \
        == (cfg.qkv_bias, cfg.attn_out_bias, cfg.qk_norm)
    if cfg.qk_norm:
        assert np.array_equal(tensors[layer + "k_norm.weight"], np.asarray(params["blocks"][0]["k_norm"]))
    if cfg.qkv_bias:
        assert np.array_equal(tensors[layer + "v_proj.bias"], np.asarray(params["blocks"][0]["bv"]))
    assert config["hidden_act"] == cfg.ffn_activation
    assert ("model.layers.0.mlp.gate_proj.weight" in tensors) is (cfg.ffn_activation == "silu")
    assert ("lm_head.weight" in tensors) is not cfg.tie_embeddings
    assert len(tensors) == len(tree_flatten(params))  # every leaf, nothing else


@pytest.mark.parametrize("options, message", [
    ({"attn_out_bias": True}, "model.attn_out_bias without model.qkv_bias"),
    ({"qk_norm": True, "qkv_bias": True}, "model.qk_norm with model.qkv_bias True and model.attn_out_bias False"),
    ({"ffn_activation": "relu2", "qk_norm": True}, "model.ffn_activation 'relu2' with model.qk_norm True"),
    ({"ffn_activation": "gelu", "qkv_bias": True}, "Arcee .* biases on q, k, v and o together or on none"),
])
def test_export_refuses_what_no_architecture_has(options, message):
    from abot.export import hf_config, hf_tensors

    cfg = config_from_dict({"model": {**SMALL, **options}, "data": {"seq_len": 64}})
    params = transformer(cfg.model).init(mx.random.key(0))
    for write in (lambda: hf_config(cfg), lambda: hf_tensors(params, cfg)):
        with pytest.raises(AbotError, match=message):
            write()


@pytest.mark.parametrize("options", [
    {"n_kv_heads": 2, "rope_scaling": LLAMA3, "tie_embeddings": False},
    {"qkv_bias": True, "n_kv_heads": 2},
    {"qk_norm": True, "head_dim": 16, "n_kv_heads": 1},
    {"ffn_activation": "relu2", "n_kv_heads": 2, "tie_embeddings": False},
    {"ffn_activation": "gelu"},
], ids=["llama3", "qwen2", "qwen3", "arcee-relu2", "arcee-gelu"])
def test_transformers_loads_the_export_with_the_same_logits(tmp_path, options):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, model, params, config, tensors, out = export_folder(tmp_path, **options)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    toks = tokens(seq=30)
    with torch.no_grad():
        theirs = hf(torch.tensor(np.asarray(toks))).logits.numpy()
    assert np.abs(theirs - np.asarray(model.apply(params, toks))).max() < 1e-4


# ------------------------------------------------------------------ abot train of a GQA model, resumed

def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "abot", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_gqa_model_trains_from_yaml_and_resumes_bit_exactly(tmp_path):
    from abot.checkpoint import load_checkpoint

    tiny, tok = str(ROOT / "configs" / "tiny.yaml"), tmp_path / "tok.model"
    out = cli("tokenizer", "train", tiny, "model.vocab_size=500", f"train.tokenizer_path={tok}", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    args = [tiny, "model.n_kv_heads=2", "model.vocab_size=500", "model.n_layers=2", "model.d_model=64",
            "model.n_heads=4", "model.dropout=0.1", "data.seq_len=32", "train.micro_batch_size=2",
            "train.total_steps=3", "train.ckpt_interval=1", "train.ckpt_keep=5", "train.eval_interval=1000",
            "train.warmup_steps=1", f"train.tokenizer_path={tok}", "data.shuffle_buffer=16"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    out = cli("train", *args, f"train.save_dir={whole}", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    shutil.copytree(whole, resumed)
    (resumed / "step_00000003.ckpt").unlink()
    out = cli("train", *args, f"train.save_dir={resumed}", "--resume", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "at step 2" in out.stdout
    a, b = (load_checkpoint(d / "step_00000003.ckpt") for d in (whole, resumed))
    assert a.meta["config"]["model"]["n_kv_heads"] == 2
    assert a.trees["state"]["params"]["blocks"][0]["wk"].shape == (64, 2 * 16)
    same = tree_map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a.trees["state"], b.trees["state"])
    assert all(v for _, v in tree_flatten(same))
    assert b.meta["data_state"] == a.meta["data_state"]


# ------------------------------------------------------------------ speedrun options (issue 23)

@pytest.mark.parametrize("options", [{"ffn_activation": "relu2"}, {"logit_softcap": 2.0},
                                     {"ffn_activation": "relu2", "logit_softcap": 5.0, "qk_norm": True}],
                         ids=["relu2", "softcap", "relu2-softcap-qknorm"])
def test_speedrun_options_equal_the_reference(options):
    cfg, model, params = build(**options)
    toks = tokens()
    logits = model.apply(params, toks)
    assert mx.abs(logits - reference_logits(cfg, params, toks)).max().item() < 1e-5
    if cfg.logit_softcap is not None:
        assert mx.abs(logits).max().item() < cfg.logit_softcap
    assert transformer_param_count(cfg) == count_params(params)


def test_relu2_gradient_equals_autodiff_of_the_plain_formula():
    from abot.ops.elementwise import relu_squared

    a = mx.random.normal((4, 33), key=mx.random.key(3))
    cotangent = mx.random.normal((4, 33), key=mx.random.key(4))
    ours = mx.vjp(relu_squared, [a], [cotangent])[1][0]
    plain = mx.vjp(lambda x: mx.square(mx.maximum(x, 0.0)), [a], [cotangent])[1][0]
    assert mx.array_equal(relu_squared(a), mx.square(mx.maximum(a, 0.0))).item()
    assert mx.abs(ours - plain).max().item() == 0.0


def test_zero_init_out_starts_every_block_as_the_identity():
    cfg = ModelConfig(**SMALL, zero_init_out=True)
    plain, zeroed = (transformer(c).init(mx.random.key(0)) for c in (ModelConfig(**SMALL), cfg))
    for a, b in zip(plain["blocks"], zeroed["blocks"]):
        assert not b["wo"].any().item() and not b["w_down"].any().item()
        assert all(mx.array_equal(a[k], b[k]).item() for k in a if k not in ("wo", "w_down"))  # same draws
    toks = tokens()
    x = zeroed["embed"][toks]
    x = x * mx.rsqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * zeroed["final_norm"]
    assert mx.abs(transformer(cfg).apply(zeroed, toks) - x @ zeroed["embed"].T).max().item() < 1e-5


def test_value_embeds_every_other_block_ending_with_the_last_equal_the_reference():
    for n_layers, with_table in ((3, [0, 2]), (4, [1, 3])):
        plain_cfg = ModelConfig(**{**SMALL, "n_layers": n_layers, "n_kv_heads": 2})
        cfg, plain_model = dataclasses.replace(plain_cfg, value_embeds=True), transformer(plain_cfg)
        model = transformer(cfg)
        params = model.init(mx.random.key(0))
        assert [i for i, b in enumerate(params["blocks"]) if "value_embed" in b] == with_table
        assert transformer_param_count(cfg) == count_params(params)
        toks = tokens()
        # Zero at init, every other leaf drawn as without the option: the same model to start with.
        assert mx.array_equal(model.apply(params, toks),
                              plain_model.apply(plain_model.init(mx.random.key(0)), toks)).item()
        for i in with_table:
            table = params["blocks"][i]["value_embed"]
            assert table.shape == (64, 2 * 8) and param_role(f"blocks.{i}.value_embed", table) == EMBEDDING
            params["blocks"][i]["value_embed"] = mx.random.normal(table.shape, key=mx.random.key(i))
        logits = model.apply(params, toks)
        assert mx.abs(logits - reference_logits(cfg, params, toks)).max().item() < 1e-5
        # Generation's cached path looks up each new token's row.
        step, cache = model.apply(params, toks[:, :7], cache=model.new_cache())
        steps = [step]
        for i in range(7, 10):
            step, cache = model.apply(params, toks[:, i:i + 1], cache=cache)
            steps.append(step)
        assert mx.abs(mx.concatenate(steps, axis=1) - logits[:, :10]).max().item() < 1e-5


def test_speedrun_option_errors_and_export_refusals():
    from abot.export import hf_config

    with pytest.raises(ConfigError, match="model.logit_softcap must be positive"):
        config_from_dict({"model": {**SMALL, "logit_softcap": 0.0}, "data": {"seq_len": 64}})
    with pytest.raises(ConfigError, match="relu2"):
        config_from_dict({"model": {**SMALL, "ffn_activation": "relu"}, "data": {"seq_len": 64}})
    cfg = config_from_dict({"model": {**SMALL, "logit_softcap": 30.0}, "data": {"seq_len": 64}})
    with pytest.raises(AbotError, match="model.logit_softcap is 30.0: Llama, Qwen2 and Qwen3 do not cap logits"):
        hf_config(cfg)
    cfg = config_from_dict({"model": {**SMALL, "value_embeds": True}, "data": {"seq_len": 64}})
    with pytest.raises(AbotError, match="model.value_embeds is true: no Hugging Face decoder"):
        hf_config(cfg)  # ReLU² exports as Arcee: test_export_writes_the_architecture_and_fields
