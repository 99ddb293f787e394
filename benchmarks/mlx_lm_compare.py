"""abot against mlx-lm on the same Hugging Face model folder: full fine-tuning and greedy generation, one run.

    python benchmarks/mlx_lm_compare.py [--batch 4] [--seq 256] [--steps 4] [--repeats 2] [--new 128]
    python benchmarks/mlx_lm_compare.py --quick        # tiny shapes, a few steps: checks the script end to end

The model: `HuggingFaceTB/SmolLM2-135M` where it is in the local Hugging Face cache (nothing is downloaded),
else a random-weight model of its shape (LlamaForCausalLM, hidden 576, 30 layers, 9 heads, 3 kv heads,
intermediate 1536, vocab 49152, tied embeddings, rope_theta 100000), made once by abot itself: a random
abot model with those model.* keys written out as `abot export` writes one (config.json + model.safetensors),
cached under ~/.cache/abot/bench/. `--model PATH` takes any Llama-family folder. Token ids are fed straight
to both sides, so no tokenizer is needed.

mlx-lm is installed beside abot for this (`pip install mlx-lm`), never as a dependency. Every configuration
runs in its own fresh process, alternating abot and mlx-lm and repeated (`--repeats`); each process imports
`abot` first, so on Linux mlx-lm runs on the same fast BLAS (abot.platform) as abot.

Training: full fine-tuning, every weight trained (embedding and final norm too), AdamW (lr 1e-5,
betas 0.9/0.999, eps 1e-8, weight decay 0.01), one micro-batch of `--batch` x `--seq` random ids per step, no
gradient accumulation, no gradient checkpointing, float32.
- abot: the step `abot train` builds from a config whose `train.init_from` is the folder (restore.with_model_folder,
  run.decide_lanes, run.build_step, restore.load_init_params, StepParts.fresh_state), with abot's defaults kept:
  global-norm clipping at 1.0 and the non-finite guard.
- mlx-lm: what `mlx_lm.lora --fine-tune-type full` runs (mlx_lm/tuner/trainer.py `train`): `nn.value_and_grad`
  of its `default_loss`, `optim.AdamW`, one `mx.compile`d step with the model, optimizer and random state as
  its state; all parameters unfrozen (mlx_lm.lora's `full` unfreezes the transformer layers only).
tokens/s: the median step over `--steps` timed steps after `--warmup` (the first compiles); peak memory: MLX's.

Generation: batch 1, a fixed prompt of `--prompt` ids, `--new` greedy tokens with no stop token; decode tokens/s
excludes the prompt step, whose time (prompt + first token) is reported on its own line.
- abot: abot.generate.generate_tokens (KV cache; one BLAS thread while decoding, as abot generate runs it).
- mlx-lm: mlx_lm.generate.generate_step, the loop stream_generate drives (KV cache, greedy sampler), inside its
  wired_limit, without the detokenizer.
Both load the folder's weights in their stored dtype and print their greedy tokens, which are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import abot  # noqa: F401  (loads the fast BLAS before mlx; in mlx-lm's processes too)
import mlx.core as mx
import numpy as np

HUB_ID = "HuggingFaceTB/SmolLM2-135M"
# SmolLM2-135M's config.json, as abot model keys.
SMOLLM2_135M = {"vocab_size": 49152, "d_model": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3,
                "mlp_hidden": 1536, "tie_embeddings": True, "rope_theta": 100000.0, "norm_eps": 1e-5,
                "max_seq_len": 8192, "dropout": 0.0}
QUICK = {**SMOLLM2_135M, "vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "mlp_hidden": 128, "max_seq_len": 512}
LR, WEIGHT_DECAY = 1e-5, 0.01  # mlx-lm's default learning rate; mlx.optimizers.AdamW's default decay


# ---------------------------------------------------------------------------------------------- the model folder

def cached_hub_model() -> Path | None:
    """The real SmolLM2-135M where the local Hugging Face cache holds it (never downloads)."""
    try:
        from huggingface_hub import snapshot_download
        folder = Path(snapshot_download(HUB_ID, local_files_only=True))
    except Exception:
        return None
    return folder if (folder / "config.json").exists() else None


def make_random_folder(folder: Path, model_keys: dict) -> Path:
    """A random-weight model folder made by abot: its model, written as `abot export` writes it."""
    from abot.build import build_model
    from abot.config import config_from_dict
    from abot.export import hf_config, hf_tensors

    if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config_from_dict({"model": model_keys, "data": {"seq_len": min(2048, model_keys["max_seq_len"])}})
    params = build_model(cfg).init(mx.random.key(0))
    mx.save_safetensors(str(folder / "model.safetensors"), hf_tensors(params, cfg), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(cfg, "float32"), indent=2))
    return folder


def model_folder(args) -> tuple[Path, str]:
    if args.model:
        return Path(args.model), args.model
    if not args.quick:
        real = cached_hub_model()
        if real is not None:
            return real, f"{HUB_ID} (local Hugging Face cache)"
    name = "tiny-llama-random" if args.quick else "smollm2-135m-random"
    folder = make_random_folder(Path.home() / ".cache" / "abot" / "bench" / name, QUICK if args.quick else SMOLLM2_135M)
    what = "a tiny random Llama (--quick)" if args.quick else "random weights of SmolLM2-135M's shape, made by abot"
    return folder, what


def batch_ids(vocab: int, batch: int, seq: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (batch, seq + 1), dtype=np.int32)


def prompt_ids(vocab: int, n: int) -> list[int]:
    return np.random.default_rng(1).integers(0, vocab, n).tolist()


def vocab_of(folder: str) -> int:
    return int(json.loads((Path(folder) / "config.json").read_text())["vocab_size"])


# ---------------------------------------------------------------------------------------------- training

def timed_steps(run_step, steps: int, warmup: int) -> tuple[list[float], float]:
    """Seconds per step for `steps` steps after `warmup`, and the first step's loss."""
    times, first_loss = [], None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = run_step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if first_loss is None:
            first_loss = loss
    return times, first_loss


