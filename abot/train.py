"""The training loop: build the run from the config, then step, log, evaluate and checkpoint.

State lives in one tree (`abot.step.init_state`) that goes into the compiled step and comes out;
the loop only moves batches in, metrics out, and the tree to and from checkpoints.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from abot import __version__
from abot.build import build_model, build_optimizer, build_schedule, ensure_tokenizer
from abot.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint, save_rotating,
                             verify_checkpoint)
from abot.config import Config
from abot.data.loader import eval_data as build_eval_data, train_stream
from abot.errors import AbotError
from abot.finetune.batches import describe as describe_data
from abot.finetune.stage import SEQUENCES_PER_EXAMPLE, check_stage, load_init_params, stage_data, stage_loss
from abot.metrics import NullLogger, RunLogger
from abot.models.transformer import count_params
from abot.platform import device
from abot.platform.lanes import parallel_lanes
from abot.step import init_state, make_eval_step, make_train_step

# Model keys that may change between a checkpoint and its resumed run (everything else changes shapes).
SAFE_MODEL_CHANGES = {"dropout"}


def describe_eval(result: dict) -> str:
    """"loss 2.3456, ppl 10.44" and any other eval metrics (fine-tuning: accuracy, reward margin, ...)."""
    parts = [f"loss {result['loss']:.4f}"] + ([f"ppl {result['ppl']:.2f}"] if "ppl" in result else [])
    return ", ".join(parts + [f"{k} {v:.4f}" for k, v in result.items() if k not in ("loss", "ppl")])


def evaluate(eval_fn, params, batches) -> dict:
    losses = [eval_fn(params, mx.array(b))[0] for b in batches]
    loss = mx.stack(losses).mean().item() if losses else float("nan")
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


def check_resumable(ckpt, cfg: Config, tokenizer, path, fresh_state: dict | None = None) -> list[str]:
    """Refuse shape-changing config changes; return the safe ones so they can be logged.

    `fresh_state`, the state this config would start from, is compared leaf by leaf (paths, shapes, dtypes)
    with the checkpoint's, so any other mismatch is also an error here, not a crash inside the train step.
    """
    if "state" not in ckpt.trees:
        held = ", ".join(map(str, ckpt.trees)) or "nothing"
        raise AbotError(f"{path}: not a training checkpoint (it holds {held}, no training state); give a "
                        "step_*.ckpt from a run's save_dir as train.checkpoint_path")
    old = ckpt.meta.get("config", {})
    new = cfg.to_dict()
    old_model = old.get("model", {})
    bad = [k for k, v in new["model"].items() if k not in SAFE_MODEL_CHANGES and old_model.get(k, v) != v]
    if bad:
        changes = ", ".join(f"model.{k}: {old_model[k]} -> {new['model'][k]}" for k in bad)
        raise AbotError(f"{path}: cannot resume, the config changes the model's shape ({changes}); "
                        "restore those values or start a new run in another save_dir")
    old_opt = old.get("train", {}).get("optimizer", new["train"]["optimizer"])
    if old_opt != new["train"]["optimizer"]:
        raise AbotError(f"{path}: cannot resume, the config changes the optimizer (train.optimizer: {old_opt} -> "
                        f"{new['train']['optimizer']}) and its state does not carry over; restore train.optimizer, "
                        "or start a new run in another save_dir")
    if fresh_state is not None:
        check_state_fits(ckpt.trees["state"], fresh_state, path)
    if ckpt.meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
        raise AbotError(f"{path}: the checkpoint was trained with a different tokenizer than "
                        f"{tokenizer.path}; point train.tokenizer_path at the original tokenizer")
    return [f"{sec}.{k}: {old.get(sec, {}).get(k)} -> {v}" for sec in ("data", "train")
            for k, v in new[sec].items() if old.get(sec, {}).get(k, v) != v]


def check_state_fits(saved: dict, fresh: dict, path) -> None:
    """AbotError listing the leaves where a checkpoint's training state differs from this config's."""
    want = {k: (v.shape, v.dtype) for k, v in tree_flatten(fresh)}
    got = {k: (v.shape, v.dtype) for k, v in tree_flatten(saved) if isinstance(v, mx.array)}
    diffs = [f"{k}: missing" for k in want if k not in got] + [f"{k}: unexpected" for k in got if k not in want]
    diffs += [f"{k}: {tuple(got[k][0])} {got[k][1]} vs {tuple(want[k][0])} {want[k][1]}"
              for k in want if k in got and got[k] != want[k]]
    if diffs:
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise AbotError(f"{path}: cannot resume, the checkpoint's training state does not fit this config "
                        f"({'; '.join(diffs[:3])}{more}); restore the model and optimizer settings it was written "
                        "with (train.optimizer_args included), or start a new run in another save_dir")


def check_no_damaged_checkpoints(save_dir: Path) -> None:
    """--resume found nothing loadable: refuse to restart from step 0 over damaged checkpoints."""
    found = list_checkpoints(save_dir)
    if not found:
        return
    try:
        verify_checkpoint(found[-1][1])
        reason = f"{found[-1][1]}: cannot be loaded"
    except AbotError as err:
        reason = str(err)
    raise AbotError(f"--resume: {save_dir} holds {len(found)} checkpoint file(s) but no checkpoint there can be "
                    f"loaded (newest: {reason}); give a good one as train.checkpoint_path, or move them away "
                    "to start from step 0")


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits cleanly."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def requested(self, group) -> bool:
        """Whether any rank was asked to stop: data-parallel ranks must stop at the same step."""
        if group is None:
            return self.signal is not None
        return mx.distributed.all_sum(mx.array(float(self.signal is not None)), group=group).item() > 0

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def distributed_group():
    """mx.distributed's group when launched with several ranks (mlx.launch), else None."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


