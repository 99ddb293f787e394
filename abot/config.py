"""Typed configuration: the guide's `model`, `data` and `train` sections, loaded from YAML and checked.

An optional fourth section, `adapter`, trains low-rank adapters on a frozen base instead of every weight.

Every key of the configuration guide is here with its meaning; keys abot adds (registry choices,
seed, ...) have defaults that keep the guide's YAMLs valid unchanged. See README "Configuration".
The cross-field rules (heads that divide the width, learning rates in order, ...) are in abot.config_rules.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from abot.config_rules import suggest, validation_problems
from abot.errors import ConfigError



@dataclass
class ModelConfig:
    name: str = "transformer"  # registered model (abot list models)
    vocab_size: int = 32000  # must match the tokenizer's vocabulary
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12  # query heads; d_model must be divisible by n_heads unless head_dim is set
    mlp_multiple: float = 4.0  # MLP hidden size = mlp_multiple * d_model (unless mlp_hidden is set)
    dropout: float = 0.1
    max_seq_len: int = 4096  # longest sequence RoPE and generation support
    rope_theta: float = 10000.0
    ffn_activation: str = "silu"  # "silu" (SwiGLU), "gelu" (GELU MLP) or "relu2" (ReLU² MLP, modded-nanogpt)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True
    # Shapes of Llama / Mistral / Qwen2 / Qwen3 checkpoints; the defaults are abot's own model.
    n_kv_heads: Union[int, None] = None  # key/value heads (grouped-query attention); null: n_heads
    head_dim: Union[int, None] = None  # width of one attention head; null: d_model / n_heads
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2; Llama's attention_bias)
    attn_out_bias: bool = False  # a bias on the attention output projection (Llama's attention_bias)
    qk_norm: bool = False  # RMSNorm over head_dim on each head of q and k, before RoPE (Qwen3)
    rope_scaling: Union[dict, None] = None  # null, or {rope_type: llama3, factor, low_freq_factor, ...}
    mlp_hidden: Union[int, None] = None  # MLP hidden size given directly; null: mlp_multiple * d_model
    # Speedrun options (modded-nanogpt); the defaults are abot's own model.
    zero_init_out: bool = False  # attention and MLP output projections start at zero (each block starts as identity)
    logit_softcap: Union[float, None] = None  # logits -> cap * tanh(logits / cap); null: no cap
    value_embeds: bool = False  # every other block (ending with the last) adds a token table of its own to v




@dataclass
class DataConfig:
    source: str = "huggingface"  # registered data source (abot list datasets)
    source_args: dict = field(default_factory=dict)  # extra options for the source
    dataset: str = "allenai/c4"  # Hugging Face dataset name, or a loader ("json", "text", "parquet") with data_files
    config: Union[str, None] = None  # dataset config, e.g. "en" for allenai/c4
    split: str = "train"
    text_field: str = "text"
    data_files: Union[str, list, None] = None  # local files/globs for load_dataset(dataset, data_files=...)
    eval_split: Union[str, None] = None  # held-out split; null carves eval_fraction of documents off
    eval_fraction: float = 0.01
    seq_len: int = 2048
    shuffle_buffer: int = 1000  # windows held in the streaming shuffle buffer
    num_workers: int = 2  # tokenizer threads
    cache_dir: Union[str, None] = None  # Hugging Face cache directory
    streaming: bool = True
    overlong: str = "truncate"  # SFT/DPO: a conversation over seq_len + 1 tokens: "truncate" or "drop" (counted)


@dataclass
class TrainConfig:
    total_steps: int = 50000
    micro_batch_size: int = 1
    grad_accum_steps: int = 4
    lr: float = 3e-4  # peak learning rate (shared by the Muon and AdamW groups, see README)
    min_lr: float = 3e-5
    warmup_steps: int = 1000
    weight_decay: float = 0.02  # decoupled
    max_grad_norm: float = 1.0  # 0 turns clipping off
    log_interval: int = 25
    eval_interval: int = 500
    eval_steps: int = 20  # micro-batches per evaluation
    ckpt_interval: int = 2000
    ckpt_keep: int = 3
    log_path: Union[str, None] = None  # default: save_dir/logs
    save_dir: str = "checkpoints/pretrain"
    precision: str = "float32"  # "float32", "bfloat16" or "float16"; master weights stay float32
    compile: bool = True  # mx.compile the train step
    gradient_checkpointing: bool = True
    tokenizer_path: str = "data/tokenizer.model"
    checkpoint_path: Union[str, None] = None  # resume from this checkpoint
    optimizer: str = "muon_adamw"  # registered optimizer (abot list optimizers)
    optimizer_args: dict = field(default_factory=dict)
    momentum: Union[float, None] = None  # Muon momentum (0.90 / 0.95 / 0.97); null: the optimizer's default
    schedule: str = "cosine"  # registered schedule (abot list schedules)
    schedule_args: dict = field(default_factory=dict)
    seed: int = 0
    max_nonfinite_steps: int = 20  # consecutive skipped (non-finite) steps before the run stops
    init_from: Union[str, None] = None  # SFT/DPO: start from this checkpoint (file or save_dir): weights only
    loss: Union[str, None] = None  # registered loss (abot list losses); null: the command's (next_token, sft, dpo)
    loss_args: dict = field(default_factory=dict)  # options for the loss, e.g. {beta: 0.1} for dpo/ipo


@dataclass
class AdapterConfig:
    """Adapters on a frozen base (README "Adapters: LoRA, DoRA, QLoRA"); kind null is full fine-tuning."""

    kind: Union[str, None] = None  # registered adapter kind (abot list adapters): "lora", "dora"; null: none
    rank: int = 8  # r: the inner width of the low-rank update
    alpha: float = 16.0  # the update is scaled by alpha / rank (Hu et al. 2021)
    dropout: float = 0.0  # dropout on the adapter's input (LoRA's lora_dropout)
    targets: list = field(default_factory=lambda: ["q", "k", "v", "o"])  # of q, k, v, o, gate, up, down
    quantize_bits: Union[int, None] = None  # 4 or 8: the frozen base quantized (QLoRA); null: kept in float
    group_size: int = 64  # quantization group along each projection's input dimension


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # The "section.key" names the user wrote (YAML or overrides), even at their default value: abot.unread
    # warns about those the chosen components ignore. Not a setting: not in to_dict, not compared.
    given: frozenset = field(default=frozenset(), compare=False, repr=False)

    def to_dict(self) -> dict:
        """The settings, section by section (what a checkpoint stores); `given` is not one of them. The adapter
        section only when it chooses an adapter: a full fine-tuning run's config reads as it always has."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS
                if name != "adapter" or self.adapter.kind is not None}


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "adapter": AdapterConfig}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; numbers written like `3e-4` (strings to PyYAML) become floats."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(out):
                    return out
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    elif tp is list:
        if isinstance(value, list):
            return value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             list: "a list"}
    raise ConfigError(f"{where}: expected {names.get(tp, tp)}, got {value!r}")


