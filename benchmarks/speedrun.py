"""Time to quality (issue 23): held-out loss against wall-clock for abot's recipes and two PyTorch references.

    python benchmarks/speedrun.py                 # tiny's shape, 10 minutes per run (a few hours in all)
    python benchmarks/speedrun.py --quick         # the whole pipeline at toy sizes in a few minutes
    python benchmarks/speedrun.py --report DIR/speedrun.json   # the table and plot again from a run's JSON

What it fixes, for every run alike:
- Data: the built-in corpus (`stdlib_docs`, this Python's standard-library docstrings) tokenized once by
  `abot data prepare` into shards under --work (default ~/.cache/abot/speedrun), with an 8,000-token BPE
  tokenizer trained once beside them (both reused when present). Held out: the corpus's own eval split
  (5% of modules); the eval windows are up to 64 non-overlapping windows of seq_len + 1 tokens spread evenly
  over it, the same for every run.
- The token stream: the train split cut into non-overlapping windows, shuffled per epoch by the seed, in
  batches of `batch` windows: step k of every run reads the same tokens (faster runs read further).
- The model: tiny's shape (6 x 256, seq 128, batch 16: 2,048 tokens a step) or --size small.
- The clock: --minutes of training per run. It starts after one untimed warm-up step whose result is
  dropped (MLX's compilation; torch.compile on a GPU) and stops while evaluating. --steps N instead counts
  steps (N a run): every run of a recipe then trains the same steps whatever the machine's speed, which
  compares settings per step (a one-run sweep on the wall clock moves with the machine's drift; frameworks and
  options that change the step's time need the wall clock).
- The schedule: abot's `wsd` on that clock (warm-up over the first 5% of the budget, linear decay to lr/10
  over the last 20%), so every run ends its decay at the budget whatever its step time.
- Evaluation: every budget/20 seconds of training clock (--quick: budget/10, on 16 windows) and at the end,
  the mean next-token cross-entropy over the eval windows in float32 (abot's `next_token` loss; the PyTorch
  model's is the same formula, and tests/test_speedrun.py checks that both give the same loss for the same
  weights).
- A quiet machine: each run records the share of the machine's CPU time that other processes took while it
  ran (Linux: /proc/stat's busy time less the run's own) and the script warns above 5%: PyTorch's OpenMP
  threads lost 2-3x of their steps to a niced test suite on the other core, MLX less. (The load average
  cannot tell: the previous run's own threads keep it near 2 for a minute after.)

The recipes, in order: PyTorch AdamW and PyTorch's own `torch.optim.Muon` (blocks' matrices; AdamW on the rest),
each with its lr swept; abot adamw (lr swept) and abot muon_adamw (lr, then `adamw_lr_scale`, then `ns_steps`, then
AdamW's b1, swept); where other Newton-Schulz steps or b1 won, PyTorch's Muon again with them (it has the same
knobs); on the better of abot's two, each architecture option alone; then the options that beat it, together, with
the share of its clock spent in the final decay swept (0.2, 0.4, 0.8; where a longer decay won, the stronger
PyTorch reference again with the same decay); then that combination on shorter clocks (--minutes x 0.6, 0.7, 0.8,
its whole schedule over each), since a recipe that runs its decay over the full budget crosses the target only
inside that decay. A sweep whose best value is at its edge is extended one step. The sweeps of settings that
leave a step's time alone (the learning rates, adamw_lr_scale, b1, the decay) compare per step: their anchor (the
middle lr, scale 1, b1 0.9, decay 0.2) runs on the clock, the other values on a clock of the steps it made, and the
best runs on the clock again for the rows after it; frameworks, ns_steps and the architecture options change the
step's time and compare on the clock. Each run is its own process (MLX fixes its evaluation order at its first
evaluation, see benchmarks/train_speed.py's `bench_in_child`); the PyTorch processes never import abot. The target
is the stronger PyTorch reference's final held-out loss; a recipe's time to it is the training clock at its first
evaluation at or below it (resolution: the evaluation interval).

Then the decisive pair, that reference and abot's best row, runs again --repeats times (default 2), alternating:
identical runs on a shared CPU differ by 10-16% in step count from one minute to the next, which moves the
time-to-target ratio by as much. Each pair is scored against its own reference run, and the report gives every
pair's ratio and their median beside the plan's single verdict, read at the evaluations and, since one can come
up to an interval late, linearly between the evaluation above the target and the first at or below it.

Output under --out: speedrun.md (the tables), speedrun.png (loss against wall-clock, every recipe),
speedrun.json (every evaluation of every run; --resume reuses the runs already in it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 8000
SIZES = {  # (d_model, n_layers, n_heads, seq_len, batch)
    "tiny": (256, 6, 8, 128, 16),  # configs/tiny.yaml's shape and step (2,048 tokens)
    "small": (512, 8, 8, 256, 8),
    "quick": (64, 2, 4, 64, 8),
}
WARMUP_FRACTION, DECAY_FRACTION, MIN_LR_FRACTION = 0.05, 0.2, 0.1
SCHEDULE_GRID = 1000  # the wsd schedule's steps, laid over the clock
WEIGHT_DECAY = 0.02
QUIET = 0.05  # the most CPU share other processes may take during a run before the script warns
ARCH_OPTIONS = {  # abot's speedrun model keys (README "Configuration"), each tried alone
    "relu2": {"ffn_activation": "relu2"},
    "qk_norm": {"qk_norm": True},
    "zero_init_out": {"zero_init_out": True},
    "logit_softcap": {"logit_softcap": 30.0},
    "untied_head": {"tie_embeddings": False},
    "value_embeds": {"value_embeds": True},
}
FULL_GRIDS = {"torch_adamw": [2e-3, 4e-3, 8e-3], "torch_muon": [4e-3, 8e-3, 1.6e-2],
              "abot_adamw": [2e-3, 4e-3, 8e-3], "abot_muon": [4e-3, 8e-3, 1.6e-2], "adamw_lr_scale": [1.0, 4.0, 8.0],
              "ns_steps": [2, 3, 5], "b1": [0.8, 0.9], "decay": [0.2, 0.4, 0.8],
              "clock": [0.6, 0.7, 0.8]}
QUICK_GRIDS = {"torch_adamw": [4e-3, 8e-3], "torch_muon": [8e-3, 1.6e-2],
               "abot_adamw": [4e-3, 8e-3], "abot_muon": [8e-3, 1.6e-2], "adamw_lr_scale": [1.0, 2.0],
               "ns_steps": [3, 5], "b1": [0.8, 0.9], "decay": [0.2, 0.4], "clock": [0.5]}
NS_STEPS = 5  # Muon's Newton-Schulz steps by default, in abot and in torch.optim.Muon
B1 = 0.9  # AdamW's first-moment decay by default, in abot's muon_adamw and in the PyTorch references


@dataclass(frozen=True)
class Setup:
    """What every run shares: the data, the shape, the clock, the evaluation schedule."""

    shards: str
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    batch: int
    budget_s: float
    eval_every_s: float
    eval_windows: int = 64  # held-out windows of seq_len + 1 tokens (at most; a whole number of batches)
    seed: int = 0
    precision: str = "float32"
    step_clock: bool = False  # the clock counts steps, not seconds (budget_s, eval_every_s are then steps)


@dataclass(frozen=True)
class Recipe:
    """One run: a framework ("abot" or "torch"), an optimizer, its peak lr and options, model options."""

    framework: str
    optimizer: str
    lr: float
    optimizer_args: tuple = ()  # sorted (key, value) pairs, hashable
    model: tuple = ()  # sorted (model key, value) pairs: abot's architecture options
    clock: float = 1.0  # the fraction of the budget this run trains for, its whole schedule laid over it
    decay: float = DECAY_FRACTION  # the fraction of its clock spent in wsd's final linear decay
    repeat: int = 0  # > 0: the same run again (only the machine's timing differs), for the repeated pairs
    steps: int = 0  # > 0: a clock of this many steps, not the setup's (a point of a per-step sweep)

    def label(self) -> str:
        """A short human name: 'abot muon_adamw lr 8e-3, adamw_lr_scale 2, +qk_norm, 0.7x clock'."""
        parts = [f"lr {self.lr:g}"] + [f"{k} {v:g}" for k, v in self.optimizer_args]
        options = [name for name, keys in ARCH_OPTIONS.items() if set(keys.items()) <= set(self.model)]
        name = "PyTorch" if self.framework == "torch" else "abot"
        return (f"{name} {self.optimizer} " + ", ".join(parts) + "".join(f", +{o}" for o in options)
                + (f", decay {self.decay:g}" if self.decay != DECAY_FRACTION else "")
                + (f", {self.clock:g}x clock" if self.clock != 1.0 else "")
                + (f", repeat {self.repeat}" if self.repeat else "")
                + (f", {self.steps}-step clock" if self.steps else ""))

    def with_options(self, **options) -> Recipe:
        return replace(self, model=tuple(sorted({**dict(self.model), **options}.items())))

    def with_optimizer_args(self, **args) -> Recipe:
        return replace(self, optimizer_args=tuple(sorted({**dict(self.optimizer_args), **args}.items())))


def recipe_from_dict(d: dict) -> Recipe:
    return Recipe(d["framework"], d["optimizer"], d["lr"], tuple(tuple(p) for p in d["optimizer_args"]),
                  tuple(tuple(p) for p in d["model"]), d.get("clock", 1.0), d.get("decay", DECAY_FRACTION),
                  d.get("repeat", 0), d.get("steps", 0))


# --- data: numpy only (the PyTorch processes must not import abot) ------------------------------------------

def load_split(shards: str | Path, split: str) -> np.ndarray:
    """A split of an `abot data prepare` folder as one int64 array (the built-in corpus is about 0.5M tokens)."""
    folder = Path(shards)
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    files = meta["splits"][split]["files"]
    return np.concatenate([np.fromfile(folder / f, dtype=dtype) for f in files]).astype(np.int64)


def train_batches(tokens: np.ndarray, seq_len: int, batch: int, seed: int) -> Iterator[np.ndarray]:
    """(batch, seq_len + 1) windows, non-overlapping targets, reshuffled each epoch by (seed, epoch): forever."""
    starts = np.arange(0, len(tokens) - seq_len - 1, seq_len)
    for epoch in range(1 << 30):
        order = np.random.default_rng([seed, epoch]).permutation(starts)
        for i in range(0, len(order) - batch + 1, batch):
            yield np.stack([tokens[s:s + seq_len + 1] for s in order[i:i + batch]])


def eval_windows(tokens: np.ndarray, seq_len: int, batch: int, most: int) -> np.ndarray:
    """Up to `most` non-overlapping (seq_len + 1)-token windows spread evenly over the held-out split, as
    (n_batches, batch, seq_len + 1): a whole number of batches, so the eval step keeps one shape."""
    available = len(tokens) // (seq_len + 1)
    n = min(most, available) // batch * batch
    if n == 0:
        raise SystemExit(f"the eval split ({len(tokens)} tokens) holds fewer than {batch} windows of {seq_len + 1}")
    picks = np.linspace(0, available - 1, n).round().astype(int)
    windows = np.stack([tokens[k * (seq_len + 1):(k + 1) * (seq_len + 1)] for k in picks])
    return windows.reshape(n // batch, batch, seq_len + 1)


def held_out(setup: Setup) -> np.ndarray:
    """The setup's evaluation windows, (n_batches, batch, seq_len + 1)."""
    return eval_windows(load_split(setup.shards, "eval"), setup.seq_len, setup.batch, setup.eval_windows)


