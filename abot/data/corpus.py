"""The built-in offline corpus: docstrings of Python's standard library.

Every machine with Python has ~1.7 MB of English prose in its standard library, so abot can train a
tokenizer and a small model with no network at all. One document per module: the module docstring,
then its class and function docstrings in source order, joined with blank lines. Modules are read in
sorted order and split into train/validation by a hash of their relative path, so the corpus (and which
module lands in which split) is the same on every run of the same Python version. The documents are
cached as JSONL (one `{"text": ...}` per line) so data sources can read them through `datasets`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

VALIDATION_FRACTION = 0.05
SPLITS = ("train", "validation")

# Folders whose files are tests, test data or third-party code rather than the standard library's own docs
# (covers test/, idlelib/idle_test/, tkinter/test/, lib2to3/tests/, ctypes/test/, unittest/test/, ...).
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_modules(root: Path | None = None) -> list[Path]:
    """The standard library's .py files (relative to `root`), tests and site-packages left out, sorted."""
    root = root or stdlib_root()
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIPPED_DIRS.isdisjoint(rel.parts[:-1]):
            found.append(rel)
    return sorted(found, key=lambda p: p.as_posix())


def _definitions_in_order(node: ast.AST) -> Iterator[ast.AST]:
    """Classes and functions below `node`, depth first in source order (ast.walk is breadth first)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child
        yield from _definitions_in_order(child)


def module_document(source: bytes | str) -> str:
    """One module's docstrings (module, then classes and functions) joined with blank lines; "" if none.

    Raises SyntaxError/ValueError for files that do not parse.
    """
    tree = ast.parse(source)  # bytes: honours the file's coding declaration
    nodes = [tree, *_definitions_in_order(tree)]
    docs = (ast.get_docstring(n, clean=True) for n in nodes)
    return "\n\n".join(d.strip() for d in docs if d and d.strip())


def in_validation(rel_path: str) -> bool:
    """Deterministic held-out membership: ~VALIDATION_FRACTION of modules, by a hash of their path."""
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < VALIDATION_FRACTION


def stdlib_documents(root: Path | None = None) -> Iterator[tuple[str, str]]:
    """(relative path, document) for every standard library module with docstrings, in sorted order."""
    root = root or stdlib_root()
    for rel in stdlib_modules(root):
        try:
            text = module_document((root / rel).read_bytes())
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue  # e.g. deliberately broken files, or ones for another Python version
        if text:
            yield rel.as_posix(), text


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "abot" / "corpus" / f"stdlib-docs-py{sys.version_info.major}{sys.version_info.minor}"


def _write_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, path)  # readers see the old file or the whole new one, never a partial one
    finally:
        tmp.unlink(missing_ok=True)


def build_stdlib_docs(folder: Path) -> dict[str, Path]:
    """Extract the corpus and write `train.jsonl` and `validation.jsonl` (field "text") into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {s: [] for s in SPLITS}
    for rel, text in stdlib_documents():
        split = "validation" if in_validation(rel) else "train"
        rows[split].append(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    paths = {s: folder / f"{s}.jsonl" for s in SPLITS}
    for split in ("validation", "train"):  # train last: its presence marks a complete cache
        _write_atomic(paths[split], rows[split])
    return paths


def stdlib_docs_files() -> dict[str, Path]:
    """Paths of the cached corpus by split ("train", "validation"), building the cache on first use (~4 s)."""
    folder = cache_dir()
    paths = {s: folder / f"{s}.jsonl" for s in SPLITS}
    if all(p.is_file() for p in paths.values()):
        return paths
    return build_stdlib_docs(folder)
