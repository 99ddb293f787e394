"""`abot eval`: held-out loss and perplexity of a checkpoint.

The data is the checkpoint's own config unless told otherwise: its source's "eval" split (the same
micro-batches training evaluated on: `abot.build.build_documents(cfg, "eval")` through
`abot.data.pipeline.eval_batches`, unshuffled, each document followed by EOS), `train.eval_steps`
micro-batches of `train.micro_batch_size` x `data.seq_len`. A YAML file replaces the data section, and
`data.*` / `train.*` overrides change single keys (`data.dataset=json data.data_files=held_out.jsonl`);
model keys cannot change. The loss is the mean next-token cross-entropy over all predicted tokens (every
batch is full, so the mean of batch means is the token mean); perplexity is exp(loss). A checkpoint trained
on conversations (`abot sft`) is scored as `abot sft` evaluates: cross-entropy on assistant tokens only,
the mean over micro-batches.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import yaml
from mlx.utils import tree_map

from abot import registry
from abot.build import build_documents, build_loss, build_model
from abot.checkpoint import load_checkpoint
from abot.config import ConfigError, config_from_dict
from abot.data.pipeline import eval_batches
from abot.errors import AbotError
from abot.finetune.batches import ENCODERS, example_eval_batches
from abot.finetune.stage import stage_loss
from abot.generate import checkpoint_params, resolve_tokenizer
from abot.step import make_eval_step

SPLITS = ("eval", "train")


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
    return config_from_dict(raw, where, overrides)


def evaluate_checkpoint(ckpt_path: str | Path, data: Sequence[str] = (), split: str = "eval",
                        steps: int | None = None, tokenizer_path: str | Path | None = None) -> dict:
    """Loss, perplexity and token count of a checkpoint on `split` of its (possibly overridden) data."""
    if split not in SPLITS:
        raise AbotError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt.meta.get("config"), dict):
        raise AbotError(f"{ckpt_path}: the checkpoint has no config in its meta; give a checkpoint written by abot")
    cfg = eval_config(ckpt.meta["config"], f"{ckpt_path} (its config)", data)
    params = checkpoint_params(ckpt, ckpt_path)
    tokenizer = resolve_tokenizer(cfg, ckpt.meta, ckpt_path, tokenizer_path)
    model = build_model(cfg)
    n_batches = cfg.train.eval_steps if steps is None else steps
    if n_batches <= 0:
        raise AbotError(f"--steps must be positive, got {n_batches}")
    d, t = cfg.data, cfg.train
    kind = getattr(registry.datasets.get(d.source, "data.source"), "produces", "text")
    if kind == "preferences":
        raise AbotError(f"{ckpt_path}: its data (data.source: {d.source}) is preference pairs, whose loss needs the "
                        "frozen reference model; `abot dpo` prints that held-out loss and reward accuracy. For "
                        "perplexity on text: abot eval CHECKPOINT --data data.source=stdlib_docs (or a text dataset)")
    t0 = time.perf_counter()
    if kind == "conversations":  # as `abot sft` evaluates: the loss on assistant tokens
        encode = functools.partial(ENCODERS[kind], tokenizer=tokenizer, seq_len=d.seq_len, overlong=d.overlong)
        batches = [tree_map(mx.array, b) for b in
                   example_eval_batches(build_documents(cfg, split), encode, t.micro_batch_size, n_batches)]
        eval_fn = make_eval_step(model, stage_loss(cfg, "sft"), t.compile)
        losses = [eval_fn(params, b)[0].item() for b in batches]
        tokens = int(sum(b["mask"].sum().item() for b in batches))
    else:
        batches = eval_batches(build_documents(cfg, split), tokenizer, d.seq_len, t.micro_batch_size, n_batches,
                               d.num_workers)
        eval_fn = make_eval_step(model, build_loss(), compile=t.compile)
        losses = [eval_fn(params, mx.array(b))[0].item() for b in batches]
        tokens = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    if not batches:
        raise AbotError(f"the {split} split gave no full micro-batch of {t.micro_batch_size}; lower "
                        "train.micro_batch_size or use more data")
    seconds = time.perf_counter() - t0
    loss = sum(losses) / len(losses)
    source = d.dataset if d.source == "huggingface" else d.source
    return {"checkpoint": str(ckpt_path), "step": ckpt.step, "split": split, "source": source,
            "data_files": d.data_files, "batches": len(batches), "micro_batch_size": t.micro_batch_size,
            "seq_len": d.seq_len, "tokens": tokens, "loss": loss, "ppl": math.exp(min(loss, 50.0)),
            "bits_per_token": loss / math.log(2), "seconds": seconds}


def result_table(result: dict):
    """The result of `evaluate_checkpoint` as a rich table."""
    from rich.table import Table

    table = Table(title=f"{result['checkpoint']} (step {result['step']})", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    data = result["source"] + (f" ({result['data_files']})" if result.get("data_files") else "")
    rows = [("data", data), ("split", result["split"]),
            ("batches", f"{result['batches']} x {result['micro_batch_size']} x {result['seq_len']}"),
            ("tokens", f"{result['tokens']:,}"), ("loss", f"{result['loss']:.4f}"), ("ppl", f"{result['ppl']:.2f}"),
            ("bits/token", f"{result['bits_per_token']:.3f}"), ("time", f"{result['seconds']:.1f} s")]
    for name, value in rows:
        table.add_row(name, value)
    return table
