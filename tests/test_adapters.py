"""Adapters (LoRA, DoRA, QLoRA): forward passes against hand computations, the step trains the adapters only,
merge and export, the base's identity, the config's errors, and fine-tuning runs from the committed Hugging Face
fixture (slow)."""

import abot  # noqa: F401  (first: it sets up BLAS before anything imports mlx.core)

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from abot import registry
from abot.adapters.dora import dora
from abot.adapters.lora import lora
from abot.adapters.tree import attach, describe, merge
from abot.checkpoint import latest_checkpoint, load_checkpoint
from abot.config import ConfigError, config_from_dict
from abot.errors import AbotError
from abot.export_peft import peft_config, peft_tensors
from abot.memory import estimate_memory, measure_step_peak
from abot.ops.linear import dequantize, linear, quantize
from abot.restore import base_identity, check_base_fits, open_checkpoint
from abot.run import build_step, trainable
from abot.stage import STAGES, random_batch
from abot.step import init_state
from kill_resume import assert_bit_identical, run_then_kill

ROOT = Path(__file__).resolve().parent.parent
QWEN2 = ROOT / "tests" / "fixtures" / "hf" / "qwen2"
MODEL = {"vocab_size": 96, "n_layers": 2, "d_model": 64, "n_heads": 4, "dropout": 0.0}


def config(**adapter):
    return config_from_dict({"model": MODEL, "data": {"seq_len": 16, "source": "stdlib_docs"},
                             "train": {"init_from": "base", "micro_batch_size": 2, "grad_accum_steps": 1,
                                       "gradient_checkpointing": True},
                             "adapter": {"kind": "lora", **adapter}})


def built(**adapter):
    """(cfg, parts, base, adapters, frozen, tokens) of a tiny random model."""
    cfg = config(**adapter)
    parts = build_step(cfg, STAGES["pretrain"])
    base = parts.model.init(mx.random.key(1))
    adapters, frozen = trainable(cfg, parts, base, mx.random.key(2))
    tokens = mx.random.randint(0, 96, (2, 16), key=mx.random.key(3))
    return cfg, parts, base, adapters, frozen, tokens


def with_random_b(adapters):
    """The adapters with B drawn at random (B = 0 at init would hide any mistake in the update)."""
    keys = iter(mx.random.split(mx.random.key(7), 64))
    return {"blocks": [{n: {**a, "lora_b": 0.1 * mx.random.normal(a["lora_b"].shape, key=next(keys))}
                        for n, a in b.items()} for b in adapters["blocks"]]}


def test_lora_with_b_zero_gives_exactly_the_base_logits():
    cfg, parts, base, adapters, frozen, tokens = built(targets=["q", "k", "v", "o", "gate", "up", "down"])
    want = parts.model.apply(base, tokens)
    got = parts.model.apply(attach(frozen, adapters, parts.adapter), tokens)
    assert mx.array_equal(got, want).item()


def test_lora_is_the_hand_computed_update():
    w, x = mx.random.normal((8, 6), key=mx.random.key(0)), mx.random.normal((3, 8), key=mx.random.key(1))
    a, b = mx.random.normal((8, 2), key=mx.random.key(2)), mx.random.normal((2, 6), key=mx.random.key(3))
    kind = lora(rank=2, alpha=6.0)
    got = linear(x, {"base": w, "adapter": {"lora_a": a, "lora_b": b}, "apply": kind.apply})
    want = np.array(x) @ np.array(w) + 3.0 * (np.array(x) @ np.array(a)) @ np.array(b)
    assert np.abs(np.array(got) - want).max() < 1e-5


