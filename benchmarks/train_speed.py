"""Training throughput of abot's compiled step for the tiny and small shapes, side by side in one run.

    python benchmarks/train_speed.py [--steps 10] [--shapes tiny,small] [--optimizers muon_adamw,adamw]
    python benchmarks/train_speed.py --flat-update [--optimizers adamw,sgd]

Prints tokens/s (median over timed steps after warm-up), step time, model FLOPs per token, achieved
GFLOP/s, the fraction of this machine's measured fp32 matmul peak, MLX's peak memory, and the kernels of one
compiled step. --flat-update runs each optimizer twice, its update leaf by leaf and on flat buffers
(abot.optim.flat; per leaf either way for an optimizer not declared elementwise), side by side.
FLOPs per token (training, forward + backward = 3x forward, Kaplan et al. 2020 / PaLM appendix B):
    6 * N_matmul + 12 * n_layers * seq_len * d_model
where N_matmul counts the weights used in matmuls (blocks + output head) and the second term is attention
scores and values (causal attention still computes the full square in the fused kernel).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import abot  # noqa: F401  (loads the fast BLAS before mlx)
import mlx.core as mx
import numpy as np

from abot.config import ModelConfig, config_from_dict
from abot.models.transformer import count_params
from abot.platform import prepare
from abot.run import build_step, decide_lanes
from abot.stage import PRETRAIN

SHAPES = {  # NOTES.md benchmark shapes: (d_model, n_layers, n_heads, seq_len, batch)
    "tiny": (256, 6, 8, 256, 8),
    "tiny128": (256, 6, 8, 128, 16),
    "small": (512, 8, 8, 512, 4),
    "toy": (64, 2, 4, 64, 4),  # a quick check that the script runs, not a benchmark
}
VOCAB = 8000
sys.path.insert(0, str(Path(__file__).resolve().parent))  # torch_reference.py beside this file


def mlx_matmul_flops(n: int, dtype=mx.float32, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n MLX matmul on the default device: one timed batch after warm-up."""
    a = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a)
    for _ in range(3):
        mx.eval(a @ a)
    t0 = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ a)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def matmul_peak_gflops(n: int = 1024, repeats: int = 10) -> tuple[float, float]:
    """This machine's fp32 sgemm speed: MLX (through abot's BLAS) and numpy."""
    mlx_rate = mlx_matmul_flops(n, repeats=repeats) / 1e9
    an = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    an @ an
    t0 = time.perf_counter()
    for _ in range(repeats):
        an @ an
    return mlx_rate, 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


# Primitives that only re-describe their input's memory (views: no kernel runs for them on the CPU or the GPU).
VIEWS = {"Reshape", "Slice", "Squeeze", "ExpandDims", "Transpose", "AsStrided", "Broadcast", "Depends",
         "StopGradient"}


def graph_primitives(*outputs) -> Counter:
    """How many nodes of each primitive the graph of `outputs` holds (unevaluated: a compiled step's outputs
    are its compiled graph, fused elementwise kernels as one node each), read from `mx.export_to_dot`."""
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as dot:
        mx.export_to_dot(dot.name, *outputs)
        return Counter(re.findall(r'label ="([^"]+)", shape=rectangle', Path(dot.name).read_text()))


def kernel_count(primitives: Counter) -> int:
    """Nodes that run a kernel: all but views. A Concatenate counts once (it copies each input: on a GPU, a
    launch per input)."""
    return sum(n for name, n in primitives.items() if name not in VIEWS)


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    n_matmul = n_params - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)  # embed lookup is free
    return 6 * n_matmul + 12 * cfg.n_layers * seq_len * cfg.d_model


