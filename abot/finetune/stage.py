"""What the training loop (abot.train.train) needs to run a fine-tuning stage instead of pre-training.

- `stage_loss`: the registered loss for the stage (`train.loss`, default `next_token` / `sft` / `dpo`) with
  its `train.loss_args` (e.g. beta), checked against the stage's kind of batch;
- `load_init_params`: `train.init_from`, weights only, after checking that the model section and the
  tokenizer match the checkpoint's;
- `stage_data`: the batch stream, the evaluation and `prepare`, which turns a numpy batch into mx arrays and,
  for preference losses, adds the frozen reference model's log-probs. The reference parameters are an
  explicit argument of a compiled function run outside the gradient (eval mode: no dropout); the train step
  receives its output as part of the batch.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from abot import registry
from abot.build import build_documents
from abot.checkpoint import latest_checkpoint, load_checkpoint
from abot.config import Config
from abot.data.loader import data_rank
from abot.data.pipeline import rank_documents
from abot.errors import AbotError
from abot.finetune.batches import (ENCODERS, OVERLONG, DataStats, ExampleStream, describe,
                                   example_eval_batches)
from abot.finetune.losses import sequence_logprobs
from abot.step import DTYPES, batch_slices, make_eval_step, new_streams

STAGES = ("pretrain", "sft", "dpo")
DEFAULT_LOSS = {"pretrain": "next_token", "sft": "sft", "dpo": "dpo"}
BATCH_KIND = {"pretrain": "text", "sft": "conversations", "dpo": "preferences"}
SEQUENCES_PER_EXAMPLE = {"pretrain": 1, "sft": 1, "dpo": 2}  # for tokens/step: a pair is two sequences
SOURCE_HINT = {"conversations": "chat (one conversation per row, e.g. HuggingFaceH4/ultrachat_200k) or oasst1",
               "preferences": "preferences (chosen/rejected pairs, e.g. HuggingFaceH4/ultrafeedback_binarized)",
               "text": "huggingface or stdlib_docs"}
# Model keys that may differ from the starting checkpoint's (nothing else may: it changes shapes or function).
SAFE_MODEL_CHANGES = {"dropout"}
LOSS_POSITIONAL = 4  # loss(model, params, batch, key, **loss_args)


def check_stage(stage: str, cfg: Config) -> None:
    """Cheap checks before any slow work: the stage name, data.overlong, the source's kind, init_from."""
    if stage not in STAGES:
        raise AbotError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    source = registry.datasets.get(cfg.data.source, "data.source")
    kind, produces = BATCH_KIND[stage], getattr(source, "produces", "text")
    if produces != kind:
        command = {"text": "train", "conversations": "sft", "preferences": "dpo"}
        raise AbotError(f"data.source: '{cfg.data.source}' gives {produces}, but `abot {command[kind]}` trains on "
                        f"{kind}; use data.source: {SOURCE_HINT[kind]} (or `abot {command[produces]}` for {produces})")
    if stage == "pretrain":
        return
    if cfg.data.overlong not in OVERLONG:
        raise AbotError(f"data.overlong: '{cfg.data.overlong}' is not one of {', '.join(OVERLONG)}")
    if not cfg.train.init_from and stage == "dpo":
        raise AbotError("abot dpo needs train.init_from: the checkpoint to start from, which is also the frozen "
                        "reference model (usually the SFT run's save_dir or one of its step_*.ckpt files)")
    if not Path(cfg.train.tokenizer_path).exists():
        raise AbotError(f"train.tokenizer_path: {cfg.train.tokenizer_path} not found; fine-tuning needs the "
                        "tokenizer the starting checkpoint was trained with (its config's train.tokenizer_path)")