def test_dora_forward_is_the_papers_formula_on_a_small_matrix():
    """W' = m * V / ||V||_c, V = W + (alpha/r) A B; ||.||_c over the input dimension of each output column."""
    w, x = np.random.RandomState(0).randn(5, 4), np.random.RandomState(1).randn(3, 5)
    a, b = np.random.RandomState(2).randn(5, 2), np.random.RandomState(3).randn(2, 4)
    kind = dora(rank=2, alpha=4.0)
    adapter = kind.init(mx.array(w, dtype=mx.float32), mx.random.key(0))
    assert np.allclose(np.array(adapter["magnitude"]), np.sqrt((w ** 2).sum(axis=0)), atol=1e-5)  # ||W||_c at init
    m = np.array([0.5, 1.0, 2.0, 3.0])
    adapter = {"lora_a": mx.array(a, dtype=mx.float32), "lora_b": mx.array(b, dtype=mx.float32),
               "magnitude": mx.array(m, dtype=mx.float32)}
    v = w + 2.0 * a @ b
    want = x @ (m * v / np.sqrt((v ** 2).sum(axis=0, keepdims=True)))
    got = kind.apply(mx.array(x, dtype=mx.float32), mx.array(w, dtype=mx.float32), adapter)
    assert np.abs(np.array(got) - want).max() < 1e-4
    merged = kind.merge(mx.array(w, dtype=mx.float32), adapter)
    assert np.abs(np.array(mx.array(x, dtype=mx.float32) @ merged) - want).max() < 1e-4


