"""abot's training step on a GPU next to PyTorch's (eager bf16 autocast, torch.compile), the guide's sizes, one run.

    python benchmarks/gpu_speed.py [--sizes tiny,small,medium,large] [--steps 20] [--variants medium,large]
                                   [--breakdown medium] [--budget-s 380]

Sizes: vocab 32000, seq 1024, batch 16 (tiny, small, medium) or 8 (large), AdamW, clip 1.0. abot runs
`precision: bfloat16` (float32 master weights and AdamW state, bfloat16 compute, float32 loss), compiled;
PyTorch runs benchmarks/torch_reference.py in a child process (its own GPU memory figures): float32 master
weights under bfloat16 autocast, fused AdamW, eager and then `torch.compile`. Prints a Markdown table:
tokens/s (median of timed steps after warm-up), step time, MFU against the card's dense bf16 peak
(--peak-tflops; 989 for H100/H200 SXM by NVIDIA's datasheet), peak memory (MLX: mx.get_peak_memory;
PyTorch: torch.cuda.max_memory_allocated), the loss after the last step, and abot / torch.compile.
--variants adds, for those sizes, what each of abot's changes bought: the same step with MLX's autodiff of
the SwiGLU gate and the cross-entropy (the plain MLX step), float32 (TF32 matmuls), and gradient checkpointing.
--breakdown times, for those sizes, the compiled forward + loss and forward + backward apart from the step.
FLOPs per token: benchmarks/train_speed.py's formula (6 N_matmul + 12 n_layers seq d_model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import abot  # noqa: F401  (before mlx: on the CPU build it loads the fast BLAS)
import mlx.core as mx
import mlx.nn as nn
import mlx.utils
import numpy as np

from abot.platform import device
from abot.registry import optimizers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_speed import bench, mlx_matmul_flops  # noqa: E402

SIZES = {  # the guide's sizes at seq 1024: (d_model, n_layers, n_heads, seq_len, batch)
    "tiny": (256, 6, 8, 1024, 16),
    "small": (512, 8, 8, 1024, 16),
    "medium": (768, 12, 12, 1024, 16),
    "large": (1024, 24, 16, 1024, 8),
}
VOCAB = 32000


@contextlib.contextmanager
def autodiff_ops():
    """The plain MLX step: MLX's autodiff through silu(a) * b and a float32 log-softmax (abot's ops swapped out)."""
    import abot.ops.losses as losses
    import abot.ops.mlp as mlp

    def logprobs(logits, targets):
        x = logits.astype(mx.float32)
        return mx.take_along_axis(x, targets[..., None], -1)[..., 0] - mx.logsumexp(x, -1)

    saved = mlp.silu_gate, losses.token_logprobs
    mlp.silu_gate, losses.token_logprobs = (lambda a, b: nn.silu(a) * b), logprobs
    try:
        yield
    finally:
        mlp.silu_gate, losses.token_logprobs = saved


def float32_matmul_error(n: int = 1024) -> float:
    """Max relative error of an MLX float32 matmul against float64: ~1e-6 in full fp32, ~1e-3 in TF32."""
    a, b = np.random.default_rng(0).standard_normal((2, n, n)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    return float(np.abs(np.array(mx.array(a) @ mx.array(b)) - exact).max() / np.abs(exact).max())


def torch_run(dims: tuple, steps: int, compile: bool, timeout: float) -> dict:
    where = "cuda" if mx.default_device() == mx.gpu else "cpu"  # cpu: a dry run of this script
    cmd = [sys.executable, str(HERE / "torch_reference.py"), "--device", where, "--precision", "bfloat16",
           "--dims", ",".join(map(str, dims)), "--vocab", str(VOCAB), "--steps", str(steps)]
    try:
        out = subprocess.run(cmd + (["--compile"] if compile else []), capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:160]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def abot_run(dims: tuple, steps: int, precision: str = "bfloat16", checkpointing: bool = False) -> dict:
    try:
        return bench(dims, "adamw", True, checkpointing, steps, vocab=VOCAB, precision=precision)
    except Exception as err:  # noqa: BLE001  (one failed row must not lose the table)
        return {"error": f"{type(err).__name__}: {str(err)[:160]}"}
    finally:
        mx.clear_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small,medium,large")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", default="", help="sizes that also run the A/B variants (comma-separated)")
    parser.add_argument("--breakdown", default="", help="sizes whose step time is split into its parts")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip the runs that would start after this")
    parser.add_argument("--seq", type=int, help="override every size's seq_len (a quick dry run on a CPU)")
    parser.add_argument("--batch", type=int, help="override every size's batch")
    args = parser.parse_args()
    for name, (d, layers, heads, seq, batch) in SIZES.items():
        SIZES[name] = (d, layers, heads, args.seq or seq, args.batch or batch)
    n = 8192 if mx.default_device() == mx.gpu else 512
    start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731

    print(f"{device.describe()}; mlx {mx.__version__}")
    print(f"measured: bf16 8192^3 matmul {mlx_matmul_flops(n, mx.bfloat16) / 1e12:.1f} TFLOP/s, fp32 {mlx_matmul_flops(n) / 1e12:.1f}"
          f" TFLOP/s; fp32 matmul max rel. error vs float64 {float32_matmul_error():.1e}; MFU below is against "
          f"{args.peak_tflops:.0f} TFLOP/s")
    print("| size | params | run | tok/s | step ms | MFU | peak GB | loss | / torch.compile |")
    print("|---|---|---|---|---|---|---|---|---|")
    fpt: dict[str, float] = {}
    params: dict[str, float] = {}
    compiled: dict[str, float] = {}

    def row(size: str, name: str, r: dict, abot_row: bool = False) -> None:
        if "error" in r:
            print(f"| {size} | | {name} | failed: {r['error']} | | | | | |", flush=True)
            return
        if abot_row and size not in fpt:
            fpt[size], params[size] = r["flops_per_token"], r["params_m"]
        mfu = r["tokens_per_s"] * fpt.get(size, float("nan")) / (args.peak_tflops * 1e12)
        ratio = r["tokens_per_s"] / compiled[size] if size in compiled else float("nan")
        print(f"| {size} | {params.get(size, float('nan')):.1f}M | {name} | {r['tokens_per_s']:,.0f} | "
              f"{r['step_s'] * 1e3:.1f} | {100 * mfu:.1f}% | {r['peak_mem_gb'] or float('nan'):.1f} | {r['loss']:.3f} | "
              f"{ratio:.2f}x |", flush=True)

    sizes = args.sizes.split(",")
    results: dict[str, dict] = {}
    for size in sizes:
        dims = SIZES[size]
        if left() <= 0:
            print(f"| {size} | | skipped: time budget | | | | | | |")
            continue
        results[size] = abot_run(dims, args.steps)
        if not args.no_torch:
            # At least 180 s each: torch.compile of large took over 60 s on an H200.
            eager = torch_run(dims, args.steps, False, max(left(), 180))
            comp = torch_run(dims, args.steps, True, max(left(), 180))
            if "error" not in comp:
                compiled[size] = comp["tokens_per_s"]
        row(size, "abot bf16", results[size], abot_row=True)
        if not args.no_torch:
            row(size, "torch eager bf16 autocast", eager)
            row(size, "torch.compile bf16 autocast", comp)
    for size in filter(None, args.breakdown.split(",")):
        if left() > 0:
            print(f"{size} bf16 step: {breakdown(SIZES[size], args.steps)}", flush=True)
    for size in filter(None, args.variants.split(",")):
        dims = SIZES[size]
        for name, run in [("abot bf16, MLX autodiff gate + CE", lambda: _plain(dims, args.steps)),
                          ("abot float32 (TF32)", lambda: abot_run(dims, args.steps, "float32")),
                          ("abot bf16 + checkpointing", lambda: abot_run(dims, args.steps, checkpointing=True))]:
            if left() <= 0:
                print(f"| {size} | | {name}: skipped (time budget) | | | | | | |")
                continue
            row(size, name, run(), abot_row=True)
    print(f"total {time.perf_counter() - start:.0f} s")


def breakdown(dims: tuple, steps: int) -> str:
    """Where abot's bf16 step goes: compiled forward + loss, with backward, the AdamW update alone, the whole step."""
    from abot.config import ModelConfig
    from abot.losses import next_token
    from abot.models.transformer import transformer

    d, layers, heads, seq, batch = dims
    model = transformer(ModelConfig(vocab_size=VOCAB, n_layers=layers, d_model=d, n_heads=heads, dropout=0.0,
                                    max_seq_len=seq))
    params = mlx.utils.tree_map(lambda p: p.astype(mx.bfloat16), model.init(mx.random.key(0)))
    tokens = mx.random.randint(0, VOCAB, (batch, seq + 1), key=mx.random.key(2))
    loss = lambda p: next_token(model, p, tokens, None)[0]  # noqa: E731
    optimizer = optimizers.get("adamw")(weight_decay=0.02)
    master = mlx.utils.tree_map(lambda p: p.astype(mx.float32), params)
    opt_state = optimizer.init(master)
    update = mx.compile(lambda g, s, p: optimizer.update(g, s, p, mx.array(1e-4)))
    times = {}
    for name, fn, args in [("forward", mx.compile(loss), (params,)),
                           ("forward+backward", mx.compile(mx.value_and_grad(loss)), (params,)),
                           ("AdamW update", update, (master, opt_state, master))]:
        for _ in range(3):
            mx.eval(fn(*args))
        t0 = time.perf_counter()
        for _ in range(steps):
            mx.eval(fn(*args))
        times[name] = (time.perf_counter() - t0) / steps * 1e3
    mx.clear_cache()
    full = abot_run(dims, steps)
    return (f"forward + loss {times['forward']:.1f} ms, + backward {times['forward+backward']:.1f} ms, AdamW "
            f"update alone {times['AdamW update']:.1f} ms, whole step {full.get('step_s', float('nan')) * 1e3:.1f} ms "
            "(the whole step adds casts, the global norm and clipping)")


def _plain(dims: tuple, steps: int) -> dict:
    with autodiff_ops():
        return abot_run(dims, steps)


if __name__ == "__main__":
    main()
