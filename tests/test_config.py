from pathlib import Path

import pytest

from abot.config import load_config
from abot.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


def test_guide_numbers_without_a_decimal_point_are_numbers(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 3e-4\n  min_lr: 3e-5\nmodel:\n  norm_eps: 1e-5\n"))
    assert cfg.train.lr == 3e-4 and cfg.train.min_lr == 3e-5 and cfg.model.norm_eps == 1e-5


def test_guide_minimal_example_keeps_its_values():
    cfg = load_config(CONFIGS / "guide" / "minimal_test_run.yaml")
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.data.config, cfg.train.lr) == (6, 512, "en", 1e-3)
    assert cfg.train.optimizer == "muon_adamw" and cfg.train.schedule == "cosine" and cfg.model.name == "transformer"


def test_dotted_overrides_apply_after_the_file(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  total_steps: 5\n"),
                      ["train.total_steps=20", "data.seq_len=128", "train.optimizer_args.momentum=0.9"])
    assert cfg.train.total_steps == 20 and cfg.data.seq_len == 128
    assert cfg.train.optimizer_args == {"momentum": 0.9}


@pytest.mark.parametrize("text,overrides,message", [
    ("train:\n  lrr: 1e-3\n", [], "train.lrr: unknown key; did you mean 'lr'?"),
    ("trian:\n  lr: 1e-3\n", [], "unknown section 'trian'; did you mean 'train'?"),
    ("train:\n  lr: fast\n", [], "train.lr: expected a number, got 'fast'"),
    ("train:\n  total_steps: 1.5\n", [], "train.total_steps: expected an integer"),
    ("train:\n  compile: maybe\n", [], "train.compile: expected true or false"),
    ("model:\n  d_model: 100\n  n_heads: 3\n", [], "model.d_model (100) must be divisible by model.n_heads (3)"),
    ("model:\n  max_seq_len: 512\ndata:\n  seq_len: 1024\n", [], "data.seq_len (1024) must be <= model.max_seq_len (512)"),
    ("model:\n  ffn_activation: relu\n", [], "model.ffn_activation 'relu' is not one of silu, gelu"),
    ("train:\n  precision: fp8\n", [], "train.precision 'fp8' is not one of float32, bfloat16, float16"),
    ("model: 3\n", [], "model: expected a mapping"),
    ("- a\n- b\n", [], "the top level must be a mapping"),
    ("train:\n  lr: [1\n", [], "invalid YAML (line"),
    ("", ["train.total_step=3"], "train.total_step: unknown key; did you mean 'total_steps'?"),
    ("", ["total_steps=3"], "must look like section.key=value"),
    ("", ["train.total_steps"], "expected section.key=value"),
])
def test_config_errors_name_the_file_and_key(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert message in str(err.value)
    if overrides == [] or "unknown key" in message:
        assert str(path) in str(err.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "model:\n  d_model: 100\n  n_heads: 3\ntrain:\n  precision: fp8\n"))
    assert "2 problems" in str(err.value)
