"""A data-source plugin: every `*.txt` file under a folder is one document."""

import hashlib
from pathlib import Path

import numpy as np

from abot.errors import AbotError


def textfiles(data, split: str, seed: int, path: str, pattern: str = "*.txt"):
    """Documents from text files under `path`; a file goes to eval by a hash of its name (data.eval_fraction)."""
    root = Path(path).expanduser()
    files = sorted(root.rglob(pattern)) if root.is_dir() else []
    if not files:
        raise AbotError(f"data.source_args.path: no {pattern} files under {root}; point it at a folder of text files")

    def held_out(f: Path) -> bool:
        digest = hashlib.sha256(str(f.relative_to(root)).encode()).digest()
        return int.from_bytes(digest[:4], "little") / 2**32 < data.eval_fraction

    chosen = [f for f in files if held_out(f) == (split == "eval")]

    def documents(epoch: int):
        order = np.random.default_rng([seed, epoch]).permutation(len(chosen)) if split == "train" else range(len(chosen))
        for i in order:
            yield chosen[i].read_text(encoding="utf-8", errors="replace")

    return documents


textfiles.reads = ("eval_fraction",)  # the data keys it reads: abot warns about others the user sets (data.dataset, ...)
