"""Adapters' memory and speed: full fine-tuning, LoRA, DoRA and QLoRA 4-bit in abot, and mlx-lm's LoRA, side by side.

    python benchmarks/adapters.py [--size tiny|small|medium] [--model HF_FOLDER] [--seq 512] [--batch 2]
                                  [--steps 3] [--warmup 2] [--rounds 3] [--no-checkpointing] [--quick]

The base is a Hugging Face folder: `--model`, or a random model of configs/<size>.yaml's shape written as one
by abot's own export (abot.export.hf_config / hf_tensors, what `abot export` writes), so abot and mlx-lm read
the same weights. Every configuration runs in its own fresh process (MLX fixes its evaluation order at its first
evaluation, and a process's peak memory is its own):

- abot: the step `abot train` (continued pre-training) builds, through abot.run (`with_model_folder`,
  `decide_lanes`, `build_step`, `load_init_params`, `trainable`), with AdamW, on random tokens;
- mlx-lm: its LoRA layers on the same folder (`linear_to_lora_layers`, the same rank, scale alpha / rank and
  targets), AdamW, and the compiled step of `mlx_lm.tuner.trainer.train` with its `default_loss`; the process
  imports abot first, so both use abot's BLAS on Linux.

Same batch and sequence length for all; gradient checkpointing as abot's default (on) for both, unless
`--no-checkpointing`. Peak memory: `mx.get_peak_memory()` over the warm-up and timed steps (the training state
already allocated; "held" is what is allocated before the first step: weights, adapters, optimizer state).
Tokens/s: batch x seq over the median timed step.

The setups run in turn, `--rounds` times (each time in a fresh process): on a shared machine the speed drifts by
10% from one minute to the next (2026-12-03: one pair of runs gave LoRA 1.22x full's tokens/s, the next two
1.43x and 1.38x), so each ratio is the median of the rounds' ratios, each round comparing runs a few minutes apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import abot  # noqa: F401  (loads the fast BLAS before mlx)
import mlx.core as mx
import yaml

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
MLX_LM_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]  # the same seven projections, mlx-lm's module names
RANK, ALPHA = 16, 32.0  # scale alpha / rank = 2 in both
LR, WEIGHT_DECAY = 1e-4, 0.02
SETUPS = {  # the adapter section of each abot setup (None: full fine-tuning)
    "full fine-tuning": None,
    "LoRA r=16": {"kind": "lora"},
    "DoRA r=16": {"kind": "dora"},
    "QLoRA 4-bit (LoRA r=16)": {"kind": "lora", "quantize_bits": 4, "group_size": 64},
}
MLX_LM = "mlx-lm LoRA r=16"


# ---------------------------------------------------------------------------------------------- the base

def write_random_base(size: str, folder: Path) -> Path:
    """A random model of configs/<size>.yaml's model shape as a Hugging Face folder (config.json and
    model.safetensors), written with the functions `abot export` uses; kept between runs."""
    from mlx_lm_compare import make_random_folder  # benchmarks/ is this script's folder, so on sys.path

    return make_random_folder(folder, yaml.safe_load((ROOT / "configs" / f"{size}.yaml").read_text())["model"])


# ---------------------------------------------------------------------------------------------- one measurement

def measure(step, state, warmup: int, steps: int, tokens: int) -> dict:
    """Run `state = step(state)` warm-up + timed times: peak memory over all of them, tokens/s of the median."""
    mx.eval(state)
    mx.clear_cache()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    times, loss = [], None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, loss = step(state)
        mx.eval(state, loss)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"peak_gb": mx.get_peak_memory() / 1e9, "held_gb": held / 1e9, "tokens_per_s": tokens / step_s,
            "step_s": step_s, "loss": loss.item()}


def abot_config(folder: str, adapter: dict | None, seq: int, batch: int, checkpointing: bool):
    """The config `abot train` would run: the base from train.init_from (a Hugging Face folder: its model
    section), AdamW, one micro-batch per step, float32, and the adapter section when there is one."""
    from abot.config import config_from_dict
    from abot.restore import with_model_folder

    train = {"init_from": folder, "optimizer": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY,
             "micro_batch_size": batch, "grad_accum_steps": 1, "precision": "float32",
             "gradient_checkpointing": checkpointing}
    raw = {"data": {"seq_len": seq, "source": "stdlib_docs"}, "train": train}
    if adapter is not None:
        raw["adapter"] = {"rank": RANK, "alpha": ALPHA, "targets": TARGETS, **adapter}
    return with_model_folder(config_from_dict(raw))


def bench_abot(folder: str, adapter: dict | None, seq: int, batch: int, checkpointing: bool, warmup: int,
               steps: int) -> dict:
    """One abot setup, built as abot.run.build_run builds it: lanes first, the registry's step, the base from
    train.init_from, then what trains (the whole model, or adapters on the frozen base)."""
    from abot.restore import load_init_params
    from abot.run import build_step, decide_lanes, trainable
    from abot.stage import PRETRAIN, random_batch

    cfg = abot_config(folder, adapter, seq, batch, checkpointing)
    lanes = decide_lanes(cfg.train)
    parts = build_step(cfg, PRETRAIN, lanes)
    init_key, key = mx.random.split(mx.random.key(cfg.train.seed))
    base, _ = load_init_params(cfg, None, parts.model)  # a Hugging Face folder records no tokenizer to check
    params, frozen = trainable(cfg, parts, base, init_key)
    del base  # with adapters, only the frozen copy stays (quantized for QLoRA)
    state, parts = parts.fresh_state(params, key, cfg.train.precision), parts.with_frozen(frozen)
    del params
    tokens, lr = random_batch(PRETRAIN, cfg, init_key), mx.array(LR)
    mx.eval(tokens)
    def one_step(state):
        state, metrics = parts.step(state, tokens, lr)
        return state, metrics["loss"]

    return {**measure(one_step, state, warmup, steps, batch * seq), "lanes": lanes}


def bench_mlx_lm(folder: str, seq: int, batch: int, checkpointing: bool, warmup: int, steps: int) -> dict:
    """mlx-lm's LoRA on the same folder: its layers, its loss and the compiled step of its trainer (one
    micro-batch per update), AdamW with abot's learning rate and weight decay, on random tokens."""
    from functools import partial

    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder))
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0,
                                                     "keys": MLX_LM_KEYS})
    if checkpointing:
        grad_checkpoint(model.layers[0])
    optimizer = optim.AdamW(learning_rate=LR, weight_decay=WEIGHT_DECAY)
    optimizer.init(model.trainable_parameters())
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    compiled_state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    def step(tokens, lengths):
        (loss, _), grad = loss_value_and_grad(model, tokens, lengths)
        optimizer.update(model, grad)
        return loss

    model.train()
    vocab = model.args.vocab_size
    tokens = mx.random.randint(0, vocab, (batch, seq + 1), key=mx.random.key(2))
    lengths = mx.array([[1, seq]] * batch)  # every position scored, as abot's next-token loss
    mx.eval(tokens, lengths, model.parameters(), optimizer.state)
    return measure(lambda s: (s, step(tokens, lengths)), [model.state, optimizer.state], warmup, steps,
                   batch * seq)


