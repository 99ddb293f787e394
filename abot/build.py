"""From a resolved config to the pure functions of a run: registry lookups, nothing else.

Each builder reads its section of the config, looks its name up in the registry and calls the
factory with the options the config gives it (checked against the factory's signature).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from abot import registry
from abot.config import Config
from abot.errors import AbotError
from abot.registry import call_with_options

# Characters of text used to train a tokenizer from a streaming source (SentencePiece samples further).
TOKENIZER_TRAINING_CHARS = 200_000_000


def build_model(cfg: Config):
    factory = registry.models.get(cfg.model.name, "model.name")
    return factory(cfg.model, gradient_checkpointing=cfg.train.gradient_checkpointing)


def build_optimizer(cfg: Config, model=None):
    """The configured optimizer; `model` (its `Model`) gives it the model's `param_role`, if it takes one."""
    t = cfg.train
    given = {"weight_decay": t.weight_decay}
    if t.momentum is not None:  # the guide's Muon momentum; ignored by optimizers without momentum
        given["momentum"] = t.momentum
    if model is not None:  # which leaves are hidden matrices, embedding, head (abot.models.roles)
        given["param_role"] = model.param_role
    return call_with_options(registry.optimizers.get(t.optimizer, "train.optimizer"), t.optimizer_args,
                             "train.optimizer_args", **given)


def build_adapter(cfg: Config):
    """The adapter kind of the adapter section (abot.adapters.kind.AdapterKind), None for full fine-tuning."""
    a = cfg.adapter
    if a.kind is None:
        return None
    return call_with_options(registry.adapters.get(a.kind, "adapter.kind"), {}, "adapter",
                             rank=a.rank, alpha=a.alpha, dropout=a.dropout)


def build_schedule(cfg: Config) -> Callable[[int], float]:
    t = cfg.train
    return call_with_options(registry.schedules.get(t.schedule, "train.schedule"), t.schedule_args,
                             "train.schedule_args", lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                             total_steps=t.total_steps)


def build_loss(name: str = "next_token"):
    return registry.losses.get(name, "loss")


def build_documents(cfg: Config, split: str):
    """The configured source's documents for `split` ("train" or "eval"): a callable epoch -> iterable of str."""
    source = registry.datasets.get(cfg.data.source, "data.source")
    return call_with_options(source, cfg.data.source_args, "data.source_args", data=cfg.data, split=split,
                             seed=cfg.train.seed)


def ensure_tokenizer(cfg: Config, say: Callable[[str], None] = print):
    """Load `train.tokenizer_path`, training it first on the configured data if it does not exist.

    A Hugging Face folder or tokenizer.json is loaded, never trained; its vocabulary may be smaller than
    model.vocab_size (padded embeddings), abot's SentencePiece model must match it exactly (`vocab_rule`).
    """
    from abot.tokenizer import is_hf_path, load_tokenizer, train_tokenizer, vocab_fits, vocab_rule

    path = Path(cfg.train.tokenizer_path)
    if not path.exists() and not is_hf_path(path):
        say(f"Tokenizer {path} not found: training a {cfg.model.vocab_size}-token BPE tokenizer on "
            f"{cfg.data.source} data (first {TOKENIZER_TRAINING_CHARS // 1_000_000} MB at most)...")
        train_tokenizer(_take_chars(build_documents(cfg, "train")(0), TOKENIZER_TRAINING_CHARS),
                        cfg.model.vocab_size, path)
    tokenizer = load_tokenizer(path)
    if not vocab_fits(tokenizer, cfg.model.vocab_size):
        fix = ("or point train.tokenizer_path at a new path to train a matching tokenizer" if tokenizer.exact_vocab
               else f"({vocab_rule(tokenizer)})")
        raise AbotError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                        f"{cfg.model.vocab_size}; set model.vocab_size: {tokenizer.vocab_size}, {fix}")
    return tokenizer


def _take_chars(docs, limit: int):
    total = 0
    for doc in docs:
        if total >= limit:
            return
        total += len(doc)
        yield doc
