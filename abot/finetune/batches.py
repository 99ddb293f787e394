"""Conversations and preference pairs -> fixed-shape, padded token batches with loss masks.

One conversation per row, rendered with the tokenizer's chat template (abot.chat_template: abot's own, or a
Hugging Face model's Jinja) and right-padded with the tokenizer's pad id to `seq_len + 1` tokens. Attention is causal, so a real token never sees padding and no row sees another
conversation: padding per sequence needs no block-diagonal mask. Shapes never change, so the compiled step
is traced once.

- SFT example: {"tokens": (L + 1,) int32, "mask": (L,) float32}, mask[t] = 1 where tokens[t + 1] is an
  assistant token (text and its end-of-turn marker): the template's mask shifted onto targets. Padding is 0.
- DPO example: {"chosen", "rejected": (L + 1,), "chosen_mask", "rejected_mask": (L,)}; the masks cover the
  final assistant message only (its run of the template's mask; everything before it is prompt).

Bad input is dropped and counted per reason, never silently (DataStats, reported in the run's summary):
`malformed` (not a list of {role, content} with a known role), `empty_message` (blank content),
`no_assistant_turn` (nothing to learn; for pairs: a side not ending with an assistant reply),
`prompt_mismatch` (chosen and rejected differ before their last message), `identical_responses`, and
`too_long` (over seq_len + 1 tokens with `data.overlong: drop`, or no response token left after truncating).
With `data.overlong: truncate` (default) a long sequence keeps its first seq_len + 1 tokens and counts as
`truncated`.

Streams are BatchStreams (abot.data.pipeline): same background thread, per-epoch shuffle buffer seeded by
(seed, epoch), no batch across epochs, and the same {"epoch", "batches"} resume state.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from abot.chat_template import ROLES, final_turn_mask, render
from abot.data.pipeline import BatchStream, _chunks, buffer_shuffle, epoch_rng
from abot.errors import AbotError
from abot.token_layout import PAD_ID

OVERLONG = ("truncate", "drop")
DROP_REASONS = ("malformed", "empty_message", "no_assistant_turn", "prompt_mismatch", "identical_responses",
                "too_long")
Encoded = tuple[dict | None, str]  # (example or None, "used" | "truncated" | a drop reason)


def check_conversation(messages: Any) -> str | None:
    """Why a conversation cannot be trained on (a DROP_REASONS entry), or None if it is fine."""
    if not isinstance(messages, (list, tuple)):
        return "malformed"
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return "malformed"
    if any(not m["content"].strip() for m in messages):
        return "empty_message"
    if not any(m["role"] == "assistant" for m in messages):
        return "no_assistant_turn"
    return None


def _fit(ids: list[int], mask: list[int], seq_len: int, overlong: str,
         pad_id: int = PAD_ID) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """Pad (or truncate) to seq_len + 1 tokens; the mask moves onto targets. None: nothing left to learn."""
    window = seq_len + 1
    truncated = len(ids) > window
    if truncated:
        if overlong == "drop":
            return None
        ids, mask = ids[:window], mask[:window]
    if not any(mask[1:]):
        return None
    tokens = np.full(window, pad_id, dtype=np.int32)
    tokens[:len(ids)] = ids
    target_mask = np.zeros(seq_len, dtype=np.float32)
    target_mask[:len(ids) - 1] = mask[1:]
    return tokens, target_mask, truncated


def encode_conversation(messages: Any, tokenizer, seq_len: int, overlong: str = "truncate") -> Encoded:
    """One SFT example: {"tokens", "mask"} with the loss on assistant tokens only."""
    reason = check_conversation(messages)
    if reason:
        return None, reason
    ids, mask = render(messages, tokenizer=tokenizer)
    fitted = _fit(ids, mask, seq_len, overlong, pad_of(tokenizer))
    if fitted is None:
        return None, "too_long"
    tokens, target_mask, truncated = fitted
    return {"tokens": tokens, "mask": target_mask}, "truncated" if truncated else "used"


def pad_of(tokenizer) -> int:
    """The tokenizer's pad id (abot's PAD for an encode-only fake)."""
    return getattr(tokenizer, "pad_id", PAD_ID)


def _prompt(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages[:-1]]


def encode_pair(pair: Any, tokenizer, seq_len: int, overlong: str = "truncate") -> Encoded:
    """One DPO example: chosen and rejected with masks over their final assistant message only."""
    if not isinstance(pair, dict) or "chosen" not in pair or "rejected" not in pair:
        return None, "malformed"
    chosen, rejected = pair["chosen"], pair["rejected"]
    for side in (chosen, rejected):
        reason = check_conversation(side)
        if reason:
            return None, reason
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return None, "no_assistant_turn"
    if _prompt(chosen) != _prompt(rejected):
        return None, "prompt_mismatch"
    if chosen[-1]["content"] == rejected[-1]["content"]:
        return None, "identical_responses"
    out, truncated = {}, False
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        ids, mask = render(side, tokenizer=tokenizer)
        fitted = _fit(ids, final_turn_mask(mask), seq_len, overlong, pad_of(tokenizer))
        if fitted is None:
            return None, "too_long"
        out[name], out[name + "_mask"], cut = fitted
        truncated |= cut
    return out, "truncated" if truncated else "used"


ENCODERS = {"conversations": encode_conversation, "preferences": encode_pair}


class DataStats:
    """What the batch builder did with each pass over the data: examples read, used, truncated, dropped.

    Written by the producer thread, read by the training loop (hence the lock).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._passes: dict[int, Counter] = {}
        self._complete: set[int] = set()

    def count(self, epoch: int, outcome: str, n: int = 1) -> None:
        with self._lock:
            self._passes.setdefault(epoch, Counter())[outcome] += n

    def finish(self, epoch: int) -> None:
        with self._lock:
            self._complete.add(epoch)

    def report(self) -> dict:
        """The last complete pass's counts (or the current partial one's): what the run summary shows."""
        with self._lock:
            if not self._passes:
                return {}
            done = sorted(self._complete & self._passes.keys())
            epoch = done[-1] if done else max(self._passes)
            c = self._passes[epoch]
        dropped = {r: c[r] for r in DROP_REASONS if c[r]}
        used = c["used"] + c["truncated"]
        return {"pass": epoch, "complete": epoch in done, "examples": used + sum(dropped.values()), "used": used,
                "truncated": c["truncated"], "dropped": dropped, "dropped_total": sum(dropped.values()),
                "left_over": c["left_over"]}


