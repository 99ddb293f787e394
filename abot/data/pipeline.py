"""Documents -> fixed-shape token batches: deterministic, resumable, tokenized ahead of the training step.

Per epoch: documents (from a source, see abot.data.sources) are tokenized in chunks, each followed by EOS
(and preceded by BOS where the tokenizer prepends one, `Tokenizer.add_bos`), concatenated, and cut into windows of seq_len + 1 tokens (inputs are window[:-1], targets window[1:];
consecutive windows share no token, and the tail shorter than a window is dropped at the end of the epoch).
Windows pass through a streaming shuffle buffer seeded by (seed, epoch) and are stacked into int32 arrays
of shape (grad_accum, micro_batch, seq_len + 1); windows left over at the end of an epoch that cannot fill a
batch are dropped. A batch never mixes two epochs, so `{"epoch": e, "batches": n}` pins the position.

Resuming replays epoch e deterministically and skips its first n batches. That costs re-tokenizing the
skipped part of the epoch (~1 M tokens/s per thread); pre-tokenized shards make it instant (below).

Pre-tokenized token streams (`WindowSource`, e.g. abot.data.shards) go through abot.data.windows instead.
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from abot.errors import AbotError
from abot.tokenizer import document_start

Documents = Callable[[int], Iterable[str]]
DOCS_PER_CHUNK = 64  # documents per encode_batch call: large enough for threads, small enough to keep latency low
PREFETCH_BATCHES = 4  # bound on batches tokenized ahead (and on the memory they take)


class Encoder(Protocol):
    """What the pipeline needs from a tokenizer (abot.tokenizer.Tokenizer, or a fake in tests)."""

    eos_id: int  # the document separator (a real tokenizer also has bos_id and add_bos)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]: ...


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    # A SeedSequence of both numbers: (seed 0, epoch 1) and (seed 1, epoch 0) give unrelated streams.
    return np.random.default_rng([seed, epoch])


def buffer_shuffle(items: Iterable[Any], buffer_size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Streaming shuffle: hold `buffer_size` items, emit a random one as each new item arrives.

    Memory is bounded by the buffer; an item moves about buffer_size places at most. 0 or 1 = no shuffle.
    """
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = int(rng.integers(buffer_size))
        buffer[j], item = item, buffer[j]
        yield item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def token_windows(docs: Iterable[str], tokenizer: Encoder, window: int, num_threads: int = 1,
                  docs_per_chunk: int = DOCS_PER_CHUNK) -> Iterator[np.ndarray]:
    """Documents -> consecutive, non-overlapping int32 windows of `window` tokens (each [BOS] + document + EOS)."""
    eos, start = tokenizer.eos_id, document_start(tokenizer)
    carry = np.empty(0, dtype=np.int32)  # tokens after the last full window, continued by the next chunk
    for chunk in _chunks(docs, docs_per_chunk):
        chunk = [d for d in chunk if d]  # an empty document would only add a stray EOS
        flat: list[int] = []
        for ids in tokenizer.encode_batch(chunk, num_threads):
            flat.extend(start)
            flat.extend(ids)
            flat.append(eos)
        tokens = np.concatenate([carry, np.asarray(flat, dtype=np.int32)])
        n = len(tokens) // window
        # Copies, not views: a view would keep its whole chunk alive while it waits in a shuffle buffer.
        yield from (row.copy() for row in tokens[: n * window].reshape(n, window))
        carry = tokens[n * window:]


def _with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """(item, is_last) pairs: one item of look-ahead."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class BatchStream:
    """Endless iterator of (grad_accum, micro_batch, seq_len + 1) int32 batches, epoch after epoch.

    `state()` after a batch, passed back as `state=`, makes a new stream continue with exactly the next
    batch. Tokenization runs ahead in a daemon thread with a bounded queue; its errors are raised here.
    """

    def __init__(self, docs: Documents, tokenizer: Encoder, seq_len: int, batch_shape: tuple[int, int],
                 shuffle_buffer: int = 0, seed: int = 0, num_workers: int = 1, state: dict | None = None,
                 prefetch: int = PREFETCH_BATCHES):
        grad_accum, micro_batch = batch_shape
        if seq_len < 1 or grad_accum < 1 or micro_batch < 1:
            raise AbotError(f"batch shape must be positive: seq_len={seq_len}, grad_accum_steps={grad_accum}, "
                            f"micro_batch_size={micro_batch}")
        self.docs, self.tokenizer, self.seq_len = docs, tokenizer, seq_len
        self.batch_shape = (grad_accum, micro_batch)
        self.shuffle_buffer, self.seed, self.num_workers = shuffle_buffer, seed, max(1, num_workers)
        self._epoch, self._batches = _read_state(state)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def state(self) -> dict:
        """Position after the last batch handed out: {"epoch": e, "batches": batches of epoch e consumed}."""
        return {"epoch": self._epoch, "batches": self._batches}

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> np.ndarray:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._thread = threading.Thread(  # daemon: never blocks interpreter exit
                target=_produce, args=(self._batches_of(), self._epoch, self._batches, self._queue, self._stop),
                daemon=True, name="abot-batches")
            self._thread.start()
        while True:
            try:
                item = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._error = RuntimeError("the batch producer thread stopped without a result")
                    raise self._error from None
        if isinstance(item, _Failure):
            self._error = item.error
            raise self._error
        epoch, index, batch, last = item
        self._epoch, self._batches = (epoch + 1, 0) if last else (epoch, index + 1)
        return batch

    def close(self, timeout: float = 10.0) -> None:
        """Stop the producer thread and wait up to `timeout` s for it to leave (at its next hand-off).

        Waiting matters at exit: a daemon thread still inside native code when the interpreter finalizes (a
        SentencePiece batch encode) is torn down by pthread_exit, which aborts the process with "terminate
        called without an active exception" after a run has finished and saved.
        """
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)  # absent if __init__ raised
        if stop is not None:
            stop.set()

    def _batches_of(self) -> Callable[[int], Iterator[np.ndarray]]:
        """epoch -> that epoch's batches, closing over the settings only (not over this stream)."""
        return functools.partial(epoch_batches, self.docs, self.tokenizer, self.seq_len, self.batch_shape,
                                 shuffle_buffer=self.shuffle_buffer, seed=self.seed, num_workers=self.num_workers)


