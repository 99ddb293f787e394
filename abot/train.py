"""The training loop: step, log, evaluate and checkpoint the run that `abot.run.build_run` built.

State lives in one tree (`abot.step.init_state`) that goes into the compiled step and comes out; the loop
only moves batches in, metrics out, and the tree to checkpoints. What it tells the person and the logs goes
through `Report`.
"""

from __future__ import annotations

import time

import mlx.core as mx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from abot import __version__
from abot.config import Config, TrainConfig
from abot.errors import AbotError
from abot.finetune.batches import describe as describe_data
from abot.guards import StopRequest, Watchdog, distributed_world
from abot.metrics import NullLogger, RunLogger
from abot.platform import device
from abot.restore import with_model_folder
from abot.run import Run, build_run, decide_lanes
from abot.stage import check_stage

NOT_AVERAGED = ("loss", "grad_norm", "finite", "loss_scale")  # step metrics that are not the loss's own


def describe_eval(result: dict) -> str:
    """"loss 2.3456, ppl 10.44" and any other eval metrics (fine-tuning: accuracy, reward margin, ...)."""
    parts = [f"loss {result['loss']:.4f}"] + ([f"ppl {result['ppl']:.2f}"] if "ppl" in result else [])
    return ", ".join(parts + [f"{k} {v:.4f}" for k, v in result.items() if k not in ("loss", "ppl")])


class MetricsWindow:
    """The steps since the last log row (finite losses, the loss's own metrics, time) and the skipped steps."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step, self.skipped, self.in_a_row = tokens_per_step, 0, 0
        self.restart()

    def restart(self) -> None:
        """Empty the window and restart its clock (also after a checkpoint: saving is not training time)."""
        self.losses, self.extra, self.steps, self.t0 = [], [], 0, time.perf_counter()

    def add(self, metrics: dict) -> bool:
        """Count one step; False when it was skipped (non-finite loss or gradient)."""
        self.steps += 1
        if metrics["finite"].item() == 0.0:
            self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
            return False
        self.in_a_row = 0
        self.losses.append(metrics["loss"])
        self.extra.append({k: v for k, v in metrics.items() if k not in NOT_AVERAGED})
        return True

    def row(self, done: int, lr: float, metrics: dict, precision: str) -> dict:
        """The log row of the window ending at step `done`; empties the window."""
        elapsed = time.perf_counter() - self.t0
        row = {"loss": mx.stack(self.losses).mean().item() if self.losses else float("nan"), "lr": lr,
               "grad_norm": metrics["grad_norm"].item(), "tokens": done * self.tokens_per_step,
               "tokens_per_s": self.steps * self.tokens_per_step / elapsed, "step_time_s": elapsed / self.steps,
               "memory_gb": mx.get_peak_memory() / 1e9, "skipped_steps": self.skipped}
        if precision == "float16":
            row["loss_scale"] = metrics["loss_scale"].item()
        row.update({k: mx.stack([m[k] for m in self.extra]).mean().item() for k in (self.extra[0] if self.extra else {})})
        self.restart()
        return row


class Report:
    """What the loop tells the person (console, progress bar) and the run's logs (abot.metrics.RunLogger)."""

    def __init__(self, console: Console, logger, progress: Progress, bar):
        self.console, self.logger, self.progress, self.bar = console, logger, progress, bar

    def step(self, done: int) -> None:
        self.progress.update(self.bar, completed=done)

    def row(self, done: int, row: dict) -> None:
        self.logger.log(done, row)
        self.progress.update(self.bar, description=f"loss {row['loss']:.3f} | lr {row['lr']:.2e} | "
                                                   f"{row['tokens_per_s']:,.0f} tok/s")

    def evaluation(self, done: int, result: dict) -> None:
        if result:
            self.logger.log(done, result, prefix="eval")
            self.console.print(f"step {done}: eval {describe_eval(result)}")

    def checkpoint(self, done: int, path) -> None:
        if path is not None:
            size = path.stat().st_size
            self.logger.event("checkpoint", step=done, path=str(path), bytes=size)
            self.console.print(f"step {done}: saved {path} ({size / 2**20:.1f} MiB)")


def announce(run: Run, console: Console, logger) -> None:
    """Where the run starts from, the device, the model and the batch, before the first step."""
    t, d, w = run.cfg.train, run.cfg.data, run.world
    if run.resumed_from is not None:
        console.print(f"Resumed from {run.resumed_from} at step {run.start_step}.")
        logger.event("resume", step=run.start_step, checkpoint=str(run.resumed_from))
    elif run.init_from:
        console.print(f"Starting from {run.init_from} (weights only: fresh optimizer state and schedule).")
    if run.config_changes:
        logger.event("resume_config_changes", changes=run.config_changes)
        console.print("Config changes since the checkpoint: " + "; ".join(run.config_changes))
    console.print(f"abot {__version__} | {device.describe()}")
    trained = "parameters" if run.parts.adapter is None else "adapter parameters"  # n_params counts what trains
    console.print(f"model: {run.cfg.model.name}, {run.n_params / 1e6:.2f}M {trained} | optimizer: {t.optimizer} | "
                  f"schedule: {t.schedule} | precision: {t.precision} | batch: "
                  + (f"{w.size} ranks x " if w.size > 1 else "")
                  + f"{t.grad_accum_steps} x {t.micro_batch_size} x {d.seq_len} = {run.tokens_per_step} tokens/step")
    if run.lanes > 1:
        console.print(f"cpu: each micro-batch runs as {run.lanes} parallel lanes (one MLX stream per core)")


