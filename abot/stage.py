"""A training stage as one value: what `abot train`, `sft` and `dpo` train on, with which loss, and how they score.

A stage names the kind of batch its data source must produce (text, conversations or preference pairs), its
default loss, and how its held-out evaluation reads. Any registered loss whose `batch_kind` matches a stage
trains in it (a plugin's loss too, `train.loss`). Whether it needs a frozen reference model is the loss's own
property (`needs_reference`: DPO and IPO do, ORPO and SimPO do not). `stage_data` builds the batch stream, the
fixed evaluation batches and `prepare` (numpy batch -> what the train step takes) for every stage; `evaluate`
is the one evaluation, used by training and by `abot eval` alike.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_map

from abot import registry
from abot.build import build_documents
from abot.config import Config
from abot.data.loader import data_rank, eval_data, train_stream
from abot.data.pipeline import rank_documents
from abot.errors import AbotError
from abot.finetune.batches import ENCODERS, OVERLONG, DataStats, ExampleStream, describe, example_eval_batches
from abot.finetune.reference import add_reference_logprobs, make_reference_fn
from abot.step import DTYPES, make_eval_step

LOSS_POSITIONAL = 4  # loss(model, params, batch, key, **loss_args)


@dataclass(frozen=True)
class Stage:
    """What one training command trains on and how it is scored."""

    name: str  # "pretrain", "sft", "dpo": the value of `stage` in a checkpoint's meta
    command: str  # the `abot` command that runs it
    batch_kind: str  # what its data source must produce: "text", "conversations" or "preferences"
    default_loss: str  # the registered loss when train.loss is null
    sequences_per_example: int  # for tokens/step: a preference pair is two sequences
    perplexity: bool  # the loss is a token cross-entropy, so evaluation also reports exp(loss)
    eval_at_start: bool  # evaluate the starting point too (fine-tuning), for comparison
    source_hint: str  # the data sources that fit, for error messages


PRETRAIN = Stage("pretrain", "train", "text", "next_token", 1, perplexity=True, eval_at_start=False,
                 source_hint="huggingface or stdlib_docs")
SFT = Stage("sft", "sft", "conversations", "sft", 1, perplexity=True, eval_at_start=True,
            source_hint="chat (one conversation per row, e.g. HuggingFaceH4/ultrachat_200k) or oasst1")
DPO = Stage("dpo", "dpo", "preferences", "dpo", 2, perplexity=False, eval_at_start=True,
            source_hint="preferences (chosen/rejected pairs, e.g. HuggingFaceH4/ultrafeedback_binarized)")
STAGES = {s.name: s for s in (PRETRAIN, SFT, DPO)}


def get_stage(stage: str | Stage) -> Stage:
    if isinstance(stage, Stage):
        return stage
    if stage not in STAGES:
        raise AbotError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    return STAGES[stage]


def stage_for_source(cfg: Config) -> Stage:
    """The stage whose batches `data.source` produces (abot verify and abot eval, which are given no command)."""
    kind = getattr(registry.datasets.get(cfg.data.source, "data.source"), "produces", "text")
    return next((s for s in STAGES.values() if s.batch_kind == kind), PRETRAIN)


def loss_batch_kind(name: str, fn: Callable) -> str | None:
    return getattr(fn, "batch_kind", "text" if name == "next_token" else None)


def loss_needs_reference(name: str, fn: Callable) -> bool:
    """Whether a preference loss reads the frozen reference's log-probs (`ref_chosen`, `ref_rejected`).

    Its `needs_reference` attribute; a preference loss without one is taken to need them (the contract before
    the attribute existed), a loss of another kind never does.
    """
    kind = loss_batch_kind(name, fn)
    return kind == "preferences" and bool(getattr(fn, "needs_reference", True))


def needs_reference(stage: str | Stage, cfg: Config) -> bool:
    """Whether the stage's loss (train.loss, else the stage's default) compares with the frozen train.init_from
    model, so that every batch needs its log-probs: DPO and IPO do, ORPO and SimPO (reference-free) do not."""
    stage = get_stage(stage)
    name = cfg.train.loss or stage.default_loss
    return stage.batch_kind == "preferences" and loss_needs_reference(name, registry.losses.get(name, "train.loss"))


def check_stage(stage: str | Stage, cfg: Config) -> Stage:
    """Cheap checks before any slow work: the stage, data.overlong, the source's kind, init_from."""
    stage = get_stage(stage)
    source = registry.datasets.get(cfg.data.source, "data.source")
    produces = getattr(source, "produces", "text")
    if produces != stage.batch_kind:
        other = next((s.command for s in STAGES.values() if s.batch_kind == produces), "train")
        raise AbotError(f"data.source: '{cfg.data.source}' gives {produces}, but `abot {stage.command}` trains on "
                        f"{stage.batch_kind}; use data.source: {stage.source_hint} (or `abot {other}` for {produces})")
    if stage is PRETRAIN:
        return stage
    if cfg.data.overlong not in OVERLONG:
        raise AbotError(f"data.overlong: '{cfg.data.overlong}' is not one of {', '.join(OVERLONG)}")
    if needs_reference(stage, cfg) and not cfg.train.init_from:
        name = cfg.train.loss or stage.default_loss
        free = [e.name for e in registry.losses.entries()
                if loss_batch_kind(e.name, e.obj) == stage.batch_kind and not loss_needs_reference(e.name, e.obj)]
        raise AbotError(f"abot {stage.command} needs train.init_from: the checkpoint to start from, which is also the "
                        f"frozen reference model of train.loss '{name}' (usually the SFT run's save_dir or one of "
                        f"its step_*.ckpt files); the reference-free losses ({', '.join(free)}) need none")
    if not Path(cfg.train.tokenizer_path).exists():
        raise AbotError(f"train.tokenizer_path: {cfg.train.tokenizer_path} not found; fine-tuning needs the "
                        "tokenizer the starting checkpoint was trained with (its config's train.tokenizer_path)")
    return stage