def epoch_batches(docs: Documents, tokenizer: Encoder, seq_len: int, batch_shape: tuple[int, int], epoch: int,
                  shuffle_buffer: int = 0, seed: int = 0, num_workers: int = 1) -> Iterator[np.ndarray]:
    """One epoch's (grad_accum, micro_batch, seq_len + 1) batches. AbotError if there is not a single one."""
    grad_accum, micro_batch = batch_shape
    per_batch = grad_accum * micro_batch
    counted = [0]

    def count(windows):
        for w in windows:
            counted[0] += 1
            yield w

    windows = count(token_windows(docs(epoch), tokenizer, seq_len + 1, num_workers))
    windows = buffer_shuffle(windows, shuffle_buffer, epoch_rng(seed, epoch))
    batches = 0
    for group in _chunks(windows, per_batch):
        if len(group) < per_batch:
            break  # the epoch's last, partial batch
        batches += 1
        yield np.stack(group).reshape(grad_accum, micro_batch, seq_len + 1)
    if batches == 0:
        raise AbotError(f"the data cannot fill a single batch: epoch {epoch} gave {counted[0]} windows of "
                        f"data.seq_len + 1 = {seq_len + 1} tokens, and a batch needs grad_accum_steps x "
                        f"micro_batch_size = {per_batch}; use more data, or lower data.seq_len, "
                        "train.micro_batch_size or train.grad_accum_steps")


# The producer gets no reference to its BatchStream, so an abandoned stream is garbage-collected, and its
# __del__ sets `stop`, which ends the thread at its next hand-off.
def _produce(batches_of: Callable[[int], Iterator[np.ndarray]], epoch: int, skip: int, out: queue.Queue,
             stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            seen = 0
            for index, (batch, last) in enumerate(_with_last(batches_of(epoch))):
                seen = index + 1
                if index >= skip and not _put(out, (epoch, index, batch, last), stop):
                    return
            if seen < skip:
                raise AbotError(f"cannot resume the data stream at batch {skip} of epoch {epoch}: that epoch "
                                f"has only {seen} batches now; the data or data settings changed since the "
                                "checkpoint (restore them, or start the data stream afresh)")
            epoch, skip = epoch + 1, 0
    except BaseException as err:  # hand everything to the consumer, which raises it
        _put(out, _Failure(err), stop)


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Block until the queue takes `item`; False if the stream was closed meanwhile."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _read_state(state: dict | None) -> tuple[int, int]:
    if state is None:
        return 0, 0
    try:
        epoch, batches = state["epoch"], state["batches"]
    except (KeyError, TypeError):
        raise AbotError(f"data stream state {state!r} is not of the form {{'epoch': E, 'batches': N}}; "
                        "the checkpoint's data state is damaged") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, batches)):
        raise AbotError(f"data stream state {state!r}: epoch and batches must be integers >= 0")
    return epoch, batches


def eval_batches(docs: Documents, tokenizer: Encoder, seq_len: int, micro_batch: int, n_batches: int,
                 num_workers: int = 1) -> list[np.ndarray]:
    """The eval split's first `n_batches` micro-batches, (micro_batch, seq_len + 1) int32, unshuffled.

    Computed once and reused at every evaluation, so losses are comparable across steps. Fewer than
    `n_batches` if the eval data runs out; AbotError if it cannot fill one.
    """
    if n_batches <= 0:
        return []
    windows = token_windows(docs(0), tokenizer, seq_len + 1, max(1, num_workers))
    out = []
    for group in _chunks(windows, micro_batch):
        if len(group) < micro_batch:
            break
        out.append(np.stack(group))
        if len(out) == n_batches:
            break
    if not out:
        raise AbotError(f"the eval data cannot fill one micro-batch of {micro_batch} x {seq_len + 1} tokens; "
                        "hold out more data (data.eval_fraction or data.eval_split) or lower data.seq_len")
    return out


def rank_documents(docs: Documents, rank: int, world_size: int) -> Documents:
    """The documents of one data-parallel rank: every `world_size`-th document from the `rank`-th.

    Ranks see disjoint documents that together make up the whole epoch. Every rank still reads (but does
    not tokenize) all documents. Their epochs end at slightly different steps; shards avoid that.
    """
    check_rank(rank, world_size)
    if world_size == 1:
        return docs
    return lambda epoch: itertools.islice(docs(epoch), rank, None, world_size)


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise AbotError(f"data rank {rank} of world size {world_size}: need 0 <= rank < world_size")
