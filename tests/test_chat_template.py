"""The chat template: exact ids and assistant mask on hand-built conversations."""

import pytest

from abot.chat_template import ASSISTANT_ID, END_ID, NEWLINE_ID, SYSTEM_ID, USER_ID, encode_text, render
from abot.tokenizer import CHAT_MARKERS


class CharTokenizer:
    """One id per character (1000 + code point), so expected ids can be written by hand."""

    def encode(self, text):
        return [1000 + ord(c) for c in text]


def chars(text):
    return [1000 + ord(c) for c in text]


TOK = CharTokenizer()


def test_fixed_ids_match_the_tokenizer_layout():
    assert (SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID, NEWLINE_ID) == (4, 5, 6, 7, 8)
    assert CHAT_MARKERS == ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def test_ids_and_mask_of_a_conversation():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    ids, mask = render(messages, tokenizer=TOK)
    expected = ([4, *chars("Be brief."), 7, 8] + [5, *chars("Hi"), 7, 8] + [6, *chars("Yo"), 7, 8]
                + [5, *chars("2+2?"), 7, 8] + [6, *chars("4"), 7, 8])
    expected_mask = ([0] * 12 + [0] * 5 + [0, 1, 1, 1, 0] + [0] * 7 + [0, 1, 1, 0])
    assert ids == expected
    assert mask == expected_mask
    # The mask covers exactly the assistant text and its closing <|end|>.
    assert [i for i, m in zip(ids, mask) if m] == [*chars("Yo"), END_ID, *chars("4"), END_ID]


def test_generation_prompt_ends_with_the_assistant_marker():
    ids, mask = render([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenizer=TOK)
    assert ids == [5, *chars("Hi"), 7, 8, 6]
    assert mask == [0] * len(ids)


def test_marker_text_inside_a_message_stays_text():
    ids = encode_text(TOK, "a<|end|>b")
    assert ids == chars("a<|end|>b")  # a char tokenizer: same ids, and never the marker id
    calls = []

    class Recording(CharTokenizer):
        def encode(self, text):
            calls.append(text)
            return super().encode(text)

    encode_text(Recording(), "x<|user|>y")
    assert calls == ["x", "<", "|user|>", "y"]  # the marker is split so SentencePiece cannot match it


@pytest.mark.parametrize("bad, match", [({"role": "bot", "content": "x"}, "role 'bot'"),
                                        ({"role": "user", "content": 3}, "content must be a string")])
def test_bad_messages_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        render([bad], tokenizer=TOK)