def stage_loss(cfg: Config, stage: str | Stage) -> Callable:
    """The stage's registered loss with `train.loss_args` bound; AbotError if it does not fit the stage."""
    stage, t = get_stage(stage), cfg.train
    name = t.loss or stage.default_loss
    fn = registry.losses.get(name, "train.loss")
    kind = loss_batch_kind(name, fn)
    if kind is not None and kind != stage.batch_kind:
        fitting = [e.name for e in registry.losses.entries() if loss_batch_kind(e.name, e.obj) == stage.batch_kind]
        raise AbotError(f"train.loss: '{name}' trains on {kind}, but `abot {stage.name}` gives {stage.batch_kind}; "
                        f"use one of: {', '.join(fitting) or 'none registered'}")
    if not t.loss_args:
        return fn
    params = list(inspect.signature(fn).parameters.values())[LOSS_POSITIONAL:]
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in t.loss_args if k not in accepted]
    if unknown:
        raise AbotError(f"train.loss_args: loss '{name}' has no option '{unknown[0]}'; "
                        f"it accepts: {', '.join(accepted) or 'nothing'}")
    check_loss_args(t.loss_args)
    return functools.partial(fn, **t.loss_args)


# The built-in losses' numeric options and what each must be: beta scales log-prob differences (dpo, ipo,
# simpo) or weighs ORPO's odds-ratio term; gamma is SimPO's target margin.
LOSS_ARG_RULES = {"beta": (lambda v: v > 0, "a positive number"), "gamma": (lambda v: v >= 0, "a number >= 0")}


def check_loss_args(loss_args: dict) -> None:
    """AbotError naming the option whose value is out of range (`LOSS_ARG_RULES`); other options pass as given."""
    for key, value in loss_args.items():
        if key not in LOSS_ARG_RULES:
            continue
        valid, what = LOSS_ARG_RULES[key]
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (is_number and valid(value)):
            raise AbotError(f"train.loss_args.{key} must be {what}, got {value!r}")


# ---------------------------------------------------------------------------------------------- data

def _encoder(stage: Stage, cfg: Config, tokenizer) -> Callable:
    d = cfg.data
    return functools.partial(ENCODERS[stage.batch_kind], tokenizer=tokenizer, seq_len=d.seq_len, overlong=d.overlong)


def eval_batches(stage: Stage, cfg: Config, tokenizer, split: str = "eval", n: int | None = None,
                 stats: DataStats | None = None) -> list:
    """The first `n` (default train.eval_steps) micro-batches of `split`, unshuffled, as mx arrays."""
    n = cfg.train.eval_steps if n is None else n
    if n <= 0:
        return []
    if stage.batch_kind == "text":
        return [mx.array(b) for b in eval_data(cfg, tokenizer, split, n)]
    batches = example_eval_batches(build_documents(cfg, split), _encoder(stage, cfg, tokenizer),
                                   cfg.train.micro_batch_size, n, stats)
    return [tree_map(mx.array, b) for b in batches]


@dataclass
class StageData:
    stream: Any  # endless train batches (numpy), resumable: .state()
    eval_batches: list  # micro-batches, mx arrays (with the reference log-probs where the loss needs them)
    prepare: Callable[[Any], Any]  # numpy batch from the stream -> what the train step takes
    report: Callable[[], dict] | None  # what the data pipeline kept and dropped (conversations, pairs)
    eval_report: dict | None


