"""Pre-tokenized token shards: `abot data prepare` writes them, the `shards` data source reads them.

A shards folder holds, per split ("train", "eval"), the split's documents tokenized once, each followed by
EOS, concatenated and cut into files of `tokens_per_shard` tokens:

    DIR/train-00000.bin, train-00001.bin, ...   raw little-endian uint16 (vocab_size <= 65535) or uint32
    DIR/eval-00000.bin, ...                     no header: the dtype and token counts are in meta.json
    DIR/tokenizer.model                         a copy of the tokenizer the tokens were made with
    DIR/meta.json                               written last: its presence marks a complete folder

meta.json: {"format": "abot-token-shards", "format_version": 1, "abot_version", "created",
"tokenizer_sha256", "tokenizer_path", "vocab_size", "eos_id", "dtype", "tokens_per_shard", "source": {how
the documents were read}, "splits": {"train": {"files": [...], "tokens": [per file], "total_tokens",
"documents", "truncated"}, "eval": {...}}}.

Documents come from the configured source exactly as training would stream them in epoch 0 (same seed),
so reading the shards in order gives the same windows as streaming with shuffle_buffer 0. Reading is by
np.memmap (a window may span two files), so any data.seq_len works with the same shards.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from abot.config import Config, DataConfig
from abot.data.pipeline import DOCS_PER_CHUNK, Encoder, _chunks
from abot.errors import AbotError
from abot.tokenizer import document_start

FORMAT = "abot-token-shards"
FORMAT_VERSION = 1
META = "meta.json"
TOKENIZER_COPY = "tokenizer.model"
HF_TOKENIZER_COPY = "tokenizer.json"  # the copy's name when the tokenizer is a Hugging Face one
SPLITS = ("train", "eval")
DEFAULT_TOKENS_PER_SHARD = 1 << 26  # 64 Mi tokens: 128 MiB files at uint16
DEFAULT_MAX_EVAL_TOKENS = 10_000_000  # evaluation reads train.eval_steps micro-batches: this is plenty


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32; little-endian either way."""
    return np.dtype("<u2") if vocab_size <= 0xFFFF else np.dtype("<u4")


# --- writing -------------------------------------------------------------------------------------------------