class _Watchdog:
    """Data parallel: a rank whose peer died would wait in an all-reduce forever. If no step completes
    for ABOT_DIST_TIMEOUT seconds (default 600), print why and exit with status 1."""

    def __init__(self, world: int):
        self.timeout = float(os.environ.get("ABOT_DIST_TIMEOUT", "600")) if world > 1 else 0.0
        self.last = time.monotonic()
        self._done = threading.Event()

    def __enter__(self):
        if self.timeout > 0:
            threading.Thread(target=self._watch, daemon=True, name="abot-watchdog").start()
        return self

    def step_done(self):
        self.last = time.monotonic()

    def _watch(self):
        while not self._done.wait(min(self.timeout, 10.0)):
            if time.monotonic() - self.last > self.timeout:
                sys.stderr.write(f"abot: no training step finished in {self.timeout:.0f} s; another rank probably "
                                 "died or hangs. Exiting (set ABOT_DIST_TIMEOUT to wait longer).\n")
                os._exit(1)

    def __exit__(self, *exc):
        self._done.set()


def train(cfg: Config, resume: bool = False, console: Console | None = None, stage: str = "pretrain") -> dict:
    """Run `cfg` to `train.total_steps` (or until stopped); return the final summary.

    `stage` picks the batches and the default loss: "pretrain" (token windows, next_token), "sft"
    (conversations, sft) or "dpo" (preference pairs, dpo); see abot.finetune.stage.
    """
    group = distributed_group()
    rank, world = (group.rank(), group.size()) if group else (0, 1)
    console = console or Console()
    if rank != 0:  # rank 0 alone prints, logs and writes checkpoints
        console = Console(quiet=True)
    t, d = cfg.train, cfg.data
    # Before MLX's first evaluation (it fixes the evaluation order then). Ranks already share the cores;
    # checkpointed steps keep their memory saving only on one stream.
    lanes = parallel_lanes(t.micro_batch_size) if world == 1 and not t.gradient_checkpointing else 1
    # Registry lookups first: a typo'd name fails before any slow work.
    check_stage(stage, cfg)
    model, optimizer, schedule = build_model(cfg), build_optimizer(cfg), build_schedule(cfg)
    loss_fn = stage_loss(cfg, stage)
    from abot.verify import preflight  # save_dir writable, disk for a checkpoint, memory estimate (warn)
    preflight(cfg, lambda line: console.print(line, style="yellow", highlight=False))
    tokenizer = ensure_tokenizer(cfg, console.print)
    save_dir = Path(t.save_dir)
    log_dir = Path(t.log_path) if t.log_path else save_dir / "logs"

    init_key, key = mx.random.split(mx.random.key(t.seed))
    # train.init_from: weights only (fresh optimizer state and schedule); also DPO's frozen reference model.
    init_params, init_path = load_init_params(cfg, tokenizer, model) if t.init_from else (model.init(init_key), None)
    state = init_state(init_params, optimizer, key, t.precision)
    start, data_state = 0, None
    ckpt_path = t.checkpoint_path or (latest_checkpoint(save_dir) if resume else None)
    if resume and ckpt_path is None:
        check_no_damaged_checkpoints(save_dir)
        console.print(f"No checkpoint in {save_dir}: starting from step 0.")
    safe_changes = []
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path)
        safe_changes = check_resumable(ckpt, cfg, tokenizer, ckpt_path, fresh_state=state)
        state, start, data_state = ckpt.trees["state"], ckpt.step, ckpt.meta.get("data_state")
        console.print(f"Resumed from {ckpt_path} at step {start}.")
    elif init_path:
        console.print(f"Starting from {init_path} (weights only: fresh optimizer state and schedule).")

    # The effective batch spans every rank: world x grad_accum x micro_batch sequences per update.
    tokens_per_step = world * t.grad_accum_steps * t.micro_batch_size * d.seq_len * SEQUENCES_PER_EXAMPLE[stage]
    n_params = count_params(state["params"])
    console.print(f"abot {__version__} | {device.describe()}")
    console.print(f"model: {cfg.model.name}, {n_params / 1e6:.2f}M parameters | optimizer: {t.optimizer} | "
                  f"schedule: {t.schedule} | precision: {t.precision} | batch: "
                  + (f"{world} ranks x " if world > 1 else "")
                  + f"{t.grad_accum_steps} x {t.micro_batch_size} x {d.seq_len} = {tokens_per_step} tokens/step")

    finetune = None
    if stage == "pretrain":
        stream = train_stream(cfg, tokenizer, state=data_state)  # BatchStream, or WindowStream for shards
        eval_data = build_eval_data(cfg, tokenizer)
    else:  # conversations or preference pairs (abot.finetune)
        finetune = stage_data(stage, cfg, tokenizer, model, loss_fn, reference=init_params, data_state=data_state,
                              say=console.print, lanes=lanes)
        stream, eval_data = finetune.stream, finetune.eval_batches
    if lanes > 1:
        console.print(f"cpu: each micro-batch runs as {lanes} parallel lanes (one MLX stream per core)")
    step_fn = make_train_step(model, loss_fn, optimizer, grad_accum_steps=t.grad_accum_steps,
                              max_grad_norm=t.max_grad_norm, precision=t.precision, compile=t.compile,
                              group=group, lanes=lanes)
    eval_fn = make_eval_step(model, loss_fn, compile=t.compile, lanes=lanes)
    prepare, run_eval = mx.array, lambda params: evaluate(eval_fn, params, eval_data) if eval_data else {}
    if finetune:
        prepare, run_eval = finetune.prepare, finetune.evaluate

    def save(step: int) -> Path | None:
        if rank != 0:
            return None
        meta = {"config": cfg.to_dict(), "tokenizer_sha256": tokenizer.sha256, "data_state": stream.state(),
                "n_params": n_params, "stage": stage}
        path = save_rotating(save_dir, {"state": state}, step, meta, t.ckpt_keep)
        size = path.stat().st_size
        logger.event("checkpoint", step=step, path=str(path), bytes=size)
        console.print(f"step {step}: saved {path} ({size / 2**20:.1f} MiB)")
        return path

    summary = {"abot_version": __version__, "n_params": n_params, "start_step": start, "tokens_per_step": tokens_per_step}
    done, skipped, bad_run, last_eval, last_ckpt, stopped, diverged = start, 0, 0, {}, None, None, False
    window_loss, window_t0, window_steps = [], time.perf_counter(), 0
    window_metrics: list[dict] = []  # the loss function's own metrics (DPO: rewards, accuracy)
    run_t0 = time.perf_counter()
    columns = [TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with (RunLogger(log_dir) if rank == 0 else NullLogger()) as logger, _StopRequest() as stop, \
            _Watchdog(world) as watchdog, \
            Progress(*columns, console=console, transient=False) as progress:
        if ckpt_path:
            logger.event("resume", step=start, checkpoint=str(ckpt_path))
        if safe_changes:
            logger.event("resume_config_changes", changes=safe_changes)
            console.print("Config changes since the checkpoint: " + "; ".join(safe_changes))
        bar = progress.add_task("", total=t.total_steps, completed=start)
        if finetune and start == 0:  # where fine-tuning starts from, for comparison
            summary["initial_eval"] = run_eval(state["params"])
            if summary["initial_eval"]:
                logger.log(0, summary["initial_eval"], prefix="eval")
                console.print(f"step 0: eval {describe_eval(summary['initial_eval'])}")
        for step in range(start, t.total_steps):
            lr = schedule(step)
            state, metrics = step_fn(state, prepare(next(stream)), mx.array(lr, dtype=mx.float32))
            mx.eval(state, metrics)
            watchdog.step_done()
            window_steps += 1
            if metrics["finite"].item() == 0.0:
                skipped, bad_run = skipped + 1, bad_run + 1
                logger.event("nonfinite_step_skipped", step=step + 1, loss=metrics["loss"].item(),
                             grad_norm=metrics["grad_norm"].item(), in_a_row=bad_run)
                if bad_run >= t.max_nonfinite_steps:
                    stopped, diverged = f"{bad_run} non-finite steps in a row", True
            else:
                bad_run = 0
                window_loss.append(metrics["loss"])
                window_metrics.append({k: v for k, v in metrics.items()
                                       if k not in ("loss", "grad_norm", "finite", "loss_scale")})
            done = step + 1
            progress.update(bar, completed=done)
            if done % t.log_interval == 0 or done == t.total_steps:
                elapsed = time.perf_counter() - window_t0
                loss = mx.stack(window_loss).mean().item() if window_loss else float("nan")
                row = {"loss": loss, "lr": lr, "grad_norm": metrics["grad_norm"].item(),
                       "tokens": done * tokens_per_step, "tokens_per_s": window_steps * tokens_per_step / elapsed,
                       "step_time_s": elapsed / window_steps, "memory_gb": mx.get_peak_memory() / 1e9,
                       "skipped_steps": skipped}
                if t.precision == "float16":
                    row["loss_scale"] = metrics["loss_scale"].item()
                row.update({k: mx.stack([m[k] for m in window_metrics]).mean().item() for k in
                            (window_metrics[0] if window_metrics else {})})
                window_metrics = []
                logger.log(done, row)
                progress.update(bar, description=f"loss {loss:.3f} | lr {lr:.2e} | {row['tokens_per_s']:,.0f} tok/s")
                window_loss, window_t0, window_steps = [], time.perf_counter(), 0
            if eval_data and (done % t.eval_interval == 0 or done == t.total_steps):
                last_eval = run_eval(state["params"])
                logger.log(done, last_eval, prefix="eval")
                console.print(f"step {done}: eval {describe_eval(last_eval)}")
            if stop.requested(group) and not stopped:
                stopped = f"received {stop.signal or 'a stop signal on another rank'}"
            if done % t.ckpt_interval == 0 or done == t.total_steps or stopped:
                last_ckpt = save(done)
                window_t0 = time.perf_counter()  # checkpoint time is not training time
            if stopped:
                console.print(f"Stopping at step {done}: {stopped}.")
                break
        elapsed = time.perf_counter() - run_t0
        trained = done - start
        summary.update({"final_step": done, "total_steps": t.total_steps, "stopped": stopped,
                        "skipped_steps": skipped, "tokens_trained": trained * tokens_per_step, "wall_time_s": elapsed,
                        "tokens_per_s": trained * tokens_per_step / elapsed if elapsed else 0.0,
                        "final_eval": last_eval, "checkpoint": str(last_ckpt) if last_ckpt else None,
                        "peak_memory_gb": mx.get_peak_memory() / 1e9})
        if finetune:  # what the data pipeline used, truncated and dropped: never silent
            summary.update({"stage": stage, "data": finetune.report(), "eval_data": finetune.eval_report})
            console.print(f"{stage} train data: {describe_data(summary['data'])}")
        logger.write_summary(summary)
    if diverged:
        fixes = [f"lower train.lr (now {t.lr:g})", f"raise train.warmup_steps (now {t.warmup_steps})"]
        if t.max_grad_norm <= 0:
            fixes.append("turn gradient clipping on (train.max_grad_norm: 1.0)")
        if t.precision != "float32":
            fixes.append(f"use train.precision: float32 (now {t.precision})")
        raise AbotError(f"training stopped: {stopped} (train.max_nonfinite_steps: {t.max_nonfinite_steps}); the "
                        f"state after the last finite step is saved in {last_ckpt}. To go on, "
                        f"{', '.join(fixes[:-1])} or {fixes[-1]}, and resume from it or an earlier checkpoint "
                        "(train.checkpoint_path)")
    return summary