# --- the schedule on the clock ------------------------------------------------------------------------------

def load_wsd() -> Callable:
    """abot's `wsd` factory, read from abot/schedules.py by path: it is plain Python, and importing the `abot`
    package would tune the process for MLX (BLAS, malloc, evaluation order), which the PyTorch runs must not get."""
    spec = importlib.util.spec_from_file_location("abot_schedules_for_speedrun", ROOT / "abot" / "schedules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.wsd


def clock_schedule(lr: float, budget_s: float, decay: float = DECAY_FRACTION) -> Callable[[float], float]:
    """lr at `elapsed` seconds of training: `wsd` over SCHEDULE_GRID steps laid evenly over the budget, its
    last `decay` of them a linear decay."""
    schedule = load_wsd()(lr, MIN_LR_FRACTION * lr, round(WARMUP_FRACTION * SCHEDULE_GRID), SCHEDULE_GRID,
                          decay_fraction=decay)
    return lambda elapsed: schedule(min(SCHEDULE_GRID - 1, int(elapsed / budget_s * SCHEDULE_GRID)))


# --- one run: the loop both frameworks share ----------------------------------------------------------------

def train_for_budget(step: Callable[[np.ndarray, float], None], evaluate: Callable[[], float], setup: Setup,
                     recipe: Recipe) -> dict:
    """Train until the clock passes the budget; evaluate at 0, every eval_every_s and at the end.

    `step(batch, lr)` returns when the update is done (synchronised); the clock excludes `evaluate`. A non-finite
    held-out loss ends the run early (a diverged learning rate). With `setup.step_clock` each step counts 1: the
    same recipe then trains the same steps on any machine, so settings compare per step, free of its drift.
    """
    batches = train_batches(load_split(setup.shards, "train"), setup.seq_len, setup.batch, setup.seed)
    lr_at = clock_schedule(recipe.lr, setup.budget_s, recipe.decay)
    tokens_per_step = setup.batch * setup.seq_len
    evals = [{"time_s": 0.0, "step": 0, "tokens": 0, "loss": evaluate()}]
    clock, steps, next_eval = 0.0, 0, setup.eval_every_s
    while clock < setup.budget_s and math.isfinite(evals[-1]["loss"]):
        t0 = time.perf_counter()
        step(next(batches), lr_at(clock))
        clock += 1.0 if setup.step_clock else time.perf_counter() - t0
        steps += 1
        if clock >= next_eval or clock >= setup.budget_s:
            evals.append({"time_s": clock, "step": steps, "tokens": steps * tokens_per_step, "loss": evaluate()})
            while next_eval <= clock:
                next_eval += setup.eval_every_s
    return {"evals": evals, "steps": steps, "tokens": steps * tokens_per_step, "final_loss": evals[-1]["loss"]}


def abot_run(recipe: Recipe, setup: Setup) -> dict:
    """One abot run in this process: the compiled step as `abot train` builds it (abot.run.build_step)."""
    import abot  # noqa: F401  (before mlx: abot's platform tuning)
    import mlx.core as mx

    from abot.config import config_from_dict
    from abot.run import build_step, decide_lanes
    from abot.stage import PRETRAIN
    from abot.step import make_eval_step

    cfg = config_from_dict({
        "model": {"vocab_size": VOCAB, "n_layers": setup.n_layers, "d_model": setup.d_model,
                  "n_heads": setup.n_heads, "dropout": 0.0, "max_seq_len": setup.seq_len, **dict(recipe.model)},
        "data": {"seq_len": setup.seq_len},
        "train": {"optimizer": recipe.optimizer, "optimizer_args": dict(recipe.optimizer_args),
                  "weight_decay": WEIGHT_DECAY, "micro_batch_size": setup.batch, "grad_accum_steps": 1,
                  "gradient_checkpointing": False, "compile": True, "max_grad_norm": 1.0,
                  "precision": setup.precision, "seed": setup.seed}})
    lanes = decide_lanes(cfg.train)  # before MLX's first evaluation
    parts = build_step(cfg, PRETRAIN, lanes)
    state = parts.fresh_state(parts.model.init(mx.random.key(setup.seed)), mx.random.key(setup.seed + 1),
                              setup.precision)
    eval_step = make_eval_step(parts.model, parts.loss, True, lanes)
    windows = [mx.array(b.astype(np.int32)) for b in held_out(setup)]
    held = {"state": state}

    def step(batch: np.ndarray, lr: float) -> None:
        held["state"], metrics = parts.step(held["state"], mx.array(batch.astype(np.int32))[None], mx.array(lr))
        mx.eval(held["state"], metrics)

    def evaluate() -> float:
        losses = [eval_step(held["state"]["params"], w)[0] for w in windows]
        return mx.mean(mx.stack(losses)).item()

    first = next(train_batches(load_split(setup.shards, "train"), setup.seq_len, setup.batch, setup.seed))
    # Warm-up: compiles the step; its result is dropped (the state is a value, so nothing else changes).
    mx.eval(parts.step(state, mx.array(first.astype(np.int32))[None], mx.array(0.0)))
    return {**train_for_budget(step, evaluate, setup, recipe), "lanes": lanes}


def torch_run(recipe: Recipe, setup: Setup) -> dict:
    """One PyTorch run in this process: benchmarks/torch_reference.py's model; eager on a CPU, compiled on CUDA."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch_reference as ref

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(setup.seed)
    params = ref.init_params(VOCAB, setup.d_model, setup.n_layers, device=device)
    opts = ref.make_optimizers(params, recipe.optimizer, recipe.lr, WEIGHT_DECAY, fused=cuda,
                               **dict(recipe.optimizer_args))
    cos, sin = (t.to(device) for t in ref.rope_tables(setup.seq_len, setup.d_model // setup.n_heads, 10000.0))

    def loss_of(tokens):
        return ref.next_token_loss(params, tokens, setup.n_layers, setup.n_heads, cos, sin)

    loss_fn = torch.compile(loss_of) if cuda else loss_of
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    windows = [torch.from_numpy(b).to(device) for b in held_out(setup)]

    def step(batch: np.ndarray, lr: float) -> None:
        loss = loss_fn(torch.from_numpy(batch).to(device))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
            for group in opt.param_groups:
                group["lr"] = lr
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        for opt in opts:
            opt.step()
        sync()

    def evaluate() -> float:
        with torch.no_grad():
            return torch.stack([loss_fn(w) for w in windows]).mean().item()

    first = next(train_batches(load_split(setup.shards, "train"), setup.seq_len, setup.batch, setup.seed))
    loss_fn(torch.from_numpy(first).to(device)).backward()  # warm-up (torch.compile on a GPU); gradients dropped
    for p in params.values():
        p.grad = None
    return {**train_for_budget(step, evaluate, setup, recipe), "threads": torch.get_num_threads()}


def busy_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has spent busy since boot (Linux's /proc/stat), else None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest time is inside user


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def others_share(busy_before: float | None, busy_after: float | None, own_cpu_s: float, wall_s: float) -> float | None:
    """The fraction of the machine's CPU time (all cores over `wall_s`) that processes other than the run took."""
    if busy_before is None or busy_after is None or wall_s <= 0:
        return None
    return max(0.0, busy_after - busy_before - own_cpu_s) / (wall_s * (os.cpu_count() or 1))


def run_in_child(recipe: Recipe, setup: Setup) -> dict:
    """One run in a fresh process (MLX fixes its evaluation order at its first evaluation; PyTorch never shares
    a process with abot's tuning); its result, or {"error": ...} when the process failed. `others_cpu` is the
    share of the machine that other processes took meanwhile (None where /proc/stat is missing)."""
    job = json.dumps({"recipe": asdict(recipe), "setup": asdict(setup)})
    t0, busy0, own0 = time.perf_counter(), busy_cpu_seconds(), children_cpu_seconds()
    out = subprocess.run([sys.executable, __file__, "--child", job], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    seen = {"process_s": wall, "others_cpu": others_share(busy0, busy_cpu_seconds(), children_cpu_seconds() - own0,
                                                          wall)}
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:] or ["exit status " + str(out.returncode)],
                "final_loss": math.inf, "evals": [], **seen}
    return {**json.loads(out.stdout.strip().splitlines()[-1]), **seen}


