"""Data parallelism on mx.distributed: 2 local ranks (ring backend) equal one process on the union of their batches."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).resolve().parent / "dist_worker.py"


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_union(tmp_path):
    launcher = shutil.which("mlx.launch", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
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