def test_dora_peft_tensors_merge_by_pefts_formula_to_abots_merged_weight():
    """PEFT's DoRA merge in its (out, in) layout, W' = m / ||W + s B A||_(dim=1) * (W + s B A), from the exported
    tensors, equals abot's merged (in, out) weight transposed; the config says use_dora."""
    rng = np.random.RandomState(4)
    w = rng.randn(6, 5).astype(np.float32)  # abot (in, out)
    adapter = {"lora_a": mx.array(rng.randn(6, 2), dtype=mx.float32),
               "lora_b": mx.array(rng.randn(2, 5), dtype=mx.float32),
               "magnitude": mx.array(rng.rand(5) + 0.5, dtype=mx.float32)}
    tensors = peft_tensors({"blocks": [{"wq": adapter}]})
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    assert sorted(tensors) == [f"{module}.lora_A.weight", f"{module}.lora_B.weight", f"{module}.lora_magnitude_vector"]
    a, b, m = (np.array(tensors[f"{module}.{k}"]) for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
    v = w.T + 2.0 * b @ a  # scaling = lora_alpha / r = 4 / 2
    want = m[:, None] * v / np.linalg.norm(v, axis=1, keepdims=True)
    got = np.array(dora(rank=2, alpha=4.0).merge(mx.array(w), adapter)).T
    assert np.abs(got - want).max() < 1e-5
    cfg = config_from_dict({"model": {"vocab_size": 64, "n_layers": 1, "d_model": 32, "n_heads": 2},
                            "data": {"seq_len": 16}, "train": {"init_from": "base"},
                            "adapter": {"kind": "dora", "rank": 2, "alpha": 4.0}})
    config = peft_config(cfg, "base")
    assert config["use_dora"] is True and config["peft_type"] == "LORA" and config["lora_alpha"] == 4.0


def test_dora_at_init_gives_the_base_logits():
    cfg, parts, base, adapters, frozen, tokens = built(kind="dora")
    want = parts.model.apply(base, tokens)
    assert mx.abs(parts.model.apply(attach(frozen, adapters, parts.adapter), tokens) - want).max().item() < 1e-5


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merged_weights_give_the_adapter_models_logits(kind):
    cfg, parts, base, adapters, frozen, tokens = built(kind=kind, targets=["q", "v", "gate", "down"])
    adapters = with_random_b(adapters)
    adapted = parts.model.apply(attach(frozen, adapters, parts.adapter), tokens)
    merged = parts.model.apply(merge(frozen, adapters, parts.adapter), tokens)
    assert mx.abs(adapted).max().item() > 0 and mx.abs(adapted - merged).max().item() <= 1e-5


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_forward_equals_the_dequantized_base_forward(bits):
    """The quantized base never dequantized in the forward (quantized_matmul) computes x @ dequantize(W)."""
    w = mx.random.normal((128, 32), key=mx.random.key(0)) * 0.05
    x = mx.random.normal((4, 128), key=mx.random.key(1))
    q = quantize(w, bits, 64)
    assert q["packed"].shape == (32, 128 * bits // 32)  # W.T (out, in) packed, grouped along the input dimension
    assert mx.abs(linear(x, q) - x @ dequantize(q)).max().item() < 1e-4
    assert mx.abs(dequantize(q) - w).max().item() < (0.02 if bits == 4 else 0.002)  # quantization's own error
    cfg, parts, base, adapters, frozen, tokens = built(quantize_bits=bits)
    plain = merge(frozen, adapters, parts.adapter)  # B = 0: the dequantized base
    got = parts.model.apply(attach(frozen, adapters, parts.adapter), tokens)
    assert mx.abs(got - parts.model.apply(plain, tokens)).max().item() < 1e-4


def test_qlora_on_the_cpu_has_quantized_matmuls_value_and_input_gradient():
    """On the CPU the quantized base is multiplied through its dequantized weight (dequantized_matmul, ~20x
    faster than MLX's CPU quantized_matmul); the value and the gradient reaching x are quantized_matmul's."""
    q = quantize(mx.random.normal((128, 96), key=mx.random.key(0)), 4, 64)
    x, c = mx.random.normal((4, 128), key=mx.random.key(1)), mx.random.normal((4, 96), key=mx.random.key(2))
    reference = lambda x: (mx.quantized_matmul(x, q["packed"], q["scales"], q["biases"], transpose=True,  # noqa: E731
                                               group_size=64, bits=4) * c).sum()
    ours = lambda x: (linear(x, q) * c).sum()  # noqa: E731
    (want, want_grad), (got, got_grad) = mx.value_and_grad(reference)(x), mx.value_and_grad(ours)(x)
    assert abs(got - want).item() < 1e-3 and mx.abs(got_grad - want_grad).max().item() < 1e-4
    checkpointed = mx.compile(mx.checkpoint(mx.value_and_grad(ours)))
    assert mx.abs(checkpointed(x)[1] - want_grad).max().item() < 1e-4


@pytest.mark.parametrize("adapter", [{}, {"kind": "dora"}, {"quantize_bits": 4}])
def test_a_step_changes_only_the_adapters_and_leaves_the_base_bit_identical(adapter):
    cfg, parts, base, adapters, frozen, tokens = built(**adapter)
    before = {k: np.array(v) for k, v in tree_flatten(frozen) if isinstance(v, mx.array)}
    state = init_state(adapters, parts.optimizer, mx.random.key(4))
    step = parts.with_frozen(frozen).step
    batch = random_batch(STAGES["pretrain"], cfg, mx.random.key(5))
    for _ in range(2):
        state, metrics = step(state, batch, mx.array(1e-2))
    mx.eval(state)
    assert sorted(state) == ["good_steps", "key", "loss_scale", "opt_state", "params"]
    assert [k for k, _ in tree_flatten(state["params"])] == [k for k, _ in tree_flatten(adapters)]
    assert not mx.array_equal(state["params"]["blocks"][0]["wq"]["lora_b"], adapters["blocks"][0]["wq"]["lora_b"])
    after = {k: np.array(v) for k, v in tree_flatten(frozen) if isinstance(v, mx.array)}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    n_adapter = sum(v.size for _, v in tree_flatten(state["params"]))
    n_opt = sum(v.size for _, v in tree_flatten(state["opt_state"]))
    assert n_opt <= 2 * n_adapter + 16  # AdamW's moments for the adapters only (plus step counters)


@pytest.mark.parametrize("overrides, words", [
    ({"targets": ["q", "gat"]}, r"adapter.targets: unknown target 'gat'; did you mean 'gate'\?"),
    ({"rank": 0}, r"adapter.rank must be positive, got 0"),
    ({"quantize_bits": 3}, r"adapter.quantize_bits must be 4 or 8"),
    ({"rnak": 4}, r"adapter.rnak: unknown key; did you mean 'rank'\?"),
])
def test_bad_adapter_config_is_a_clear_error_naming_the_key(overrides, words):
    with pytest.raises(ConfigError, match=words):
        config(**overrides)


def test_an_unknown_kind_and_a_missing_base_are_refused():
    with pytest.raises(AbotError, match=r"unknown adapter 'lroa' \(adapter.kind\); did you mean 'lora'\?"):
        build_step(config(kind="lroa"), STAGES["pretrain"])
    with pytest.raises(ConfigError, match=r"adapter.kind 'lora' needs train.init_from"):
        config_from_dict({"adapter": {"kind": "lora"}})
    assert {"lora", "dora"} <= set(registry.adapters.names())


def test_targets_the_model_lacks_are_skipped_and_said_and_none_present_is_an_error():
    cfg = config_from_dict({"model": {**MODEL, "ffn_activation": "relu2"}, "data": {"seq_len": 16},
                            "train": {"init_from": "base"},
                            "adapter": {"kind": "lora", "rank": 4, "targets": ["q", "gate", "down"]}})
    parts = build_step(cfg, STAGES["pretrain"])
    base = parts.model.init(mx.random.key(1))
    adapters, frozen = trainable(cfg, parts, base, mx.random.key(2))
    assert [sorted(b) for b in adapters["blocks"]] == [["w_down", "wq"]] * 2  # a ReLU² MLP has no gate
    # 2 blocks x (q: A 64x4 + B 4x64; down: A 256x4 + B 4x64) = 2 x (512 + 1280) = 3584 parameters
    assert describe(cfg.adapter, adapters, frozen) == (
        "adapters: lora rank 4 on q, down in 2 blocks, 3,584 parameters to train (gate: not in this model, skipped)")
    with pytest.raises(AbotError, match=r"adapter.targets \['gate'\]: the model has none of these projections; "
                                        r"its blocks have q, k, v, o, up, down"):
        trainable(config_from_dict({**cfg.to_dict(), "adapter": {"kind": "lora", "targets": ["gate"]}}), parts,
                  base, mx.random.key(2))


def test_a_different_base_is_refused_with_one_message(tmp_path):
    (tmp_path / "a.ckpt").write_bytes(b"one base")
    (tmp_path / "b.ckpt").write_bytes(b"another base")
    meta = {"base": base_identity(tmp_path / "a.ckpt")}
    check_base_fits(meta, base_identity(tmp_path / "a.ckpt"), "here", "fix")
    with pytest.raises(AbotError, match=r"here: the adapters were trained on a different base model: .*b.ckpt"):
        check_base_fits(meta, base_identity(tmp_path / "b.ckpt"), "here", "fix")
    folder = base_identity(QWEN2)  # a Hugging Face folder: its safetensors files
    assert folder["path"] == str(QWEN2) and len(folder["sha256"]) == 64


@pytest.mark.parametrize("adapter, checkpointing", [({}, False), ({"kind": "dora"}, True)])
def test_the_memory_estimate_covers_an_adapter_step(adapter, checkpointing):
    cfg = config_from_dict({"model": {"vocab_size": 4000, "n_layers": 2, "d_model": 256, "n_heads": 4, "dropout": 0.0},
                            "data": {"seq_len": 128, "source": "stdlib_docs"},
                            "train": {"init_from": "base", "micro_batch_size": 4, "grad_accum_steps": 1,
                                      "gradient_checkpointing": checkpointing},
                            "adapter": {"kind": "lora", "targets": ["q", "k", "v", "o", "gate", "up", "down"],
                                        **adapter}})
    est = estimate_memory(cfg)
    peak, _ = measure_step_peak(cfg)
    assert abs(est.peak - peak) / peak <= 0.15, (est, peak)
    assert est.frozen > 0 and est.params < est.frozen / 10  # the adapters are a small fraction of the base


# ---------------------------------------------------------------------------------------------- end to end

def abot_cli(*args, cwd):
    out = subprocess.run([sys.executable, "-m", "abot", *args], capture_output=True, text=True, cwd=cwd,
                         timeout=600, env={**__import__("os").environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


COMMON = ["train.micro_batch_size=4", "train.grad_accum_steps=1", "train.lr=1e-2", "train.min_lr=1e-3",
          "train.warmup_steps=0", "train.eval_steps=4", "train.log_interval=10", "train.ckpt_keep=3",
          "train.precision=float32", "train.schedule=constant"]


def sft_yaml(tmp_path, adapter: str) -> str:
    (tmp_path / "sft.yaml").write_text(
        f"data:\n  source: chat\n  dataset: {ROOT}/configs/data/ultrachat_mini\n  split: train_sft\n"
        f"  eval_split: test_sft\n  seq_len: 64\ntrain:\n  init_from: {QWEN2}\n  save_dir: sft\n"
        f"adapter:\n{adapter}")
    return "sft.yaml"


@pytest.mark.slow
def test_lora_sft_from_the_fixture_lowers_the_loss_and_exports_merged_and_as_peft(tmp_path):
    yaml = sft_yaml(tmp_path, "  kind: lora\n  rank: 8\n  targets: [q, k, v, o, gate, up, down]\n")
    abot_cli("sft", yaml, *COMMON, "train.total_steps=30", "train.eval_interval=30", "train.ckpt_interval=30",
             cwd=tmp_path)
    summary = json.loads((tmp_path / "sft" / "logs" / "final_training_summary.json").read_text())
    assert summary["final_eval"]["loss"] < summary["initial_eval"]["loss"] - 0.3
    opened = open_checkpoint(tmp_path / "sft")
    assert opened.is_adapter and opened.meta["base"] == base_identity(QWEN2)
    assert all(".lora_" in k for k, _ in tree_flatten(opened.ckpt.trees["state"]["params"]))

    abot_cli("export", "sft", "--merge", "--out", "merged", cwd=tmp_path)
    tokens = mx.array([[3, 14, 15, 92, 65, 35, 8, 9]])
    from abot.build import build_model

    model = build_model(opened.config())
    want = model.apply(opened.params(), tokens)  # the base with the adapters merged
    frozen = open_checkpoint(QWEN2).params()
    adapted = model.apply(attach(frozen, opened.trained(), lora(8, 16.0)), tokens)
    assert mx.abs(adapted - want).max().item() <= 1e-5
    reloaded = open_checkpoint(tmp_path / "merged")
    assert mx.abs(build_model(reloaded.config()).apply(reloaded.params(), tokens) - want).max().item() <= 1e-5

    abot_cli("export", "sft", "--out", "peft", cwd=tmp_path)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16.0
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    tensors = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)  # (r, in)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 8)  # (out, r)
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape == (8, 64)
    assert len(tensors) == 2 * 7 * 2
    abot_cli("generate", "sft", "--prompt", "Hello", "--max-new-tokens", "4", cwd=tmp_path)
    abot_cli("eval", "sft", "--steps", "2", cwd=tmp_path)


@pytest.mark.slow
def test_qlora_resume_is_bit_exact_and_a_different_base_is_refused(tmp_path):
    """10 steps, then --resume to 20 (a constant schedule, so total_steps may change) equals 20 steps at once."""
    yaml = sft_yaml(tmp_path, "  kind: dora\n  quantize_bits: 8\n  group_size: 32\n")
    whole = ["train.ckpt_interval=10", "train.eval_interval=1000"]
    abot_cli("sft", yaml, *COMMON, *whole, "train.total_steps=20", "train.save_dir=whole", cwd=tmp_path)
    abot_cli("sft", yaml, *COMMON, *whole, "train.total_steps=10", "train.save_dir=parts", cwd=tmp_path)
    abot_cli("sft", yaml, *COMMON, *whole, "train.total_steps=20", "train.save_dir=parts", "--resume", cwd=tmp_path)
    a = open_checkpoint(tmp_path / "whole" / "step_00000020.ckpt").ckpt.trees["state"]
    b = open_checkpoint(tmp_path / "parts" / "step_00000020.ckpt").ckpt.trees["state"]
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert fa.keys() == fb.keys() and all(np.array_equal(np.array(fa[k]), np.array(fb[k])) for k in fa)

    other = tmp_path / "other_base"
    other.mkdir()
    for f in QWEN2.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    weights = mx.load(str(other / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    mx.save_safetensors(str(other / "model.safetensors"), weights)
    out = subprocess.run([sys.executable, "-m", "abot", "sft", yaml, *COMMON, *whole, "train.total_steps=30",
                          "train.save_dir=parts", f"train.init_from={other}", "--resume"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=600, env={**os.environ, "COLUMNS": "400"})
    assert out.returncode == 2 and "the adapters were trained on a different base model" in out.stdout, out.stdout
    out = subprocess.run([sys.executable, "-m", "abot", "export", "parts", "--out", "peft"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=600, env={**os.environ, "COLUMNS": "400"})
    assert out.returncode != 0 and "8-bit quantized base" in out.stdout + out.stderr and "--merge" in out.stdout
    assert not (tmp_path / "peft" / "adapter_model.safetensors").exists()


def abot_popen(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "abot", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=cwd, env={**os.environ, "COLUMNS": "400"})


KILL_TOTAL = 120  # steps of ~40 ms: the kill, soon after the step-20/40 checkpoint, lands mid-run


@pytest.mark.slow
def test_lora_sft_killed_with_sigkill_then_resumed_ends_bit_identical(tmp_path):
    """`abot sft` with LoRA (dropout on, so the PRNG key matters) from the Hugging Face fixture, SIGKILLed at a
    random point after a checkpoint and resumed with --resume, ends with exactly the adapters, their optimizer
    state, key and data position of an uninterrupted run; the base's identity is recorded in both."""
    yaml = sft_yaml(tmp_path, "  kind: lora\n  rank: 4\n  dropout: 0.1\n  targets: [q, v, gate, down]\n")
    steps = [*COMMON, f"train.total_steps={KILL_TOTAL}", "train.ckpt_interval=20", "train.eval_interval=100000",
             "train.ckpt_keep=2", "train.log_interval=20"]
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kill_after, delay = rng.choice([20, 40]), rng.uniform(0.0, 0.05)
    # The uninterrupted run first; the other starts once the first has a checkpoint, its kernels in MLX's cache.
    code = run_then_kill(lambda run: abot_popen("sft", yaml, *steps, f"train.save_dir={run.name}", cwd=tmp_path),
                         tmp_path / "whole", tmp_path / "killed", kill_after, delay)
    assert code == -signal.SIGKILL, f"the run finished before the kill (delay {delay:.3f} s, seed {seed})"
    killed_at = load_checkpoint(latest_checkpoint(tmp_path / "killed")).step
    assert kill_after <= killed_at < KILL_TOTAL, f"checkpoint {killed_at} (delay {delay:.3f} s, seed {seed})"

    out = abot_cli("sft", yaml, *steps, "train.save_dir=killed", "--resume", cwd=tmp_path)
    assert f"at step {killed_at}" in out

    name = f"step_{KILL_TOTAL:08d}.ckpt"
    a, b = load_checkpoint(tmp_path / "whole" / name), load_checkpoint(tmp_path / "killed" / name)
    why = f"(killed {delay:.3f} s after step {kill_after}, resumed from step {killed_at}; random seed {seed})"
    assert a.step == b.step == KILL_TOTAL
    assert all(".lora_" in k for k, _ in tree_flatten(a.trees["state"]["params"]))  # the adapters only
    assert_bit_identical(b.trees["state"]["params"], a.trees["state"]["params"], f"adapters {why}")
    assert_bit_identical(b.trees["state"]["opt_state"], a.trees["state"]["opt_state"], f"opt_state {why}")
    assert_bit_identical(b.trees["state"], a.trees["state"], f"state {why}")  # key, loss scale, good steps too
    assert b.meta["data_state"] == a.meta["data_state"]
    assert b.meta["base"] == a.meta["base"] == base_identity(QWEN2)
