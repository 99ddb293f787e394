"""Adapters over the whole parameter tree: init, freeze, attach, merge (pure tree functions).

The adapter tree mirrors the base's blocks with the targeted projections only:
`{"blocks": [{"wq": {"lora_a": ..., "lora_b": ...}, ...}, ...]}`. It is what training updates
(state["params"]); the base is frozen beside it and goes into the step as its own argument.
"""

from __future__ import annotations

import functools
from typing import Any

import mlx.core as mx

from abot.adapters.kind import AdapterKind
from abot.config import AdapterConfig
from abot.config_rules import ADAPTER_TARGETS
from abot.errors import AbotError
from abot.models.roles import OTHER
from abot.models.transformer import count_params
from abot.ops.linear import dequantize, is_quantized, quantize

PROJECTIONS = tuple(ADAPTER_TARGETS.values())  # the block leaves that are projection weights


def target_leaves(cfg: AdapterConfig) -> list[str]:
    """adapter.targets as block leaf names ("q" -> "wq")."""
    return [ADAPTER_TARGETS[t] for t in cfg.targets]


def init_adapters(base: dict, kind: AdapterKind, cfg: AdapterConfig, key: mx.array) -> dict:
    """A fresh adapter for each targeted projection of each block (the model then computes the base's logits).
    A target the model lacks (gate in a ReLU² or GELU MLP) is skipped, as PEFT skips an unmatched name; a list
    with none of the model's projections is an error."""
    names = target_leaves(cfg)
    present = present_targets(base)
    if not any(t in present for t in cfg.targets):
        raise AbotError(f"adapter.targets {list(cfg.targets)}: the model has none of these projections; its blocks "
                        f"have {', '.join(present)}")
    keys = iter(mx.random.split(key, len(base["blocks"]) * len(names)))
    return {"blocks": [{name: kind.init(block[name], next(keys)) for name in names if name in block}
                       for block in base["blocks"]]}


def present_targets(base: dict) -> list[str]:
    """The adapter target names (q, k, ..., down) that are projections of this model's blocks."""
    return [t for t, leaf in ADAPTER_TARGETS.items() if any(leaf in block for block in base["blocks"])]


def describe(cfg: AdapterConfig, adapters: dict, frozen: dict) -> str:
    """One line for the start of a run: what is adapted, what trains, and the targets this model lacks."""
    present = present_targets(frozen)
    missing = [t for t in cfg.targets if t not in present]
    n = count_params(adapters)
    bits = f", base quantized to {cfg.quantize_bits} bits" if cfg.quantize_bits else ""
    return (f"adapters: {cfg.kind} rank {cfg.rank} on {', '.join(t for t in cfg.targets if t in present)} in "
            f"{len(adapters['blocks'])} blocks, {n:,} parameters to train{bits}"
            + (f" ({', '.join(missing)}: not in this model, skipped)" if missing else ""))


def freeze(base: dict, cfg: AdapterConfig, dtype: mx.Dtype) -> dict:
    """The base as the step reads it: float leaves in the compute dtype, and with adapter.quantize_bits every
    block projection quantized (QLoRA: all of them, targeted or not; the embedding and head stay float)."""
    bits, group = cfg.quantize_bits, cfg.group_size

    def block(i: int, b: dict) -> dict:
        out = {k: v.astype(dtype) for k, v in b.items()}
        if bits is None:
            return out
        for name in (n for n in PROJECTIONS if n in b):
            if b[name].shape[0] % group:
                raise AbotError(f"adapter.group_size {group} does not divide the input width {b[name].shape[0]} of "
                                f"blocks.{i}.{name}; choose a group size that divides it (32, 64 or 128)")
            out[name] = quantize(out[name], bits, group)
        return out

    top = {k: v.astype(dtype) for k, v in base.items() if k != "blocks"}
    return {**top, "blocks": [block(i, b) for i, b in enumerate(base["blocks"])]}


def attach(frozen: dict, adapters: dict, kind: AdapterKind, key: mx.array | None = None) -> dict:
    """The tree `model.apply` sees: each projection a frozen leaf of abot.ops.linear, {"base"}, or where it is
    adapted {"base", "adapter", "apply"} (`apply` binds that projection's dropout key; None: eval mode)."""
    n = sum(len(b) for b in adapters["blocks"])
    keys = iter(mx.random.split(key, n) if key is not None else [None] * n)

    def block(base: dict, adapter: dict) -> dict:
        marked = {name: {"base": base[name]} for name in PROJECTIONS if name in base}
        adapted = {name: {"base": base[name], "adapter": a, "apply": functools.partial(kind.apply, key=next(keys))}
                   for name, a in adapter.items()}
        return {**base, **marked, **adapted}

    return {**frozen, "blocks": [block(b, a) for b, a in zip(frozen["blocks"], adapters["blocks"])]}


def merge(base: dict, adapters: dict, kind: AdapterKind) -> dict:
    """Plain weights that compute what base + adapters computes (a quantized base leaf is dequantized)."""
    def plain(leaf: Any) -> mx.array:
        return dequantize(leaf) if is_quantized(leaf) else leaf

    def block(b: dict, adapter: dict) -> dict:
        out = {k: plain(v) for k, v in b.items()}
        out.update({name: kind.merge(out[name], a) for name, a in adapter.items()})
        return out

    return {**base, "blocks": [block(b, a) for b, a in zip(base["blocks"], adapters["blocks"])]}


def adapter_role(path: str, leaf: mx.array) -> str:
    """Every adapter leaf is trained by AdamW (OTHER): Muon is for the model's own hidden matrices."""
    return OTHER
