"""A Hugging Face model's tokenizer as an abot `Tokenizer`: tokenizer.json through the `tokenizers` library.

Read from the model folder (or from beside the given tokenizer.json):
- tokenizer.json: the ids (`tokenizers.Tokenizer.from_file`); its `added_tokens` are the special tokens.
  `sha256` is of this file's bytes: the ids, not the chat template or the BOS/EOS settings.
- tokenizer_config.json: `bos_token`, `eos_token`, `pad_token` (strings or {"content": ...}); `add_bos_token`
  (absent: whether tokenizer.json's post-processor prepends BOS); and in folders saved before transformers 5,
  `chat_template` (a string, or a list of named templates, of which "default" is used).
- chat_template.jinja: the template of folders saved by transformers 5 (used when present).
- generation_config.json: `eos_token_id`, one id or a list; every one of them ends generation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from abot.chat_template import ChatTemplate
from abot.errors import AbotError
from abot.jinja_template import jinja_chat_template, missing_template

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


@dataclass(frozen=True)
class HFTokenizer:
    """A Hugging Face tokenizer (a `Tokenizer`, abot.tokenizer). Immutable; build it with `load_hf_tokenizer`."""

    path: Path  # tokenizer.json
    sha256: str  # of tokenizer.json's bytes
    backend: Any = field(repr=False, compare=False)  # tokenizers.Tokenizer
    vocab_size: int
    bos_id: int | None
    add_bos: bool
    eos_id: int
    eos_ids: tuple[int, ...]
    pad_id: int
    chat_template: ChatTemplate = field(repr=False, compare=False)
    special_tokens: dict[str, int] = field(repr=False, compare=False)  # added tokens marked special: content -> id
    config: dict = field(repr=False, compare=False)  # tokenizer_config.json as read ({} when absent)
    template_source: str | None = field(repr=False, compare=False)  # the chat template's Jinja, if any

    kind = "huggingface"
    exact_vocab = False  # a model's embedding table may be padded above the tokenizer's size

    @property
    def folder(self) -> Path:
        return self.path.parent

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Encode many texts (the `tokenizers` library runs them on its own thread pool)."""
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `text` and each token's (start, end) characters in it (for the chat template's mask)."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]  # numpy/mlx arrays too
        return self.backend.decode(ids, skip_special_tokens=False)


def read_json(path: Path) -> dict:
    """A JSON object from `path`; {} when the file is absent, AbotError when it is not a JSON object."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise AbotError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise AbotError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or {"content": ...}; None when unset."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def locate(path: str | Path) -> Path:
    """The tokenizer.json of a model folder, or `path` itself when it is a .json file; AbotError otherwise."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return path / "tokenizer.json"
        raise AbotError(f"tokenizer {path}: is a folder, not a SentencePiece model file; point train.tokenizer_path "
                        "at a .model file, or at a Hugging Face model folder with a tokenizer.json (this one has "
                        "none)")
    if not path.is_file():
        raise AbotError(f"tokenizer {path}: not found; point train.tokenizer_path at a Hugging Face model folder or "
                        "its tokenizer.json")
    return path


def template_source(folder: Path, config: dict) -> tuple[str | None, str]:
    """The chat template's Jinja and where it came from: chat_template.jinja, else tokenizer_config.json's."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    where = str(folder / "tokenizer_config.json")
    value = config.get("chat_template")
    if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            raise AbotError(f"{where}: chat_template lists templates {sorted(map(str, named))} but none named "
                            "'default', the one abot uses")
        return named["default"], f"{where} (chat_template 'default')"
    if value is not None and not isinstance(value, str):
        raise AbotError(f"{where}: chat_template must be a string or a list of named templates")
    return value, where


def token_id(backend, content: str | None, where: str) -> int | None:
    """The id of a special token's text; AbotError when the vocabulary lacks it."""
    if content is None:
        return None
    found = backend.token_to_id(content)
    if found is None:
        raise AbotError(f"{where}: {content!r} is not a token of the tokenizer's vocabulary")
    return found


def id_list(value: Any) -> list[int]:
    """An id or a list of ids (generation_config.json's eos_token_id) as a list."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def bos_rule(backend, config: dict, bos_id: int | None, where: str) -> bool:
    """Whether to prepend BOS: `add_bos_token` when set, else what tokenizer.json's post-processor does."""
    if isinstance(config.get("add_bos_token"), bool):
        add = config["add_bos_token"]
    else:
        with_specials = backend.encode("a", add_special_tokens=True).ids
        add = bos_id is not None and bool(with_specials) and with_specials[0] == bos_id
    if add and bos_id is None:
        raise AbotError(f"{where}: add_bos_token is true but no bos_token is set")
    return add


def eos_rule(backend, config: dict, generation: dict, where: str) -> tuple[int, tuple[int, ...]]:
    """The EOS (document separator) and every id that ends generation (tokenizer's first, then the config's)."""
    eos_id = token_id(backend, token_content(config.get("eos_token")), where)
    listed = id_list(generation.get("eos_token_id"))
    if eos_id is None and not listed:
        raise AbotError(f"{where}: no eos_token (nor eos_token_id in generation_config.json): abot needs an EOS to "
                        "separate documents and end generation")
    eos_id = listed[0] if eos_id is None else eos_id
    return eos_id, tuple(dict.fromkeys([eos_id, *listed]))


def load_hf_tokenizer(path: str | Path) -> HFTokenizer:
    """Load a Hugging Face folder's (or a tokenizer.json's) tokenizer with its rules and chat template."""
    from tokenizers import Tokenizer as Backend

    json_path = locate(path)
    folder = json_path.parent
    data = json_path.read_bytes()
    try:
        backend = Backend.from_str(data.decode("utf-8"))
    except Exception as err:  # the library raises its own Exception type for bad files
        raise AbotError(f"tokenizer {json_path}: not a Hugging Face tokenizer.json ({err})") from None
    config = read_json(folder / "tokenizer_config.json")
    where = str(folder / "tokenizer_config.json")
    bos_id = token_id(backend, token_content(config.get("bos_token")), where)
    eos_id, eos_ids = eos_rule(backend, config, read_json(folder / "generation_config.json"), where)
    pad_id = token_id(backend, token_content(config.get("pad_token")), where)
    variables = {name: token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES
                 if token_content(config.get(name)) is not None}
    source, source_name = template_source(folder, config)
    template = (jinja_chat_template(source, source_name, variables, backend.token_to_id) if source
                else missing_template(str(folder)))
    added = backend.get_added_tokens_decoder()
    vocab = backend.get_vocab(with_added_tokens=True)
    return HFTokenizer(
        path=json_path, sha256=hashlib.sha256(data).hexdigest(), backend=backend,
        vocab_size=max(vocab.values()) + 1 if vocab else 0, bos_id=bos_id,
        add_bos=bos_rule(backend, config, bos_id, where), eos_id=eos_id, eos_ids=eos_ids,
        pad_id=eos_id if pad_id is None else pad_id, chat_template=template,
        special_tokens={t.content: i for i, t in added.items() if t.special}, config=config, template_source=source)
