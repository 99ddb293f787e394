import abot  # noqa: F401  (first: it sets up BLAS before anything imports mlx.core)

import dataclasses
import hashlib
import itertools

import numpy as np
import pytest
import sentencepiece as spm

from abot.data.corpus import stdlib_documents
from abot.errors import AbotError
from abot.tokenizer import (
    BOS_ID, CHAT_MARKERS, EOS_ID, MAX_SENTENCE_BYTES, PAD_ID, UNK_ID, _training_sentences, load_tokenizer,
    train_tokenizer,
)

VOCAB = 600
CODE = '''class Stack:
    """A LIFO stack."""

    def push(self, item):
\tself.items.append(item)  # tab-indented on purpose
        return   len(self.items)


if __name__ == "__main__":
    print(Stack().push(42), 3.14159, 0x1F)
'''
ROUND_TRIP = [
    "",
    "Hello, world.",
    "  leading and trailing spaces  ",
    "several    spaces\tand\ttabs\t\tand a\nnewline\n\n\nand blank lines\n",
    "windows line ends\r\nand a lone \r carriage return",
    CODE,
    "unicode: café naïve Ünïcödé, 日本語のテキスト, Ελληνικά, עברית, emoji 🎉👩‍💻, combining e\u0301",
    "<|system|>You are terse.<|end|>\n<|user|>Hi!<|end|>\n<|assistant|>Hello.<|end|>\n",
    "a literal \u2581 (SentencePiece's space mark) and \u2581\u2581 twice",
    "control chars \x00\x01\x7f and a zero-width\u200bjoin",
    "digits 1234567890 and 3.14e-10",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    docs = [text for _, text in itertools.islice(stdlib_documents(), 40)] + [CODE] * 5
    return train_tokenizer(docs, VOCAB, tmp_path_factory.mktemp("tok") / "new" / "folder" / "tok.model")


@pytest.fixture(scope="module")
def tok(model_path):
    return load_tokenizer(model_path)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_exact_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(ROUND_TRIP, num_threads=2) == [tok.encode(t) for t in ROUND_TRIP]


def test_decode_accepts_arrays(tok):
    ids = tok.encode("numpy ids")
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == "numpy ids"


def test_special_ids(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    sp = tok.processor
    assert [sp.id_to_piece(i) for i in range(9)] == ["<pad>", "<unk>", "<s>", "</s>", *CHAT_MARKERS, "\n"]
    assert tok.special_ids == {"<|system|>": 4, "<|user|>": 5, "<|assistant|>": 6, "<|end|>": 7}
    for marker, i in tok.special_ids.items():
        assert tok.encode(marker) == [i]
        assert tok.encode(f"x{marker}y").count(i) == 1
    assert tok.encode("\n") == [8]
    assert tok.vocab_size == VOCAB


def test_sha256_and_immutability(tok, model_path):
    assert tok.sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert tok.path == model_path
    with pytest.raises(dataclasses.FrozenInstanceError):
        tok.sha256 = "x"


def test_written_atomically(model_path):
    assert [p.name for p in model_path.parent.iterdir()] == ["tok.model"]  # no temp file left behind


def test_long_lines_are_cut_not_skipped():
    line = ("word " * 3000) + "é" * 3000  # far over SentencePiece's per-sentence limit
    pieces = list(_training_sentences([line + "\nshort"]))
    assert pieces[-1] == "short"
    assert "".join(pieces[:-1]) == line
    assert all(0 < len(p.encode()) < MAX_SENTENCE_BYTES for p in pieces)


def test_reading_stops_on_an_endless_stream():
    endless = itertools.repeat("line one\nline two")
    assert len(list(_training_sentences(endless, max_total_chars=1000))) == 2 * 59  # 59 documents of 17 chars


def test_too_small_corpus_names_vocab_size(tmp_path):
    with pytest.raises(AbotError, match="model.vocab_size"):
        train_tokenizer(["tiny text, tiny text"], 5000, tmp_path / "t.model")
    with pytest.raises(AbotError, match="no text"):
        train_tokenizer([], 5000, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()


def _garbage(p):
    p.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)


def _empty(p):
    p.write_bytes(b"")


def _folder(p):
    p.mkdir()


@pytest.mark.parametrize("make", [None, _empty, _folder, _garbage], ids=["missing", "empty", "folder", "garbage"])
def test_bad_tokenizer_files(tmp_path, make):
    path = tmp_path / "tokenizer.model"
    if make:
        make(path)
    with pytest.raises(AbotError) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)
    assert "abot tokenizer train" in str(info.value) or "tokenizer_path" in str(info.value)


def test_foreign_sentencepiece_model_is_refused(tmp_path):
    path = tmp_path / "plain"
    spm.SentencePieceTrainer.train(sentence_iterator=iter([CODE] * 20), model_prefix=str(path), vocab_size=60,
                                   minloglevel=2)
    with pytest.raises(AbotError, match="special tokens"):
        load_tokenizer(f"{path}.model")