def train_abot(folder: str, batch: int, seq: int, steps: int, warmup: int, precision: str) -> dict:
    """abot's compiled step, built as `abot train` builds it for `train.init_from: folder`."""
    from abot.config import config_from_dict
    from abot.restore import load_init_params, with_model_folder
    from abot.run import build_step, decide_lanes
    from abot.stage import PRETRAIN

    cfg = with_model_folder(config_from_dict({
        "data": {"seq_len": seq},
        "train": {"init_from": folder, "optimizer": "adamw", "optimizer_args": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
                  "weight_decay": WEIGHT_DECAY, "lr": LR, "min_lr": 0.0, "micro_batch_size": batch,
                  "grad_accum_steps": 1, "gradient_checkpointing": False, "compile": True, "precision": precision}}))
    lanes = decide_lanes(cfg.train)  # before MLX's first evaluation
    parts = build_step(cfg, PRETRAIN, lanes)
    params, _ = load_init_params(cfg, None, parts.model)  # no tokenizer: the folder records no tokenizer hash
    state = parts.fresh_state(params, mx.random.key(1), precision)
    tokens = mx.array(batch_ids(cfg.model.vocab_size, batch, seq))[None]  # (accum, batch, seq + 1)
    lr = mx.array(LR)
    mx.eval(state, tokens)
    mx.reset_peak_memory()

    def one():
        nonlocal state
        state, metrics = parts.step(state, tokens, lr)
        mx.eval(state, metrics)
        return metrics["loss"].item()

    times, loss = timed_steps(one, steps, warmup)
    return {"step_s": statistics.median(times), "times": times, "tokens_per_s": batch * seq / statistics.median(times),
            "peak_gb": mx.get_peak_memory() / 1e9, "first_loss": loss, "lanes": lanes}


def train_mlx_lm(folder: str, batch: int, seq: int, steps: int, warmup: int, precision: str,
                 threads: int | None = None) -> dict:
    """The step mlx_lm/tuner/trainer.py `train` compiles, for full fine-tuning of every parameter.

    `threads`: OpenBLAS threads (a diagnostic; None: as the process has them, every core)."""
    from abot.generate import blas_threads
    with blas_threads(threads):
        return _train_mlx_lm(folder, batch, seq, steps, warmup, precision)


def _train_mlx_lm(folder: str, batch: int, seq: int, steps: int, warmup: int, precision: str) -> dict:
    from functools import partial

    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.nn.utils import average_gradients
    from mlx.utils import tree_map
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder))
    model.set_dtype(getattr(mx, precision))  # the folder's dtype may differ (the real SmolLM2 is bfloat16)
    model.unfreeze()  # every weight, as abot trains them
    model.train()
    optimizer = optim.AdamW(learning_rate=LR, betas=[0.9, 0.999], eps=1e-8, weight_decay=WEIGHT_DECAY)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, prev_grad, do_update):  # mlx_lm.tuner.trainer.train's step, as it is there
        (lvalue, toks), grad = loss_value_and_grad(model, *batch)
        if prev_grad is not None:
            grad = tree_map(lambda x, y: x + y, grad, prev_grad)
        if do_update:
            grad = average_gradients(grad)
            optimizer.update(model, grad)
            grad = None
        return lvalue, toks, grad

    ids = mx.array(batch_ids(model.args.vocab_size, batch, seq))
    lengths = mx.array([[0, seq + 1]] * batch)  # (offset, length): every target counts, as in abot
    mx.eval(model.parameters(), ids, lengths)
    mx.reset_peak_memory()

    def one():
        lvalue, toks, grad = step((ids, lengths), None, True)
        mx.eval(state, lvalue, toks, grad)
        return lvalue.item()

    times, loss = timed_steps(one, steps, warmup)
    return {"step_s": statistics.median(times), "times": times, "tokens_per_s": batch * seq / statistics.median(times),
            "peak_gb": mx.get_peak_memory() / 1e9, "first_loss": loss}


