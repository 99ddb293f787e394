"""Hugging Face model folders: the committed fixtures (tests/fixtures/hf, made by make_fixtures.py with
transformers) load into abot's transformer and give transformers' logits and greedy tokens; what abot cannot
represent is refused naming the field."""

import abot  # noqa: F401  (first: it sets up BLAS before anything imports mlx.core)

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from huggingface_hub import constants as hub_constants

from abot.build import build_model
from abot.config import load_config
from abot.errors import AbotError
from abot.generate import generate_tokens
from abot.restore import open_checkpoint, with_model_folder

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
ROOT = Path(__file__).resolve().parent.parent
KINDS = ["llama", "qwen2", "qwen3", "arcee"]


def expected(kind: str) -> dict:
    return mx.load(str(FIXTURES / kind / "expected.npz"))


@pytest.mark.parametrize("kind", KINDS)
def test_a_fixture_gives_transformers_logits_and_greedy_tokens(kind):
    opened = open_checkpoint(FIXTURES / kind)
    cfg, want = opened.config(), expected(kind)
    model = build_model(cfg)
    params = tree_map(lambda p: p.astype(mx.float32), opened.params())  # transformers computed in float32
    logits = model.apply(params, want["input_ids"][None])[0]
    assert float(mx.abs(logits - want["logits"]).max()) <= 1e-4
    greedy = list(generate_tokens(model, params, want["input_ids"].tolist(), max_new_tokens=8, stop_ids=()))
    assert greedy == want["greedy"].tolist()


def test_each_architecture_maps_to_its_model_keys():
    llama, qwen2, qwen3, arcee = (open_checkpoint(FIXTURES / kind).config().model for kind in KINDS)
    assert (llama.n_heads, llama.n_kv_heads, llama.tie_embeddings, llama.rope_theta) == (4, 2, False, 500000.0)
    assert llama.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    assert (qwen2.qkv_bias, qwen2.attn_out_bias, qwen2.qk_norm, qwen2.tie_embeddings) == (True, False, False, True)
    assert (qwen3.qk_norm, qwen3.head_dim, qwen3.d_model // qwen3.n_heads) == (True, 32, 16)
    assert llama.mlp_hidden == 128 and llama.vocab_size == 320
    assert (llama.ffn_activation, arcee.ffn_activation, arcee.tie_embeddings, arcee.qk_norm) == \
        ("silu", "relu2", False, False)
    assert "w_gate" not in open_checkpoint(FIXTURES / "arcee").params()["blocks"][0]


def test_bfloat16_weights_stay_bfloat16():
    params = open_checkpoint(FIXTURES / "llama").params()
    assert {leaf.dtype for _, leaf in tree_flatten(params)} == {mx.bfloat16}


def copy_fixture(tmp_path: Path, kind: str = "qwen2", **changes) -> Path:
    folder = tmp_path / kind
    shutil.copytree(FIXTURES / kind, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, words", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures is ['GPT2LMHeadModel']; abot imports LlamaForCausalLM"),
    ({"num_local_experts": 8}, "num_local_experts is 8; mixture-of-experts"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ({"architectures": ["ArceeForCausalLM"], "hidden_act": "silu"},
     "hidden_act is 'silu'; abot's ungated MLP takes relu2 or gelu"),
    ({"use_sliding_window": True, "sliding_window": 16}, "sliding_window is 16; sliding-window attention"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_scaling.rope_type is 'yarn'"),
    ({"hidden_size": 96}, "its parameters do not fit the configured model"),
])
def test_what_abot_cannot_represent_is_refused_naming_the_field(tmp_path, changes, words):
    with pytest.raises(AbotError, match=None) as err:
        open_checkpoint(copy_fixture(tmp_path, **changes))
    assert words in str(err.value)


def test_a_folder_without_weights_or_with_extra_tensors_is_refused(tmp_path):
    folder = copy_fixture(tmp_path)
    (folder / "model.safetensors").rename(tmp_path / "weights.safetensors")
    with pytest.raises(AbotError, match="no model weights"):
        open_checkpoint(folder)
    tensors = mx.load(str(tmp_path / "weights.safetensors"))
    mx.save_safetensors(str(folder / "model.safetensors"), {**tensors, "model.layers.0.mlp.gate_proj.bias":
                                                            mx.zeros((128,))})
    with pytest.raises(AbotError, match="1 tensors that config.json does not explain"):
        open_checkpoint(folder)
    del tensors["model.norm.weight"]
    mx.save_safetensors(str(folder / "model.safetensors"), tensors)
    with pytest.raises(AbotError, match="no tensor 'model.norm.weight'"):
        open_checkpoint(folder)


def test_sharded_weights_load_through_the_index(tmp_path):
    folder = copy_fixture(tmp_path)
    tensors = mx.load(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        mx.save_safetensors(str(folder / file), {n: tensors[n] for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: file for file, part in shards.items() for n in part}}))
    whole = open_checkpoint(FIXTURES / "qwen2").params()
    for (k, a), (_, b) in zip(tree_flatten(open_checkpoint(folder).params()), tree_flatten(whole)):
        assert np.array_equal(np.array(a), np.array(b)), k


def test_a_hub_id_offline_and_not_cached_fails_at_once_saying_how_to_point_at_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(AbotError) as err:
        open_checkpoint("HuggingFaceTB/SmolLM2-135M", "train.init_from")
    message = str(err.value)
    assert "not" in message and "local Hugging Face cache" in message and "point train.init_from at the model" in message


