"""Data parallelism on mx.distributed: 2 local ranks (ring backend) equal one process on the union of their batches."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


@pytest.fixture
def launcher():
    found = shutil.which("mlx.launch", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("mlx.launch is not installed")
    return found


@pytest.fixture
def tiny_run(tmp_path):
    """Overrides for a tiny model in tmp_path, with its tokenizer already trained (shared by both ranks)."""
    overrides = [f"train.save_dir={tmp_path}/run", f"train.tokenizer_path={tmp_path}/tok.model",
                 "model.vocab_size=500", "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "data.seq_len=32",
                 "train.micro_batch_size=4", "train.log_interval=5", "train.ckpt_interval=10"]
    tok = subprocess.run([sys.executable, "-m", "abot", "tokenizer", "train", str(CONFIG), *overrides],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert tok.returncode == 0, tok.stdout + tok.stderr
    return overrides


def summary(tmp_path) -> dict:
    return json.loads((tmp_path / "run" / "logs" / "final_training_summary.json").read_text())


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_union(tmp_path, launcher):
    single = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "single.npz"), "single"],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    dist = subprocess.run([launcher, "-n", "2", "--backend", "ring", "--", sys.executable, str(WORKER),
                           str(tmp_path / "dist.npz"), "dist"], capture_output=True, text=True, timeout=300)
    assert dist.returncode == 0, dist.stdout + dist.stderr
    a, b = np.load(tmp_path / "single.npz"), np.load(tmp_path / "dist.npz")
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_two_rank_cli_run_logs_once_and_resumes(tmp_path, launcher, tiny_run):
    """`mlx.launch -n 2 -- abot train`: rank 0 alone writes logs and checkpoints; a resumed run continues."""
    common = [*tiny_run, "train.eval_interval=10", "train.eval_steps=2"]

    def launch(*extra):
        return subprocess.run([launcher, "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "abot", "train",
                               str(CONFIG), *common, *extra], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)

    first = launch("train.total_steps=10")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 ranks x 1 x 4 x 32 = 256 tokens/step" in first.stdout
    assert first.stdout.count("saved") == 1  # one checkpoint message: rank 0's
    second = launch("train.total_steps=20", "--resume")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "at step 10" in second.stdout
    result = summary(tmp_path)
    assert result["start_step"] == 10 and result["final_step"] == 20 and result["tokens_per_step"] == 256
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["split"] == "train"]
    assert steps == [5, 10, 15, 20]  # each logged once, by rank 0


@pytest.mark.slow
def test_killed_two_rank_run_resumes_and_continues(tmp_path, launcher, tiny_run):
    """SIGKILL the whole 2-rank job after its first checkpoint; `--resume` on 2 ranks continues to the end."""
    common = [*tiny_run, "train.eval_interval=1000", "train.eval_steps=1", "train.total_steps=400"]
    command = [launcher, "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "abot", "train", str(CONFIG),
               *common]
    job = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "run").glob("step_*.ckpt")):
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint before the job ended"
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the launcher and both ranks
        job.wait(timeout=30)
    resumed = subprocess.run([*command[:-1], "train.total_steps=30", "--resume"], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    result = summary(tmp_path)
    assert 10 <= result["start_step"] < 30 and result["final_step"] == 30