def bench(shape, optimizer: str, compile: bool, checkpointing: bool, steps: int, warmup: int = 3,
          group=None, accum: int = 1, vocab: int = VOCAB, precision: str = "float32", max_lanes=None,
          flat_update: bool = True) -> dict:
    """One configuration's figures; with a distributed `group`, each rank runs the shape's batch (tokens/s: world).

    `shape`: a name in SHAPES or a (d_model, n_layers, n_heads, seq_len, batch) tuple. The micro-batch runs
    as abot.train would run it: in `parallel_lanes` lanes (at most `max_lanes`; one per rank
    and with checkpointing).
    """
    d, layers, heads, seq, batch = SHAPES[shape] if isinstance(shape, str) else shape
    cfg = config_from_dict({
        "model": {"vocab_size": vocab, "n_layers": layers, "d_model": d, "n_heads": heads, "dropout": 0.0,
                  "max_seq_len": seq},
        "data": {"seq_len": seq},
        "train": {"optimizer": optimizer, "weight_decay": 0.02, "micro_batch_size": batch, "grad_accum_steps": accum,
                  "max_grad_norm": 1.0, "compile": compile, "gradient_checkpointing": checkpointing,
                  "precision": precision}})
    # As abot train builds it (abot.run): the lanes first, then the registry's model, optimizer and loss.
    lanes = decide_lanes(cfg.train, group.size() if group else 1, max_lanes)
    parts = build_step(cfg, PRETRAIN, lanes, group, flat_update=flat_update)
    state = parts.fresh_state(parts.model.init(mx.random.key(0)), mx.random.key(1), precision)
    step = parts.step
    tokens = mx.random.randint(0, vocab, (accum, batch, seq + 1), key=mx.random.key(2))
    lr = mx.array(1e-3)
    mx.eval(state, tokens)
    mx.reset_peak_memory()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = step(state, tokens, lr)
        mx.eval(state, metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    primitives = graph_primitives(*step(state, tokens, lr)) if compile else Counter()  # one more step, unevaluated
    n_params = count_params(state["params"])
    fpt = flops_per_token(cfg.model, n_params, seq)
    tok_s = accum * batch * seq * (group.size() if group else 1) / step_s
    return {"tokens_per_s": tok_s, "step_s": step_s, "flops_per_token": fpt, "gflops": tok_s * fpt / 1e9,
            "peak_mem_gb": mx.get_peak_memory() / 1e9, "params_m": n_params / 1e6, "loss": metrics["loss"].item(),
            "lanes": lanes, "kernels": kernel_count(primitives), "primitives": sum(primitives.values()),
            "concatenates": primitives["Concatenate"], "flat": parts.layout is not None}


def bench_in_child(**kwargs) -> dict:
    """`bench` in a fresh process: MLX fixes its evaluation order (abot.platform.lanes.parallel_lanes) at its first
    evaluation, and each configuration must get the order abot.train would give it."""
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(kwargs)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def torch_reference(shape: str, steps: int) -> dict | None:
    """The same model and AdamW step in PyTorch CPU eager, when torch is installed."""
    try:
        import torch_reference as ref
    except ImportError:
        return None
    d, layers, heads, seq, batch = SHAPES[shape]
    return ref.bench(d, layers, heads, seq, batch, VOCAB, steps)


def compare_flat_update(shapes: list[str], optimizers: list[str], steps: int, accum: int, rounds: int) -> None:
    """Each optimizer's step with its update leaf by leaf and on flat buffers, alternated `rounds` times (each
    configuration in a fresh process): median step time and the kernels of one compiled step."""
    print(f"{'shape':6} {'optimizer':11} {'update':8} {'lanes':>5} {'step ms':>8} {'tok/s':>8} {'kernels':>8} "
          f"{'(concat)':>8} {'primitives':>10} {'mem GB':>6}")
    for shape in shapes:
        for opt in optimizers:
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(rounds):
                for flat in (False, True):
                    r = bench_in_child(shape=shape, optimizer=opt, compile=True, checkpointing=False, steps=steps,
                                       accum=accum, flat_update=flat)
                    times[flat].append(r["step_s"])
                    update = "flat" if r["flat"] else "per-leaf"
                    print(f"{shape:6} {opt:11} {update:8} {r['lanes']:5} {r['step_s'] * 1e3:8.1f} "
                          f"{r['tokens_per_s']:8.0f} {r['kernels']:8} {r['concatenates']:8} {r['primitives']:10} "
                          f"{r['peak_mem_gb']:6.2f}")
            per_leaf, flat = statistics.median(times[False]), statistics.median(times[True])
            print(f"{shape:6} {opt:11} flat / per-leaf step time (median of {rounds} runs each): "
                  f"{flat * 1e3:.1f} / {per_leaf * 1e3:.1f} ms = {flat / per_leaf:.3f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--shapes", default="tiny,small")
    parser.add_argument("--optimizers", default="muon_adamw,adamw")
    parser.add_argument("--variants", action="store_true", help="also: uncompiled, gradient checkpointing")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference even if torch is here")
    parser.add_argument("--accum", type=int, default=1,
                        help="micro-batches per optimizer step (Muon's Newton-Schulz runs once per step)")
    parser.add_argument("--flat-update", action="store_true",
                        help="compare the flat-buffer update with the per-leaf one (time and kernels per step)")
    parser.add_argument("--rounds", type=int, default=3, help="--flat-update: alternated runs of each variant")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one bench(**json) in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(bench(**json.loads(args.one))))
        return
    mlx_peak, numpy_peak = matmul_peak_gflops()
    print(f"BLAS: {prepare().blas}; JIT: {prepare().jit}; fp32 1024^3 matmul: MLX {mlx_peak:.0f} GFLOP/s, numpy {numpy_peak:.0f} GFLOP/s")
    if args.flat_update:
        compare_flat_update(args.shapes.split(","), args.optimizers.split(","), args.steps, args.accum, args.rounds)
        return
    print("FLOPs/token = 6 * N_matmul + 12 * n_layers * seq_len * d_model")
    header = f"{'shape':6} {'optimizer':11} {'compile':7} {'ckpt':5} {'lanes':>6} {'params':>7} {'tok/s':>8} " \
             f"{'step ms':>8} {'GFLOP/tok':>9} {'GFLOP/s':>8} {'% peak':>6} {'mem GB':>6} {'kernels':>7}"
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        runs = [(opt, True, False, None) for opt in args.optimizers.split(",")]
        if args.variants:
            first = runs[0][0]
            runs += [(first, True, False, 1), (first, False, False, None), (first, True, True, None)]
        results = {}
        for opt, compile, ckpt, max_lanes in runs:
            r = results[opt, compile, ckpt, max_lanes] = bench_in_child(
                shape=shape, optimizer=opt, compile=compile, checkpointing=ckpt, steps=args.steps, accum=args.accum,
                max_lanes=max_lanes)
            print(f"{shape:6} {opt:11} {str(compile):7} {str(ckpt):5} {r['lanes']:6} {r['params_m']:6.1f}M "
                  f"{r['tokens_per_s']:8.0f} {r['step_s'] * 1e3:8.1f} {r['flops_per_token'] / 1e9:9.3f} "
                  f"{r['gflops']:8.1f} {100 * r['gflops'] / mlx_peak:5.0f}% {r['peak_mem_gb']:6.2f} {r['kernels']:7}")
        reference = None if args.no_torch else torch_reference(shape, args.steps)
        if reference:
            fpt = next(iter(results.values()))["flops_per_token"]
            print(f"{shape:6} {'torch adamw':11} {'eager':7} {'False':5} {'':6} {'':7} {reference['tokens_per_s']:8.0f} "
                  f"{reference['step_s'] * 1e3:8.1f} {fpt / 1e9:9.3f} {reference['tokens_per_s'] * fpt / 1e9:8.1f} "
                  f"{100 * reference['tokens_per_s'] * fpt / 1e9 / mlx_peak:5.0f}%  ({reference['threads']} threads)")
            for (opt, compile, ckpt, _), r in results.items():
                print(f"{'':6} abot {opt} (compile={compile}, ckpt={ckpt}, lanes={r['lanes']}) / torch eager adamw: "
                      f"{r['tokens_per_s'] / reference['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
