"""Build a run once from its config: the model, its state, the data, the compiled step, evaluation and saving.

`abot train`, `sft` and `dpo` (abot.train) loop over what `build_run` returns. `abot verify --measure` and the
benchmarks build their step with `build_step`, the same function, so the step they measure is the one that
trains. Data flows config -> registry lookups (abot.build) -> pure functions -> the compiled step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

from abot.adapters.tree import adapter_role, attach, describe, freeze, init_adapters
from abot.build import build_adapter, build_model, build_optimizer, build_schedule, ensure_tokenizer
from abot.checkpoint import latest_checkpoint, save_rotating
from abot.config import Config, TrainConfig
from abot.guards import World
from abot.models.transformer import count_params
from abot.platform.lanes import parallel_lanes
from abot.restore import (Opened, base_identity, check_no_damaged_checkpoints, check_resumable, load_init_params,
                          open_checkpoint)
from abot.stage import Stage, StageData, check_stage, make_stage_eval, stage_data, stage_loss
from abot.step import DTYPES, init_state, make_train_step
from abot.update import checkpoint_state, step_state, update_layout


def decide_lanes(train: TrainConfig, world_size: int = 1, max_lanes: int | None = None) -> int:
    """How many parallel lanes the train step splits a micro-batch into on this machine (abot.platform.lanes).

    Call it before MLX's first evaluation, which fixes the evaluation order. Data-parallel ranks already share
    the cores, and a checkpointed step keeps its memory saving only on one stream: one lane for both.
    """
    one = world_size > 1 or train.gradient_checkpointing
    return parallel_lanes(train.micro_batch_size, max_lanes=1 if one else max_lanes)


@dataclass
class StepParts:
    """The registered pieces of a run and the compiled train step over them."""

    model: Any
    optimizer: Any
    schedule: Callable[[int], float]
    loss: Callable
    step: Callable  # (state, batch, lr) -> (state, metrics), compiled; with adapters (state, batch, lr, frozen)
    adapter: Any = None  # the adapter kind (abot.adapters.kind.AdapterKind); None: full fine-tuning
    combine: Callable | None = None  # (frozen, adapters, key) -> the tree the model sees, with adapters
    layout: Callable | None = None  # params -> the flat update's layout (abot.update.update_layout); None: per leaf

    def step_state(self, state: dict) -> dict:
        """A per-tensor training state (fresh, or a checkpoint's) in the form the step carries between steps."""
        return step_state(state, self.layout)

    def fresh_state(self, params: dict, key: mx.array, precision: str = "float32") -> dict:
        """`abot.step.init_state` for these parts' optimizer, in the form the step carries between steps."""
        return self.step_state(init_state(params, self.optimizer, key, precision))

    def checkpoint_state(self, state: dict) -> dict:
        """The step's state in the per-tensor form a checkpoint holds, whichever update wrote it."""
        return checkpoint_state(state, self.layout)

    def with_frozen(self, frozen: dict | None) -> "StepParts":
        """These parts with the frozen base bound into the step: `step(state, batch, lr)` either way."""
        if frozen is None:
            return self
        step = self.step
        return dataclasses.replace(self, step=lambda state, batch, lr: step(state, batch, lr, frozen))


def build_step(cfg: Config, stage: Stage, lanes: int = 1, group=None, flat_update: bool = True) -> StepParts:
    """Registry lookups for `cfg` (a typo'd name fails here, before any slow work), then the train step.

    With an adapter section the step trains the adapters only, the base its frozen argument (abot.step).
    `flat_update` False keeps an elementwise optimizer's update per leaf (benchmarks compare the two)."""
    t = cfg.train
    model, adapter = build_model(cfg), build_adapter(cfg)
    combine = None if adapter is None else (lambda frozen, params, key: attach(frozen, params, adapter, key))
    # Adapter leaves are not the model's own: they have their own roles (all AdamW's).
    optimizer = build_optimizer(cfg, model if adapter is None else model._replace(param_role=adapter_role))
    schedule, loss = build_schedule(cfg), stage_loss(cfg, stage)
    step = make_train_step(model, loss, optimizer, grad_accum_steps=t.grad_accum_steps, max_grad_norm=t.max_grad_norm,
                           precision=t.precision, compile=t.compile, group=group, lanes=lanes, combine=combine,
                           flat_update=flat_update)
    return StepParts(model, optimizer, schedule, loss, step, adapter, combine,
                     update_layout(optimizer, lanes, flat_update))


def trainable(cfg: Config, parts: StepParts, base: dict, key: mx.array,
              evaluate: bool = True) -> tuple[dict, dict | None]:
    """(what trains, the frozen base): the whole model and None, or with adapters fresh adapters and the base
    frozen in compute precision (quantized for QLoRA), evaluated here (`evaluate`) so that the float copy it
    came from can be freed."""
    if parts.adapter is None:
        return base, None
    frozen = freeze(base, cfg.adapter, DTYPES[cfg.train.precision])
    if evaluate:
        mx.eval(frozen)
    return init_adapters(frozen, parts.adapter, cfg.adapter, key), frozen


@dataclass
class Run:
    """Everything the training loop reads, built once."""

    cfg: Config
    stage: Stage
    world: World
    lanes: int
    parts: StepParts
    tokenizer: Any
    start_step: int
    data: StageData
    evaluate: Callable[[dict], dict]  # params -> held-out metrics ({} without eval data)
    tokens_per_step: int
    n_params: int
    resumed_from: Path | None
    init_from: Path | None
    config_changes: list[str]  # safe config changes since the resumed checkpoint
    start_state: dict | None = field(default=None, repr=False)
    base: dict | None = None  # adapters: the frozen base's identity {"path", "sha256"} (abot.restore.base_identity)

    def take_state(self) -> dict:
        """The state the run starts from, handed over once. The run keeps no reference to it, so as the loop
        rebinds its state each step, the previous one is freed (a second copy of a large state is not small)."""
        state, self.start_state = self.start_state, None
        if state is None:
            raise RuntimeError("the run's starting state was already taken")
        return state

    def save(self, state: dict, step: int) -> Path | None:
        """Write `state` as the checkpoint of `step` (rank 0 only) and rotate old ones out."""
        if self.world.rank != 0:
            return None
        t = self.cfg.train
        meta = {"config": self.cfg.to_dict(), "tokenizer_sha256": self.tokenizer.sha256,
                "data_state": self.data.stream.state(), "n_params": self.n_params, "stage": self.stage.name,
                **({"base": self.base} if self.base else {})}
        return save_rotating(Path(t.save_dir), {"state": self.parts.checkpoint_state(state)}, step, meta, t.ckpt_keep)


def resume_point(cfg: Config, resume: bool, say: Callable[[str], None]) -> Opened | None:
    """The checkpoint to continue from: train.checkpoint_path (a file or a run folder), else with `resume`
    the newest in save_dir; None to start from step 0."""
    t = cfg.train
    if t.checkpoint_path:
        return open_checkpoint(t.checkpoint_path, "train.checkpoint_path")
    if not resume:
        return None
    found = latest_checkpoint(t.save_dir)
    if found is None:
        check_no_damaged_checkpoints(Path(t.save_dir))
        say(f"No checkpoint in {t.save_dir}: starting from step 0.")
        return None
    return open_checkpoint(found)


def build_run(cfg: Config, stage: str | Stage = "pretrain", resume: bool = False, *, world: World = World(),
              lanes: int = 1, say: Callable[[str], None] = print) -> Run:
    """The run `cfg` describes, with the state it starts from (step 0, or resumed: `Run.take_state`).

    `lanes`: from `decide_lanes`, chosen before MLX's first evaluation.
    """
    stage = check_stage(stage, cfg)
    t, d = cfg.train, cfg.data
    parts = build_step(cfg, stage, lanes, world.group)
    tokenizer = ensure_tokenizer(cfg, say)
    init_key, key = mx.random.split(mx.random.key(t.seed))
    # train.init_from: weights only (fresh optimizer state and schedule); also DPO's frozen reference model.
    init_params, init_path = (load_init_params(cfg, tokenizer, parts.model) if t.init_from
                              else (parts.model.init(init_key), None))
    params, frozen = trainable(cfg, parts, init_params, init_key)
    base = base_identity(init_path) if frozen is not None else None
    if frozen is not None:
        say(describe(cfg.adapter, params, frozen))
    state, start, data_state, changes = init_state(params, parts.optimizer, key, t.precision), 0, None, []
    opened = resume_point(cfg, resume, say)
    if opened is not None:
        changes = check_resumable(opened, cfg, tokenizer, fresh_state=state, base=base)
        state, start, data_state = opened.ckpt.trees["state"], opened.step, opened.meta.get("data_state")
    state = parts.step_state(state)
    # With adapters the reference model (DPO) is the frozen base itself, adapters off: no second copy.
    data = stage_data(stage, cfg, tokenizer, parts.model, reference=init_params if frozen is None else frozen,
                      data_state=data_state, say=say, lanes=lanes)
    evaluate = make_stage_eval(stage, parts.model, parts.loss, data.eval_batches, t.compile, lanes, parts.combine,
                               frozen)
    parts = parts.with_frozen(frozen)
    # The effective batch spans every rank: world x grad_accum x micro_batch sequences per update.
    tokens_per_step = world.size * t.grad_accum_steps * t.micro_batch_size * d.seq_len * stage.sequences_per_example
    return Run(cfg, stage, world, lanes, parts, tokenizer, start, data, evaluate, tokens_per_step,
               count_params(state["params"]), opened and opened.path, init_path, changes, start_state=state, base=base)
