"""The memory estimate of `abot verify` (abot/verify.py) against the measured peak of one compiled step.

    python benchmarks/memory_estimate.py [--cases tiny,small,medium] [--quick]

Each case runs in its own process (a clean `mx.get_peak_memory()`): fp32, the default muon_adamw, vocab
32000, one compiled step after `mx.reset_peak_memory()`, with and without gradient checkpointing. Prints a
Markdown table: shape, seq, micro-batch, accumulation steps, checkpointing, estimated, measured, error.
Medium takes minutes per case on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SHAPES = {"tiny": (6, 256, 8), "small": (8, 512, 8), "medium": (12, 768, 12)}
CASES = [("tiny", 256, 4, 1), ("tiny", 256, 4, 4), ("tiny", 512, 1, 1), ("small", 512, 2, 1), ("small", 512, 2, 4),
         ("small", 256, 1, 1), ("medium", 512, 2, 1), ("medium", 256, 1, 1)]
QUICK = [("tiny", 256, 2, 1)]
# (shape, seq_len, micro_batch, grad_accum_steps)

CHILD = r"""
import json, sys
import abot
from abot.config import config_from_dict
from abot.memory import estimate_memory, measure_step_peak
raw = json.loads(sys.argv[1])
cfg = config_from_dict(raw)
peak, held = measure_step_peak(cfg)
print(json.dumps({"estimate": estimate_memory(cfg).peak, "peak": peak, "held": held}))
"""


def config(shape: str, seq: int, batch: int, ckpt: bool, accum: int = 1, vocab: int = 32000) -> dict:
    n_layers, d_model, n_heads = SHAPES[shape]
    return {"model": {"vocab_size": vocab, "n_layers": n_layers, "d_model": d_model, "n_heads": n_heads,
                      "dropout": 0.0},
            "data": {"seq_len": seq},
            "train": {"micro_batch_size": batch, "grad_accum_steps": accum, "gradient_checkpointing": ckpt,
                      "precision": "float32", "optimizer": "muon_adamw"}}


def measure(raw: dict) -> dict:
    """Estimate and measured peak for a config dict, measured in a fresh process."""
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(raw)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="tiny,small,medium", help="shapes to run")
    parser.add_argument("--quick", action="store_true", help="one tiny case only")
    args = parser.parse_args()
    wanted = set(args.cases.split(","))
    cases = QUICK if args.quick else [c for c in CASES if c[0] in wanted]
    print("| shape | seq | micro-batch | accumulation | checkpointing | estimated | measured | error |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, seq, batch, accum in cases:
        for ckpt in (False, True):
            r = measure(config(shape, seq, batch, ckpt, accum))
            n, d, _ = SHAPES[shape]
            error = (r["estimate"] - r["peak"]) / r["peak"] * 100
            print(f"| {shape} ({n}x{d}) | {seq} | {batch} | {accum} | {'on' if ckpt else 'off'} | "
                  f"{r['estimate'] / 2**20:,.0f} MiB | {r['peak'] / 2**20:,.0f} MiB | {error:+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