def steps(run: Run, report: Report, stop: StopRequest, watchdog: Watchdog) -> dict:
    """Train from `run.start_step` to train.total_steps, or until stopped; return the summary."""
    t, data, state = run.cfg.train, run.data, run.take_state()
    done, last_eval, last_ckpt, stopped, diverged = run.start_step, {}, None, None, False
    window, run_t0 = MetricsWindow(run.tokens_per_step), time.perf_counter()
    summary = {"abot_version": __version__, "n_params": run.n_params, "start_step": run.start_step,
               "tokens_per_step": run.tokens_per_step}
    if run.stage.eval_at_start and done == 0:  # where fine-tuning starts from, for comparison
        summary["initial_eval"] = run.evaluate(state["params"])
        report.evaluation(0, summary["initial_eval"])
    for step in range(run.start_step, t.total_steps):
        lr = run.parts.schedule(step)
        state, metrics = run.parts.step(state, data.prepare(next(data.stream)), mx.array(lr, dtype=mx.float32))
        mx.eval(state, metrics)
        watchdog.step_done()
        done = step + 1
        if not window.add(metrics):
            report.logger.event("nonfinite_step_skipped", step=done, loss=metrics["loss"].item(),
                                grad_norm=metrics["grad_norm"].item(), in_a_row=window.in_a_row)
            if window.in_a_row >= t.max_nonfinite_steps:
                stopped, diverged = f"{window.in_a_row} non-finite steps in a row", True
        report.step(done)
        if done % t.log_interval == 0 or done == t.total_steps:
            report.row(done, window.row(done, lr, metrics, t.precision))
        if data.eval_batches and (done % t.eval_interval == 0 or done == t.total_steps):
            last_eval = run.evaluate(state["params"])
            report.evaluation(done, last_eval)
        if stop.requested(run.world.group) and not stopped:
            stopped = f"received {stop.signal or 'a stop signal on another rank'}"
        if done % t.ckpt_interval == 0 or done == t.total_steps or stopped:
            last_ckpt = run.save(state, done)
            report.checkpoint(done, last_ckpt)
            window.restart()  # checkpoint time is not training time
        if stopped:
            report.console.print(f"Stopping at step {done}: {stopped}.")
            break
    elapsed, trained = time.perf_counter() - run_t0, done - run.start_step
    summary.update({"final_step": done, "total_steps": t.total_steps, "stopped": stopped, "diverged": diverged,
                    "skipped_steps": window.skipped, "tokens_trained": trained * run.tokens_per_step,
                    "wall_time_s": elapsed, "tokens_per_s": trained * run.tokens_per_step / elapsed if elapsed else 0.0,
                    "final_eval": last_eval, "checkpoint": str(last_ckpt) if last_ckpt else None,
                    "peak_memory_gb": mx.get_peak_memory() / 1e9})
    if data.report is not None:  # what the data pipeline used, truncated and dropped: never silent
        summary.update({"stage": run.stage.name, "data": data.report(), "eval_data": data.eval_report})
        report.console.print(f"{run.stage.name} train data: {describe_data(summary['data'])}")
    return summary


def loop(run: Run, console: Console) -> dict:
    """Train `run` with its logs, stop request, watchdog, data stream and progress bar open; return the summary.
    Closing the stream stops and joins its producer thread before the process exits (BatchStream.close)."""
    t = run.cfg.train
    columns = [TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with (RunLogger(t.log_path or f"{t.save_dir}/logs") if run.world.rank == 0 else NullLogger()) as logger, \
            StopRequest() as stop, Watchdog(run.world.size) as watchdog, run.data.stream, \
            Progress(*columns, console=console, transient=False) as progress:
        announce(run, console, logger)
        report = Report(console, logger, progress, progress.add_task("", total=t.total_steps, completed=run.start_step))
        summary = steps(run, report, stop, watchdog)
        logger.write_summary({k: v for k, v in summary.items() if k != "diverged"})
    return summary


def divergence_error(summary: dict, t: TrainConfig) -> AbotError:
    """Why the run stopped on non-finite steps, where its last good state is, and what to change."""
    fixes = [f"lower train.lr (now {t.lr:g})", f"raise train.warmup_steps (now {t.warmup_steps})"]
    if t.max_grad_norm <= 0:
        fixes.append("turn gradient clipping on (train.max_grad_norm: 1.0)")
    if t.precision != "float32":
        fixes.append(f"use train.precision: float32 (now {t.precision})")
    return AbotError(f"training stopped: {summary['stopped']} (train.max_nonfinite_steps: {t.max_nonfinite_steps}); "
                     f"the state after the last finite step is saved in {summary['checkpoint']}. To go on, "
                     f"{', '.join(fixes[:-1])} or {fixes[-1]}, and resume from it or an earlier checkpoint "
                     "(train.checkpoint_path)")


def train(cfg: Config, resume: bool = False, console: Console | None = None, stage: str = "pretrain") -> dict:
    """Run `cfg` to `train.total_steps` (or until stopped); return the final summary.

    `stage` picks the batches, the default loss and the evaluation: "pretrain" (token windows, next_token),
    "sft" (conversations, sft) or "dpo" (preference pairs, dpo); see abot.stage.
    """
    from abot.verify import preflight  # save_dir writable, disk for a checkpoint, memory estimate (warn)

    cfg = with_model_folder(cfg)  # train.init_from a Hugging Face model: its model section and tokenizer
    world = distributed_world()
    console = console or Console()
    if world.rank != 0:  # rank 0 alone prints, logs and writes checkpoints
        console = Console(quiet=True)
    lanes = decide_lanes(cfg.train, world.size)  # before MLX's first evaluation
    stage = check_stage(stage, cfg)
    preflight(cfg, lambda line: console.print(line, style="yellow", highlight=False))
    summary = loop(build_run(cfg, stage, resume, world=world, lanes=lanes, say=console.print), console)
    if summary.pop("diverged"):
        raise divergence_error(summary, cfg.train)
    return summary