class _ShardWriter:
    """Appends tokens to `{split}-NNNNN.bin` files of `tokens_per_shard` tokens (temporary names until done)."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, tokens_per_shard: int):
        self.folder, self.split, self.dtype, self.per_shard = folder, split, dtype, tokens_per_shard
        self.files: list[str] = []
        self.counts: list[int] = []
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self.counts[-1] == self.per_shard:
                self._open_next()
            room = self.per_shard - self.counts[-1]
            part, tokens = tokens[:room], tokens[room:]
            self._file.write(part.astype(self.dtype, copy=False).tobytes())
            self.counts[-1] += len(part)

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        self.files.append(name)
        self.counts.append(0)
        self._file = open(self.folder / name, "wb")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_split(docs: Iterable[str], tokenizer: Encoder, folder: Path, split: str, vocab_size: int,
                max_tokens: int | None = None, tokens_per_shard: int = DEFAULT_TOKENS_PER_SHARD,
                num_threads: int = 1, progress: Callable[[int], None] | None = None) -> dict:
    """Tokenize `docs` (each + EOS) into `folder/{split}-NNNNN.bin`; the split's entry for meta.json.

    Stops after exactly `max_tokens` tokens when given (the last document may be cut).
    """
    if tokens_per_shard < 1:
        raise AbotError(f"tokens per shard must be positive, got {tokens_per_shard}")
    dtype, eos, start = token_dtype(vocab_size), tokenizer.eos_id, document_start(tokenizer)
    writer = _ShardWriter(folder, split, dtype, tokens_per_shard)
    total = documents = 0
    truncated = False
    try:
        for chunk in _chunks(docs, DOCS_PER_CHUNK):
            chunk = [d for d in chunk if d]  # as token_windows: an empty document adds nothing
            if not chunk:
                continue
            encoded = tokenizer.encode_batch(chunk, num_threads)
            tokens: list[int] = []
            for ids in encoded:
                tokens.extend(start)
                tokens.extend(ids)
                tokens.append(eos)
            flat = np.asarray(tokens, dtype=np.int64)
            if len(flat) and (flat.min() < 0 or flat.max() >= vocab_size):
                raise AbotError(f"the tokenizer gave ids outside 0..{vocab_size - 1}; vocab_size is wrong")
            if max_tokens is not None and total + len(flat) >= max_tokens:
                flat, truncated = flat[: max_tokens - total], True
            writer.write(flat)
            total += len(flat)
            documents += len(chunk)
            if progress:
                progress(total)
            if truncated:
                break
    finally:
        writer.close()
    return {"files": writer.files, "tokens": writer.counts, "total_tokens": total, "documents": documents,
            "truncated": truncated}


def describe_source(data: DataConfig, seed: int) -> dict:
    """What the documents were read from, for meta.json (known-dataset defaults applied)."""
    from abot.data.known import with_known_defaults

    out = {"source": data.source, "source_args": data.source_args, "seed": seed, "epoch": 0}
    if data.source == "huggingface":
        d = with_known_defaults(data)
        out.update(dataset=d.dataset, config=d.config, split=d.split, eval_split=d.eval_split,
                   eval_fraction=d.eval_fraction, text_field=d.text_field, data_files=d.data_files)
    return out


def prepare(cfg: Config, out: str | Path, max_tokens: int | None = None,
            max_eval_tokens: int | None = DEFAULT_MAX_EVAL_TOKENS,
            tokens_per_shard: int = DEFAULT_TOKENS_PER_SHARD, force: bool = False,
            say: Callable[[str], None] = print) -> dict:
    """Tokenize the configured source's train and eval documents into a shards folder; return its meta.

    The tokenizer at train.tokenizer_path is used (trained first if missing, as `abot train` does). Train
    documents are epoch 0's, in the order training would stream them with train.seed.
    """
    from abot import __version__
    from abot.build import build_documents, ensure_tokenizer

    if cfg.data.source == "shards":
        raise AbotError("data.source is already 'shards': prepare reads a text source (huggingface, "
                        "stdlib_docs, ...) and writes shards from it")
    for name, value in [("--max-tokens", max_tokens), ("--max-eval-tokens", max_eval_tokens)]:
        if value is not None and value < 1:
            raise AbotError(f"{name} must be positive, got {value}")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise AbotError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not force:
            raise AbotError(f"{folder}: not empty; pass --force to replace its shards, or choose another --out")
        _remove_shards(folder)
    folder.mkdir(parents=True, exist_ok=True)

    tokenizer = ensure_tokenizer(cfg, say)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "abot_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tokenizer_sha256": tokenizer.sha256, "tokenizer_path": str(tokenizer.path),
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "dtype": token_dtype(tokenizer.vocab_size).name, "tokens_per_shard": tokens_per_shard,
            "source": describe_source(cfg.data, cfg.train.seed), "splits": {}}
    limits = {"train": max_tokens, "eval": max_eval_tokens}
    for split in SPLITS:
        docs = build_documents(cfg, split)
        if not callable(docs):
            raise AbotError(f"data.source '{cfg.data.source}' does not give documents to tokenize")
        say(f"Tokenizing {split} documents into {folder}/{split}-*.bin"
            + (f" (at most {limits[split]:,} tokens)" if limits[split] else "") + "...")
        meta["splits"][split] = write_split(docs(0), tokenizer, folder, split, tokenizer.vocab_size,
                                            limits[split], tokens_per_shard, cfg.data.num_workers,
                                            progress=_progress(say, split))
        entry = meta["splits"][split]
        say(f"  {split}: {entry['total_tokens']:,} tokens from {entry['documents']:,} documents in "
            f"{len(entry['files'])} file(s)")
    shutil.copyfile(tokenizer.path, folder / (HF_TOKENIZER_COPY if tokenizer.kind == "huggingface" else TOKENIZER_COPY))
    tmp = folder / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / META)  # last: a folder with meta.json is complete
    return meta


def _progress(say: Callable[[str], None], split: str, every: int = 50_000_000) -> Callable[[int], None]:
    mark = [every]

    def report(total: int) -> None:
        if total >= mark[0]:
            say(f"  {split}: {total:,} tokens so far")
            mark[0] = (total // every + 1) * every

    return report


def _remove_shards(folder: Path) -> None:
    """Remove what a previous prepare wrote (and nothing else) before writing anew."""
    for path in folder.iterdir():
        if path.is_file() and (path.name in (META, TOKENIZER_COPY, HF_TOKENIZER_COPY, f".{META}.tmp")
                               or (path.suffix == ".bin" and path.name.split("-")[0] in SPLITS)):
            path.unlink()


# --- reading -------------------------------------------------------------------------------------------------

def read_meta(folder: str | Path) -> dict:
    """meta.json of a shards folder, checked; AbotError saying what is wrong and how to fix it."""
    folder = Path(folder)
    meta_path = folder / META
    if not folder.is_dir():
        raise AbotError(f"data.dataset '{folder}': no such folder; with data.source: shards it is the folder "
                        "`abot data prepare CONFIG --out DIR` wrote")
    if not meta_path.is_file():
        raise AbotError(f"data.dataset '{folder}': no {META} in it, so not a complete shards folder (an "
                        "interrupted `abot data prepare`?); run `abot data prepare CONFIG --out DIR` again")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise AbotError(f"{meta_path}: not valid JSON; run `abot data prepare` again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AbotError(f"{meta_path}: not an abot shards folder (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AbotError(f"{meta_path}: shards format version {meta.get('format_version')}, this abot reads "
                        f"{FORMAT_VERSION}; run `abot data prepare` again with this version")
    return meta


class ShardSet:
    """One split of a shards folder as a `WindowSource`: a token stream read by memmap, files opened lazily.

    Not a document source: calling it (as tokenizer training would) raises an AbotError explaining why.
    """

    def __init__(self, folder: str | Path, split: str, meta: dict | None = None):
        self.folder = Path(folder)
        self.meta = meta if meta is not None else read_meta(self.folder)
        self.split = split
        entry = self.meta.get("splits", {}).get(split)
        if not entry or not entry.get("total_tokens"):
            raise AbotError(f"{self.folder}: the shards hold no {split} tokens; prepare them from a config "
                            "whose source has that split")
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.tokenizer_sha256 = self.meta.get("tokenizer_sha256")
        self.files = [self.folder / name for name in entry["files"]]
        counts = [int(c) for c in entry["tokens"]]
        for path, count in zip(self.files, counts):
            size = path.stat().st_size if path.is_file() else -1
            if size != count * self.dtype.itemsize:
                raise AbotError(f"{path}: " + ("missing" if size < 0 else f"{size} bytes, expected "
                                               f"{count * self.dtype.itemsize}")
                                + "; the shards folder is damaged, run `abot data prepare` again")
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n_tokens = int(self.starts[-1])
        self._maps: dict[int, np.memmap] = {}

    def _map(self, k: int) -> np.memmap:
        m = self._maps.get(k)
        if m is None:
            m = self._maps[k] = np.memmap(self.files[k], dtype=self.dtype, mode="r")
        return m

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int32 (a window may span files)."""
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside 0..{self.n_tokens}")
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        offset = start - int(self.starts[k])
        first = self._map(k)[offset: offset + length]
        if len(first) == length:
            return first.astype(np.int32)
        parts, got = [first], len(first)
        while got < length:
            k += 1
            part = self._map(k)[: length - got]
            parts.append(part)
            got += len(part)
        return np.concatenate(parts).astype(np.int32)

    def __call__(self, epoch: int) -> Iterator[str]:
        raise AbotError(f"data.source: shards ({self.folder}) holds tokens, not text, so it cannot train a "
                        f"tokenizer; point train.tokenizer_path at the tokenizer the shards were made with "
                        f"(a copy is {self.folder / TOKENIZER_COPY})")


def check_tokenizer(source, tokenizer, where: str = "data.dataset") -> None:
    """Refuse token windows made with another tokenizer than the config's (by the model file's sha256)."""
    made_with = getattr(source, "tokenizer_sha256", None)
    if made_with is not None and made_with != tokenizer.sha256:
        folder = getattr(source, "folder", where)
        raise AbotError(f"{folder}: these shards were tokenized with another tokenizer (sha256 "
                        f"{made_with[:12]}...) than train.tokenizer_path {tokenizer.path} (sha256 "
                        f"{tokenizer.sha256[:12]}...); point train.tokenizer_path at the one they were made with "
                        f"({Path(str(folder)) / TOKENIZER_COPY} is a copy), or prepare them again with this one")


def shards(data: DataConfig, split: str, seed: int) -> ShardSet:
    """Pre-tokenized shards from `abot data prepare` (data.dataset: the folder); O(1) resume, no tokenizing."""
    if split not in SPLITS:
        raise ValueError(f"a data source's split is 'train' or 'eval', got {split!r}")
    return ShardSet(Path(data.dataset).expanduser(), split)


shards.reads = ("dataset",)  # the folder; how its documents were read is fixed in its meta.json