# ---------------------------------------------------------------------------------------------- generation

def timed_generation(tokens) -> dict:
    """Consume a token iterator: the prompt step (prompt + first token), then tokens/s over the rest."""
    t0 = time.perf_counter()
    out = [next(tokens)]
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    out += list(tokens)
    decode = time.perf_counter() - t1
    return {"prompt_s": first, "decode_tokens_per_s": (len(out) - 1) / decode, "tokens": out}


def generate_abot(folder: str, prompt: list[int], new: int) -> dict:
    from abot.build import build_model
    from abot.generate import generate_tokens
    from abot.restore import open_checkpoint

    opened = open_checkpoint(folder)
    model, params = build_model(opened.config()), opened.params()  # stored dtype, as abot generate loads it
    mx.eval(params)

    def run(n):
        return generate_tokens(model, params, prompt, max_new_tokens=n, temperature=0.0, stop_ids=())

    list(run(8))  # warm-up: first-call overheads, the allocator
    mx.reset_peak_memory()
    return {**timed_generation(run(new)), "peak_gb": mx.get_peak_memory() / 1e9}


def generate_mlx_lm(folder: str, prompt: list[int], new: int, threads: int | None = None) -> dict:
    from abot.generate import blas_threads
    from mlx_lm.generate import generate_step, generation_stream, wired_limit
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder))
    mx.eval(model.parameters())
    ids = mx.array(prompt)

    def run(n):  # stream_generate's loop: generate_step inside wired_limit, greedy (sampler=None)
        with wired_limit(model, [generation_stream]):
            yield from (int(t) for t, _ in generate_step(ids, model, max_tokens=n))

    with blas_threads(threads):  # None: OpenBLAS as the process has it (every core)
        list(run(8))
        mx.reset_peak_memory()
        result = timed_generation(run(new))
    return {**result, "peak_gb": mx.get_peak_memory() / 1e9}


JOBS = {"train_abot": train_abot, "train_mlx_lm": train_mlx_lm, "generate_abot": generate_abot,
        "generate_mlx_lm": generate_mlx_lm}


def in_child(job: str, **kwargs) -> dict:
    """One job in a fresh process: MLX fixes its evaluation order at its first evaluation (abot.platform.lanes),
    and neither framework's compiled graphs, caches or allocator state may leak into the other's figures."""
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps({"job": job, **kwargs})],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{job} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- the report

def machine_line(lanes: int) -> str:
    from importlib.metadata import version

    from abot.platform import prepare

    if mx.default_device() == mx.gpu:
        device = "GPU"
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   "CPU") if Path("/proc/cpuinfo").exists() else "CPU"
        device = f"{cpu}, {os.cpu_count()} cores; BLAS: {prepare().blas}; JIT: {prepare().jit}"
    return (f"device: {device}; abot lanes: {lanes}; mlx {version('mlx')}, mlx-lm {version('mlx-lm')}; "
            "mlx-lm's processes import abot first (same BLAS)")


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def row(measure: str, a: float, m: float, fmt: str) -> str:
    return f"| {measure} | {a:{fmt}} | {m:{fmt}} | {a / m:.2f}x |"


def agreement(a: list[int], b: list[int]) -> str:
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{same}/{len(a)} identical before the first difference"


def table(args, res: dict) -> list[str]:
    ta, tm, ga, gm = res["train_abot"], res["train_mlx_lm"], res["generate_abot"], res["generate_mlx_lm"]
    shape = f"batch {args.batch} x seq {args.seq}"
    lines = ["| measure | abot | mlx-lm | abot / mlx-lm |", "|---|---|---|---|",
             row(f"full fine-tuning tokens/s ({args.precision}, AdamW, {shape})",
                 median_of(ta, "tokens_per_s"), median_of(tm, "tokens_per_s"), ",.0f"),
             row("training step, s (median)", median_of(ta, "step_s"), median_of(tm, "step_s"), ".2f"),
             row("training peak memory, GB", median_of(ta, "peak_gb"), median_of(tm, "peak_gb"), ".2f"),
             f"| first step's loss (same weights, same batch) | {ta[0]['first_loss']:.4f} | "
             f"{tm[0]['first_loss']:.4f} | |",
             row(f"greedy decode tokens/s (batch 1, {args.new} new)", median_of(ga, "decode_tokens_per_s"),
                 median_of(gm, "decode_tokens_per_s"), ",.1f"),
             row(f"prompt step, ms ({args.prompt} ids + first token)", 1e3 * median_of(ga, "prompt_s"),
                 1e3 * median_of(gm, "prompt_s"), ",.0f"),
             row("generation peak memory, GB", median_of(ga, "peak_gb"), median_of(gm, "peak_gb"), ".2f"),
             f"| greedy tokens | {agreement(ga[0]['tokens'], gm[0]['tokens'])} | | |"]
    if res.get("generate_mlx_lm_1t"):
        g1 = res["generate_mlx_lm_1t"]
        lines.append(f"| greedy decode tokens/s, mlx-lm on 1 BLAS thread (as abot decodes) | "
                     f"{median_of(ga, 'decode_tokens_per_s'):,.1f} | {median_of(g1, 'decode_tokens_per_s'):,.1f} | "
                     f"{median_of(ga, 'decode_tokens_per_s') / median_of(g1, 'decode_tokens_per_s'):.2f}x |")
    return lines


