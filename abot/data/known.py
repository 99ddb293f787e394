"""Defaults for the Hugging Face datasets the configuration guide names, from each dataset's real schema.

So that the guide's YAMLs work unchanged, `with_known_defaults` fills the `data` keys a dataset needs but a
config may leave out, e.g. `allenai/c4` has no default config (it wants `en`), Ultra-FineWeb keeps its text
in `content`, and `openbmb/Ultra-FineWeb` has no `train` split (its splits are `en` and `zh`).

A key is filled only while it still has abot's default value (`config: null`, `split: train`,
`text_field: text`), and every value in the table is one where that default would fail on that dataset
(no such config, split or field), so a value written in the config always wins. Names match
case-insensitively, like Hub repository ids. `abot list datasets` does not show this table: it is in the
README ("Known datasets") and below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

from abot.config import DataConfig

# What "left at its default" means: DataConfig's own defaults for the keys the table can fill.
_UNSET = {f.name: f.default for f in dataclasses.fields(DataConfig) if f.name in ("config", "split", "text_field")}


@dataclass(frozen=True)
class KnownDataset:
    """The keys a dataset needs (None: abot's default is right) and, for people, its fields and splits."""

    config: Union[str, None] = None
    split: Union[str, None] = None
    text_field: Union[str, None] = None
    schema: str = ""


KNOWN_DATASETS: dict[str, KnownDataset] = {
    # --- pre-training text ---
    "allenai/c4": KnownDataset(
        config="en", schema="text, timestamp, url; splits train, validation (data.eval_split: validation)"),
    "EliMC/Ultra-FineWeb": KnownDataset(text_field="content", schema="content"),
    "openbmb/Ultra-FineWeb": KnownDataset(split="en", text_field="content", schema="content; splits en, zh"),
    "NeelNanda/pile-uncopyrighted": KnownDataset(
        schema="text, meta.pile_set_name; .jsonl.zst files (read with zstandard)"),
    "HuggingFaceFW/fineweb": KnownDataset(
        schema="text, id, dump, url, date, language, language_score, token_count; configs default, "
               "sample-10BT, CC-MAIN-..."),
    # --- fine-tuning and preference data: rows load through the same source (formatting is elsewhere) ---
    "HuggingFaceH4/ultrachat_200k": KnownDataset(
        split="train_sft", schema="prompt, prompt_id, messages [{role, content}]; splits train_sft, test_sft, "
                                  "train_gen, test_gen"),
    "OpenAssistant/oasst1": KnownDataset(
        schema="one message per row: message_id, parent_id, message_tree_id, role, text, lang, rank, ...; "
               "splits train, validation"),
    "HuggingFaceH4/ultrafeedback_binarized": KnownDataset(
        split="train_prefs", schema="prompt, prompt_id, chosen, rejected, messages, score_chosen, "
                                    "score_rejected; splits train_prefs, test_prefs, train_sft, ..."),
}

_BY_LOWER = {name.lower(): entry for name, entry in KNOWN_DATASETS.items()}


def known_dataset(name: str) -> KnownDataset | None:
    """The table's entry for a Hub dataset name (case-insensitive), or None."""
    return _BY_LOWER.get(str(name).lower())


def with_known_defaults(data: DataConfig) -> DataConfig:
    """`data` with the known dataset's values filled into keys left at abot's defaults (a new object)."""
    entry = known_dataset(data.dataset)
    if entry is None:
        return data
    changes = {key: getattr(entry, key) for key, unset in _UNSET.items()
               if getattr(entry, key) is not None and getattr(data, key) == unset}
    return dataclasses.replace(data, **changes) if changes else data
