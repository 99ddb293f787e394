"""Fault tolerance end to end: bit-identical resume after SIGKILL, SIGTERM, divergence, config changes on resume.

Every run is the real CLI (`python -m abot train`) on a tiny model (2 x 64, vocab 1000) over the built-in
corpus, with one tokenizer trained once for the whole module and shared by all runs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlx.utils import tree_flatten

import abot  # noqa: F401  (before mlx.core)
from abot.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from kill_resume import assert_bit_identical, run_then_kill, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
MODEL = ["model.vocab_size=1000", "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.dropout=0.1",
         "data.seq_len=64", "train.micro_batch_size=4", "train.warmup_steps=5", "train.log_interval=5",
         "train.eval_steps=2", "data.shuffle_buffer=64"]


ENV = {**os.environ, "COLUMNS": "400"}  # messages on one line each


def cli(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "abot", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=ENV)


def popen(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "abot", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=cwd, env=ENV)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """One 1000-token tokenizer for every run of this module (trained once, ~2 s)."""
    folder = tmp_path_factory.mktemp("tok")
    path = folder / "tok.model"
    out = cli("tokenizer", "train", TINY, "model.vocab_size=1000", f"train.tokenizer_path={path}", cwd=folder)
    assert out.returncode == 0, out.stdout + out.stderr
    return path


def run_args(tokenizer, save_dir, *extra):
    return ["train", TINY, *MODEL, f"train.tokenizer_path={tokenizer}", f"train.save_dir={save_dir}", *extra]


def events(save_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(save_dir) / "logs" / "events.jsonl").read_text().splitlines()]


def summary(save_dir) -> dict:
    return json.loads((Path(save_dir) / "logs" / "final_training_summary.json").read_text())


def small_corpus(folder: Path, chars: int = 12_000) -> Path:
    """A few hundred paragraphs of the built-in corpus as a JSON-lines file: an epoch of ~10 steps."""
    from abot.data.corpus import stdlib_docs_files

    docs, total = [], 0
    with open(stdlib_docs_files()["train"]) as f:
        for line in f:
            for para in json.loads(line)["text"].split("\n\n"):
                if para.strip() and total < chars:
                    docs.append({"text": para})
                    total += len(para)
    path = folder / "small.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


TOTAL = 80  # steps: long enough that the kill, ~0.1 s after a step-10/20 checkpoint, lands mid-run


@pytest.mark.slow
@pytest.mark.parametrize("data", ["stdlib_docs", "small_json"])
def test_sigkill_then_resume_is_bit_identical(tokenizer, tmp_path, data):
    """A run killed with SIGKILL at a random point after its first checkpoint, then resumed with --resume,
    ends with exactly the parameters, optimizer state, RNG key and data position of an uninterrupted run.

    stdlib_docs: the kill lands mid-epoch. small_json: a local file whose epoch is ~10 steps, with a
    per-epoch document shuffle, so the 80 steps cross several epochs and the resume lands anywhere in one.
    """
    steps = [f"train.total_steps={TOTAL}", "train.ckpt_interval=10", "train.eval_interval=1000", "train.ckpt_keep=2"]
    if data == "small_json":
        steps += ["data.source=huggingface", "data.dataset=json", f"data.data_files={small_corpus(tmp_path)}",
                  "data.eval_fraction=0.1", "train.eval_steps=1", "data.source_args={doc_shuffle_buffer: 8}",
                  "data.shuffle_buffer=16"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kill_after, delay = rng.choice([10, 20]), rng.uniform(0.0, 0.15)  # lands soon after that checkpoint
    # The uninterrupted run goes first; the other starts once it has a checkpoint, so its train step's
    # kernels are in MLX's JIT cache: two processes compiling the same kernel at once can trip over each
    # other's half-written files in /tmp/mlx. Evaluation only at the end (compiled by one process at a time).
    code = run_then_kill(lambda run: popen(*run_args(tokenizer, run, *steps), cwd=tmp_path), whole, killed,
                         kill_after, delay)
    assert code == -signal.SIGKILL, f"the run finished before the kill (delay {delay:.2f} s, seed {seed})"
    killed_at = load_checkpoint(latest_checkpoint(killed)).step
    assert kill_after <= killed_at < TOTAL, f"checkpoint {killed_at} (delay {delay:.2f} s, seed {seed})"

    out = cli(*run_args(tokenizer, killed, *steps), "--resume", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"at step {killed_at}" in out.stdout
    assert summary(killed)["start_step"] == killed_at and summary(killed)["final_step"] == TOTAL

    a, b = load_checkpoint(whole / f"step_{TOTAL:08d}.ckpt"), load_checkpoint(killed / f"step_{TOTAL:08d}.ckpt")
    why = f"(killed {delay:.2f} s after step {kill_after}, resumed from step {killed_at}; random seed {seed})"
    assert a.step == b.step == TOTAL
    assert_bit_identical(b.trees["state"]["params"], a.trees["state"]["params"], f"params {why}")
    assert_bit_identical(b.trees["state"]["opt_state"], a.trees["state"]["opt_state"], f"opt_state {why}")
    assert_bit_identical(b.trees["state"], a.trees["state"], f"state {why}")  # key, loss scale, good steps too
    assert b.meta["data_state"] == a.meta["data_state"]
    if data == "small_json":
        assert a.meta["data_state"]["epoch"] >= 2, a.meta["data_state"]  # the runs did cross epochs


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resume_checks_config_changes(tokenizer, tmp_path):
    """SIGTERM mid-run: the step in flight finishes, a checkpoint of it is written, the summary says why, exit 0.
    Then the resume: debris of a write cut short is ignored and swept, a shape change is refused naming the
    key, and safe changes (total_steps, lr, intervals) are accepted and logged to events.jsonl."""
    run = tmp_path / "run"
    steps = ["train.total_steps=500", "train.ckpt_interval=5", "train.eval_interval=1000", "train.ckpt_keep=2"]
    proc = popen(*run_args(tokenizer, run, *steps), cwd=tmp_path)
    try:
        wait_for(lambda: list_checkpoints(run), proc, "the first checkpoint")
        time.sleep(random.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    done = summary(run)
    final = done["final_step"]
    assert done["stopped"] == "received SIGTERM" and 5 <= final < 500, done
    assert f"Stopping at step {final}: received SIGTERM." in " ".join(output.split())
    latest = latest_checkpoint(run)
    assert load_checkpoint(latest).step == final and done["checkpoint"] == str(latest)
    assert events(run)[-1]["event"] == "checkpoint" and events(run)[-1]["step"] == final

    # A write killed midway leaves only a temp file: it is never read, and the next save removes it.
    stray = run / f"step_{final + 1:08d}.ckpt.k1ll3d.tmp"
    stray.write_bytes(latest.read_bytes()[:4096])

    out = cli(*run_args(tokenizer, run, *steps, "model.d_model=32"), "--resume", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    message = " ".join(out.stdout.split())
    assert "cannot resume: the config's model section does not match the checkpoint's (model.d_model: checkpoint 64, config 32)" in message, message
    assert "start a new run in another save_dir" in message

    changed = [f"train.total_steps={final + 3}", "train.lr=1e-3", "train.ckpt_interval=3", "train.log_interval=1",
               "train.eval_interval=1000", "train.ckpt_keep=2"]
    out = cli(*run_args(tokenizer, run, *changed), "--resume", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Resumed from {latest} at step {final}." in " ".join(out.stdout.split())
    assert "Config changes since the checkpoint" in out.stdout
    after = summary(run)
    assert after["start_step"] == final and after["final_step"] == final + 3 and after["stopped"] is None
    log = events(run)
    resumed = [e for e in log if e["event"] == "resume"]
    assert resumed and resumed[-1]["step"] == final and resumed[-1]["checkpoint"] == str(latest)
    changes = [e for e in log if e["event"] == "resume_config_changes"][-1]["changes"]
    assert sorted(changes) == sorted([f"train.total_steps: 500 -> {final + 3}", "train.lr: 0.004 -> 0.001",
                                      "train.ckpt_interval: 5 -> 3", "train.log_interval: 5 -> 1"]), changes
    assert not stray.exists()
    assert load_checkpoint(latest_checkpoint(run)).step == final + 3


@pytest.mark.slow
def test_nonfinite_loss_stops_with_the_last_good_state(tokenizer, tmp_path):
    """lr 1e6 without clipping blows the weights up after one step: every later step has a non-finite
    gradient and is skipped (params and optimizer state untouched) until train.max_nonfinite_steps in a row
    stop the run with a checkpoint, a message saying what to change, and exit code 2."""
    run = tmp_path / "run"
    out = cli(*run_args(tokenizer, run, "train.total_steps=30", "train.lr=1e6", "train.warmup_steps=0",
                        "train.max_grad_norm=0", "train.max_nonfinite_steps=3", "train.ckpt_interval=1",
                        "train.ckpt_keep=30", "train.log_interval=1", "train.eval_interval=1000"), cwd=tmp_path)
    output = out.stdout + out.stderr
    assert out.returncode == 2 and "Traceback" not in output, output
    message = " ".join(out.stdout.split())
    done = summary(run)
    final = done["final_step"]
    assert done["stopped"] == "3 non-finite steps in a row" and done["skipped_steps"] == 3 and final < 30, done
    assert "error: training stopped: 3 non-finite steps in a row (train.max_nonfinite_steps: 3)" in message
    assert f"saved in {run / f'step_{final:08d}.ckpt'}" in message
    assert "lower train.lr (now 1e+06)" in message and "turn gradient clipping on (train.max_grad_norm" in message

    skipped = [e for e in events(run) if e["event"] == "nonfinite_step_skipped"]
    assert [e["step"] for e in skipped] == [final - 2, final - 1, final]
    assert [e["in_a_row"] for e in skipped] == [1, 2, 3]
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows if r["split"] == "train"][-3:] == [1, 2, 3]

    last = load_checkpoint(latest_checkpoint(run))
    assert last.step == final
    for name, leaf in tree_flatten(last.trees["state"]):
        assert np.isfinite(np.array(leaf)).all(), f"{name} is not finite in the saved state"
    if final - 3 >= 1:  # the skipped steps changed neither the weights nor the optimizer state
        good = load_checkpoint(run / f"step_{final - 3:08d}.ckpt").trees["state"]
        assert_bit_identical(last.trees["state"]["params"], good["params"], "params")
        assert_bit_identical(last.trees["state"]["opt_state"], good["opt_state"], "opt_state")