def describe(report: dict) -> str:
    """One line: '1000 examples: 990 used (12 truncated), 10 dropped (no_assistant_turn 10)' (+ ' so far...')."""
    if not report:
        return "no examples read"
    line = f"{report['examples']} examples: {report['used']} used ({report['truncated']} truncated)"
    if report["dropped_total"]:
        reasons = ", ".join(f"{k} {v}" for k, v in report["dropped"].items())
        line += f", {report['dropped_total']} dropped ({reasons})"
    return line + ("" if report["complete"] else f" so far in pass {report['pass']}")


def _encoded(examples: Iterable[Any], encode: Callable[[Any], Encoded], stats: DataStats, epoch: int) -> Iterator[dict]:
    for example in examples:
        item, outcome = encode(example)
        stats.count(epoch, outcome)
        if item is not None:
            yield item


def _stack(group: list[dict], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {k: np.stack([g[k] for g in group]).reshape(*shape, *group[0][k].shape) for k in group[0]}


def example_epoch_batches(examples: Callable[[int], Iterable[Any]], encode: Callable[[Any], Encoded],
                          batch_shape: tuple[int, int], stats: DataStats, epoch: int, shuffle_buffer: int = 0,
                          seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """One epoch's batches: dicts of (grad_accum, micro_batch, ...) arrays. AbotError if not a single one."""
    per_batch = batch_shape[0] * batch_shape[1]
    items = buffer_shuffle(_encoded(examples(epoch), encode, stats, epoch), shuffle_buffer, epoch_rng(seed, epoch))
    batches = 0
    for group in _chunks(items, per_batch):
        if len(group) < per_batch:
            stats.count(epoch, "left_over", len(group))  # the epoch's last, partial batch
            break
        batches += 1
        yield _stack(group, batch_shape)
    stats.finish(epoch)
    if batches == 0:
        raise AbotError(f"the data cannot fill a single batch: epoch {epoch} gave {describe(stats.report())}, and "
                        f"a batch needs grad_accum_steps x micro_batch_size = {per_batch} usable examples; use "
                        "more data, or lower train.micro_batch_size or train.grad_accum_steps")


class ExampleStream(BatchStream):
    """BatchStream over encoded examples instead of token windows: endless, resumable, tokenized ahead."""

    def __init__(self, examples: Callable[[int], Iterable[Any]], encode: Callable[[Any], Encoded],
                 batch_shape: tuple[int, int], shuffle_buffer: int = 0, seed: int = 0, state: dict | None = None,
                 stats: DataStats | None = None):
        super().__init__(examples, None, 1, batch_shape, shuffle_buffer, seed, 1, state=state)
        self.encode = encode
        self.stats = stats or DataStats()

    def _batches_of(self) -> Callable[[int], Iterator[dict]]:
        return functools.partial(example_epoch_batches, self.docs, self.encode, self.batch_shape, self.stats,
                                 shuffle_buffer=self.shuffle_buffer, seed=self.seed)


def example_eval_batches(examples: Callable[[int], Iterable[Any]], encode: Callable[[Any], Encoded],
                         micro_batch: int, n_batches: int, stats: DataStats | None = None) -> list[dict]:
    """The eval split's first `n_batches` micro-batches (dicts of (micro_batch, ...) arrays), unshuffled."""
    stats = stats if stats is not None else DataStats()
    if n_batches <= 0:
        return []
    out = []
    for group in _chunks(_encoded(examples(0), encode, stats, 0), micro_batch):
        if len(group) < micro_batch:
            break
        out.append(_stack(group, (micro_batch,)))
        if len(out) == n_batches:
            break
    stats.finish(0)  # what eval reads is all of eval, even when the split has more
    if not out:
        raise AbotError(f"the eval data cannot fill one micro-batch of {micro_batch} examples "
                        f"({describe(stats.report())}); hold out more data (data.eval_split or "
                        "data.eval_fraction) or lower train.micro_batch_size")
    return out
