"""`abot dpo` with a reference-free loss (orpo, simpo): no train.init_from needed, no reference log-probs
computed, and `abot eval` scores the checkpoint on its preference pairs."""

import abot  # noqa: F401  (first: it sets up BLAS before anything imports mlx.core)

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import abot.stage
from abot.cli import app

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "hf" / "llama"  # a small Hugging Face tokenizer (320 ids)


def tiny_dpo_args(save_dir: Path, *extra: str) -> list[str]:
    """`abot dpo configs/dpo.yaml` with a tiny model, a few steps and no starting checkpoint."""
    return ["dpo", str(ROOT / "configs" / "dpo.yaml"), "model.vocab_size=320", "model.n_layers=1",
            "model.d_model=32", "model.n_heads=2", "model.max_seq_len=128", f"train.tokenizer_path={TOKENIZER}",
            f"data.dataset={ROOT}/configs/data/ultrafeedback_mini", "data.seq_len=64", "train.init_from=null",
            f"train.save_dir={save_dir}", "train.total_steps=3", "train.micro_batch_size=4", "train.warmup_steps=1",
            "train.log_interval=1", "train.eval_interval=3", "train.eval_steps=2", "train.ckpt_interval=3", *extra]


@pytest.fixture
def no_reference(monkeypatch):
    """Fail the test if the stage builds the reference function or adds reference log-probs to a batch."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("reference log-probs computed for a reference-free loss")

    monkeypatch.setattr(abot.stage, "make_reference_fn", refuse)
    monkeypatch.setattr(abot.stage, "add_reference_logprobs", refuse)
    return calls


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_dpo_with_a_reference_free_loss_needs_no_reference(loss, tmp_path, no_reference):
    out = CliRunner().invoke(app, tiny_dpo_args(tmp_path / "run", f"train.loss={loss}"))
    assert out.exit_code == 0, out.output + repr(out.exception)
    assert no_reference == [] and "random initialization" in out.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 3 and {"reward_margin", "accuracy"} <= set(train_rows[-1])
    summary = json.loads((tmp_path / "run" / "logs" / "final_training_summary.json").read_text())
    assert summary["stage"] == "dpo" and "accuracy" in summary["final_eval"]

    # abot eval scores the checkpoint as the run evaluated it: its loss and rewards, no perplexity.
    scored = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--json"])
    assert scored.exit_code == 0, scored.output + repr(scored.exception)
    result = json.loads(scored.output)
    assert result["loss"] == pytest.approx(summary["final_eval"]["loss"], rel=1e-4)
    assert result["accuracy"] == pytest.approx(summary["final_eval"]["accuracy"]) and "ppl" not in result
    table = CliRunner().invoke(app, ["eval", str(tmp_path / "run")])
    assert table.exit_code == 0 and "reward_margin" in table.output and "ppl" not in table.output


def test_dpo_without_init_from_is_refused_before_any_work(tmp_path, no_reference):
    out = CliRunner().invoke(app, tiny_dpo_args(tmp_path / "run"))
    assert out.exit_code != 0 and "needs train.init_from" in str(out.exception)
    assert not (tmp_path / "run").exists()
