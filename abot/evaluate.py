"""`abot eval`: held-out loss and perplexity of a checkpoint.

The data is the checkpoint's own config unless told otherwise: its source's "eval" split (the same
micro-batches training evaluated on, `abot.stage.eval_batches`: unshuffled, each document followed by EOS),
`train.eval_steps` micro-batches of `train.micro_batch_size` x `data.seq_len`, scored by `abot.stage.evaluate`
exactly as training scores them. A YAML file replaces the data section, and
`data.*` / `train.*` overrides change single keys (`data.dataset=json data.data_files=held_out.jsonl`);
model keys cannot change. The loss is the mean next-token cross-entropy over all predicted tokens (every
batch is full, so the mean of batch means is the token mean); perplexity is exp(loss). A checkpoint trained
on conversations (`abot sft`) is scored as `abot sft` evaluates: cross-entropy on assistant tokens only,
the mean over micro-batches. One trained on preference pairs with a reference-free loss (orpo, simpo) is
scored as `abot dpo` evaluates it: that loss and its rewards and accuracy, no perplexity; a DPO or IPO
checkpoint's loss needs the frozen reference model, which a checkpoint does not hold, so it is refused.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Sequence

import yaml

from abot import registry
from abot.build import build_model
from abot.config import Config, ConfigError, config_from_dict
from abot.errors import AbotError
from abot.restore import checkpoint_tokenizer, open_checkpoint
from abot.stage import (Stage, eval_batches, evaluate, loss_batch_kind, needs_reference, predicted_tokens,
                        stage_for_source, stage_loss)
from abot.step import make_eval_step

SPLITS = ("eval", "train")
PREFERENCE_METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "accuracy")  # shown in the table


def _data_section(path: str) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read it as a YAML config ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("data", {}), dict):
        raise ConfigError(f"{path}: expected a YAML config with a `data:` section")
    return raw.get("data") or {}


def eval_config(ckpt_meta_config: dict, where: str, data: Sequence[str] = ()):
    """The checkpoint's config with `data` applied: YAML files (their data section) and section.key=value items."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ckpt_meta_config.items()}
    overrides = []
    for item in data:
        if "=" in item and not Path(item).exists():
            key = item.partition("=")[0].strip()
            if not key.startswith(("data.", "train.")):
                raise ConfigError(f"override '{item}': abot eval takes data.* and train.* overrides only "
                                  "(the model is the checkpoint's)")
            overrides.append(item)
        elif Path(item).is_file():
            raw["data"] = _data_section(item)
        else:
            raise ConfigError(f"--data {item!r}: neither a YAML config file nor a data.key=value override")
    return config_from_dict(raw, where, overrides, stored=True)


def scoring_config(cfg: Config, stage: Stage) -> Config:
    """`cfg` with its train.loss where that fits the data's stage, else with the stage's default loss (e.g. a
    DPO-tuned model scored on text: next_token)."""
    name = cfg.train.loss
    if name and loss_batch_kind(name, registry.losses.get(name, "train.loss")) not in (None, stage.batch_kind):
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss=None, loss_args={}))
    return cfg


def scoring_loss(cfg: Config, stage: Stage):
    """The loss a checkpoint is scored with on the data's stage (`scoring_config`), its options bound."""
    return stage_loss(scoring_config(cfg, stage), stage)


def evaluate_checkpoint(ckpt_path: str | Path, data: Sequence[str] = (), split: str = "eval",
                        steps: int | None = None, tokenizer_path: str | Path | None = None) -> dict:
    """Loss, perplexity and token count of a checkpoint (or a run folder's newest) on `split` of its data."""
    if split not in SPLITS:
        raise AbotError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    opened = open_checkpoint(ckpt_path)
    cfg = opened.config(lambda raw, where: eval_config(raw, where, data))
    tokenizer = checkpoint_tokenizer(cfg, opened, tokenizer_path)
    n_batches = cfg.train.eval_steps if steps is None else steps
    if n_batches <= 0:
        raise AbotError(f"--steps must be positive, got {n_batches}")
    d, t = cfg.data, cfg.train
    stage = stage_for_source(cfg)  # scored as the stage that trains on this data evaluates
    if needs_reference(stage, scoring_config(cfg, stage)):
        raise AbotError(f"{opened.path}: its data (data.source: {d.source}) is preference pairs, whose loss needs the "
                        "frozen reference model; `abot dpo` prints that held-out loss and reward accuracy. For "
                        "perplexity on text: abot eval CHECKPOINT --data data.source=stdlib_docs (or a text dataset)")
    t0 = time.perf_counter()
    batches = eval_batches(stage, cfg, tokenizer, split, n_batches)
    if not batches:
        raise AbotError(f"the {split} split gave no full micro-batch of {t.micro_batch_size}; lower "
                        "train.micro_batch_size or use more data")
    result = evaluate(stage, make_eval_step(build_model(cfg), scoring_loss(cfg, stage), t.compile), opened.params(),
                      batches)
    loss, seconds = result.pop("loss"), time.perf_counter() - t0
    source = d.dataset if d.source == "huggingface" else d.source
    # A token cross-entropy has a perplexity; a reference-free preference loss (orpo, simpo) reports its own
    # metrics (rewards, margin, accuracy) instead.
    scores = ({"ppl": math.exp(min(loss, 50.0)), "bits_per_token": loss / math.log(2)} if stage.perplexity
              else result)
    return {"checkpoint": str(opened.path), "step": opened.step, "split": split, "source": source,
            "data_files": d.data_files, "batches": len(batches), "micro_batch_size": t.micro_batch_size,
            "seq_len": d.seq_len, "tokens": sum(predicted_tokens(b) for b in batches), "loss": loss, **scores,
            "seconds": seconds}


def result_table(result: dict):
    """The result of `evaluate_checkpoint` as a rich table."""
    from rich.table import Table

    table = Table(title=f"{result['checkpoint']} (step {result['step']})", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    data = result["source"] + (f" ({result['data_files']})" if result.get("data_files") else "")
    rows = [("data", data), ("split", result["split"]),
            ("batches", f"{result['batches']} x {result['micro_batch_size']} x {result['seq_len']}"),
            ("tokens", f"{result['tokens']:,}"), ("loss", f"{result['loss']:.4f}")]
    if "ppl" in result:
        rows += [("ppl", f"{result['ppl']:.2f}"), ("bits/token", f"{result['bits_per_token']:.3f}")]
    rows += [(k, f"{result[k]:.4f}") for k in PREFERENCE_METRICS if k in result]
    rows.append(("time", f"{result['seconds']:.1f} s"))
    for name, value in rows:
        table.add_row(name, value)
    return table
