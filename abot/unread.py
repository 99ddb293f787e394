"""Keys the user set that the chosen components never read, each a warning that names the key and the fix.

Only what is certain: a data source's declared `reads` (a source that declares none is not judged), whether
the optimizer's or the schedule's factory takes the key, and data.overlong, which pre-training never reads.
Only keys the user wrote count (Config.given), so a default left alone never warns.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

from abot import registry
from abot.config import Config, DataConfig
from abot.errors import AbotError
from abot.registry import Registry, accepts

# Data keys the batch pipeline reads whatever the source (abot.data.loader, abot.finetune.stage).
PIPELINE_READS = frozenset({"source", "source_args", "seq_len", "shuffle_buffer", "num_workers"})
# Train keys passed to the chosen factory only when its signature takes them (abot.build).
OPTIMIZER_KEYS = ("momentum",)
SCHEDULE_KEYS = ("warmup_steps", "min_lr")


class Unread(NamedTuple):
    """One given key that nothing reads: `detail` says which component ignores it, `fix` what to do."""

    key: str
    detail: str
    fix: str

    def __str__(self) -> str:
        return f"{self.detail}; {self.fix}"


def unread_keys(cfg: Config) -> list[Unread]:
    """Every key the user gave that the chosen data source, optimizer or schedule does not read."""
    return [*_unread_data(cfg), *_unread_factory_keys(cfg, registry.optimizers, "optimizer", OPTIMIZER_KEYS),
            *_unread_factory_keys(cfg, registry.schedules, "schedule", SCHEDULE_KEYS)]


def _kind(source: Callable) -> str:
    return getattr(source, "produces", "text")


def _unread_data(cfg: Config) -> list[Unread]:
    """data.* keys the source does not declare in `reads`, and data.overlong given to a text (pre-training) source."""
    d = cfg.data
    try:
        source = registry.datasets.get(d.source, "data.source")
    except AbotError:  # a typo'd name is reported where the config is checked
        return []
    out = []
    if "data.overlong" in cfg.given and _kind(source) == "text":
        out.append(Unread("data.overlong", f"data.overlong: set to {d.overlong!r}, but abot train (data.source "
                          f"'{d.source}' gives text) does not read it: pre-training packs documents into "
                          "windows, so no example is over long",
                          "remove data.overlong (abot sft and dpo read it)"))
    reads = getattr(source, "reads", None)
    if reads is None:  # a source that does not say what it reads: nothing is certain
        return out
    read = PIPELINE_READS | {"overlong"} | set(reads)
    for key in [f.name for f in dataclasses.fields(DataConfig) if f.name not in read]:
        if f"data.{key}" in cfg.given:
            readers = [e.name for e in registry.datasets.entries()
                       if key in (getattr(e.obj, "reads", None) or ()) and _kind(e.obj) == _kind(source)]
            use = f"set data.source to one that reads it ({', '.join(readers)}), or " if readers else ""
            out.append(Unread(f"data.{key}", f"data.{key}: set to {getattr(d, key)!r}, but data.source "
                              f"'{d.source}' does not read it ({_what_it_reads(source, reads)})",
                              f"{use}remove data.{key}"))
    return out


def _what_it_reads(source: Callable, reads) -> str:
    """"it reads ..." from the first clause of the source's docstring, else from its declared keys."""
    summary = ((source.__doc__ or "").strip().splitlines() or [""])[0].split(";")[0].rstrip(".")
    if not summary:
        return "it reads " + (", ".join(f"data.{k}" for k in reads) or "no data key of its own")
    first = summary.split(" ")[0]
    return "it reads " + (summary[0].lower() + summary[1:] if first[1:].islower() else summary)


def _takes(fn: Callable, key: str) -> bool:
    try:
        return accepts(fn, key)
    except (ValueError, TypeError):  # no signature to read: it may take anything
        return True


def _unread_factory_keys(cfg: Config, kind: Registry, role: str, keys: tuple[str, ...]) -> list[Unread]:
    """train.KEY given (and not null) while the factory named by train.ROLE does not take KEY."""
    name = getattr(cfg.train, role)
    try:
        factory = kind.get(name, f"train.{role}")
    except AbotError:
        return []
    out = []
    for key in keys:
        value = getattr(cfg.train, key)
        if f"train.{key}" not in cfg.given or value is None or _takes(factory, key):
            continue
        readers = [e.name for e in kind.entries() if _takes(e.obj, key)]
        use = f"set train.{role} to one that takes it ({', '.join(readers)}), or " if readers else ""
        out.append(Unread(f"train.{key}", f"train.{key}: set to {value!r}, but train.{role} '{name}' does not "
                          f"read it (its factory takes no {key})", f"{use}remove train.{key}"))
    return out
