"""End-to-end: the CLI trains a small model on the built-in corpus and leaves logs, summary and checkpoints."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from abot.checkpoint import latest_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def abot(*args, cwd):
    return subprocess.run([sys.executable, "-m", "abot", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_train_tiny_config_end_to_end(tmp_path):
    overrides = [f"train.save_dir={tmp_path}/run", f"train.tokenizer_path={tmp_path}/tok.model",
                 "model.vocab_size=1000", "model.n_layers=2", "model.d_model=64", "model.n_heads=4",
                 "data.seq_len=64", "train.micro_batch_size=8", "train.total_steps=60", "train.warmup_steps=5",
                 "train.log_interval=10", "train.eval_interval=30", "train.eval_steps=4", "train.ckpt_interval=30",
                 "train.ckpt_keep=1"]
    out = abot("train", str(ROOT / "configs" / "tiny.yaml"), *overrides, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "training a 1000-token BPE tokenizer" in out.stdout
    logs = tmp_path / "run" / "logs"
    summary = json.loads((logs / "final_training_summary.json").read_text())
    assert summary["final_step"] == 60 and summary["tokens_trained"] == 60 * 8 * 64
    rows = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40, 50, 60]
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s", "memory_gb"} <= set(train_rows[0])
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0  # it learns
    assert evals[-1]["loss"] < math.log(1000) and summary["final_eval"]["loss"] == evals[-1]["loss"]
    assert any((logs / "tensorboard").iterdir())
    # ckpt_keep: 1 -> only the newest remains, and it reloads with the resolved config.
    ckpts = sorted((tmp_path / "run").glob("step_*.ckpt"))
    assert [p.name for p in ckpts] == ["step_00000060.ckpt"] and latest_checkpoint(tmp_path / "run") == ckpts[0]
    ckpt = load_checkpoint(ckpts[0])
    assert ckpt.step == 60 and ckpt.meta["config"]["model"]["d_model"] == 64


@pytest.mark.slow
def test_config_error_is_one_clear_line(tmp_path):
    out = abot("train", str(ROOT / "configs" / "tiny.yaml"), "train.optimizer=adamww", cwd=tmp_path)
    assert out.returncode == 2
    assert "did you mean 'adamw'?" in out.stdout and "Traceback" not in out.stdout + out.stderr
