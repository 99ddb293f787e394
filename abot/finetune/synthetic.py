"""Small synthetic chat and preference sets with the real Hub schemas, for offline runs and tests.

- `chat_rows`: HuggingFaceH4/ultrachat_200k rows (`prompt`, `prompt_id`, `messages`), simple word tasks,
  some with a system message, some multi-turn.
- `preference_rows`: HuggingFaceH4/ultrafeedback_binarized rows (`prompt`, `prompt_id`, `chosen`, `rejected`,
  `messages`, `score_chosen`, `score_rejected`) with a rule a tiny model learns in a few dozen steps: asked
  for the last word of a list, the chosen answer is that word, the rejected one the same word spelled
  backwards (`reverse=False`: a word not in the list instead, which needs in-context copying and is much
  harder for a tiny model).

`write_dataset` lays rows out like a Hub dataset folder (`data/<split>-00000-of-00001.jsonl`), which
`load_dataset(folder, split=...)` reads, so `data.dataset: configs/data/ultrachat_mini` stands in for
`HuggingFaceH4/ultrachat_200k` with the same split names. Regenerate the shipped copies with
`python -m abot.finetune.synthetic configs/data`.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

WORDS = ("apple river stone cloud garden window silver forest candle mountain ocean paper yellow summer winter "
         "music bridge castle dragon feather island lemon market orange pepper rabbit rocket shadow spider tiger "
         "valley wizard anchor basket butter circle desert engine flower hammer").split()
NUMBERS = ("zero one two three four five six seven eight nine").split()


def _id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _msg(role: str, content: str) -> dict:
    return {"content": content, "role": role}  # the Hub files store content first


def _words(rng: random.Random, lo: int = 3, hi: int = 5) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _chat_turn(rng: random.Random) -> tuple[str, str]:
    words = _words(rng)
    task = rng.randrange(4)
    if task == 0:
        return f"What is the first word in: {' '.join(words)}?", f"The first word is {words[0]}."
    if task == 1:
        return f"How many words are in: {' '.join(words)}?", f"There are {NUMBERS[len(words)]} words."
    if task == 2:
        word = rng.choice(WORDS)
        return f"Spell {word} with dashes.", "-".join(word)
    return "Say hello.", "Hello! How can I help you today?"


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` conversations in HuggingFaceH4/ultrachat_200k's schema."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.2:
            messages.append(_msg("system", "You are a helpful assistant. Answer briefly."))
        for _ in range(1 if rng.random() < 0.7 else 2):
            question, answer = _chat_turn(rng)
            messages += [_msg("user", question), _msg("assistant", answer)]
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        rows.append({"prompt": prompt, "prompt_id": _id(prompt), "messages": messages})
    return rows


def preference_rows(n: int, seed: int = 0, reverse: bool = True) -> list[dict]:
    """`n` pairs in HuggingFaceH4/ultrafeedback_binarized's schema: chosen = the list's last word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = _words(rng, 3, 4)
        prompt = f"Which word comes last in: {' '.join(words)}?"
        wrong = words[-1][::-1] if reverse else rng.choice([w for w in WORDS if w not in words])
        chosen = [_msg("user", prompt), _msg("assistant", words[-1])]
        rejected = [_msg("user", prompt), _msg("assistant", wrong)]
        rows.append({"prompt": prompt, "prompt_id": _id(prompt), "chosen": chosen, "rejected": rejected,
                     "messages": chosen, "score_chosen": 9.0, "score_rejected": 2.0})
    return rows


def write_dataset(folder: str | Path, splits: dict[str, list[dict]]) -> Path:
    """Write `{split: rows}` as `folder/data/<split>-00000-of-00001.jsonl` (a Hub-like local dataset)."""
    data = Path(folder) / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(data / f"{split}-00000-of-00001.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(folder)


def write_all(root: str | Path, n_chat: int = 1000, n_prefs: int = 1000, n_test: int = 64) -> None:
    """The shipped copies: configs/data/ultrachat_mini and configs/data/ultrafeedback_mini."""
    root = Path(root)
    write_dataset(root / "ultrachat_mini", {"train_sft": chat_rows(n_chat, seed=1),
                                            "test_sft": chat_rows(n_test, seed=2)})
    write_dataset(root / "ultrafeedback_mini", {"train_prefs": preference_rows(n_prefs, seed=3),
                                                "test_prefs": preference_rows(n_test, seed=4)})


if __name__ == "__main__":
    write_all(sys.argv[1] if len(sys.argv) > 1 else "configs/data")