def verdict(res: dict) -> str:
    train = median_of(res["train_abot"], "tokens_per_s") / median_of(res["train_mlx_lm"], "tokens_per_s")
    gen = (median_of(res["generate_abot"], "decode_tokens_per_s")
           / median_of(res["generate_mlx_lm"], "decode_tokens_per_s"))
    say = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    return (f"targets: training >= 1.0x mlx-lm: {say(train >= 1.0)} ({train:.2f}x); "
            f"generation >= 0.9x mlx-lm: {say(gen >= 0.9)} ({gen:.2f}x)")


def each_run(res: dict) -> list[str]:
    lines = []
    for job, key in (("train", "tokens_per_s"), ("generate", "decode_tokens_per_s")):
        for who in ("abot", "mlx_lm", "mlx_lm_1t"):
            runs = res.get(f"{job}_{who}")
            if runs:
                lines.append(f"  {job} {who}: " + ", ".join(f"{r[key]:,.1f}" for r in runs) + " tok/s")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Llama-family model folder (default: SmolLM2-135M from the cache, "
                                        "else random weights of its shape)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating which goes first")
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                        help="training dtype (abot: compute dtype over float32 master weights; mlx-lm: the "
                             "model's dtype, weights and AdamW moments included)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt ids")
    parser.add_argument("--new", type=int, default=128, help="generated tokens")
    parser.add_argument("--no-one-thread", action="store_true",
                        help="skip the extra mlx-lm decode run on one BLAS thread")
    parser.add_argument("--quick", action="store_true", help="tiny model and shapes, few steps (a smoke run)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one job in this process
    args = parser.parse_args()
    if args.one:
        kwargs = json.loads(args.one)
        print(json.dumps(JOBS[kwargs.pop("job")](**kwargs)))
        return
    if args.quick:
        args.batch, args.seq, args.steps, args.warmup, args.repeats, args.new, args.prompt = 2, 32, 3, 2, 1, 16, 8
    folder, what = model_folder(args)
    load_before = os.getloadavg()
    train_kw = dict(folder=str(folder), batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                    precision=args.precision)
    gen_kw = dict(folder=str(folder), prompt=prompt_ids(vocab_of(str(folder)), args.prompt), new=args.new)
    res = {k: [] for k in ("train_abot", "train_mlx_lm", "generate_abot", "generate_mlx_lm", "generate_mlx_lm_1t")}
    for r in range(args.repeats):
        order = ("abot", "mlx_lm") if r % 2 == 0 else ("mlx_lm", "abot")  # alternate: drift in load cancels
        for who in order:
            res[f"train_{who}"].append(in_child(f"train_{who}", **train_kw))
            print(f"  repeat {r + 1}: train {who}: {res[f'train_{who}'][-1]['tokens_per_s']:,.0f} tok/s", flush=True)
        for who in order:
            res[f"generate_{who}"].append(in_child(f"generate_{who}", **gen_kw))
            print(f"  repeat {r + 1}: generate {who}: {res[f'generate_{who}'][-1]['decode_tokens_per_s']:,.1f} tok/s",
                  flush=True)
        if not args.no_one_thread:
            res["generate_mlx_lm_1t"].append(in_child("generate_mlx_lm", threads=1, **gen_kw))
    load_after = os.getloadavg()
    print()
    print(f"model: {folder} ({what})")
    print(machine_line(res["train_abot"][0]["lanes"]))
    print(f"load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after: {' '.join(f'{x:.2f}' for x in load_after)}; medians of {args.repeats} run(s) per side, "
          f"each in its own process; training: median of {args.steps} steps after {args.warmup} warm-up")
    print()
    print("\n".join(table(args, res)))
    print()
    print(verdict(res) + (" (--quick: a smoke run on a tiny model; its figures say nothing about speed)"
                          if args.quick else ""))
    print("each run:")
    print("\n".join(each_run(res)))


if __name__ == "__main__":
    main()
