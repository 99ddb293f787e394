"""From the config to what the training loop reads: the train batch stream and the fixed eval batches.

A source that gives documents (huggingface, stdlib_docs, plugins) goes through `BatchStream` (tokenized in a
background thread); one that gives token windows (`shards`) through `WindowStream` (random access, O(1)
resume). Both hand out (grad_accum, micro_batch, seq_len + 1) int32 batches and the same resumable state.

Data-parallel ranks: `data_rank()` is (rank, world_size) of `mx.distributed`'s global group (0, 1 when no
distributed backend was launched). Each rank reads a disjoint part: every world_size-th window of the
epoch's order (shards; equal batch counts on every rank), or every world_size-th document (streaming).
Evaluation data is the same on every rank.
"""

from __future__ import annotations

import numpy as np

from abot.config import Config
from abot.data.pipeline import BatchStream, eval_batches, rank_documents
from abot.data.windows import WindowStream, is_window_source, window_eval_batches


def data_rank() -> tuple[int, int]:
    """(rank, world_size) from mx.distributed's global group; (0, 1) without a launched backend."""
    import mlx.core as mx

    if not mx.distributed.is_available():
        return 0, 1
    group = mx.distributed.init()  # idempotent; a group of one when not started by mlx.launch
    return group.rank(), group.size()


def train_stream(cfg: Config, tokenizer, state: dict | None = None, rank: int | None = None,
                 world_size: int | None = None) -> BatchStream | WindowStream:
    """The endless train batch stream for `cfg`, continuing from `state` (a checkpoint's data_state)."""
    from abot.build import build_documents
    from abot.data.shards import check_tokenizer

    d, t = cfg.data, cfg.train
    if rank is None or world_size is None:
        rank, world_size = data_rank()
    source = build_documents(cfg, "train")
    shape = (t.grad_accum_steps, t.micro_batch_size)
    if is_window_source(source):
        check_tokenizer(source, tokenizer)
        return WindowStream(source, d.seq_len, shape, shuffle=d.shuffle_buffer > 1, seed=t.seed, state=state,
                            rank=rank, world_size=world_size)
    return BatchStream(rank_documents(source, rank, world_size), tokenizer, d.seq_len, shape, d.shuffle_buffer,
                       t.seed, d.num_workers, state=state)


def eval_data(cfg: Config, tokenizer, split: str = "eval", n: int | None = None) -> list[np.ndarray]:
    """The first `n` (default train.eval_steps) micro-batches of `split`, unshuffled, the same at every evaluation."""
    from abot.build import build_documents
    from abot.data.shards import check_tokenizer

    d, t = cfg.data, cfg.train
    n = t.eval_steps if n is None else n
    if n <= 0:
        return []
    source = build_documents(cfg, split)
    if is_window_source(source):
        check_tokenizer(source, tokenizer)
        return window_eval_batches(source, d.seq_len, t.micro_batch_size, n)
    return eval_batches(source, tokenizer, d.seq_len, t.micro_batch_size, n, d.num_workers)
