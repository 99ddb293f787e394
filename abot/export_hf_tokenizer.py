"""The tokenizer files of an export when the model was trained with a Hugging Face tokenizer.

The original tokenizer.json is copied unchanged (the ids the model learned), with a tokenizer_config.json
that keeps the source folder's settings and carries the chat template inline (read by transformers 4 and 5
and by mlx-lm), the source's special_tokens_map.json when it had one, and the BOS/EOS/pad ids for
config.json and generation_config.json (every EOS id and the template's end of turn end generation).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def special_ids(tokenizer) -> dict:
    """bos/eos/pad ids for config.json (eos: the tokenizer's EOS)."""
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def hf_generation_config(tokenizer) -> dict:
    """generation_config.json: generation ends at every EOS id and the template's end of turn."""
    eos = list(dict.fromkeys([*tokenizer.eos_ids, *tokenizer.chat_template.end_of_turn_ids]))
    return {**special_ids(tokenizer), "eos_token_id": eos, "do_sample": False, "_from_model_config": False}


def hf_tokenizer_config(tokenizer, model_max_length: int) -> dict:
    """tokenizer_config.json: the source's, with its special tokens named and its chat template inline."""
    config = {k: v for k, v in tokenizer.config.items() if k != "chat_template"}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    backend = tokenizer.backend
    for name, token in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
                        ("pad_token", tokenizer.pad_id)):
        if config.get(name) is None and token is not None:
            config[name] = backend.id_to_token(token)
    config["model_max_length"] = model_max_length
    if tokenizer.template_source:
        config["chat_template"] = tokenizer.template_source
    return config


def write_hf_tokenizer(tokenizer, out_dir: Path, model_max_length: int) -> list[str]:
    """Write the tokenizer files into `out_dir` (generation_config.json included); their names."""
    shutil.copyfile(tokenizer.path, out_dir / "tokenizer.json")
    written = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    files = {"tokenizer_config.json": hf_tokenizer_config(tokenizer, model_max_length),
             "generation_config.json": hf_generation_config(tokenizer)}
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    special_map = tokenizer.folder / "special_tokens_map.json"
    if special_map.is_file():
        shutil.copyfile(special_map, out_dir / "special_tokens_map.json")
        written.append("special_tokens_map.json")
    return written
