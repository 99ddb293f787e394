"""Pre-tokenized token streams (`WindowSource`, e.g. abot.data.shards): random access, O(1) resume.

`WindowStream` gives the same windows as abot.data.pipeline's `BatchStream` (window i = tokens
[i (seq_len + 1), (i + 1)(seq_len + 1)) of the concatenated stream, so unshuffled they equal `token_windows`
of the same documents), the same batch shapes and the same state `{"epoch": e, "batches": n}`, but read by
random access: an epoch is a seeded permutation of all windows, so a restored state costs one permutation,
not a replay. Data-parallel ranks read disjoint strides of it.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from abot.data.pipeline import _read_state, check_rank, epoch_rng
from abot.errors import AbotError


class WindowSource(Protocol):
    """Random access to one split's token stream: documents, each followed by EOS, concatenated.

    Window i of length w is `read(i * w, w)`; there are `n_tokens // w` of them (the tail is dropped).
    """

    n_tokens: int
    tokenizer_sha256: str | None  # of the tokenizer file the tokens were made with; None: unknown

    def read(self, start: int, length: int) -> np.ndarray: ...  # int32 tokens [start, start + length)


def is_window_source(obj: Any) -> bool:
    """Whether a data source gave a `WindowSource` (token windows) rather than a documents callable."""
    return hasattr(obj, "read") and hasattr(obj, "n_tokens")


def rank_windows(n_windows: int, rank: int, world_size: int) -> tuple[int, slice]:
    """(windows per rank, the slice of an epoch's window order that is this rank's).

    Rank r takes positions r, r + W, r + 2W, ... of the epoch's order, up to the same count for every rank
    (the last n_windows % W positions are dropped), so the ranks' windows are disjoint, and step by step
    their union is exactly what one rank with a W times larger batch would read.
    """
    check_rank(rank, world_size)
    per_rank = n_windows // world_size
    return per_rank, slice(rank, per_rank * world_size, world_size)


class WindowStream:
    """Endless iterator of (grad_accum, micro_batch, seq_len + 1) int32 batches read from a `WindowSource`.

    Epoch e reads windows in the order `epoch_rng(seed, e).permutation(n_windows)` when `shuffle`, else in
    stored order (then the batches equal a `BatchStream` of the same documents with shuffle_buffer 0). The
    same `state()` / `state=` contract as `BatchStream`; restoring costs one permutation (O(n_windows)
    integers, no token is re-read). `rank`/`world_size`: see `rank_windows`.
    """

    def __init__(self, source: WindowSource, seq_len: int, batch_shape: tuple[int, int], shuffle: bool = True,
                 seed: int = 0, state: dict | None = None, rank: int = 0, world_size: int = 1):
        grad_accum, micro_batch = batch_shape
        if seq_len < 1 or grad_accum < 1 or micro_batch < 1:
            raise AbotError(f"batch shape must be positive: seq_len={seq_len}, grad_accum_steps={grad_accum}, "
                            f"micro_batch_size={micro_batch}")
        self.source, self.seq_len, self.batch_shape = source, seq_len, (grad_accum, micro_batch)
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.window = seq_len + 1
        self.n_windows = source.n_tokens // self.window
        per_rank, self._positions = rank_windows(self.n_windows, rank, world_size)
        self._per_batch = grad_accum * micro_batch
        self.batches_per_epoch = per_rank // self._per_batch
        if self.batches_per_epoch == 0:
            raise AbotError(f"the data cannot fill a single batch: {source.n_tokens} tokens make {self.n_windows} "
                            f"windows of data.seq_len + 1 = {self.window} tokens"
                            + (f" ({per_rank} per rank of {world_size})" if world_size > 1 else "")
                            + f", and a batch needs grad_accum_steps x micro_batch_size = {self._per_batch}; "
                            "use more data, or lower data.seq_len, train.micro_batch_size or train.grad_accum_steps")
        self._epoch, self._batches = _read_state(state)
        if self._batches >= self.batches_per_epoch:
            raise AbotError(f"cannot resume the data stream at batch {self._batches} of epoch {self._epoch}: an "
                            f"epoch has only {self.batches_per_epoch} batches now; the data or data settings "
                            "changed since the checkpoint (restore them, or start the data stream afresh)")
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def state(self) -> dict:
        """Position after the last batch handed out: {"epoch": e, "batches": batches of epoch e consumed}."""
        return {"epoch": self._epoch, "batches": self._batches}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's window indices for `epoch`, in reading order (whole batches only)."""
        if self.shuffle:
            order = epoch_rng(self.seed, epoch).permutation(self.n_windows)[self._positions]
        else:
            order = np.arange(self.n_windows)[self._positions]
        return order[: self.batches_per_epoch * self._per_batch]

    def __iter__(self) -> WindowStream:
        return self

    def __next__(self) -> np.ndarray:
        if self._order_epoch != self._epoch:
            self._order, self._order_epoch = self.epoch_order(self._epoch), self._epoch
        start = self._batches * self._per_batch
        indices = self._order[start: start + self._per_batch]
        w = self.window
        batch = np.stack([self.source.read(int(i) * w, w) for i in indices]).astype(np.int32, copy=False)
        self._batches += 1
        if self._batches == self.batches_per_epoch:
            self._epoch, self._batches = self._epoch + 1, 0
        return batch.reshape(*self.batch_shape, w)

    def close(self) -> None:
        """Nothing to stop (no thread): here for the same interface as BatchStream."""

    def __enter__(self) -> WindowStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def window_eval_batches(source: WindowSource, seq_len: int, micro_batch: int, n_batches: int) -> list[np.ndarray]:
    """`eval_batches` for a WindowSource: its first windows in stored order, the same micro-batches."""
    if n_batches <= 0:
        return []
    w = seq_len + 1
    n = min(n_batches, source.n_tokens // w // micro_batch)
    if n == 0:
        raise AbotError(f"the eval data cannot fill one micro-batch of {micro_batch} x {w} tokens (it has "
                        f"{source.n_tokens} tokens); hold out more data or lower data.seq_len")
    return [np.stack([source.read((b * micro_batch + j) * w, w) for j in range(micro_batch)]).astype(np.int32)
            for b in range(n)]