def stage_loss(cfg: Config, stage: str) -> Callable:
    """The stage's registered loss with `train.loss_args` bound; AbotError if it does not fit the stage."""
    t = cfg.train
    name = t.loss or DEFAULT_LOSS[stage]
    fn = registry.losses.get(name, "train.loss")
    kind = getattr(fn, "batch_kind", "text" if name == "next_token" else None)
    if kind is not None and kind != BATCH_KIND[stage]:
        fitting = [e.name for e in registry.losses.entries()
                   if getattr(e.obj, "batch_kind", "text" if e.name == "next_token" else None) == BATCH_KIND[stage]]
        raise AbotError(f"train.loss: '{name}' trains on {kind}, but `abot {stage}` gives {BATCH_KIND[stage]}; "
                        f"use one of: {', '.join(fitting) or 'none registered'}")
    if not t.loss_args:
        return fn
    params = list(inspect.signature(fn).parameters.values())[LOSS_POSITIONAL:]
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in t.loss_args if k not in accepted]
    if unknown:
        raise AbotError(f"train.loss_args: loss '{name}' has no option '{unknown[0]}'; "
                        f"it accepts: {', '.join(accepted) or 'nothing'}")
    beta = t.loss_args.get("beta")
    if beta is not None and not (isinstance(beta, (int, float)) and beta > 0):
        raise AbotError(f"train.loss_args.beta must be a positive number, got {beta!r}")
    return functools.partial(fn, **t.loss_args)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest one in a save_dir."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise AbotError(f"train.init_from: {path} is a folder with no loadable checkpoint; give a "
                            "step_*.ckpt file or a save_dir that has one")
        return found
    return path


def load_init_params(cfg: Config, tokenizer, model) -> tuple[dict, Path]:
    """The parameters of `train.init_from` (weights only), checked against the model section and tokenizer."""
    path = resolve_checkpoint(cfg.train.init_from)
    ckpt = load_checkpoint(path)
    old = (ckpt.meta.get("config") or {}).get("model") or {}
    new = cfg.to_dict()["model"]
    bad = [k for k, v in new.items() if k not in SAFE_MODEL_CHANGES and k in old and old[k] != v]
    if bad:
        diffs = ", ".join(f"model.{k}: checkpoint {old[k]!r}, config {new[k]!r}" for k in bad)
        raise AbotError(f"train.init_from {path}: the config's model section does not match the checkpoint's "
                        f"({diffs}); copy the model section of the config the checkpoint was trained with")
    if ckpt.meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
        raise AbotError(f"train.init_from {path}: the checkpoint was trained with a different tokenizer than "
                        f"{tokenizer.path}; point train.tokenizer_path at the tokenizer of the pre-training run")
    try:
        params = ckpt.trees["state"]["params"]
    except (KeyError, TypeError):
        raise AbotError(f"train.init_from {path}: no training state (state.params) in this checkpoint") from None
    want = dict(tree_flatten(model.init(mx.random.key(0))))  # lazy: shapes only, nothing is computed
    have = dict(tree_flatten(params))
    wrong = sorted(k for k in want.keys() | have.keys()
                   if k not in want or k not in have or tuple(want[k].shape) != tuple(have[k].shape))
    if wrong:
        k = wrong[0]
        detail = (f"{k}: checkpoint {tuple(have[k].shape) if k in have else 'missing'}, "
                  f"model {tuple(want[k].shape) if k in want else 'missing'}")
        raise AbotError(f"train.init_from {path}: its parameters do not fit the configured model ({len(wrong)} "
                        f"differ, e.g. {detail}); use the model section it was trained with")
    return tree_map(lambda p: p.astype(mx.float32), params), path


def make_reference_fn(model, compile: bool = True, lanes: int = 1):
    """`ref(ref_params, tokens, mask) -> (B,)` summed log-probs of the frozen model, eval mode, no gradient.

    With `lanes` > 1 the rows are split over that many MLX streams (as the train step's; abot.platform.lanes).
    """
    streams = new_streams(lanes)

    def ref(ref_params, tokens, mask):
        if len(streams) < 2 or tokens.shape[0] % len(streams):
            return mx.stop_gradient(sequence_logprobs(model, ref_params, tokens, mask, key=None))
        parts = []
        for stream, (part_tokens, part_mask) in zip(streams, batch_slices((tokens, mask), len(streams))):
            with mx.stream(stream):
                parts.append(sequence_logprobs(model, ref_params, part_tokens, part_mask, key=None))
        return mx.stop_gradient(mx.concatenate(parts))

    return mx.compile(ref) if compile else ref


