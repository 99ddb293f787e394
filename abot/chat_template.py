"""abot's one chat template, for chat inference and for supervised fine-tuning alike.

Every message is its role marker, its text and `<|end|>`, then a newline:

    <|system|>You are terse.<|end|>\\n<|user|>Hi!<|end|>\\n<|assistant|>Hello.<|end|>\\n

and a generation prompt ends with the bare `<|assistant|>` (the model writes the reply and its `<|end|>`).
There is no BOS: abot never trains with one. The markers and "\\n" are placed by their fixed ids
(abot.tokenizer: <|system|> 4, <|user|> 5, <|assistant|> 6, <|end|> 7, "\\n" 8), never by matching strings;
only the messages' text goes through `tokenizer.encode`.

API (all of it):

    render(messages, add_generation_prompt=False, *, tokenizer) -> Rendered(ids, mask)

`messages`: [{"role": "system" | "user" | "assistant", "content": str}, ...]. `mask[i]` is 1 where ids[i] is
a token the model should learn to produce (an assistant message's text and its closing <|end|>), 0 elsewhere
(markers, newlines, system and user text). For SFT, `loss = mask[1:] * CE(logits[:-1], ids[1:])`.

A marker written inside a message's text (say a user types "<|end|>") stays text: it is encoded in two
halves so it never becomes the marker's id, and decodes back to the same characters.
"""

from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple, Protocol

from abot.tokenizer import CHAT_MARKERS, FIRST_USER_ID

ROLES = ("system", "user", "assistant")
SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID = (FIRST_USER_ID + i for i in range(len(CHAT_MARKERS)))
NEWLINE_ID = FIRST_USER_ID + len(CHAT_MARKERS)
ROLE_IDS = {"system": SYSTEM_ID, "user": USER_ID, "assistant": ASSISTANT_ID}


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


class Rendered(NamedTuple):
    ids: list[int]
    mask: list[int]  # 1 on assistant text and its <|end|>, 0 elsewhere; same length as ids


def encode_text(tokenizer: Encoder, text: str) -> list[int]:
    """`tokenizer.encode(text)`, except that marker strings in `text` stay plain text (never marker ids)."""
    ids: list[int] = []
    start = 0
    while True:
        hits = [(text.find(m, start), m) for m in CHAT_MARKERS]
        hits = [(i, m) for i, m in hits if i >= 0]
        if not hits:
            break
        at, marker = min(hits)
        if at > start:
            ids += tokenizer.encode(text[start:at])
        ids += tokenizer.encode(marker[:1]) + tokenizer.encode(marker[1:])  # split: no longer the symbol
        start = at + len(marker)
    if start < len(text):
        ids += tokenizer.encode(text[start:])
    return ids


def render(messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = False, *,
           tokenizer: Encoder) -> Rendered:
    """Token ids of `messages` in the chat template, and the assistant mask (see the module docstring)."""
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_IDS:
            raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        body = encode_text(tokenizer, content) + [END_ID]
        learn = 1 if role == "assistant" else 0
        ids += [ROLE_IDS[role], *body, NEWLINE_ID]
        mask += [0, *([learn] * len(body)), 0]
    if add_generation_prompt:
        ids.append(ASSISTANT_ID)
        mask.append(0)
    return Rendered(ids, mask)
