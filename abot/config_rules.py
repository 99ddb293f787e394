"""The cross-field rules of a config: what single key types cannot express (heads that divide the width,
learning rates in order, adapter targets that exist...). One message per broken rule, naming the keys.

Kept apart from abot.config, which holds the schema and the loading, and imports these rules; nothing here
imports abot.config (the sections arrive as arguments).
"""

from __future__ import annotations

import difflib
from typing import Any

PRECISIONS = ("float32", "bfloat16", "float16")
ACTIVATIONS = ("silu", "gelu", "relu2")
# model.rope_scaling: the supported types and the keys each one needs (Hugging Face's names).
ROPE_SCALING_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
# adapter.targets: the names of the projections an adapter can wrap -> the transformer's block leaves.
ADAPTER_TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
QUANTIZE_BITS = (4, 8)


def suggest(name: str, options) -> str:
    """"; did you mean 'x'?" for a close match among `options`, else the list of them."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(options)}"


def validation_problems(cfg) -> list[str]:
    """The cross-field problems of a `Config`, one message per broken rule (empty when it is valid)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    errors = []
    positive = [("model.vocab_size", m.vocab_size), ("model.n_layers", m.n_layers), ("model.d_model", m.d_model),
                ("model.n_heads", m.n_heads), ("model.max_seq_len", m.max_seq_len), ("data.seq_len", d.seq_len),
                ("train.micro_batch_size", t.micro_batch_size), ("train.grad_accum_steps", t.grad_accum_steps),
                ("train.log_interval", t.log_interval), ("train.eval_interval", t.eval_interval),
                ("train.ckpt_interval", t.ckpt_interval), ("train.ckpt_keep", t.ckpt_keep),
                ("model.mlp_multiple", m.mlp_multiple), ("model.rope_theta", m.rope_theta)]
    errors += [f"{k} must be positive, got {v}" for k, v in positive if v <= 0]
    errors += attention_problems(m) + rope_scaling_problems(m.rope_scaling)
    if m.mlp_hidden is not None and m.mlp_hidden <= 0:
        errors.append(f"model.mlp_hidden must be positive (or null for mlp_multiple * d_model), got {m.mlp_hidden}")
    if d.seq_len > m.max_seq_len:
        errors.append(f"data.seq_len ({d.seq_len}) must be <= model.max_seq_len ({m.max_seq_len})")
    if m.logit_softcap is not None and m.logit_softcap <= 0:
        errors.append(f"model.logit_softcap must be positive (or null for no cap), got {m.logit_softcap}")
    if m.ffn_activation not in ACTIVATIONS:
        errors.append(f"model.ffn_activation '{m.ffn_activation}' is not one of {', '.join(ACTIVATIONS)}")
    if t.precision not in PRECISIONS:
        errors.append(f"train.precision '{t.precision}' is not one of {', '.join(PRECISIONS)}")
    if not 0.0 <= m.dropout < 1.0:
        errors.append(f"model.dropout must be in [0, 1), got {m.dropout}")
    if not 0.0 <= d.eval_fraction < 1.0:
        errors.append(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
    for k, v in [("train.total_steps", t.total_steps), ("train.warmup_steps", t.warmup_steps),
                 ("train.max_grad_norm", t.max_grad_norm), ("train.weight_decay", t.weight_decay),
                 ("train.lr", t.lr), ("train.min_lr", t.min_lr), ("data.shuffle_buffer", d.shuffle_buffer),
                 ("data.num_workers", d.num_workers), ("train.eval_steps", t.eval_steps)]:
        if v < 0:
            errors.append(f"{k} must be >= 0, got {v}")
    if t.min_lr > t.lr:
        errors.append(f"train.min_lr ({t.min_lr}) must be <= train.lr ({t.lr})")
    return errors + adapter_problems(cfg.adapter, t)


def adapter_problems(a, t) -> list[str]:
    """The rules of adapter section `a` with train section `t` (only when an adapter is chosen): a base to adapt, a positive rank, known
    targets, 4- or 8-bit quantization. The kind's name is checked against the registry where it is built."""
    if a.kind is None:
        return []
    errors = []
    if not t.init_from:
        errors.append(f"adapter.kind '{a.kind}' needs train.init_from: the base model the adapters are trained on "
                      "(an abot checkpoint or run folder, or a Hugging Face model folder)")
    if a.rank <= 0:
        errors.append(f"adapter.rank must be positive, got {a.rank}")
    if a.alpha <= 0:
        errors.append(f"adapter.alpha must be positive, got {a.alpha}")
    if not 0.0 <= a.dropout < 1.0:
        errors.append(f"adapter.dropout must be in [0, 1), got {a.dropout}")
    if not a.targets:
        errors.append(f"adapter.targets is empty; give some of {', '.join(ADAPTER_TARGETS)}")
    for target in a.targets:
        if target not in ADAPTER_TARGETS:
            errors.append(f"adapter.targets: unknown target {target!r}{suggest(str(target), ADAPTER_TARGETS)}")
    if a.quantize_bits is not None and a.quantize_bits not in QUANTIZE_BITS:
        errors.append(f"adapter.quantize_bits must be 4 or 8 (or null for a float base), got {a.quantize_bits}")
    if a.group_size not in (32, 64, 128):
        errors.append(f"adapter.group_size must be 32, 64 or 128 (mx.quantize's group sizes), got {a.group_size}")
    return errors


def attention_problems(m) -> list[str]:
    """Model section `m`'s attention shape rules: heads divide d_model (or head_dim is given), kv heads divide the query
    heads (each kv head serves n_heads / n_kv_heads of them), an even head width (RoPE rotates pairs)."""
    errors = []
    if m.n_kv_heads is not None and m.n_kv_heads <= 0:
        errors.append(f"model.n_kv_heads must be positive (or null for n_heads), got {m.n_kv_heads}")
    elif m.n_kv_heads is not None and m.n_heads > 0 and m.n_heads % m.n_kv_heads:
        errors.append(f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads}): "
                      "each key/value head serves the same number of query heads")
    if m.head_dim is not None:
        if m.head_dim <= 0 or m.head_dim % 2:
            errors.append(f"model.head_dim must be positive and even for RoPE, got {m.head_dim}")
    elif m.n_heads > 0 and m.d_model % m.n_heads:
        errors.append(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads}) "
                      "(or set model.head_dim)")
    elif m.n_heads > 0 and (m.d_model // m.n_heads) % 2:
        errors.append(f"model.d_model / model.n_heads = {m.d_model // m.n_heads} must be even for RoPE")
    return errors


def rope_scaling_problems(scaling: Any) -> list[str]:
    """model.rope_scaling: null or a supported type with exactly its keys, each a positive number."""
    if scaling is None:
        return []
    supported = ", ".join(ROPE_SCALING_KEYS)
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        return [f"model.rope_scaling: rope_type {kind!r} is not supported; supported: {supported} "
                "(or null for no scaling)"]
    needed = ROPE_SCALING_KEYS[kind]
    errors = [f"model.rope_scaling.{k}: required for rope_type {kind}" for k in needed if k not in scaling]
    errors += [f"model.rope_scaling.{k}: unknown key for rope_type {kind}{suggest(str(k), needed)}"
               for k in scaling if k != "rope_type" and k not in needed]
    errors += [f"model.rope_scaling.{k} must be a positive number, got {scaling[k]!r}" for k in needed
               if k in scaling and not (isinstance(scaling[k], (int, float)) and not isinstance(scaling[k], bool)
                                        and scaling[k] > 0)]
    if not errors and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        errors.append(f"model.rope_scaling.high_freq_factor ({scaling['high_freq_factor']}) must be greater than "
                      f"low_freq_factor ({scaling['low_freq_factor']})")
    return errors