def bench_in_child(**kwargs) -> dict:
    """One setup in a fresh process (this file with --one): its own evaluation order and its own peak."""
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(kwargs)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kwargs.get('setup')} failed:\n{out.stdout[-2000:]}{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_one(setup: str, folder: str, seq: int, batch: int, checkpointing: bool, warmup: int, steps: int) -> dict:
    """The --one entry: the named setup's figures."""
    if setup == MLX_LM:
        return bench_mlx_lm(folder, seq, batch, checkpointing, warmup, steps)
    return bench_abot(folder, SETUPS[setup], seq, batch, checkpointing, warmup, steps)


# ---------------------------------------------------------------------------------------------- the report

def paired(runs: dict[str, list[dict]], a: str, b: str, key: str) -> float:
    """a's figure over b's, the median over rounds of each round's ratio (neighbouring runs share the drift)."""
    return statistics.median(x[key] / y[key] for x, y in zip(runs[a], runs[b]))


def table(runs: dict[str, list[dict]]) -> list[str]:
    """The markdown table: each setup's peak memory and tokens/s (medians over rounds), and both against full
    fine-tuning (medians of the rounds' ratios)."""
    full = "full fine-tuning"
    lines = ["| setup | peak memory | vs full | tokens/s | vs full | held before the step |",
             "|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        median = {k: statistics.median(r[k] for r in rs) for k in ("peak_gb", "tokens_per_s", "held_gb")}
        lines.append(f"| {name} | {median['peak_gb'] * 1e3:.0f} MB | {paired(runs, name, full, 'peak_gb'):.2f}x | "
                     f"{median['tokens_per_s']:.0f} | {paired(runs, name, full, 'tokens_per_s'):.2f}x | "
                     f"{median['held_gb'] * 1e3:.0f} MB |")
    return lines


def verdicts(runs: dict[str, list[dict]]) -> list[str]:
    """Issue 22's targets, each with its measured ratio (the median of the rounds') and met / missed."""
    full, lora, qlora = "full fine-tuning", "LoRA r=16", "QLoRA 4-bit (LoRA r=16)"
    checks = [("LoRA peak memory <= 0.4x full", paired(runs, lora, full, "peak_gb"), lambda x: x <= 0.4),
              ("QLoRA 4-bit peak memory <= 0.25x full", paired(runs, qlora, full, "peak_gb"), lambda x: x <= 0.25),
              ("LoRA tokens/s >= 1.3x full", paired(runs, lora, full, "tokens_per_s"), lambda x: x >= 1.3)]
    if MLX_LM in runs:
        checks += [("abot LoRA tokens/s >= 1.0x mlx-lm LoRA", paired(runs, lora, MLX_LM, "tokens_per_s"),
                    lambda x: x >= 1.0),
                   ("abot LoRA peak memory <= 1.0x mlx-lm LoRA", paired(runs, lora, MLX_LM, "peak_gb"),
                    lambda x: x <= 1.0)]
    return [f"- {what}: {ratio:.2f}x, {'met' if ok(ratio) else 'MISSED'}" for what, ratio, ok in checks]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium", choices=["tiny", "small", "medium"],
                        help="configs/<size>.yaml's model shape, random weights (ignored with --model)")
    parser.add_argument("--model", help="a Hugging Face model folder (Llama, Qwen2, Qwen3) to use as the base")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every setup, in turn (ratios: the median)")
    parser.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off in all setups")
    parser.add_argument("--no-mlx-lm", action="store_true", help="skip mlx-lm even when it is installed")
    parser.add_argument("--quick", action="store_true", help="tiny, seq 128, batch 2, 1 + 2 steps: checks the pipeline")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run_one(**json) in this process
    args = parser.parse_args()
    if args.quick:
        args.size, args.seq, args.batch, args.warmup, args.steps = "tiny", 128, 2, 1, 2
    return args


def mlx_lm_missing(folder: str) -> str | None:
    """Why mlx-lm cannot run on this folder (not installed; an architecture it lacks, such as tiny's ReLU² MLP,
    which exports as Arcee), or None when it can."""
    try:
        from mlx_lm.utils import load_model
    except ImportError:
        return "mlx-lm is not installed"
    try:
        load_model(Path(folder), lazy=True)  # builds the model class; the weights stay unread
    except ValueError as e:
        return f"mlx-lm {e}"
    return None


def main():
    args = parse_args()
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))))
        return
    folder = args.model or str(write_random_base(args.size, Path(tempfile.gettempdir()) / f"abot-adapters-{args.size}"))
    missing = "--no-mlx-lm" if args.no_mlx_lm else mlx_lm_missing(folder)
    setups = list(SETUPS) + ([MLX_LM] if missing is None else [])
    common = dict(folder=folder, seq=args.seq, batch=args.batch, checkpointing=not args.no_checkpointing,
                  warmup=args.warmup, steps=args.steps)
    print(f"base: {folder}; seq {args.seq}, batch {args.batch}, float32, AdamW, rank {RANK}, alpha {ALPHA:g}, "
          f"targets {','.join(TARGETS)}, gradient checkpointing {'off' if args.no_checkpointing else 'on'}; "
          f"{args.warmup} warm-up + {args.steps} timed steps each, {args.rounds} round(s)"
          f"{'' if missing is None else f'; without mlx-lm ({missing})'}", flush=True)
    runs: dict[str, list[dict]] = {setup: [] for setup in setups}
    for round_ in range(1, args.rounds + 1):
        for setup in setups:
            runs[setup].append(r := bench_in_child(setup=setup, **common))
            print(f"  round {round_}, {setup}: peak {r['peak_gb'] * 1e3:.0f} MB, {r['tokens_per_s']:.0f} tokens/s, "
                  f"step {r['step_s'] * 1e3:.0f} ms, loss {r['loss']:.3f}", flush=True)
    print(f"\nmedians over {args.rounds} round(s); ratios: the median of the rounds' ratios")
    print("\n".join(table(runs)))
    if MLX_LM in runs:
        print(f"\nabot LoRA vs mlx-lm LoRA: tokens/s {paired(runs, 'LoRA r=16', MLX_LM, 'tokens_per_s'):.2f}x, "
              f"peak memory {paired(runs, 'LoRA r=16', MLX_LM, 'peak_gb'):.2f}x")
    print("\nIssue 22's targets:")
    print("\n".join(verdicts(runs)))


if __name__ == "__main__":
    main()