def add_reference_logprobs(ref_fn: Callable, ref_params, batch: dict) -> dict:
    """Add "ref_chosen" / "ref_rejected" to a preference batch with a leading (grad_accum,) axis or none."""
    lead = batch["chosen"].shape[:-2]  # () for a micro-batch, (grad_accum,) for a step's batch
    chosen = batch["chosen"].reshape(-1, *batch["chosen"].shape[-2:])
    rejected = batch["rejected"].reshape(chosen.shape)
    cm = batch["chosen_mask"].reshape(-1, *batch["chosen_mask"].shape[-2:])
    rm = batch["rejected_mask"].reshape(cm.shape)
    rc, rr = [], []
    for i in range(chosen.shape[0]):  # one micro-batch at a time: one trace, bounded memory
        n = chosen.shape[1]
        lp = ref_fn(ref_params, mx.concatenate([chosen[i], rejected[i]]), mx.concatenate([cm[i], rm[i]]))
        rc.append(lp[:n])
        rr.append(lp[n:])
    out = dict(batch)
    out["ref_chosen"] = mx.stack(rc).reshape(*lead, -1)
    out["ref_rejected"] = mx.stack(rr).reshape(*lead, -1)
    return out


@dataclass
class StageData:
    stream: ExampleStream
    eval_batches: list  # micro-batches, mx arrays (DPO: with the reference log-probs)
    prepare: Callable[[Any], Any]  # numpy batch from the stream -> what the train step takes
    evaluate: Callable[[Any], dict]  # params -> held-out metrics ({} without eval data)
    report: Callable[[], dict]  # what the data pipeline kept and dropped, for the summary
    eval_report: dict


def stage_data(stage: str, cfg: Config, tokenizer, model, loss_fn: Callable, reference: Any = None,
               data_state: dict | None = None, say: Callable[[str], None] = print, lanes: int = 1) -> StageData:
    """Batches, evaluation and the reference model for a fine-tuning stage (`lanes`: as the train step's)."""
    t, d = cfg.train, cfg.data
    kind = BATCH_KIND[stage]
    encode = functools.partial(ENCODERS[kind], tokenizer=tokenizer, seq_len=d.seq_len, overlong=d.overlong)
    # Data-parallel ranks train on disjoint examples (every world_size-th); eval is the same everywhere.
    examples = rank_documents(build_documents(cfg, "train"), *data_rank())
    stream = ExampleStream(examples, encode, (t.grad_accum_steps, t.micro_batch_size), d.shuffle_buffer, t.seed,
                           state=data_state)
    eval_stats = DataStats()
    eval_data = example_eval_batches(build_documents(cfg, "eval"), encode, t.micro_batch_size, t.eval_steps,
                                     eval_stats) if t.eval_steps > 0 else []
    eval_data = [tree_map(mx.array, b) for b in eval_data]
    if eval_data:
        say(f"eval data: {len(eval_data)} micro-batches of {t.micro_batch_size} "
            f"({describe(eval_stats.report())})")

    if not t.init_from:
        say(f"Note: no train.init_from, so {stage} starts from a random initialization.")
    if kind == "preferences":
        if reference is None:
            raise AbotError(f"abot {stage} needs a reference model: set train.init_from")
        ref_params = tree_map(lambda p: p.astype(DTYPES[t.precision]), reference)  # compute precision, frozen
        ref_fn = make_reference_fn(model, t.compile, lanes)
        eval_data = [add_reference_logprobs(ref_fn, ref_params, b) for b in eval_data]  # once: ref is frozen

        def prepare(batch):
            return add_reference_logprobs(ref_fn, ref_params, tree_map(mx.array, batch))
    else:
        def prepare(batch):
            return tree_map(mx.array, batch)

    eval_step = make_eval_step(model, loss_fn, t.compile, lanes)

    def evaluate(params) -> dict:
        if not eval_data:
            return {}
        totals: dict[str, Any] = {}
        for micro in eval_data:
            loss, metrics = eval_step(params, micro)
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v
        out = {k: (v / len(eval_data)).item() for k, v in totals.items()}
        if kind == "conversations":
            out["ppl"] = math.exp(min(out["loss"], 50.0))
        return out

    return StageData(stream=stream, eval_batches=eval_data, prepare=prepare, evaluate=evaluate,
                     report=stream.stats.report, eval_report=eval_stats.report())
