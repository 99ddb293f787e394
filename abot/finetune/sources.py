"""Registered data sources for fine-tuning: conversations and preference pairs instead of text.

They follow the `datasets` registry contract of abot.data.sources (same arguments, same split and
determinism rules), except for what one example is:

- `chat` and `oasst1` yield conversations: lists of {"role": "system" | "user" | "assistant", "content": str};
- `preferences` yields pairs: {"chosen": conversation, "rejected": conversation}.

Each source function carries `produces = "conversations"` or `"preferences"` (text sources have none), so
`abot sft` / `abot dpo` refuse a source of the wrong kind with a clear message, and `reads`, the data keys
it reads (abot.unread warns about the others). Sources pass examples on as the data has them; checking
them (no assistant turn, empty messages, differing prompts, ...) is the batch builder's job
(abot.finetune.batches), which counts what it drops.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Iterator

from abot.config import DataConfig
from abot.data.pipeline import buffer_shuffle, epoch_rng
from abot.data.sources import ROWS_READS, _check_split, _open, _rows, field_names, huggingface_rows
from abot.errors import AbotError

Examples = Callable[[int], Iterable[Any]]
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _split_and_carve(data: DataConfig, split: str) -> tuple[str, str, bool]:
    """(datasets split name, the config key naming it, whether eval is carved off the train split)."""
    _check_split(split)
    carve = data.eval_split is None
    if split == "eval" and carve and data.eval_fraction <= 0:
        raise AbotError("data.eval_fraction is 0 and data.eval_split is null, so nothing is held out for "
                        "evaluation; set data.eval_split (e.g. test_sft, test_prefs, validation) or data.eval_fraction")
    hf_split = data.eval_split if (split == "eval" and not carve) else data.split
    key = "data.split" if (split == "train" or carve) else "data.eval_split"
    return hf_split, key, carve


def _shuffled(examples: Iterable[Any], split: str, buffer: int, seed: int, epoch: int) -> Iterable[Any]:
    if split == "train" and buffer > 1:
        return buffer_shuffle(examples, buffer, epoch_rng(seed, epoch))
    return examples


# --- conversations, one per row (HuggingFaceH4/ultrachat_200k and alike) --------------------------------

def _check_fields(first: dict, data: DataConfig, fields: list[str], hint: str) -> None:
    """Fail when the source is built, naming the fields the data does have."""
    missing = [f for f in fields if f not in first]
    if missing:
        raise AbotError(f"data.dataset '{data.dataset}' has no field {', '.join(repr(m) for m in missing)} "
                        f"({hint}); its fields are: {', '.join(field_names(first))}")


def chat(data: DataConfig, split: str, seed: int, messages_field: str = "messages", doc_shuffle_buffer: int = 0,
         min_score: dict | None = None) -> Examples:
    """Conversations, one per row: a `messages` list of {role, content} (HuggingFaceH4/ultrachat_200k)."""
    rows = huggingface_rows(data, split, seed, doc_shuffle_buffer=doc_shuffle_buffer, min_score=min_score)
    _check_fields(rows.first, data, [messages_field], "source_args.messages_field names the list of {role, content}")

    def examples(epoch: int) -> Iterator[Any]:
        return (row[messages_field] for row in rows(epoch))

    return examples


chat.produces = "conversations"
chat.reads = ROWS_READS  # not data.text_field: source_args.messages_field names the field


# --- preference pairs (HuggingFaceH4/ultrafeedback_binarized and alike) --------------------------------

def preferences(data: DataConfig, split: str, seed: int, chosen_field: str = "chosen",
                rejected_field: str = "rejected", prompt_field: str | None = None, doc_shuffle_buffer: int = 0,
                min_score: dict | None = None) -> Examples:
    """Preference pairs: `chosen` and `rejected` message lists (HuggingFaceH4/ultrafeedback_binarized).

    With `prompt_field` set, `chosen`/`rejected` may instead be plain response strings, each made into
    [user: prompt, assistant: response]. `min_score` filters rows as for `huggingface` (e.g.
    `{field: score_chosen, value: 7}`).
    """
    rows = huggingface_rows(data, split, seed, doc_shuffle_buffer=doc_shuffle_buffer, min_score=min_score)
    _check_fields(rows.first, data, [chosen_field, rejected_field] + ([prompt_field] if prompt_field else []),
                  "source_args.chosen_field / rejected_field / prompt_field name them")

    def as_messages(value: Any, row: dict) -> Any:
        if isinstance(value, str) and prompt_field:
            return [{"role": "user", "content": row[prompt_field]}, {"role": "assistant", "content": value}]
        return value

    def examples(epoch: int) -> Iterator[Any]:
        return ({"chosen": as_messages(row[chosen_field], row), "rejected": as_messages(row[rejected_field], row)}
                for row in rows(epoch))

    return examples


preferences.produces = "preferences"
preferences.reads = ROWS_READS  # not data.text_field: source_args name the fields


# --- OpenAssistant/oasst1: one row per message, conversations are paths through each tree ----------------

def _rank_key(message: dict, order: int) -> tuple:
    rank = message.get("rank")
    return (rank is None, rank if rank is not None else 0, order)  # rank 0 first, unranked last, then stored order


def oasst_conversations(rows: Iterable[dict], lang: str | list[str] | None = "en",
                        paths: str = "best") -> list[list[dict]]:
    """Rebuild conversations from oasst1 message rows (any order).

    Deleted messages, and messages outside `lang` (a code, a list of codes, or None for all), are skipped
    with everything below them. `paths="best"`: from each root, follow the best-ranked reply (rank 0;
    unranked replies after ranked ones) at every turn; `paths="all"`: every root-to-leaf path. A trailing
    user message is cut off so a conversation ends with the assistant; a root nobody answered is kept as a
    one-message conversation (the batch builder drops and counts it as having no assistant turn).
    """
    if paths not in ("best", "all"):
        raise AbotError(f"data.source_args.paths: '{paths}' is not 'best' or 'all'")
    langs = None if lang is None else ({lang} if isinstance(lang, str) else set(lang))
    kept: dict[str, tuple[int, dict]] = {}
    for order, row in enumerate(rows):
        if row.get("deleted") or (langs is not None and row.get("lang") not in langs):
            continue
        kept[row["message_id"]] = (order, row)
    children: dict[str, list[tuple[int, dict]]] = {}
    roots = []
    for mid, (order, row) in kept.items():
        parent = row.get("parent_id")
        if parent is None:
            roots.append((order, row))
        elif parent in kept:  # a reply to a deleted or filtered message is unreachable
            children.setdefault(parent, []).append((order, row))
    for replies in children.values():
        replies.sort(key=lambda item: _rank_key(item[1], item[0]))
    roots.sort(key=lambda item: item[0])

    def walk(path: list[dict]) -> Iterator[list[dict]]:
        replies = children.get(path[-1]["message_id"], [])
        if not replies:
            yield path
        elif paths == "best":
            yield from walk(path + [replies[0][1]])
        else:
            for _, reply in replies:
                yield from walk(path + [reply])

    out, seen = [], set()
    for _, root in roots:
        for path in walk([root]):
            while len(path) > 1 and path[-1].get("role") != "assistant":
                path = path[:-1]
            ids = tuple(m["message_id"] for m in path)
            if ids in seen:  # "all": two user leaves under one reply cut back to the same conversation
                continue
            seen.add(ids)
            out.append([{"role": OASST_ROLES.get(m.get("role"), m.get("role")), "content": m.get("text")}
                        for m in path])
    return out


def _tree_held_out(tree_id: Any, fraction: float) -> bool:
    digest = hashlib.blake2b(str(tree_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def oasst1(data: DataConfig, split: str, seed: int, lang: Any = "en", paths: str = "best",
           doc_shuffle_buffer: int = 0) -> Examples:
    """OpenAssistant/oasst1 message trees rebuilt into conversations (best-ranked reply per turn, by `lang`)."""
    if paths not in ("best", "all"):
        raise AbotError(f"data.source_args.paths: '{paths}' is not 'best' or 'all'")
    hf_split, key, carve = _split_and_carve(data, split)
    dataset = _open(data, hf_split, key)
    first = next(iter(dataset), None)
    if first is None:
        raise AbotError(f"data.dataset '{data.dataset}' ({key}: {hf_split}) has no rows")
    _check_fields(first, data, ["message_id", "parent_id", "role", "text"],
                  "data.source: oasst1 reads one row per message, as OpenAssistant/oasst1 has them")
    cached: list[list[dict]] = []

    def conversations() -> list[list[dict]]:
        if not cached:  # the whole split is read once: trees need all their messages
            rows = _rows(dataset, data)
            if carve and data.eval_fraction > 0:  # carve whole trees, never half a conversation
                fraction = data.eval_fraction
                rows = (r for r in rows
                        if _tree_held_out(r.get("message_tree_id", r["message_id"]), fraction) == (split == "eval"))
            cached.extend(oasst_conversations(rows, lang, paths))
        return cached

    def examples(epoch: int) -> Iterator[Any]:
        yield from _shuffled(iter(conversations()), split, doc_shuffle_buffer, seed, epoch)

    return examples


oasst1.produces = "conversations"
oasst1.reads = ROWS_READS  # not data.text_field: oasst1 rows have fixed fields
