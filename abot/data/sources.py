"""Registered data sources: where the documents come from.

The contract every source (built-in or plugin, registry kind `datasets`) follows:

    source(data: DataConfig, split: str, seed: int, **source_args) -> Callable[[int], Iterable[str]]

- `split` is "train" or "eval"; the source decides what each means for its data and guarantees that the
  two never share a document.
- `source_args` are the user's `data.source_args` from the YAML.
- The returned callable takes an epoch number (0, 1, ...) and gives that pass's documents as strings.
  For a given (seed, epoch) it must give the same documents in the same order every time it is called:
  the batch pipeline resumes by replaying an epoch. Train may reorder per epoch; eval must not.
- Configuration errors (a missing field, unreachable Hub, no files) raise AbotError when the source is
  built, not later in the middle of training.

A source may instead return token windows ready for training: an object with random access to a token
stream (`abot.data.windows.WindowSource`, e.g. `shards` in abot.data.shards, pre-tokenized by `abot data
prepare`). Those skip tokenization and resume in O(1) (`abot.data.windows.WindowStream`).

A source may declare `reads`: the `data.*` keys it reads beyond the batch pipeline's own (seq_len,
shuffle_buffer, num_workers, ...), e.g. `huggingface.reads = ("dataset", ...)`. A key the user sets that it
does not read then gets a warning naming it (abot.unread); a source without `reads` gets none.
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from abot import hub
from abot.config import DataConfig
from abot.data.known import with_known_defaults
from abot.data.pipeline import buffer_shuffle, epoch_rng
from abot.errors import AbotError

Documents = Callable[[int], Iterable[str]]
SOURCE_SPLITS = ("train", "eval")

# Loaders that ship inside `datasets` and read local files (data.dataset: json + data.data_files: ...).
_FALLBACK_PACKAGED = frozenset({"json", "text", "parquet", "csv", "arrow", "pandas", "webdataset", "xml"})

# The data keys that opening a dataset and picking its split read (_open, _rows, huggingface_rows): every
# source built on them reads these (their `reads`), the text source also data.text_field.
ROWS_READS = ("dataset", "config", "split", "eval_split", "eval_fraction", "data_files", "cache_dir", "streaming")


def _check_split(split: str) -> None:
    if split not in SOURCE_SPLITS:
        raise ValueError(f"a data source's split is 'train' or 'eval', got {split!r}")


# --- the built-in offline corpus -----------------------------------------------------------------------

def stdlib_docs(data: DataConfig, split: str, seed: int, shuffle_buffer: int = 1000) -> Documents:
    """Docstrings of Python's standard library (offline, ~1.8 MB); eval is its held-out ~5% of modules."""
    from abot.data.corpus import stdlib_docs_files

    _check_split(split)
    path = stdlib_docs_files()["train" if split == "train" else "validation"]
    dataset = _load_dataset("json", "data.source: stdlib_docs", data_files=str(path), split="train",
                            streaming=True)

    def documents(epoch: int) -> Iterator[str]:
        stream = dataset
        if split == "train":
            stream = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)  # a new dataset object
            stream.set_epoch(epoch)
        for row in stream:
            yield row["text"]

    return documents


stdlib_docs.reads = ()  # the built-in corpus: no data key of its own (its shuffle buffer is a source_arg)


# --- Hugging Face datasets: the Hub, local folders, or local files through a packaged loader ------------

def huggingface(data: DataConfig, split: str, seed: int, doc_shuffle_buffer: int = 0,
                min_score: dict | None = None) -> Documents:
    """Any `datasets.load_dataset` source; eval is `data.eval_split`, or a deterministic carve of the train split.

    `doc_shuffle_buffer` (source_args): documents held in a per-epoch shuffle buffer for train (0 = the
    stored order; the batch pipeline's window shuffle still mixes nearby documents).
    `min_score` (source_args): `{field: NAME, value: X}` keeps only rows whose numeric field NAME (dotted
    for nested fields) is >= X, in train and eval alike, e.g. `{field: language_score, value: 0.65}` on
    FineWeb. Rows where it is null are dropped. The eval carve is decided before this filter.
    Datasets the guide names get their known defaults first (abot.data.known).
    """
    data = with_known_defaults(data)
    rows = huggingface_rows(data, split, seed, doc_shuffle_buffer=0, min_score=min_score)
    text_of(rows.first, data.text_field, data.dataset)  # fail now on a wrong data.text_field

    def documents(epoch: int) -> Iterator[str]:
        texts = (text_of(row, data.text_field, data.dataset) for row in rows(epoch))
        texts = (t for t in texts if t)  # null or empty text: nothing to learn from
        if split == "train" and doc_shuffle_buffer > 1:
            texts = buffer_shuffle(texts, doc_shuffle_buffer, epoch_rng(seed, epoch))
        yield from texts

    return documents


huggingface.reads = ROWS_READS + ("text_field",)


