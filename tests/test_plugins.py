"""The plugin contract end to end: pip-install the example plugins, list them, train with them."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = {"abot-lion": ROOT / "plugins" / "abot-lion", "abot-textfiles": ROOT / "plugins" / "abot-textfiles"}


def run(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def installed_plugins():
    """Install the example plugins into this environment, as a user would (`pip install plugins/<name>`)."""
    for name, path in PLUGINS.items():
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            out = run("-m", "pip", "install", "-q", "--no-deps", str(path))
            assert out.returncode == 0, out.stderr
    return PLUGINS


@pytest.mark.slow
def test_plugins_own_tests_pass(installed_plugins):
    out = run("-m", "pytest", "-q", *(str(p / "tests") for p in installed_plugins.values()))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_list_shows_plugins_with_their_package(installed_plugins):
    out = run("-m", "abot", "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("lion" in line and "abot-lion 0.1.0" in line for line in lines)
    assert any("textfiles" in line and "abot-textfiles 0.1.0" in line for line in lines)


@pytest.mark.slow
def test_training_with_a_plugin_optimizer_and_source_lowers_the_loss(installed_plugins, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "the model reads plain text files one document per file and learns their words".split()
    for i in range(60):
        (corpus / f"{i}.txt").write_text(" ".join(words[(i + j) % len(words)] for j in range(200)))
    overrides = ["data.source=textfiles", f"data.source_args.path={corpus}", "data.eval_fraction=0.2",
                 "train.optimizer=lion", "train.optimizer_args={}", "train.optimizer_args.b2=0.98",
                 "train.lr=1e-3", "train.min_lr=1e-4",
                 f"train.save_dir={tmp_path}/run", f"train.tokenizer_path={tmp_path}/tok.model",
                 "model.vocab_size=300", "model.n_layers=2", "model.d_model=64", "model.n_heads=4",
                 "data.seq_len=64", "train.micro_batch_size=8", "train.total_steps=40", "train.warmup_steps=4",
                 "train.log_interval=10", "train.eval_interval=40", "train.eval_steps=2", "train.ckpt_interval=40"]
    out = run("-m", "abot", "train", str(ROOT / "configs" / "tiny.yaml"), *overrides, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < 0.75 * losses[0], losses


@pytest.mark.slow
def test_unknown_plugin_option_is_named(installed_plugins, tmp_path):
    out = run("-m", "abot", "train", str(ROOT / "configs" / "tiny.yaml"), "train.optimizer=lion",
              "train.optimizer_args={beta1: 0.9}", cwd=tmp_path)
    assert out.returncode == 2
    assert "train.optimizer_args: unknown option 'beta1' for lion" in out.stdout