def _build_section(cls, raw: Any, where: str, problems: list[str] | None = None):
    """One section's dataclass from its mapping. With `problems` (a list), each unknown key or bad type is
    appended to it as "where.key: ..." and that key keeps its default, so every problem is found in one pass;
    without it, the first problem raises."""
    found: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        found.append(f"{where}: expected a mapping of keys, got {raw!r}")
        raw = {}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            found.append(f"{where}.{key}: unknown key{suggest(str(key), hints)}")
            continue
        try:
            kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
        except ConfigError as err:
            found.append(str(err))
    if found and problems is None:
        raise ConfigError(found[0])
    if problems is not None:
        problems.extend(found)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    if len(parts) < 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"{where}: override '{dotted}' must look like section.key=value "
                          f"(sections: {', '.join(SECTIONS)}){suggest(parts[0], SECTIONS)}")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: override '{dotted}': '{part}' is not a mapping")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`train.total_steps=20` -> ("train.total_steps", 20); values are read as YAML."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected section.key=value, e.g. train.total_steps=20")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        out.append((key.strip(), value))
    return out


def config_from_dict(raw: Any, where: str = "config", overrides: list[str] = (), stored: bool = False) -> Config:
    """A checked Config from a mapping plus overrides. `stored`: `raw` is a checkpoint's saved config, which
    abot wrote with every key, so only the overrides count as given (Config.given)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with sections model, data, train (and adapter)")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    given = set() if stored else {f"{name}.{key}" for name, section in raw.items()
                                  if name in SECTIONS and isinstance(section, dict) for key in section}
    # Every key and type problem across the sections and the overrides is collected, then the cross-field
    # rules run on what is left; all of them are reported in one ConfigError (its `.problems` lists them).
    problems: list[str] = []
    for item in overrides:
        try:
            for key, value in parse_overrides([item]):
                _set_dotted(raw, key, value, "command line")
                given.add(".".join(key.split(".")[:2]))  # data.source_args.x=1 gives data.source_args
        except ConfigError as err:
            problems.append(str(err))
    for key in list(raw):
        if key not in SECTIONS:
            problems.append(f"unknown section '{key}'{suggest(str(key), SECTIONS)}")
    cfg = Config(**{name: _build_section(cls, raw.get(name), name, problems) for name, cls in SECTIONS.items()},
                 given=frozenset(given))
    # A key that failed its type check holds its default: cross-field rules naming it would mislead.
    failed = {m.group(1) for p in problems for m in [re.match(r"((?:model|data|train|adapter)(?:\.\w+)?):", p)] if m}
    problems += [p for p in validation_problems(cfg)
                 if not any(re.search(rf"\b{re.escape(f)}\b", p) for f in failed)]
    if problems:
        raise _config_error(where, problems)
    return cfg


def _config_error(where: str, problems: list[str]) -> ConfigError:
    head = f"{where}: " if len(problems) == 1 else f"{where}: {len(problems)} problems:\n  "
    err = ConfigError(head + "\n  ".join(problems))
    err.problems = list(problems)
    return err


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply dotted `section.key=value` overrides, check types and cross-field rules."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the path of a YAML config file")
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; give a YAML config") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{line}: {getattr(err, 'problem', err)}") from None
    return config_from_dict(raw, str(path), overrides)


def validate(cfg: Config, where: str = "config") -> None:
    """Cross-field rules that single types cannot express; raises one ConfigError listing every problem."""
    problems = validation_problems(cfg)
    if problems:
        raise _config_error(where, problems)
