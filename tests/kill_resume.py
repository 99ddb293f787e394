"""The kill -9 then --resume check, shared by tests/test_resume.py (full training) and tests/test_adapters.py."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from abot.checkpoint import list_checkpoints


def wait_for(predicate, proc, what, timeout=120.0):
    """Poll `predicate` until it holds; fail if `proc` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def run_then_kill(start: Callable[[Path], subprocess.Popen], whole: Path, killed: Path, kill_after: int,
                  delay: float) -> int:
    """Start the uninterrupted run into `whole`; once it has a checkpoint (its train step's kernels then in MLX's
    JIT cache: two processes compiling the same kernel at once can trip over each other's half-written files),
    start the same run into `killed` and SIGKILL it `delay` s after its step-`kill_after` checkpoint. `start`
    launches one run into a save_dir. Waits for the reference to finish; returns the killed run's exit code."""
    reference, proc, output = start(whole), None, ""
    try:
        wait_for(lambda: list_checkpoints(whole), reference, "the reference run's first checkpoint")
        proc = start(killed)
        wait_for(lambda: [s for s, _ in list_checkpoints(killed) if s >= kill_after], proc,
                 f"the checkpoint of step {kill_after}")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        output = reference.communicate(timeout=300)[0]
    finally:
        for p in (proc, reference):
            if p is not None and p.poll() is None:
                p.kill()
            if p is not None:
                p.communicate()
    assert reference.returncode == 0, output[-3000:]
    return proc.returncode


def assert_bit_identical(got, want, what):
    """Same leaves, dtypes, shapes and values bit for bit (bfloat16 compared through its bits)."""
    got, want = dict(tree_flatten(got)), dict(tree_flatten(want))
    assert list(got) == list(want), f"{what}: different leaves"
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}.{name}: {g.dtype}{g.shape} vs {w.dtype}{w.shape}"
        if g.dtype == mx.bfloat16:
            g, w = mx.view(g, mx.uint16), mx.view(w, mx.uint16)
        assert np.array_equal(np.array(g), np.array(w)), f"{what}.{name} differs after resume"