def child_main(job: str) -> None:
    spec = json.loads(job)
    recipe, setup = recipe_from_dict(spec["recipe"]), Setup(**spec["setup"])
    if recipe.steps:  # the same number of evaluations over its steps
        setup = replace(setup, step_clock=True, budget_s=recipe.steps,
                        eval_every_s=recipe.steps * setup.eval_every_s / setup.budget_s)
    setup = replace(setup, budget_s=setup.budget_s * recipe.clock)  # same evaluation interval
    result = (abot_run if recipe.framework == "abot" else torch_run)(recipe, setup)
    print(json.dumps(result))


# --- the plan: sweeps, options, the combination -------------------------------------------------------------

def score(result: dict) -> float:
    """A run's final held-out loss; infinite when it diverged or failed."""
    loss = result.get("final_loss", math.inf)
    return loss if loss is not None and math.isfinite(loss) else math.inf


class Runner:
    """Runs recipes once each (in children), keeps every result under its recipe, and saves as it goes."""

    def __init__(self, setup: Setup, save: Callable[[], None], known: dict | None = None):
        self.setup, self.save = setup, save
        self.runs: dict[Recipe, dict] = dict(known or {})
        self.sweeps: list[dict] = []

    def __call__(self, recipe: Recipe) -> dict:
        if recipe not in self.runs:
            print(f"  {recipe.label()} ...", end="", flush=True)
            self.runs[recipe] = run_in_child(recipe, self.setup)
            r = self.runs[recipe]
            busy = (r.get("others_cpu") or 0.0) > QUIET
            print(f" final held-out loss {score(r):.3f} after {r.get('steps', 0)} steps"
                  + (f"  (other processes took {r['others_cpu']:.0%} of the CPUs meanwhile: not a quiet machine)"
                     if busy else "")
                  + (f"  FAILED: {r['error']}" if "error" in r else ""), flush=True)
            self.save()
        return self.runs[recipe]

    def sweep(self, name: str, grid: list[float], make: Callable[[float], Recipe], most: float = math.inf,
              anchor: float | None = None) -> Recipe:
        """Run `make(v)` for v in `grid`; extend one step past an edge holding the best (rounded, at least 1,
        for a grid of integers; not past `most`); the best recipe, run on the setup's clock.

        With `anchor` (a value of the grid; for settings that leave a step's time as it is) the other values run
        on a clock of the steps the anchor's run made on the setup's: the sweep then compares per step. On a wall
        clock, identical runs here differ by 10-16% in steps, a step is worth about 0.006 of loss at the end,
        and a one-run sweep read off the wall clock chose b1 0.9, which loses per step (README, "Speedrun")."""
        values = sorted(grid)
        anchored = self(make(anchor)) if anchor is not None and not self.setup.step_clock else {}
        steps = anchored.get("steps", 0) if math.isfinite(score(anchored)) else 0  # a diverged anchor: the clock

        def point(v: float) -> Recipe:
            return replace(make(v), steps=steps) if steps and v != anchor else make(v)

        losses = {v: score(self(point(v))) for v in values}
        best, extended = min(values, key=losses.get), None
        if len(values) > 1 and best in (values[0], values[-1]):
            ratio = values[1] / values[0] if best == values[0] else values[-1] / values[-2]
            extended = best / ratio if best == values[0] else best * ratio
            if all(isinstance(v, int) for v in values):
                extended = max(1, round(extended))
            if extended not in losses and extended <= most:
                losses[extended] = score(self(point(extended)))
                best = min(losses, key=losses.get)
            else:
                extended = None
        self.sweeps.append({"name": name, "points": [[v, losses[v], asdict(point(v))] for v in sorted(losses)],
                            "best": best, "extended_to": extended, "steps": steps or None,
                            "best_at_edge": best in (min(losses), max(losses)) and len(losses) > 1})
        self(make(best))  # a per-step point that won: its run on the clock, for the rows and the sweeps after
        return make(best)


