"""Tokenizers: the contract every kind implements, abot's own SentencePiece BPE, and `load_tokenizer`.

`Tokenizer` (below) is what the rest of abot asks a tokenizer: ids, its BOS/EOS rules, pad id, chat template.
Two kinds implement it: abot's SentencePiece model (`SentencePieceTokenizer`, this module: training from a
text stream, exact round trips) and a Hugging Face model's `tokenizer.json` (`abot.hf_tokenizer`).
`load_tokenizer(path)` picks by the path: a folder or a `.json` file is Hugging Face's, anything else
abot's SentencePiece file.

The SentencePiece model is trained so that decode(encode(s)) == s for any text: no normalisation, spaces and newlines
kept as they are, and bytes as the fallback for characters outside the vocabulary. The id layout is fixed
(below), so the chat template and checkpoints can rely on it; `Tokenizer.sha256` ties checkpoints and token
shards to the exact model file they were made with.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import sentencepiece as spm

from abot.chat_template import ABOT_TEMPLATE, ChatTemplate
from abot.errors import AbotError
from abot.token_layout import (  # noqa: F401  (re-exported: abot's own layout, imported from here)
    BOS, BOS_ID, CHAT_MARKERS, EOS, EOS_ID, FIRST_USER_ID, NEWLINE, PAD, PAD_ID, UNK, UNK_ID, USER_DEFINED_SYMBOLS)


class Tokenizer(Protocol):
    """The tokenizer contract: plain values and three functions, the same for abot's and Hugging Face's.

    `encode` gives the text's own ids and never adds BOS or EOS: callers add them by the rules below.
    """

    kind: str  # "sentencepiece" (abot's) or "huggingface"
    path: Path  # the file that defines the ids: the .model file, or the Hugging Face tokenizer.json
    sha256: str  # of that file's bytes (ties checkpoints and shards to the ids, not to chat or config files)
    vocab_size: int  # ids run 0..vocab_size - 1
    exact_vocab: bool  # model.vocab_size must equal vocab_size (True) or be at least it (False: padded tables)
    bos_id: int | None  # None: the tokenizer has no BOS
    add_bos: bool  # whether a document (and a raw prompt) starts with bos_id
    eos_id: int  # the tokenizer's EOS: ends each pre-training document (the document separator)
    eos_ids: tuple[int, ...]  # every id that ends generation (eos_id first); generation_config may list several
    pad_id: int  # fills batches after the end (never trained on)
    chat_template: ChatTemplate  # renders conversations to ids and the assistant mask (abot.chat_template)

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def document_start(tokenizer) -> list[int]:
    """The ids before a document's text: [BOS] where the tokenizer prepends one, else none (abot's own)."""
    return [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) else []  # fakes have only eos_id


def vocab_fits(tokenizer: Tokenizer, vocab_size: int) -> bool:
    """Whether a model of `vocab_size` embeddings can use this tokenizer (`Tokenizer.exact_vocab`)."""
    return tokenizer.vocab_size == vocab_size if tokenizer.exact_vocab else tokenizer.vocab_size <= vocab_size


def vocab_rule(tokenizer: Tokenizer) -> str:
    """The vocabulary rule in words, for messages."""
    if tokenizer.exact_vocab:
        return f"model.vocab_size must equal the tokenizer's {tokenizer.vocab_size}"
    return (f"model.vocab_size must be at least the tokenizer's {tokenizer.vocab_size} (larger is fine: Hugging Face "
            "models often pad their embedding table)")

# SentencePiece writes spaces as U+2581 internally, so a literal U+2581 in the text would decode as a space.
# We encode that character as its UTF-8 byte pieces instead, which decode back to it exactly.
META_SPACE = "\u2581"

# SentencePiece silently drops training sentences longer than this many bytes; we cut lines below it.
MAX_SENTENCE_BYTES = 4192
# Training stops reading the stream after this many characters (a streamed Hub dataset may be endless)...
MAX_TRAINING_CHARS = 100_000_000
# ...and SentencePiece samples at most this many sentences (lines) of what it read, bounding time and memory.
MAX_TRAINING_SENTENCES = 2_000_000


def _training_sentences(texts: Iterable[str], max_bytes: int = MAX_SENTENCE_BYTES,
                        max_total_chars: int = MAX_TRAINING_CHARS) -> Iterator[str]:
    """Documents -> non-empty lines, each under `max_bytes` UTF-8 bytes (long lines cut, preferably at a space).

    Stops after `max_total_chars` characters. "\n" itself need not be seen in training: it is a
    user-defined symbol, always its own piece.
    """
    max_chars = (max_bytes - 1) // 4  # a character is at most 4 bytes in UTF-8, so this many always fit
    total = 0
    for text in texts:
        if total >= max_total_chars:
            return
        total += len(text)
        for line in text.split("\n"):
            if not line:
                continue
            if len(line) <= max_chars or len(line.encode("utf-8")) < max_bytes:
                yield line
                continue
            while line:
                cut = max_chars if len(line) > max_chars else len(line)
                space = line.rfind(" ", max_chars // 2, cut)
                if cut < len(line) and space > 0:
                    cut = space  # keep the space with the next chunk, as "▁word"
                yield line[:cut]
                line = line[cut:]


def _vocab_error(err: RuntimeError, vocab_size: int) -> AbotError | None:
    """Turn SentencePiece's "corpus too small / vocab too small" failures into actionable errors."""
    text = str(err)
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text)
    if too_high:
        most = int(too_high.group(2))
        return AbotError(f"the tokenizer training text is too small for a vocabulary of {vocab_size} pieces "
                         f"(at most {most} fit); set a smaller model.vocab_size (e.g. {most}) or use more text")
    too_low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", text)
    if too_low:
        return AbotError(f"model.vocab_size {vocab_size} is too small for this text: the special tokens, "
                         f"256 byte pieces and the text's characters need at least {too_low.group(2)}; "
                         "set a larger model.vocab_size")
    return None


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_path: str | Path,
                    max_chars: int = MAX_TRAINING_CHARS) -> Path:
    """Train a BPE model of exactly `vocab_size` pieces from a stream of documents; write it to `model_path`.

    Reads documents until `max_chars` characters (the stream may be endless). The file is written atomically (temporary name, then rename), so an interrupted run never leaves a
    truncated model behind. Raises AbotError when the text is too small for `vocab_size`.
    """
    model_path = Path(model_path)
    _make_parent(model_path)  # before training: an unwritable path fails now, not after minutes of work
    sentences = _training_sentences(texts, max_total_chars=max_chars)
    try:
        first = next(sentences)
    except StopIteration:
        raise AbotError(f"no text to train the tokenizer {model_path} on: the data source gave no documents "
                        "(check data.dataset, data.split and data.text_field)") from None
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_prepend(first, sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=True,  # exactly vocab_size pieces: it must match model.vocab_size
            # Exact round trips: no normalisation, whitespace kept, unknown characters as bytes.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,  # text after "\n" (no space) and at a line start then encode alike
            allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) become single pieces
            byte_fallback=True,
            split_digits=True,
            user_defined_symbols=list(USER_DEFINED_SYMBOLS),
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
            max_sentence_length=MAX_SENTENCE_BYTES,
            input_sentence_size=MAX_TRAINING_SENTENCES,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,  # errors only
        )
    except RuntimeError as err:
        raise (_vocab_error(err, vocab_size) or AbotError(f"training the tokenizer {model_path} failed: {err}")) \
            from None
    tmp = model_path.with_name(f".{model_path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(model.getvalue())
        os.replace(tmp, model_path)
    except OSError as err:
        raise AbotError(f"tokenizer {model_path}: cannot write it ({err.strerror or err}); point "
                        "train.tokenizer_path at a writable folder with free space") from None
    finally:
        tmp.unlink(missing_ok=True)
    return model_path


def _make_parent(path: Path) -> None:
    """Create `path`'s folder, or raise an AbotError saying why not (e.g. a part of the path is a file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file" if blocker else (err.strerror or str(err))
        raise AbotError(f"tokenizer {path}: cannot create its folder {path.parent} ({why}); point "
                        "train.tokenizer_path at a writable folder") from None


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


@dataclass(frozen=True)
class SentencePieceTokenizer:
    """A loaded SentencePiece model with abot's id layout (a `Tokenizer`). Immutable; see `load_tokenizer`."""

    path: Path
    sha256: str  # of the model file's bytes
    processor: spm.SentencePieceProcessor = field(repr=False, compare=False)

    kind = "sentencepiece"
    exact_vocab = True  # trained to exactly model.vocab_size pieces
    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    add_bos = False  # abot trains and generates without BOS: EOS separates documents
    eos_id = EOS_ID
    eos_ids = (EOS_ID,)
    chat_template = ABOT_TEMPLATE

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def special_ids(self) -> dict[str, int]:
        """Chat marker -> id, e.g. {"<|system|>": 4, "<|user|>": 5, "<|assistant|>": 6, "<|end|>": 7}."""
        return {marker: FIRST_USER_ID + i for i, marker in enumerate(CHAT_MARKERS)}

    def encode(self, text: str) -> list[int]:
        if META_SPACE in text:
            return self._encode_meta_space(text)
        return self.processor.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Encode many texts at once, on `num_threads` native threads."""
        texts = list(texts)
        out = self.processor.encode(texts, out_type=int, num_threads=max(1, int(num_threads)))
        for i, text in enumerate(texts):
            if META_SPACE in text:  # rare: redo those few
                out[i] = self._encode_meta_space(text)
        return out

    def _encode_meta_space(self, text: str) -> list[int]:
        byte_ids = [self.processor.piece_to_id(f"<0x{b:02X}>") for b in META_SPACE.encode("utf-8")]
        ids: list[int] = []
        for i, part in enumerate(self.processor.encode(text.split(META_SPACE), out_type=int)):
            if i:
                ids.extend(byte_ids)
            ids.extend(part)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]  # numpy/mlx arrays too
        return self.processor.decode(ids)


def is_hf_path(path: str | Path) -> bool:
    """A Hugging Face tokenizer's path: a model folder, or a `tokenizer.json`-like file."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".json"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A Hugging Face folder or tokenizer.json (`abot.hf_tokenizer`), else abot's SentencePiece model file."""
    if is_hf_path(path):
        from abot.hf_tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(path)
    return load_sentencepiece(path)


def load_sentencepiece(path: str | Path) -> SentencePieceTokenizer:
    """Load a tokenizer trained by `train_tokenizer`; AbotError naming the path and the fix if it is unusable."""
    path = Path(path)
    fix = f"run `abot tokenizer train CONFIG`, or delete {path} so that `abot train` trains a new one"
    if not path.exists():
        raise AbotError(f"tokenizer {path}: not found; run `abot tokenizer train CONFIG` to train it "
                        "(or `abot train`, which trains it first)")
    data = path.read_bytes()
    if not data:
        raise AbotError(f"tokenizer {path}: the file is empty (an interrupted write?); {fix}")
    processor = spm.SentencePieceProcessor()
    try:
        processor.load_from_serialized_proto(data)
    except Exception:  # SentencePiece raises RuntimeError or OSError depending on the damage
        raise AbotError(f"tokenizer {path}: not a SentencePiece model file; {fix}") from None
    expected = {PAD: PAD_ID, UNK: UNK_ID, BOS: BOS_ID, EOS: EOS_ID}
    expected.update({s: FIRST_USER_ID + i for i, s in enumerate(USER_DEFINED_SYMBOLS)})
    wrong = [f"{s!r}={i}" for s, i in expected.items()
             if i >= processor.get_piece_size() or processor.id_to_piece(i) != s]
    if wrong:
        raise AbotError(f"tokenizer {path}: a SentencePiece model, but not with abot's special tokens "
                        f"(expected {', '.join(wrong)}); {fix}")
    return SentencePieceTokenizer(path=path, sha256=hashlib.sha256(data).hexdigest(), processor=processor)