def test_a_hub_id_in_the_local_cache_loads(tmp_path, monkeypatch):
    """The cache layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/REV/...}."""
    cache = tmp_path / "cache"
    repo = cache / "models--someone--tiny-qwen3"
    shutil.copytree(FIXTURES / "qwen3", repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    opened = open_checkpoint("someone/tiny-qwen3")
    assert opened.path == repo / "snapshots" / "0123abcd" and opened.config().model.qk_norm


def test_a_run_from_a_folder_takes_the_model_section_and_tokenizer_from_it(tmp_path):
    yaml = tmp_path / "sft.yaml"
    yaml.write_text(f"data:\n  seq_len: 64\ntrain:\n  init_from: {FIXTURES / 'qwen3'}\n")
    cfg = with_model_folder(load_config(yaml))
    assert cfg.model.qk_norm and cfg.model.head_dim == 32 and cfg.train.tokenizer_path == str(FIXTURES / "qwen3")
    yaml.write_text(f"model:\n  dropout: 0.1\n  n_kv_heads: 2\ndata:\n  seq_len: 64\ntrain:\n  init_from: {FIXTURES / 'qwen3'}\n")
    assert with_model_folder(load_config(yaml)).model.dropout == 0.1  # dropout may differ; the rest must agree
    yaml.write_text(f"model:\n  n_kv_heads: 1\ndata:\n  seq_len: 64\ntrain:\n  init_from: {FIXTURES / 'qwen3'}\n")
    with pytest.raises(AbotError, match=r"model.n_kv_heads: checkpoint 2, config 1"):
        with_model_folder(load_config(yaml))


def transformers_or_skip():
    """transformers, with torch to run its models: mlx-lm (benchmarks/adapters.py) installs transformers alone."""
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "arcee"])
def test_random_models_built_by_transformers_load_with_the_same_logits(tmp_path, kind):
    """Where transformers is installed: fresh random models of each architecture, so the fixtures cannot drift."""
    transformers = transformers_or_skip()
    import torch

    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "arcee": "Arcee"}
    config = getattr(transformers, f"{names[kind]}Config")(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=kind != "llama")
    torch.manual_seed(1)
    model = getattr(transformers, f"{names[kind]}ForCausalLM")(config)
    model.save_pretrained(tmp_path / kind)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 8, 9]])
    with torch.no_grad():
        want = model(ids).logits[0].numpy()
    opened = open_checkpoint(tmp_path / kind)
    logits = build_model(opened.config()).apply(opened.params(), mx.array(ids.numpy()))[0]
    assert np.abs(np.array(logits) - want).max() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_folder_to_abot_to_export_gives_the_same_tensors_bit_for_bit(tmp_path, kind):
    from abot.export import export_checkpoint

    export_checkpoint(FIXTURES / kind, tmp_path / "out", say=lambda line: None)
    original = mx.load(str(FIXTURES / kind / "model.safetensors"))
    exported = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and mx.array_equal(exported[name], tensor).item(), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    source = json.loads((FIXTURES / kind / "config.json").read_text())
    assert config["architectures"] == source["architectures"]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (FIXTURES / kind / "tokenizer.json").read_bytes()


def run_abot(*args, cwd) -> str:
    out = subprocess.run([sys.executable, "-m", "abot", *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def fine_tune(command: str, source: str, data: str, splits: str, base: str, steps: int, cwd: Path) -> dict:
    """`abot sft` or `abot dpo` from fixture `base` with a YAML that has no model section; the run's summary."""
    train, held_out = splits.split(",")
    (cwd / f"{command}.yaml").write_text(
        f"data:\n  source: {source}\n  dataset: {ROOT}/configs/data/{data}\n  split: {train}\n"
        f"  eval_split: {held_out}\n  seq_len: 64\ntrain:\n  init_from: {FIXTURES / base}\n  save_dir: {command}\n")
    run_abot(command, f"{command}.yaml", "train.micro_batch_size=4", "train.grad_accum_steps=1", "train.lr=3e-3",
             "train.min_lr=3e-4", "train.warmup_steps=2", "train.eval_steps=4", "train.log_interval=10",
             "train.ckpt_keep=1", "train.gradient_checkpointing=false", "train.precision=float32",
             f"train.total_steps={steps}", f"train.eval_interval={steps}", f"train.ckpt_interval={steps}", cwd=cwd)
    return json.loads((cwd / command / "logs" / "final_training_summary.json").read_text())


@pytest.mark.slow
def test_sft_and_dpo_from_an_imported_folder_with_no_model_section(tmp_path):
    """A YAML with no model section and no tokenizer: both come from the folder. The loss falls, the run reloads."""
    summary = fine_tune("sft", "chat", "ultrachat_mini", "train_sft,test_sft", "qwen2", 30, tmp_path)
    assert summary["final_eval"]["loss"] < summary["initial_eval"]["loss"] - 0.5
    assert open_checkpoint(tmp_path / "sft").config().model.qkv_bias  # the run folder reloads as the folder's model
    run_abot("generate", "sft", "--prompt", "Hello", "--max-new-tokens", "4", cwd=tmp_path)
    summary = fine_tune("dpo", "preferences", "ultrafeedback_mini", "train_prefs,test_prefs", "qwen3", 20, tmp_path)
    assert summary["initial_eval"]["accuracy"] == 0.0 and summary["final_eval"]["loss"] < 0.6931
