"""The one place where names become functions.

Every pluggable kind (models, optimizers, schedules, datasets, losses, adapters) is a `Registry`. abot's own
entries are listed below as "module:attribute" strings and imported on first lookup; third-party
packages add entries through the entry-point group `abot.<kind>` (see docs/plugins.md).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from abot.errors import AbotError


@dataclass(frozen=True)
class Entry:
    """A registered object and where it came from."""

    name: str
    obj: Any
    source: str  # "abot" or the providing distribution's name
    version: str

    @property
    def summary(self) -> str:
        doc = (getattr(self.obj, "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else ""


def _import(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


class Registry:
    """Names of one kind -> callables; built-ins first, then entry points, loaded lazily and cached."""

    def __init__(self, kind: str, builtins: dict[str, str]):
        self.kind = kind
        self.group = f"abot.{kind}"
        self._builtins = dict(builtins)
        self._entries: dict[str, Entry] | None = None
        self._extra: dict[str, Entry] = {}

    def register(self, name: str, obj: Callable | None = None, source: str = "user"):
        """Register `obj` under `name` (also usable as a decorator). Refuses to replace an entry."""

        def add(fn):
            if name in self._builtins or name in self._extra:
                raise AbotError(f"{self.kind}: '{name}' is already registered")
            self._extra[name] = Entry(name, fn, source, "")
            return fn

        return add(obj) if obj is not None else add

    def _load(self) -> dict[str, Entry]:
        if self._entries is not None:
            return self._entries
        from abot import __version__

        entries = {name: Entry(name, _import(t), "abot", __version__) for name, t in self._builtins.items()}
        for ep in importlib.metadata.entry_points(group=self.group):
            dist = ep.dist.name if ep.dist else "unknown package"
            version = ep.dist.version if ep.dist else ""
            if ep.name in entries:
                warnings.warn(f"abot: plugin package '{dist}' registers {self.kind} '{ep.name}', which clashes "
                              f"with an existing one from '{entries[ep.name].source}'; the plugin's is ignored "
                              "(rename it in the plugin's entry points)", stacklevel=3)
                continue
            try:
                obj = ep.load()
            except Exception as err:  # a broken plugin must not break abot
                warnings.warn(f"abot: plugin package '{dist}' failed to load {self.kind} '{ep.name}' "
                              f"({ep.value}): {type(err).__name__}: {err}; it is skipped", stacklevel=3)
                continue
            if not callable(obj):
                warnings.warn(f"abot: plugin package '{dist}' registers {self.kind} '{ep.name}' as a "
                              f"{type(obj).__name__}, not a callable; it is skipped", stacklevel=3)
                continue
            entries[ep.name] = Entry(ep.name, obj, dist, version)
        self._entries = entries
        return entries

    def entries(self) -> list[Entry]:
        return sorted({**self._load(), **self._extra}.values(), key=lambda e: e.name)

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def entry(self, name: str, key: str | None = None) -> Entry:
        found = self._extra.get(name) or self._load().get(name)
        if found is None:
            names = self.names()
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            where = f" ({key})" if key else ""
            singular = self.kind[:-2] if self.kind.endswith("sses") else self.kind[:-1]  # losses -> loss
            raise AbotError(f"unknown {singular} '{name}'{where}{hint} Available: {', '.join(names)}")
        return found

    def get(self, name: str, key: str | None = None) -> Any:
        """The object registered under `name`; `key` (e.g. "train.optimizer") is named in the error."""
        return self.entry(name, key).obj


models = Registry("models", {"transformer": "abot.models.transformer:transformer"})
optimizers = Registry("optimizers", {
    "adamw": "abot.optim.adamw:adamw",
    "muon": "abot.optim.muon:muon",
    "muon_adamw": "abot.optim.muon_adamw:muon_adamw",
    "sgd": "abot.optim.sgd:sgd",
})
schedules = Registry("schedules", {
    "cosine": "abot.schedules:cosine",
    "constant": "abot.schedules:constant",
    "linear": "abot.schedules:linear",
    "wsd": "abot.schedules:wsd",
})
datasets = Registry("datasets", {
    "huggingface": "abot.data.sources:huggingface",
    "stdlib_docs": "abot.data.sources:stdlib_docs",
    "chat": "abot.finetune.sources:chat",
    "oasst1": "abot.finetune.sources:oasst1",
    "preferences": "abot.finetune.sources:preferences",
    "shards": "abot.data.shards:shards",
})
losses = Registry("losses", {
    "next_token": "abot.losses:next_token",
    "sft": "abot.finetune.losses:sft",
    "dpo": "abot.finetune.losses:dpo",
    "ipo": "abot.finetune.losses:ipo",
    "orpo": "abot.finetune.losses:orpo",
    "simpo": "abot.finetune.losses:simpo",
})

adapters = Registry("adapters", {
    "lora": "abot.adapters.lora:lora",
    "dora": "abot.adapters.dora:dora",
})

KINDS: dict[str, Registry] = {r.kind: r for r in (models, optimizers, schedules, datasets, losses, adapters)}


def accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` takes a keyword argument `name` (by that name, or through **kwargs)."""
    import inspect

    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def call_with_options(fn: Callable, options: dict, key: str, **given) -> Any:
    """Call a registered factory with `given` (those it accepts) plus the user's `options` from YAML.

    `options` are checked against `fn`'s signature, so a typo'd option is an error naming `key`.
    """
    import inspect

    params = inspect.signature(fn).parameters
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for name in options:
        if not accepts(fn, name):
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            raise AbotError(f"{key}: unknown option '{name}' for {getattr(fn, '__name__', fn)}{hint} "
                            f"It accepts: {', '.join(accepted) or 'nothing'}. (Switched from a config's choice? "
                            f"Drop the options it set with {key}={{}} on the command line.)")
    kwargs = {k: v for k, v in given.items() if accepts(fn, k)}
    try:
        return fn(**{**kwargs, **options})
    except (ValueError, TypeError) as err:  # a factory rejecting an option value
        raise AbotError(f"{key}: {getattr(fn, '__name__', fn)} rejected its options: {err}") from None