def stage_data(stage: str | Stage, cfg: Config, tokenizer, model, reference: Any = None,
               data_state: dict | None = None, say: Callable[[str], None] = print, lanes: int = 1) -> StageData:
    """The train stream (from `data_state`), the evaluation batches and `prepare` of a stage.

    `reference`: the frozen model's parameters, used only where the loss needs them (`needs_reference`); a
    reference-free loss gets no reference log-probs, which saves a forward pass per batch. `lanes` as the
    train step's.
    """
    stage, t, d = get_stage(stage), cfg.train, cfg.data
    if stage.batch_kind == "text":
        return StageData(train_stream(cfg, tokenizer, state=data_state), eval_batches(stage, cfg, tokenizer),
                         mx.array, report=None, eval_report=None)
    # Data-parallel ranks train on disjoint examples (every world_size-th); eval is the same everywhere.
    examples = rank_documents(build_documents(cfg, "train"), *data_rank())
    stream = ExampleStream(examples, _encoder(stage, cfg, tokenizer), (t.grad_accum_steps, t.micro_batch_size),
                           d.shuffle_buffer, t.seed, state=data_state)
    eval_stats = DataStats()
    evals = eval_batches(stage, cfg, tokenizer, stats=eval_stats)
    if evals:
        say(f"eval data: {len(evals)} micro-batches of {t.micro_batch_size} ({describe(eval_stats.report())})")
    if not t.init_from:
        say(f"Note: no train.init_from, so {stage.name} starts from a random initialization.")

    if needs_reference(stage, cfg):
        if reference is None:
            raise AbotError(f"abot {stage.command} needs a reference model: set train.init_from")
        ref_params = as_dtype(reference, DTYPES[t.precision])  # compute precision, frozen
        ref_fn = make_reference_fn(model, t.compile, lanes)
        evals = [add_reference_logprobs(ref_fn, ref_params, b, lanes) for b in evals]  # once: the reference is frozen

        def prepare(batch):
            return add_reference_logprobs(ref_fn, ref_params, tree_map(mx.array, batch), lanes)
    else:
        def prepare(batch):
            return tree_map(mx.array, batch)

    return StageData(stream, evals, prepare, report=stream.stats.report, eval_report=eval_stats.report())


def as_dtype(tree: Any, dtype: mx.Dtype) -> Any:
    """The tree's float arrays in `dtype` (no copy where they already are); packed quantized weights and the
    quantization's int settings (abot.ops.linear.quantize) as they are."""
    def cast(leaf):
        return leaf.astype(dtype) if isinstance(leaf, mx.array) and mx.issubdtype(leaf.dtype, mx.floating) else leaf

    return tree_map(cast, tree)


def random_batch(stage: Stage, cfg: Config, key: mx.array) -> Any:
    """A train-step batch of the stage's shape with random tokens (measuring a step needs no real data)."""
    t, seq, vocab = cfg.train, cfg.data.seq_len, cfg.model.vocab_size
    lead = (t.grad_accum_steps, t.micro_batch_size)
    keys = mx.random.split(key, 2)
    if stage.batch_kind == "text":
        return mx.random.randint(0, vocab, (*lead, seq + 1), key=keys[0])
    if stage.batch_kind == "conversations":
        return {"tokens": mx.random.randint(0, vocab, (*lead, seq + 1), key=keys[0]), "mask": mx.ones((*lead, seq))}
    pairs = {"chosen": mx.random.randint(0, vocab, (*lead, seq + 1), key=keys[0]),
             "rejected": mx.random.randint(0, vocab, (*lead, seq + 1), key=keys[1]),
             "chosen_mask": mx.ones((*lead, seq)), "rejected_mask": mx.ones((*lead, seq))}
    if needs_reference(stage, cfg):
        pairs.update(ref_chosen=mx.zeros(lead), ref_rejected=mx.zeros(lead))
    return pairs


# ---------------------------------------------------------------------------------------------- evaluation

def evaluate(stage: Stage, eval_step: Callable, params: dict, batches: list) -> dict:
    """The mean over micro-batches of the loss and the loss's own metrics, plus ppl where the stage has one."""
    if not batches:
        return {}
    totals: dict[str, Any] = {}
    for micro in batches:
        loss, metrics = eval_step(params, micro)
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + v
    out = {k: (v / len(batches)).item() for k, v in totals.items()}
    if stage.perplexity:
        out["ppl"] = math.exp(min(out["loss"], 50.0))
    return out


def predicted_tokens(batch: Any) -> int:
    """Tokens a batch's loss is computed on: every next token of a text batch, the masked ones otherwise (both
    responses of a preference pair)."""
    if isinstance(batch, dict):
        masks = [batch[k] for k in ("mask", "chosen_mask", "rejected_mask") if k in batch]
        return int(sum(m.sum().item() for m in masks))
    return batch.shape[0] * (batch.shape[1] - 1)


def make_stage_eval(stage: Stage, model, loss_fn: Callable, batches: list, compile: bool = True,
                    lanes: int = 1, combine: Callable | None = None, frozen: Any = None) -> Callable[[dict], dict]:
    """`params -> held-out metrics` of `batches` ({} without any); with adapters `params` are the adapters,
    attached to the `frozen` base by `combine` (abot.run.build_step)."""
    eval_step = make_eval_step(model, loss_fn, compile, lanes, combine)
    if combine is None:
        return lambda params: evaluate(stage, eval_step, params, batches)
    return lambda params: evaluate(stage, lambda p, micro: eval_step(p, micro, frozen), params, batches)
