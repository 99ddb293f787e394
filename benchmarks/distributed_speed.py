"""Data-parallel throughput: 1 rank vs 2 local ranks (mlx.launch, ring backend), in one run.

    python benchmarks/distributed_speed.py [--shape tiny] [--steps 10]

Each rank runs the shape's full micro-batch, so 2 ranks do twice the tokens per step; tokens/s is for the
whole world. On one machine the ranks share its cores (and its BLAS threads), so this measures the
overhead of the all-reduce more than a speed-up; across machines each rank has its own. Run it with
OPENBLAS_NUM_THREADS=1 on 2 cores (each rank's share), or the ranks oversubscribe the cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def worker(shape: str, steps: int) -> None:
    import abot  # noqa: F401
    import mlx.core as mx
    from train_speed import bench

    group = mx.distributed.init()
    result = bench(shape, "adamw", True, False, steps, group=group if group.size() > 1 else None)
    if group.rank() == 0:
        print("RESULT " + json.dumps({"world": group.size(), **result}), flush=True)


def run(command: list[str]) -> dict:
    out = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"failed: {' '.join(command)}\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.shape, args.steps)
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", "--shape", args.shape, "--steps", str(args.steps)]
    launcher = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or "mlx.launch"
    one = run(me)
    two = run([launcher, "-n", "2", "--backend", "ring", "--", *me])
    print(f"{'ranks':>5} {'tok/s (world)':>14} {'step ms':>8}")
    for r in (one, two):
        print(f"{r['world']:5d} {r['tokens_per_s']:14.0f} {r['step_s'] * 1e3:8.1f}")
    print(f"2 ranks / 1 rank: {two['tokens_per_s'] / one['tokens_per_s']:.2f}x (shape {args.shape}, adamw, compiled)")


if __name__ == "__main__":
    main()
