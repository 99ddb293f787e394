"""Open checkpoints for every command, and the one check of whether a checkpoint fits a config.

Resume (`--resume`, `train.checkpoint_path`), `train.init_from`, generate, chat, eval and export all come
here. A path may be a checkpoint file, a run folder (a `save_dir`), which means its newest loadable
checkpoint, or a Hugging Face model folder or Hub id (abot.models.hf), which reads as a checkpoint at step 0
whose config is its model section and whose tokenizer is the folder's. Each problem has one message,
whichever command found it; only the fix differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from abot.checkpoint import Checkpoint, latest_checkpoint, list_checkpoints, load_checkpoint, verify_checkpoint
from abot.config import Config, DataConfig, ModelConfig, config_from_dict, validation_problems
from abot.errors import AbotError, ConfigError
from abot.models import hf
from abot.tokenizer import Tokenizer, load_tokenizer, vocab_fits, vocab_rule

# Model keys that may differ between a checkpoint and the config that continues from it: every other key
# changes the parameters' shapes or what they compute.
SAFE_MODEL_CHANGES = frozenset({"dropout"})


@dataclass
class Opened:
    """A checkpoint read from disk, with the path it was resolved to."""

    path: Path
    ckpt: Checkpoint

    @property
    def step(self) -> int:
        return self.ckpt.step

    @property
    def meta(self) -> dict:
        return self.ckpt.meta

    def config(self, make: Callable[[dict, str], Config] | None = None) -> Config:
        """The config the checkpoint was trained with, through `make(raw, where)` (default: as stored)."""
        raw = self.meta.get("config")
        if not isinstance(raw, dict):
            raise AbotError(f"{self.path}: the checkpoint has no config in its meta; give a checkpoint written by "
                            "abot train, sft or dpo")
        where = f"{self.path} (its config)"
        return make(raw, where) if make else config_from_dict(raw, where, stored=True)

    @property
    def is_adapter(self) -> bool:
        """Trained adapters on a frozen base (an adapter section and the base's identity in the meta)."""
        return bool(self.meta.get("base")) and bool(((self.meta.get("config") or {}).get("adapter") or {}).get("kind"))

    def params(self) -> dict:
        """The model parameters: a training state's, or a bare {"params": ...} tree; an adapter checkpoint's are
        its base's with the adapters merged in (the base read from the path its meta names, hash checked)."""
        if self.is_adapter:
            return adapted_params(self)
        return self.trained()

    def trained(self) -> dict:
        """The parameters training updated: the model's, or an adapter checkpoint's adapters."""
        trees = self.ckpt.trees
        if isinstance(trees.get("state"), dict) and "params" in trees["state"]:
            return trees["state"]["params"]
        if isinstance(trees.get("params"), dict):
            return trees["params"]
        raise AbotError(f"{self.path}: the checkpoint holds no model parameters (no trees.state.params); "
                        "give a checkpoint written by abot train, sft or dpo")


def base_identity(path: str | Path) -> dict:
    """{"path", "sha256"} of a base model: the SHA-256 of an abot checkpoint file, or of a Hugging Face folder's
    safetensors files read in name order."""
    path = Path(path).resolve()
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return {"path": str(path), "sha256": digest.hexdigest()}


def check_base_fits(meta: dict, base: dict, where: Any, fix: str) -> None:
    """The base model's identity against the one an adapter checkpoint recorded (one message for every command)."""
    expected = meta.get("base") or {}
    if expected.get("sha256") and expected["sha256"] != base["sha256"]:
        raise AbotError(f"{where}: the adapters were trained on a different base model: {base['path']} (sha256 "
                        f"{base['sha256'][:12]}...) is not their base {expected.get('path')} (sha256 "
                        f"{expected['sha256'][:12]}...); {fix}")


def adapted_params(opened: Opened) -> dict:
    """An adapter checkpoint's model: its base (from the meta's path, hash checked) with the adapters merged."""
    from abot.adapters.tree import merge
    from abot.build import build_adapter

    recorded = opened.meta["base"]
    path = recorded.get("path", "")
    if not Path(path).exists():
        raise AbotError(f"{opened.path}: its base model {path} (adapter checkpoints hold only the adapters) is not "
                        "found from here; put the base back at that path")
    check_base_fits(opened.meta, base_identity(path), opened.path, "put the original base model back at that path")
    base = tree_map(lambda p: p.astype(mx.float32), open_checkpoint(path, f"{opened.path} (its base)").params())
    return merge(base, opened.trained(), build_adapter(opened.config()))


def resolve_checkpoint(path: str | Path, key: str = "checkpoint") -> Path:
    """A checkpoint file as given, or the newest loadable one in a run folder."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise AbotError(f"{key}: {path} is a folder with no loadable checkpoint; give a step_*.ckpt file or a "
                        "save_dir that has one")
    return found


def open_checkpoint(path: str | Path, key: str = "checkpoint") -> Opened:
    """Read the checkpoint at `path` (a file, a run folder, a Hugging Face folder or Hub id); `key` names where
    the path came from."""
    folder = hf.model_folder(path, key)
    if folder is not None:
        return open_model_folder(folder)
    path = resolve_checkpoint(path, key)
    return Opened(path, load_checkpoint(path))


def open_model_folder(folder: Path) -> Opened:
    """A Hugging Face model folder as a checkpoint at step 0: its model section, its tokenizer, its weights."""
    from abot.build import build_model

    model = hf.model_section(hf.read_config(folder), folder)
    cfg = config_from_dict({"model": model, "data": {"seq_len": min(DataConfig.seq_len, model["max_seq_len"])},
                            "train": {"tokenizer_path": str(folder)}}, f"{folder} (config.json)", stored=True)
    params = hf.params_from_tensors(hf.read_tensors(folder), cfg.to_dict()["model"], folder)
    check_params_fit(params, build_model(cfg), folder)
    return Opened(folder, Checkpoint(step=0, meta={"config": cfg.to_dict(), "source": "huggingface"},
                                     trees={"params": params}))


def with_model_folder(cfg: Config) -> Config:
    """A run whose train.init_from is a Hugging Face model takes its model section and tokenizer from it.

    The YAML needs neither; a model key it gives anyway must agree with the folder (dropout may differ), and a
    train.tokenizer_path it gives is used as given (and checked against the vocabulary like any other).
    """
    folder = hf.model_folder(cfg.train.init_from, "train.init_from") if cfg.train.init_from else None
    if folder is None:
        return cfg
    section = hf.model_section(hf.read_config(folder), folder)
    given = {k.partition(".")[2] for k in cfg.given if k.startswith("model.")}
    mine = cfg.to_dict()["model"]
    check_model_fits({k: v for k, v in section.items() if k in given}, {k: mine[k] for k in given},
                     f"train.init_from {folder}", "remove those keys from the model section: the folder gives them")
    model = ModelConfig(**{**section, **{k: mine[k] for k in given}})
    tokenizer = cfg.train.tokenizer_path if "train.tokenizer_path" in cfg.given else str(folder)
    cfg = dataclasses.replace(cfg, model=model, train=dataclasses.replace(cfg.train, tokenizer_path=tokenizer))
    problems = validation_problems(cfg)  # the folder's model against the YAML's data and train sections
    if problems:
        raise ConfigError(f"train.init_from {folder}: with the folder's model section, " + "; ".join(problems))
    return cfg


# ---------------------------------------------------------------------------------------------- the checks

def check_model_fits(stored: dict, model: dict, where: Any, fix: str) -> None:
    """The config's model section against the one a checkpoint was trained with (dropout may change).

    A key the stored section lacks (written before the key existed) held its default then: checkpoints of
    abot's own model predate n_kv_heads, rope_scaling, ...; a section with no keys at all is not compared.
    """
    if stored:
        stored = {**dataclasses.asdict(ModelConfig()), **stored}
    bad = [k for k, v in model.items() if k not in SAFE_MODEL_CHANGES and k in stored and stored[k] != v]
    if bad:
        diffs = ", ".join(f"model.{k}: checkpoint {stored[k]!r}, config {model[k]!r}" for k in bad)
        raise AbotError(f"{where}: the config's model section does not match the checkpoint's ({diffs}); {fix}")


def check_tokenizer_fits(meta: dict, tokenizer: Tokenizer, where: Any, fix: str) -> None:
    """The tokenizer against the SHA-256 a checkpoint recorded (checkpoints without one pass)."""
    expected = meta.get("tokenizer_sha256")
    if expected and expected != tokenizer.sha256:
        raise AbotError(f"{where}: the checkpoint was trained with a different tokenizer: {tokenizer.path} is not "
                        f"the tokenizer it was trained with (sha256 {tokenizer.sha256[:12]}..., the checkpoint's "
                        f"{expected[:12]}...); {fix}")


def check_params_fit(params: dict, model, where: Any) -> None:
    """Parameter paths and shapes against the configured model's, built lazily (nothing is computed)."""
    want = dict(tree_flatten(model.init(mx.random.key(0))))
    have = dict(tree_flatten(params))
    wrong = sorted(k for k in want.keys() | have.keys()
                   if k not in want or k not in have or tuple(want[k].shape) != tuple(have[k].shape))
    if wrong:
        k = wrong[0]
        detail = (f"{k}: checkpoint {tuple(have[k].shape) if k in have else 'missing'}, "
                  f"model {tuple(want[k].shape) if k in want else 'missing'}")
        raise AbotError(f"{where}: its parameters do not fit the configured model ({len(wrong)} differ, e.g. "
                        f"{detail}); use the model section it was trained with")


def check_state_fits(saved: dict, fresh: dict, where: Any) -> None:
    """AbotError listing the leaves where a checkpoint's training state differs from this config's."""
    want = {k: (v.shape, v.dtype) for k, v in tree_flatten(fresh)}
    got = {k: (v.shape, v.dtype) for k, v in tree_flatten(saved) if isinstance(v, mx.array)}
    diffs = [f"{k}: missing" for k in want if k not in got] + [f"{k}: unexpected" for k in got if k not in want]
    diffs += [f"{k}: {tuple(got[k][0])} {got[k][1]} vs {tuple(want[k][0])} {want[k][1]}"
              for k in want if k in got and got[k] != want[k]]
    if diffs:
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise AbotError(f"{where}: cannot resume, the checkpoint's training state does not fit this config "
                        f"({'; '.join(diffs[:3])}{more}); restore the model and optimizer settings it was written "
                        "with (train.optimizer_args included), or start a new run in another save_dir")


# ---------------------------------------------------------------------------------------------- for training

def check_resumable(opened: Opened, cfg: Config, tokenizer: Tokenizer, fresh_state: dict,
                    base: dict | None = None) -> list[str]:
    """Refuse a resume whose config changes the model, the optimizer, the tokenizer, the adapters or their base;
    return the safe changes ("train.lr: 0.001 -> 0.002") so they can be logged. `fresh_state` is the state this
    config would start from, `base` the identity of its frozen base (adapters)."""
    if "state" not in opened.ckpt.trees:
        held = ", ".join(map(str, opened.ckpt.trees)) or "nothing"
        raise AbotError(f"{opened.path}: not a training checkpoint (it holds {held}, no training state); give a "
                        "step_*.ckpt from a run's save_dir as train.checkpoint_path")
    old, new = opened.meta.get("config", {}), cfg.to_dict()
    restore = "restore those values or start a new run in another save_dir"
    check_model_fits(old.get("model", {}), new["model"], f"{opened.path}: cannot resume", restore)
    old_opt = old.get("train", {}).get("optimizer", new["train"]["optimizer"])
    if old_opt != new["train"]["optimizer"]:
        raise AbotError(f"{opened.path}: cannot resume, the config changes the optimizer (train.optimizer: {old_opt} "
                        f"-> {new['train']['optimizer']}) and its state does not carry over; restore "
                        "train.optimizer, or start a new run in another save_dir")
    new_adapter = dataclasses.asdict(cfg.adapter)
    old_adapter = {**new_adapter, "kind": None, **old.get("adapter", {})}
    if old_adapter != new_adapter:
        diffs = ", ".join(f"adapter.{k}: {v!r} -> {new_adapter[k]!r}" for k, v in old_adapter.items()
                          if new_adapter.get(k) != v)
        raise AbotError(f"{opened.path}: cannot resume, the config changes the adapters ({diffs}); {restore}")
    if base is not None:
        check_base_fits(opened.meta, base, f"{opened.path}: cannot resume",
                        "set train.init_from to the base the run started from, or start a new run in another save_dir")
    check_state_fits(opened.ckpt.trees["state"], fresh_state, opened.path)
    check_tokenizer_fits(opened.meta, tokenizer, opened.path, "point train.tokenizer_path at the original tokenizer")
    return [f"{sec}.{k}: {old.get(sec, {}).get(k)} -> {v}" for sec in ("data", "train")
            for k, v in new[sec].items() if old.get(sec, {}).get(k, v) != v]


def check_no_damaged_checkpoints(save_dir: Path) -> None:
    """--resume found nothing loadable: refuse to restart from step 0 over damaged checkpoints."""
    found = list_checkpoints(save_dir)
    if not found:
        return
    try:
        verify_checkpoint(found[-1][1])
        reason = f"{found[-1][1]}: cannot be loaded"
    except AbotError as err:
        reason = str(err)
    raise AbotError(f"--resume: {save_dir} holds {len(found)} checkpoint file(s) but no checkpoint there can be "
                    f"loaded (newest: {reason}); give a good one as train.checkpoint_path, or move them away "
                    "to start from step 0")


def load_init_params(cfg: Config, tokenizer: Tokenizer, model) -> tuple[dict, Path]:
    """The float32 parameters of `train.init_from` (weights only), checked against the model and tokenizer."""
    opened = open_checkpoint(cfg.train.init_from, "train.init_from")
    where = f"train.init_from {opened.path}"
    stored = (opened.meta.get("config") or {}).get("model") or {}
    check_model_fits(stored, cfg.to_dict()["model"], where,
                     "copy the model section of the config the checkpoint was trained with")
    check_tokenizer_fits(opened.meta, tokenizer, where,
                         "point train.tokenizer_path at the tokenizer of the pre-training run")
    params = opened.params()
    check_params_fit(params, model, where)
    return tree_map(lambda p: p.astype(mx.float32), params), opened.path


# ---------------------------------------------------------------------------------------------- for inference

def checkpoint_tokenizer(cfg: Config, opened: Opened, tokenizer_path: str | Path | None = None) -> Tokenizer:
    """`tokenizer_path` or the config's train.tokenizer_path, checked against the checkpoint."""
    path = Path(tokenizer_path or cfg.train.tokenizer_path)
    if not path.exists() and tokenizer_path is None:
        raise AbotError(f"{opened.path}: its tokenizer {path} (train.tokenizer_path) is not found from here; "
                        "pass --tokenizer PATH to the tokenizer the model was trained with")
    tokenizer = load_tokenizer(path)
    check_tokenizer_fits(opened.meta, tokenizer, opened.path, "pass --tokenizer PATH to the original")
    if not vocab_fits(tokenizer, cfg.model.vocab_size):
        rule = "" if tokenizer.exact_vocab else f" ({vocab_rule(tokenizer)})"
        raise AbotError(f"{path}: {tokenizer.vocab_size} tokens, but the model of {opened.path} has "
                        f"{cfg.model.vocab_size}{rule}; pass --tokenizer PATH to the tokenizer it was trained with")
    return tokenizer
