"""End-to-end: pre-train a tiny model, SFT it on chat data, then DPO it on preference pairs, all through the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from abot.checkpoint import latest_checkpoint, load_checkpoint
from abot.finetune.synthetic import chat_rows, write_dataset

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.vocab_size=1000", "model.n_layers=2", "model.d_model=64", "model.n_heads=4"]


def abot(*args, cwd):
    out = subprocess.run([sys.executable, "-m", "abot", *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return " ".join(out.stdout.split())  # rich wraps long lines


def logged(run: Path, split: str) -> list[dict]:
    rows = map(json.loads, (run / "logs" / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["split"] == split]


@pytest.mark.slow
def test_pretrain_then_sft_then_dpo(tmp_path):
    common = TINY + [f"train.tokenizer_path={tmp_path}/tok.model", "train.micro_batch_size=8", "train.log_interval=10",
                     "train.ckpt_keep=1"]
    abot("train", str(ROOT / "configs" / "tiny.yaml"), *common, f"train.save_dir={tmp_path}/pre", "data.seq_len=64",
         "train.total_steps=40", "train.warmup_steps=5", "train.eval_interval=40", "train.eval_steps=2",
         "train.ckpt_interval=40", cwd=tmp_path)

    # SFT on chat rows with the real schema, plus bad rows that must be dropped and counted, not trained on.
    bad = [{"prompt": "p", "prompt_id": "0", "messages": [{"role": "user", "content": "nobody answers"}]},
           {"prompt": "p", "prompt_id": "1", "messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": ""}]},
           {"prompt": "p", "prompt_id": "2", "messages": [{"role": "system", "content": "s"}]}]
    write_dataset(tmp_path / "chat", {"train_sft": chat_rows(200, seed=1)[:100] + bad + chat_rows(200, seed=1)[100:],
                                      "test_sft": chat_rows(16, seed=2)})
    out = abot("sft", str(ROOT / "configs" / "sft.yaml"), *common, f"train.init_from={tmp_path}/pre",
               f"train.save_dir={tmp_path}/sft", f"data.dataset={tmp_path}/chat", "data.seq_len=64",
               "data.shuffle_buffer=64", "train.total_steps=40", "train.lr=2e-3", "train.eval_interval=40",
               "train.eval_steps=2", "train.ckpt_interval=40", cwd=tmp_path)
    assert "Starting from" in out and "weights only" in out
    summary = json.loads((tmp_path / "sft" / "logs" / "final_training_summary.json").read_text())
    assert summary["stage"] == "sft" and summary["final_eval"]["loss"] < summary["initial_eval"]["loss"] - 0.5
    assert summary["data"]["complete"] and summary["data"]["examples"] == 203 and summary["data"]["used"] == 200
    assert summary["data"]["dropped"] == {"empty_message": 1, "no_assistant_turn": 2}
    assert "3 dropped (empty_message 1, no_assistant_turn 2)" in out
    sft_ckpt = latest_checkpoint(tmp_path / "sft")
    assert load_checkpoint(sft_ckpt).meta["stage"] == "sft"
    # abot eval scores the SFT checkpoint as the SFT run did: the loss on assistant tokens of the eval split.
    scored = json.loads(abot("eval", str(sft_ckpt), "--json", cwd=tmp_path))
    assert scored["loss"] == pytest.approx(summary["final_eval"]["loss"], rel=1e-4)

    # DPO from the SFT model (also the frozen reference) on the shipped synthetic preference set.
    out = abot("dpo", str(ROOT / "configs" / "dpo.yaml"), *common, f"train.init_from={tmp_path}/sft",
               f"train.save_dir={tmp_path}/dpo", f"data.dataset={ROOT}/configs/data/ultrafeedback_mini",
               "data.seq_len=40", "train.total_steps=60", "train.lr=2e-3", "train.min_lr=2e-4",
               "train.eval_interval=20", "train.eval_steps=8", "train.ckpt_interval=60", cwd=tmp_path)
    evals = logged(tmp_path / "dpo", "eval")
    assert [e["step"] for e in evals] == [0, 20, 40, 60]
    assert evals[0]["accuracy"] == 0.0 and evals[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert evals[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start
    assert evals[-1]["accuracy"] > 0.9  # 64 held-out pairs
    assert 0 < evals[1]["reward_margin"] < evals[-1]["reward_margin"]
    assert evals[-1]["reward_chosen"] > evals[-1]["reward_rejected"]
    train_rows = logged(tmp_path / "dpo", "train")
    assert {"reward_chosen", "reward_rejected", "reward_margin", "accuracy"} <= set(train_rows[-1])
    summary = json.loads((tmp_path / "dpo" / "logs" / "final_training_summary.json").read_text())
    assert summary["data"]["dropped_total"] == 0 and summary["data"]["truncated"] == 0
    assert f"accuracy {evals[-1]['accuracy']:.4f}" in out
    # A DPO checkpoint's loss needs the reference model: abot eval says so and how to score it on text.
    failed = subprocess.run([sys.executable, "-m", "abot", "eval", str(latest_checkpoint(tmp_path / "dpo"))],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    message = " ".join((failed.stdout + failed.stderr).split())
    assert failed.returncode != 0 and "reference model" in message and "data.source=stdlib_docs" in message

    # SimPO from the same SFT model: reference-free, so no ref_* log-probs; it learns the same preference.
    out = abot("dpo", str(ROOT / "configs" / "dpo.yaml"), *common, f"train.init_from={tmp_path}/sft",
               f"train.save_dir={tmp_path}/simpo", f"data.dataset={ROOT}/configs/data/ultrafeedback_mini",
               "train.loss=simpo", "data.seq_len=40", "train.total_steps=60", "train.lr=2e-3", "train.min_lr=2e-4",
               "train.eval_interval=30", "train.eval_steps=8", "train.ckpt_interval=60", cwd=tmp_path)
    evals = logged(tmp_path / "simpo", "eval")
    assert evals[-1]["accuracy"] > 0.9 and evals[-1]["reward_margin"] > evals[0]["reward_margin"]
    scored = json.loads(abot("eval", str(tmp_path / "simpo"), "--json", cwd=tmp_path))
    assert scored["accuracy"] == pytest.approx(evals[-1]["accuracy"]) and "ppl" not in scored