class Rows:
    """A split's rows as dicts, per epoch (callable like Documents); `first` is the first row kept."""

    def __init__(self, rows_of: Callable[[int], Iterator[dict]], first: dict):
        self._rows_of, self.first = rows_of, first

    def __call__(self, epoch: int) -> Iterator[dict]:
        return self._rows_of(epoch)


def huggingface_rows(data: DataConfig, split: str, seed: int, doc_shuffle_buffer: int = 0,
                     min_score: dict | None = None) -> Rows:
    """The rows behind `huggingface`, as dicts (for sources whose documents are not one text field, e.g.
    chat `messages`): same known defaults, eval carve or eval_split, `min_score` filter and shuffle."""
    _check_split(split)
    data = with_known_defaults(data)
    carve = data.eval_split is None  # eval = documents of data.split whose index hashes under eval_fraction
    if split == "eval" and carve and data.eval_fraction <= 0:
        raise AbotError("data.eval_fraction is 0 and data.eval_split is null, so no documents are held out "
                        "for evaluation; set data.eval_fraction (e.g. 0.01) or data.eval_split")
    hf_split = data.eval_split if (split == "eval" and not carve) else data.split
    key = "data.split" if (split == "train" or carve) else "data.eval_split"
    dataset = _open(data, hf_split, key)
    first = next(_rows(dataset, data), None)
    if first is None:
        raise AbotError(f"data.dataset '{data.dataset}' ({key}: {hf_split}) has no rows")
    passes = _score_filter(min_score, first, data.dataset)

    keep: Callable[[int], bool] = lambda i: True
    if carve and data.eval_fraction > 0:
        fraction = data.eval_fraction
        keep = (lambda i: held_out(i, fraction)) if split == "eval" else (lambda i: not held_out(i, fraction))

    def rows(epoch: int) -> Iterator[dict]:
        kept = (row for i, row in enumerate(_rows(dataset, data)) if keep(i) and passes(row))
        if split == "train" and doc_shuffle_buffer > 1:
            kept = buffer_shuffle(kept, doc_shuffle_buffer, epoch_rng(seed, epoch))
        yield from kept

    if min_score is not None:  # one more pass over the start of the stream, to fail now, not mid-training
        first = next(rows(0), None)
        if first is None:
            raise AbotError(f"data.dataset '{data.dataset}' ({key}: {hf_split}): no row has "
                            f"{min_score['field']} >= {min_score['value']} (data.source_args.min_score)")
    return Rows(rows, first)


def _score_filter(min_score: dict | None, first: dict, dataset: str) -> Callable[[dict], bool]:
    """The row predicate for source_args.min_score ({field, value}); checks it against the first row."""
    if min_score is None:
        return lambda row: True
    if not isinstance(min_score, dict) or set(min_score) != {"field", "value"} \
            or not isinstance(min_score["field"], str) or isinstance(min_score["value"], bool) \
            or not isinstance(min_score["value"], (int, float)):
        raise AbotError(f"data.source_args.min_score: expected {{field: NAME, value: NUMBER}}, got {min_score!r}")
    field, threshold = min_score["field"], float(min_score["value"])

    def score(row: dict):
        value = row
        for part in [field] if field in row else field.split("."):
            if not isinstance(value, dict) or part not in value:
                raise AbotError(f"data.source_args.min_score: '{field}' is not a field of '{dataset}'; its fields "
                                f"are: {', '.join(field_names(row))}")
            value = value[part]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise AbotError(f"data.source_args.min_score: '{field}' of '{dataset}' holds "
                            f"{type(value).__name__} values, not numbers")
        return value

    score(first)  # fail now on a wrong field
    return lambda row: (s := score(row)) is not None and s >= threshold


def held_out(index: int, fraction: float) -> bool:
    """Whether document `index` of the train split belongs to the carved-off eval set (deterministic)."""
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def field_names(row: dict, prefix: str = "") -> list[str]:
    """A row's fields, nested mappings as dotted names: ["meta", "meta.x", "text"]."""
    names = []
    for key, value in row.items():
        names.append(prefix + str(key))
        if isinstance(value, dict):
            names.extend(field_names(value, f"{prefix}{key}."))
    return names


def text_of(row: dict, text_field: str, dataset: str = "the dataset") -> str | None:
    """The text at `text_field` in `row` ("meta.x" walks nested mappings); AbotError naming the fields if absent."""
    if text_field in row:
        value = row[text_field]
    else:
        value = row
        for part in text_field.split("."):
            if not isinstance(value, dict) or part not in value:
                raise AbotError(f"data.text_field: '{text_field}' is not a field of '{dataset}'; its fields "
                                f"are: {', '.join(field_names(row))}")
            value = value[part]
    if value is None or isinstance(value, str):
        return value
    raise AbotError(f"data.text_field: '{text_field}' of '{dataset}' holds {type(value).__name__} values, "
                    "not text; point it at a string field")


