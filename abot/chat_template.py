"""abot's one chat template, for chat inference and for supervised fine-tuning alike.

Every message is its role marker, its text and `<|end|>`, then a newline:

    <|system|>You are terse.<|end|>\\n<|user|>Hi!<|end|>\\n<|assistant|>Hello.<|end|>\\n

and a generation prompt ends with the bare `<|assistant|>` (the model writes the reply and its `<|end|>`).
There is no BOS: abot never trains with one. The markers and "\\n" are placed by their fixed ids
(abot.tokenizer: <|system|> 4, <|user|> 5, <|assistant|> 6, <|end|> 7, "\\n" 8), never by matching strings;
only the messages' text goes through `tokenizer.encode`.

API:

    render(messages, add_generation_prompt=False, *, tokenizer) -> Rendered(ids, mask)
    template_of(tokenizer) -> ChatTemplate   (the tokenizer's own template, or this one)

`messages`: [{"role": "system" | "user" | "assistant", "content": str}, ...]. `mask[i]` is 1 where ids[i] is
a token the model should learn to produce (an assistant message's text and its closing <|end|>), 0 elsewhere
(markers, newlines, system and user text). For SFT, `loss = mask[1:] * CE(logits[:-1], ids[1:])`.

A marker written inside a message's text (say a user types "<|end|>") stays text: it is encoded in two
halves so it never becomes the marker's id, and decodes back to the same characters.

`render` renders with the tokenizer's own template (`tokenizer.chat_template`): this one for abot's
tokenizer (and for any object with only `encode`), a model's Jinja template for a Hugging Face tokenizer
(abot.jinja_template), whose mask follows the same rule: assistant content and its end-of-turn marker.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Protocol, Sequence

from abot.token_layout import ASSISTANT_ID, CHAT_MARKERS, END_ID, NEWLINE_ID, SYSTEM_ID, USER_ID

ROLES = ("system", "user", "assistant")
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


class ChatTemplate(NamedTuple):
    """A chat template as a plain value: what renders conversations, and which ids end a reply in a chat."""

    name: str  # "abot", or the file a Jinja template was read from (named in errors)
    render: Callable[[Sequence[Mapping[str, Any]], bool, Any], Rendered]  # (messages, add_generation_prompt, tokenizer)
    stop_ids: tuple[int, ...]  # ids that end an assistant reply in `abot chat`, besides the tokenizer's EOS ids
    end_of_turn_ids: tuple[int, ...]  # the ids that close an assistant turn: stop raw generation too


def template_of(tokenizer: Any) -> ChatTemplate:
    """The tokenizer's chat template; abot's own for a tokenizer that has none (an encode-only fake)."""
    return getattr(tokenizer, "chat_template", None) or ABOT_TEMPLATE


def render(messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = False, *,
           tokenizer: Encoder) -> Rendered:
    """Token ids of `messages` in the tokenizer's chat template, and the assistant mask (module docstring)."""
    return template_of(tokenizer).render(list(messages), add_generation_prompt, tokenizer)


def final_turn_mask(mask: Sequence[int]) -> list[int]:
    """`mask` with only its last run of ones kept: the final assistant message, what DPO compares.

    Every template's mask is one contiguous run per assistant message (its content and end marker), so the
    last run is the final message's whatever the template: the tokens before it are the prompt.
    """
    out = [0] * len(mask)
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    out[start:end] = [1] * (end - start)
    return out


def render_abot(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool, tokenizer: Encoder) -> Rendered:
    """abot's own template (the module docstring): markers by their fixed ids, only the text encoded."""
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


ABOT_TEMPLATE = ChatTemplate("abot", render_abot, stop_ids=(SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID),
                             end_of_turn_ids=(END_ID,))