def run_plan(runner: Runner, grids: dict) -> dict[str, Recipe]:
    """Every recipe of issue 23, in order; the rows of the table, name -> recipe. Sweeps of settings that leave
    a step's time alone (learning rates, b1, the decay) compare per step, around an anchor run on the clock;
    frameworks, ns_steps and the architecture options change the step's time and compare on the clock."""
    rows: dict[str, Recipe] = {}

    def lr_sweep(name: str, grid: list[float], make: Callable[[float], Recipe]) -> Recipe:
        return runner.sweep(f"{name} lr", grid, make, anchor=sorted(grid)[len(grid) // 2])

    rows["PyTorch AdamW"] = lr_sweep("PyTorch AdamW", grids["torch_adamw"], lambda lr: Recipe("torch", "adamw", lr))
    rows["PyTorch Muon + AdamW"] = lr_sweep("PyTorch Muon", grids["torch_muon"], lambda lr: Recipe("torch", "muon", lr))
    rows["abot adamw"] = lr_sweep("abot adamw", grids["abot_adamw"], lambda lr: Recipe("abot", "adamw", lr))
    muon = lr_sweep("abot muon_adamw", grids["abot_muon"],  # at adamw_lr_scale 1, the scale sweep's 1
                    lambda lr: Recipe("abot", "muon_adamw", lr).with_optimizer_args(adamw_lr_scale=1.0))
    scaled = runner.sweep("abot muon_adamw adamw_lr_scale", grids["adamw_lr_scale"],
                          lambda s: muon.with_optimizer_args(adamw_lr_scale=s), anchor=1.0)
    # Fewer Newton-Schulz steps: cheaper steps, rougher orthogonalisation. The default is the scale sweep's run.
    ns = runner.sweep("abot muon_adamw ns_steps", grids["ns_steps"],
                      lambda n: scaled if n == NS_STEPS else scaled.with_optimizer_args(ns_steps=n))
    # AdamW's b1 on the embeddings and gains (modded-nanogpt runs 0.8): a shorter memory for a short run.
    rows["abot muon_adamw"] = runner.sweep("abot muon_adamw b1", grids["b1"], lambda b: ns if b == B1
                                           else ns.with_optimizer_args(b1=b), most=0.99, anchor=B1)
    # PyTorch's Muon recipe has both knobs: where abot's sweeps moved one, the reference runs with it too (one
    # knob more per row, at its own best lr); the stronger of its rows sets the target.
    name, reference = "PyTorch Muon + AdamW", rows["PyTorch Muon + AdamW"]
    tuned = dict(rows["abot muon_adamw"].optimizer_args)
    for key, default in (("ns_steps", NS_STEPS), ("b1", B1)):
        value = tuned.get(key, default)
        if value != default:
            name, reference = f"{name}, {key} {value:g}", reference.with_optimizer_args(**{key: value})
            rows[name] = reference
            runner(reference)
    base = min((rows["abot adamw"], rows["abot muon_adamw"]), key=lambda r: score(runner(r)))
    helped = {}
    for name, keys in ARCH_OPTIONS.items():
        rows[f"abot + {name}"] = base.with_options(**keys)
        if score(runner(rows[f"abot + {name}"])) < score(runner(base)):
            helped.update(keys)
    # The options that beat the base alone, together (one of them: that run again; none: the base).
    combination = base.with_options(**helped)
    # The share of the clock in the final decay (the default is the combination's own run); where a longer one
    # wins, the stronger PyTorch reference runs with it too, so the target moves with the schedule.
    rows["abot best combination"] = runner.sweep("abot best combination decay", grids["decay"],
                                                 lambda d: replace(combination, decay=d), most=1.0,
                                                 anchor=DECAY_FRACTION)
    decay = rows["abot best combination"].decay
    if decay != DECAY_FRACTION:
        ref = min((n for n, r in rows.items() if r.framework == "torch"), key=lambda n: score(runner(rows[n])))
        rows[f"{ref}, decay {decay:g}"] = replace(rows[ref], decay=decay)
        runner(rows[f"{ref}, decay {decay:g}"])
    # Time to quality as speedruns measure it: a recipe picks its length. With the schedule over the whole budget
    # every recipe crosses the target inside its own final decay; on a shorter clock the decay comes sooner.
    for fraction in grids["clock"]:
        name = f"abot best combination, {fraction:g}x clock"
        rows[name] = replace(rows["abot best combination"], clock=fraction)
        runner(rows[name])
    return rows


def run_repeats(runner: Runner, report: dict, repeats: int) -> dict:
    """The stronger reference's row and abot's best row again, `repeats` times, alternating; with the plan's own
    runs as the first pair: {"reference": row name, "abot": row name, "pairs": [[reference result, abot's]]}."""
    rows, results = report["rows"], report["results"]
    ref, target = reference_and_target(rows, results)
    best = best_abot(rows, results, target)
    pairs = [[results[ref], results[best]]]
    for i in range(1, repeats + 1):
        pairs.append([runner(replace(recipe_from_dict(rows[name]), repeat=i)) for name in (ref, best)])
    return {"reference": ref, "abot": best, "pairs": pairs}


# --- the report ---------------------------------------------------------------------------------------------

def time_to(result: dict, target: float) -> float | None:
    """The training clock at the first evaluation at or below `target`; None if never."""
    return next((e["time_s"] for e in result.get("evals", []) if e["loss"] <= target), None)


def crossing_time(result: dict, target: float) -> float | None:
    """When the held-out loss reached `target`, read linearly between the evaluation above it and the first at or
    below it: `time_to` rounds up to the next evaluation, up to budget/20 late. None if never."""
    evals = result.get("evals", [])
    for i, e in enumerate(evals):
        if e["loss"] <= target:
            if i == 0:
                return e["time_s"]
            b = evals[i - 1]
            return b["time_s"] + (b["loss"] - target) / (b["loss"] - e["loss"]) * (e["time_s"] - b["time_s"])
    return None


def reference_and_target(rows: dict, results: dict) -> tuple[str, float]:
    """The stronger PyTorch reference (lower final held-out loss) and its final loss: the target."""
    torch_rows = [name for name, r in rows.items() if r["framework"] == "torch"]
    ref = min(torch_rows, key=lambda n: score(results[n]))
    return ref, score(results[ref])


def best_abot(rows: dict, results: dict, target: float) -> str:
    """abot's best row: the fastest to the target; the lowest final loss when none reaches it."""
    abot_rows = [name for name, r in rows.items() if r["framework"] == "abot"]
    reached = [n for n in abot_rows if time_to(results[n], target) is not None]
    if reached:
        return min(reached, key=lambda n: time_to(results[n], target))
    return min(abot_rows, key=lambda n: score(results[n]))


def fmt_share(result: dict) -> str:
    """The CPU share other processes took during a run, flagged above QUIET; '-' where it was not measured."""
    share = result.get("others_cpu")
    return "-" if share is None else f"{share:.0%}" + (" (busy)" if share > QUIET else "")


def fmt_ratio(ratio: float) -> str:
    return "never" if math.isinf(ratio) else f"{ratio:.2f}x"


def clock_unit(setup: dict) -> str:
    return "steps" if setup.get("step_clock") else "s"


def fmt_time(t: float | None, unit: str = "s") -> str:
    return "never" if t is None else f"{t:.0f} {unit}" if t >= 10 or unit != "s" else f"{t:.1f} {unit}"


def results_table(report: dict) -> list[str]:
    """The main table: one row per recipe, the target, abot's best against the reference."""
    rows, results, unit = report["rows"], report["results"], clock_unit(report["setup"])
    ref, target = reference_and_target(rows, results)
    ref_time = time_to(results[ref], target)
    lines = [f"Target: {target:.3f}, the final held-out loss of {ref} ({Recipe(**_as_tuples(rows[ref])).label()}).",
             "", "| recipe | settings | steps | tokens | final held-out loss | reaches the target at "
             "| vs the reference | others' CPU |", "|---|---|---|---|---|---|---|---|"]
    for name, recipe in rows.items():
        r, t = results[name], time_to(results[name], target)
        ratio = f"{t / ref_time:.2f}x" if t is not None and ref_time else "-"
        lines.append(f"| {name} | {Recipe(**_as_tuples(recipe)).label()} | {r.get('steps', 0):,} | "
                     f"{r.get('tokens', 0):,} | {score(r):.3f} | {fmt_time(t, unit)} | {ratio} | {fmt_share(r)} |")
    best = best_abot(rows, results, target)
    t = time_to(results[best], target)
    measure = "steps (a per-step comparison)" if unit == "steps" else "wall-clock (issue 23's target: <= 0.60x)"
    verdict = (f"{t / ref_time:.2f}x the reference's {measure}" if t is not None
               and ref_time else f"does not reach it (final {score(results[best]):.3f})")
    return lines + ["", f"abot's best, {best}: {verdict}."]


def pair_ratio(reference: dict, abot: dict, at: Callable[[dict, float], float | None] = time_to) -> float:
    """abot's time to the reference run's final loss over the reference's own, both read by `at`; inf where abot
    never reaches it."""
    target = score(reference)
    t, ref_t = at(abot, target), at(reference, target)
    return t / ref_t if t is not None and ref_t else math.inf


def repeats_table(report: dict) -> list[str]:
    """The repeated pairs: each reference run's final loss and steps, when abot's run of the pair reached it."""
    rep = report.get("repeats")
    if not rep or len(rep["pairs"]) < 2:
        return []
    lines = [f"The decisive pair again, alternating: {rep['reference']}, then {rep['abot']}; each pair against "
             "its own reference run (pair 1: the plan's runs).", "",
             "| pair | reference final | reference steps | abot steps | abot reaches it at | vs the reference "
             "| read between evaluations |", "|---|---|---|---|---|---|---|"]
    ratios, unit = [pair_ratio(ref, abot) for ref, abot in rep["pairs"]], clock_unit(report["setup"])
    between = [pair_ratio(ref, abot, crossing_time) for ref, abot in rep["pairs"]]
    for i, ((ref, abot), ratio, linear) in enumerate(zip(rep["pairs"], ratios, between), 1):
        lines.append(f"| {i} | {score(ref):.3f} | {ref.get('steps', 0)} | {abot.get('steps', 0)} | "
                     f"{fmt_time(time_to(abot, score(ref)), unit)} | {fmt_ratio(ratio)} | {fmt_ratio(linear)} |")
    return lines + ["", f"Median of the {len(ratios)} pairs: {fmt_ratio(statistics.median(ratios))} "
                        f"(issue 23's target: <= 0.60x); read between evaluations: "
                        f"{fmt_ratio(statistics.median(between))}."]


def sweeps_table(report: dict) -> list[str]:
    lines = ["| sweep | value | final held-out loss | |", "|---|---|---|---|"]
    for s in report["sweeps"]:
        for value, loss, _ in s["points"]:
            edge = "" if not s["best_at_edge"] else " (at the edge after extending)" if s["extended_to"] is not None \
                else " (at the edge: extending it would pass the limit)"
            mark = f"best{edge}" if value == s["best"] else "extension" if value == s["extended_to"] else ""
            per_step = f" (per step: {s['steps']} steps)" if s.get("steps") else ""
            lines.append(f"| {s['name']}{per_step} | {value:g} | {loss:.3f} | {mark} |")
    return lines


def _as_tuples(d: dict) -> dict:
    return {**d, "optimizer_args": tuple(tuple(p) for p in d["optimizer_args"]),
            "model": tuple(tuple(p) for p in d["model"])}


def plot(report: dict, path: Path) -> None:
    """Held-out loss against the training clock, every row on one figure; the target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, results = report["rows"], report["results"]
    ref, target = reference_and_target(rows, results)
    fig, ax = plt.subplots(figsize=(10, 6))
    for i, (name, recipe) in enumerate(rows.items()):
        evals = results[name].get("evals", [])
        style = "--" if recipe["framework"] == "torch" else "-" if i < 10 else "-."  # tab10 repeats after 10
        ax.plot([e["time_s"] for e in evals], [e["loss"] for e in evals], style, marker=".", label=name,
                color=plt.cm.tab10(i % 10))
    if math.isfinite(target):
        ax.axhline(target, color="gray", linestyle=":", label=f"target {target:.3f} ({ref})")
    losses = [e["loss"] for n in rows for e in results[n].get("evals", [])[1:] if math.isfinite(e["loss"])]
    if losses:
        ax.set_ylim(min(losses) - 0.05, np.percentile(losses, 90) + 0.2)
    s = report["setup"]
    unit = clock_unit(s)
    ax.set(xlabel="training steps" if unit == "steps" else "training wall-clock (s)", ylabel="held-out loss",
           title=f"Time to quality: d{s['d_model']}x{s['n_layers']}, seq {s['seq_len']}, batch {s['batch']}, "
                 f"{s['budget_s']:g} {unit} per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    """speedrun.md and speedrun.png from the report's JSON (also `--report`)."""
    s = report["setup"]
    unit = clock_unit(s)
    head = [f"# Speedrun: d{s['d_model']}x{s['n_layers']}, {s['n_heads']} heads, seq {s['seq_len']}, batch "
            f"{s['batch']}, vocab {VOCAB}, {s['budget_s']:g} {unit} of training per run, held-out loss every "
            f"{s['eval_every_s']:g} {unit}" + (" (a quick check, not a result)" if report.get("quick") else ""), ""]
    repeats = repeats_table(report)
    text = "\n".join(head + results_table(report) + ([""] + repeats if repeats else []) + ["", "Sweeps:", ""]
                     + sweeps_table(report)) + "\n"
    (out / "speedrun.md").write_text(text)
    plot(report, out / "speedrun.png")
    print(text)
    print(f"Wrote {out / 'speedrun.md'}, {out / 'speedrun.png'}, {out / 'speedrun.json'}")


# --- setup and main -----------------------------------------------------------------------------------------

def prepare_data(work: Path) -> Path:
    """The tokenizer and shards under `work`, made once by `abot data prepare` (in its own process)."""
    shards = work / f"shards-{VOCAB // 1000}k"
    if (shards / "meta.json").is_file():
        return shards
    work.mkdir(parents=True, exist_ok=True)
    config = work / "data.yaml"
    config.write_text(f"model: {{vocab_size: {VOCAB}, n_layers: 1, d_model: 64, n_heads: 1}}\n"
                      "data: {source: stdlib_docs, seq_len: 64}\n"
                      f"train: {{tokenizer_path: {work / f'tokenizer-{VOCAB // 1000}k.model'}, seed: 0}}\n")
    subprocess.run([sys.executable, "-m", "abot", "data", "prepare", str(config), "--out", str(shards), "--force"],
                   check=True)
    return shards


def save_json(path: Path, runner: Runner, rows: dict, quick: bool, repeats: dict | None = None) -> None:
    report = {"setup": asdict(runner.setup), "quick": quick, "vocab": VOCAB,
              "runs": [{"recipe": asdict(r), **res} for r, res in runner.runs.items()],
              "sweeps": runner.sweeps, "rows": {n: asdict(r) for n, r in rows.items()},
              "results": {n: runner.runs[r] for n, r in rows.items() if r in runner.runs},
              **({"repeats": repeats} if repeats else {})}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def known_runs(path: Path, setup: Setup) -> dict:
    """The runs a previous invocation saved in `path` with the same setup (for --resume)."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if {"step_clock": False, **old.get("setup", {})} != asdict(setup):  # runs from before --steps: the wall clock
        print(f"{path}: another setup; not resuming from it")
        return {}
    return {recipe_from_dict(run.pop("recipe")): run for run in old["runs"] if "error" not in run}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--minutes", type=float, default=None, help="training clock per run (default 10; quick 0.1)")
    parser.add_argument("--steps", type=int, default=None,
                        help="a clock of this many steps a run instead of minutes: settings compared per step, "
                             "free of the machine's drift (not frameworks: their step times differ); no repeated pairs")
    parser.add_argument("--quick", action="store_true", help="toy shape (d64 x2, seq 64), 6 s runs, 2-point sweeps")
    parser.add_argument("--work", default="~/.cache/abot/speedrun", help="where the tokenizer and shards are kept")
    parser.add_argument("--out", default=None, help="output folder (default: WORK/out-SIZE or WORK/out-quick)")
    parser.add_argument("--precision", default="float32", help="float32; bfloat16 on a GPU")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of the decisive pair (the reference, abot's best) after the plan, alternating")
    parser.add_argument("--resume", action="store_true", help="reuse the runs already in OUT/speedrun.json")
    parser.add_argument("--report", help="regenerate the table and plot from a speedrun.json, running nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one run, JSON in, JSON out
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        return child_main(args.child)
    if args.report:
        path = Path(args.report)
        return write_report(json.loads(path.read_text()), path.parent)
    work = Path(args.work).expanduser()
    label = "quick" if args.quick else args.size
    out = Path(args.out) if args.out else work / f"out-{label}"
    out.mkdir(parents=True, exist_ok=True)
    d, layers, heads, seq, batch = SIZES[label]
    if args.steps is not None and (args.minutes is not None or args.steps < 1):
        raise SystemExit("--steps N (N >= 1) replaces --minutes' clock by N steps a run: give one of the two")
    budget = args.steps or 60 * (args.minutes if args.minutes is not None else 0.1 if args.quick else 10.0)
    evals, windows = (10, 16) if args.quick else (20, 64)  # the quick check evaluates less (its runs are short)
    setup = Setup(str(prepare_data(work)), d, layers, heads, seq, batch, budget, budget / evals, windows,
                  precision=args.precision, step_clock=args.steps is not None)
    path, rows = out / "speedrun.json", {}
    runner = Runner(setup, lambda: save_json(path, runner, rows, args.quick),
                    known_runs(path, setup) if args.resume else None)
    grids = QUICK_GRIDS if args.quick else FULL_GRIDS
    # adamw_lr_scale 1, ns_steps 5 and b1 0.9 are runs of the sweeps before them; decay 0.2 is the combination's run
    n_repeats = 0 if setup.step_clock else args.repeats  # on a step clock a run again is the same run
    n = (sum(len(g) for k, g in grids.items() if k != "clock") - 3 + len(ARCH_OPTIONS) + len(grids["clock"])
         + 2 * n_repeats)
    length = ("" if setup.step_clock else f": about {n * budget / 60:.0f} minutes of training plus start-up "
              "and evaluation")
    print(f"Speedrun {label}: d{d}x{layers}, seq {seq}, batch {batch}, {budget:g} {clock_unit(asdict(setup))} per "
          f"run; about {n} runs (up to 7 more where a per-step sweep's best runs on the clock, more where a sweep "
          f"is extended){length}")
    rows.update(run_plan(runner, grids))
    save_json(path, runner, rows, args.quick)
    repeats = run_repeats(runner, json.loads(path.read_text()), n_repeats)
    save_json(path, runner, rows, args.quick, repeats)
    write_report(json.loads(path.read_text()), out)


if __name__ == "__main__":
    main()
