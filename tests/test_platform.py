"""The Linux CPU set-up in abot/platform: JIT compiler flags, their kernel cache, malloc reuse, parallel lanes."""

import ctypes
import json
import os
import shutil
import subprocess
import sys

import pytest

from abot.platform import backends, jit, prepare


def test_kernels_built_with_other_flags_are_set_aside_once(tmp_path):
    kernels = tmp_path / "mlx" / "0.0.0" / "cpu"
    kernels.mkdir(parents=True)
    (kernels / "libold_contiguous.so").write_text("built without abot's flags")

    jit._retire_stale_kernels(kernels, "-march=x86-64-v3 -fA")
    assert not (kernels / "libold_contiguous.so").exists()
    assert (kernels / "abot-jit-flags").read_text() == "-march=x86-64-v3 -fA"
    assert sorted(p.name for p in kernels.parent.iterdir()) == ["cpu"]  # the stale copy is deleted

    (kernels / "libnew_contiguous.so").write_text("built with them")
    jit._retire_stale_kernels(kernels, "-march=x86-64-v3 -fA")
    assert (kernels / "libnew_contiguous.so").exists()  # same flags: the cache is kept

    jit._retire_stale_kernels(kernels, "-march=x86-64-v3 -fB")
    assert not (kernels / "libnew_contiguous.so").exists()
    assert (kernels / "abot-jit-flags").read_text() == "-march=x86-64-v3 -fB"


def test_missing_cache_folder_is_created_with_its_stamp(tmp_path):
    kernels = tmp_path / "fresh" / "cpu"
    jit._retire_stale_kernels(kernels, "flags")
    assert (kernels / "abot-jit-flags").read_text() == "flags"


@pytest.mark.skipif(not prepare().jit.startswith("-march"), reason="JIT flags not in use on this machine")
def test_the_g_plus_plus_mlx_runs_is_abots_wrapper_with_the_flags():
    wrapper = shutil.which("g++")
    assert wrapper is not None and "abot" in wrapper
    with open(wrapper) as f:
        assert jit._JIT_FLAGS in f.read()
    assert os.environ["PATH"].split(os.pathsep)[0] == os.path.dirname(wrapper)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@pytest.mark.skipif(prepare().malloc != "reuse", reason="not MLX's Linux CPU backend on glibc")
def test_large_mlx_buffers_are_not_served_by_fresh_mmaps():
    import mlx.core as mx

    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33")
    libc.mallinfo2.restype = _MallInfo2
    before = libc.mallinfo2().hblkhd  # bytes held in mmapped blocks
    x = mx.ones((4096, 4096)) * 2.0  # 64 MiB, above glibc's largest mmap threshold (32 MiB)
    mx.eval(x)
    assert libc.mallinfo2().hblkhd - before < 32 << 20
    assert x[0, 0].item() == 2.0


def test_the_cpu_blas_handling_stays_out_of_cuda_and_macos_builds(monkeypatch):
    monkeypatch.setattr(backends.sys, "platform", "linux")
    for wheels, expected in [(["mlx-cpu"], True), (["mlx-cuda-13"], False), (["mlx-cpu", "mlx-cuda-13"], False),
                             ([], False)]:
        monkeypatch.setattr(backends, "installed_backends", lambda b=wheels: b)
        assert backends.linux_cpu_build() is expected, wheels
    monkeypatch.setattr(backends.sys, "platform", "darwin")
    monkeypatch.setattr(backends, "installed_backends", lambda: ["mlx-cpu"])
    assert backends.linux_cpu_build() is False


def test_two_mlx_backends_installed_side_by_side_are_reported_with_the_fix(monkeypatch):
    from abot import verify

    assert backends.backend_conflict() is None  # a test environment holds one backend
    monkeypatch.setattr(backends, "installed_backends", lambda: ["mlx-cpu", "mlx-cuda-13"])
    problem, fix = backends.backend_conflict()
    assert "mlx-cpu and mlx-cuda-13" in problem and "libmlx.so" in problem
    assert fix == "pip uninstall -y mlx-cpu mlx-cuda-13 && pip install 'abot[cuda]'"
    check = verify.check_compute()
    assert check.status == "warn" and check.fix.startswith("pip uninstall -y mlx-cpu mlx-cuda-13")


LANES = r"""
import ctypes, json, os
from abot.platform import blas, lanes
threads = ctypes.CDLL(blas._numpy_openblas()).scipy_openblas_get_num_threads64_
lanes.usable_cores = lambda: 4
out = [(lanes.parallel_lanes(6), threads(), os.environ["MLX_BFS_MAX_WIDTH"]),
       (lanes.parallel_lanes(8, max_lanes=2), threads(), os.environ["MLX_BFS_MAX_WIDTH"]),
       (lanes.parallel_lanes(7), threads(), os.environ["MLX_BFS_MAX_WIDTH"])]
import mlx.core as mx
mx.eval(mx.ones(4) + 1)  # MLX has fixed its evaluation order now: too late for lanes
out.append((lanes.parallel_lanes(8), threads(), os.environ["MLX_BFS_MAX_WIDTH"]))
print(json.dumps(out))
"""


@pytest.mark.skipif(prepare().blas != "numpy-openblas", reason="parallel lanes need numpy's OpenBLAS in MLX")
def test_parallel_lanes_divide_the_micro_batch_and_share_out_the_cores():
    env = {k: v for k, v in os.environ.items()
           if k not in ("ABOT_CPU_LANES", "ABOT_CPU_SHARDS", "MLX_BFS_MAX_WIDTH", "ABOT_BFS_WIDTH")}
    out = subprocess.run([sys.executable, "-c", LANES], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    (six, eight, seven, late) = json.loads(out.stdout.strip().splitlines()[-1])
    assert six == [3, 1, "100000"]  # largest divisor of 6 up to 4 cores; 4 // 3 BLAS threads; lanes interleave
    assert eight == [2, 2, "100000"]
    assert seven == [1, 4, "1"]  # a prime batch: one stream, every core to BLAS, depth-first order
    assert late == [1, 4, "1"]  # after MLX's first evaluation the order is fixed: no lanes

    def first(**extra):
        out = subprocess.run([sys.executable, "-c", LANES], capture_output=True, text=True, timeout=120,
                             env={**env, **extra})
        return json.loads(out.stdout.strip().splitlines()[-1])[0]

    assert first(ABOT_CPU_LANES="1")[0] == 1
    assert first(ABOT_CPU_SHARDS="1")[0] == 1  # the variable's old name still works
    # A width abot exported and a child inherited is abot's to change; one the user set is left alone.
    assert first(MLX_BFS_MAX_WIDTH="1", ABOT_BFS_WIDTH="1")[2] == "100000"
    assert first(MLX_BFS_MAX_WIDTH="7")[2] == "7"