def _rows(dataset, data: DataConfig) -> Iterator[dict]:
    try:
        yield from dataset
    except ConnectionError as err:  # streaming from the Hub and the network went away
        raise AbotError(f"data.dataset '{data.dataset}': lost the connection while streaming ({err})") from None
    except AbotError:
        raise
    except Exception as err:  # a malformed file: pyarrow/json errors (often ValueErrors) when its rows are read
        reason = " ".join(str(err).split())[:500]
        fix = (f"check that the files of data.data_files ({data.data_files}) are well-formed for the "
               f"'{data.dataset}' loader (json: one JSON object per line)" if data.data_files else
               "check data.dataset and data.config, or retry if the network failed")
        raise AbotError(f"data.dataset '{data.dataset}': cannot read the data ({type(err).__name__}: {reason}); "
                        f"{fix}") from None


def _packaged_loaders() -> frozenset[str]:
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES  # private, hence the fallback
        return frozenset(_PACKAGED_DATASETS_MODULES)
    except ImportError:
        return _FALLBACK_PACKAGED


_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow", ".gz", ".zst", ".bz2", ".xz")


def _looks_like_path(name: str) -> bool:
    """A Hub name is "owner/name" or "name"; anything else that does not exist is a mistyped local path."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or name.lower().endswith(_FILE_SUFFIXES))


def _open(data: DataConfig, hf_split: str, split_key: str):
    """`load_dataset` for the config, after the checks that turn slow or cryptic failures into AbotErrors."""
    name = data.dataset
    local = Path(name).expanduser()
    if name in _packaged_loaders():
        if not data.data_files:
            raise AbotError(f"data.dataset: '{name}' reads local files; set data.data_files (e.g. path/*.jsonl)")
        _check_data_files(data.data_files, Path.cwd())
    elif local.exists():
        name = str(local)
        if data.data_files and local.is_dir():
            _check_data_files(data.data_files, local)
    elif _looks_like_path(name):
        raise AbotError(f"data.dataset: '{name}' not found (a local path); fix the path, or give a Hugging Face "
                        "dataset name such as allenai/c4")
    else:
        _check_hub_reachable(name)
    return _load_dataset(name, "data.dataset", data.config, split=hf_split, streaming=data.streaming,
                         cache_dir=data.cache_dir, data_files=data.data_files, split_key=split_key)


def _check_data_files(data_files: Any, base: Path) -> None:
    patterns = data_files.values() if isinstance(data_files, dict) else [data_files]
    flat = [p for group in patterns for p in ([group] if isinstance(group, str) else group)]
    for pattern in flat:
        if "://" in str(pattern):
            continue  # remote (hf://, s3://, https://): datasets resolves those
        full = Path(pattern).expanduser()
        full = full if full.is_absolute() else base / full
        if not glob.glob(str(full), recursive=True):
            raise AbotError(f"data.data_files: '{pattern}' matches no files (looked in {base}); fix the path or glob")


def _load_dataset(name: str, key: str, *args, split_key: str = "data.split", **kwargs):
    import datasets

    try:
        return datasets.load_dataset(name, *args, **kwargs)
    except ConnectionError as err:
        raise AbotError(_hub_unreachable_message(name, str(err))) from None
    except StopIteration:  # datasets 5.x: a data_files glob matching nothing (or only empty files) ends up here
        files = kwargs.get("data_files")
        if files and _all_files_empty(files):
            raise AbotError(f"{key} '{name}': the files of data.data_files ({files}) are empty; point "
                            "data.data_files at files with rows") from None
        raise AbotError(f"{key} '{name}': data.data_files matches no files; fix the path or glob") from None
    except ValueError as err:
        if "split" in str(err).lower():
            raise AbotError(f"{split_key}: {err}") from None
        raise AbotError(f"{key} '{name}': {err}") from None
    except FileNotFoundError as err:
        raise AbotError(f"{key} '{name}': {err}") from None


def _all_files_empty(data_files: Any) -> bool:
    """True when every local file that `data_files` names (str, list or split -> patterns) exists and is empty."""
    patterns = data_files.values() if isinstance(data_files, dict) else [data_files]
    flat = [p for group in patterns for p in ([group] if isinstance(group, str) else group)]
    paths = [Path(m) for p in flat for m in glob.glob(str(Path(p).expanduser()), recursive=True)]
    return bool(paths) and all(p.is_file() and p.stat().st_size == 0 for p in paths)


def _hub_unreachable_message(name: str, reason: str) -> str:
    return (f"data.dataset '{name}': the Hugging Face Hub cannot be reached ({reason}). To train offline, point "
            "at local files: `data.dataset: json` with `data.data_files: path/*.jsonl` (or parquet, csv, text), "
            "or `data.dataset: path/to/folder` laid out like a Hub dataset (data/train-00000-of-00001.parquet). "
            "A dataset downloaded before loads from the cache with HF_HUB_OFFLINE=1.")


def _check_hub_reachable(name: str) -> None:
    """Fail in about a second when the Hub cannot be reached (abot.hub).

    Offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): no probe; `datasets` itself fails at once unless
    the dataset is in the local cache.
    """
    if hub.flag("HF_HUB_OFFLINE") or hub.flag("HF_DATASETS_OFFLINE"):
        return
    reason = hub.unreachable()
    if reason:
        raise AbotError(_hub_unreachable_message(name, reason))
