"""`abot export`: a checkpoint as a Hugging Face folder (Llama, Qwen2, Qwen3 or Arcee architecture, safetensors
in the parameters' dtype: float32 after training, an imported bfloat16 model's own bfloat16 untouched).

abot's transformer is Llama's architecture: grouped-query attention (num_key_value_heads), RMSNorm (same
formula as LlamaRMSNorm), a SwiGLU MLP and RoPE in the "rotate-half" layout (mx.fast.rope with
traditional=False: dimension i pairs with i + head_dim/2, the layout of Hugging Face's LlamaAttention), so
q_proj/k_proj need no permutation: every weight is only transposed from abot's (in, out) to torch's
(out, in). The attention options pick the architecture (`hf_architecture`): q/k norms -> Qwen3ForCausalLM;
q/k/v biases without an o bias -> Qwen2ForCausalLM; an ungated ReLU² or GELU MLP (model.ffn_activation) ->
ArceeForCausalLM (Llama's attention, mlp.up_proj/down_proj only); otherwise LlamaForCausalLM (attention_bias
when q, k, v and o all have biases). Tensor names:

    embed                    -> model.embed_tokens.weight        (vocab, d)
    blocks[i].wq / wk / wv   -> model.layers.{i}.self_attn.{q,k,v}_proj.weight
    blocks[i].wo             -> model.layers.{i}.self_attn.o_proj.weight
    blocks[i].bq / bk / bv   -> model.layers.{i}.self_attn.{q,k,v}_proj.bias   (model.qkv_bias)
    blocks[i].bo             -> model.layers.{i}.self_attn.o_proj.bias         (model.attn_out_bias)
    blocks[i].q_norm/k_norm  -> model.layers.{i}.self_attn.{q,k}_norm.weight   (model.qk_norm, Qwen3)
    blocks[i].w_gate / w_up  -> model.layers.{i}.mlp.{gate,up}_proj.weight   (no w_gate: Arcee)
    blocks[i].w_down         -> model.layers.{i}.mlp.down_proj.weight
    blocks[i].attn_norm      -> model.layers.{i}.input_layernorm.weight
    blocks[i].mlp_norm       -> model.layers.{i}.post_attention_layernorm.weight
    final_norm               -> model.norm.weight
    head (untied only)       -> lm_head.weight                    (tie_word_embeddings otherwise)

Dropout is an inference no-op and is dropped. Refused, because no Hugging Face decoder of these families
has them: logit soft-capping, a bias on o_proj without q/k/v biases, q/k norms with biases on q, k, v only,
and an ungated MLP with q/k norms or q/k/v-only biases (Arcee's attention is Llama's).
A model trained with a Hugging Face tokenizer exports that tokenizer's own files and chat template
(abot.export_hf_tokenizer). abot's own tokenizer is the SentencePiece file itself; abot never adds BOS (nor EOS) when encoding, so the
exported tokenizer is configured with add_bos_token/add_eos_token false and no dummy prefix space.
Checked against transformers 5.24: identical ids for text, code, digits, non-Latin scripts, emoji and chat
markers. One known difference: a literal U+2581 ("\u2581", SentencePiece's space mark) in the text, which
abot encodes as its UTF-8 bytes (so it round-trips) and Hugging Face's tokenizer encodes as a space.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx

from abot.config import Config
from abot.errors import AbotError
from abot.checkpoint import dtype_name
from abot.export_hf_tokenizer import special_ids, write_hf_tokenizer
from abot.export_peft import export_peft
from abot.models import hf
from abot.models.transformer import head_dim, hidden_size, kv_heads
from abot.restore import checkpoint_tokenizer, open_checkpoint
from abot.token_layout import BOS, BOS_ID, CHAT_MARKERS, END_ID, EOS, EOS_ID, FIRST_USER_ID, PAD, PAD_ID, UNK, UNK_ID

# The chat template of abot.chat_template, as Jinja for transformers' apply_chat_template.
CHAT_TEMPLATE_JINJA = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def hf_architecture(m) -> tuple[str, str, dict]:
    """(architecture, model_type, family-specific config.json fields) for a model section; refuses what no
    Hugging Face decoder of these families computes, naming the key."""
    if m.name != "transformer":
        raise AbotError(f"model.name is '{m.name}': only abot's built-in 'transformer' maps onto Llama")
    if m.logit_softcap is not None:
        raise AbotError(f"model.logit_softcap is {m.logit_softcap}: Llama, Qwen2 and Qwen3 do not cap logits (Gemma 2's "
                        "final_logit_softcapping does; abot does not export to it), so this model cannot be exported")
    if m.value_embeds:
        raise AbotError("model.value_embeds is true: no Hugging Face decoder adds a per-token table to its attention "
                        "values (Llama, Qwen2, Qwen3 and Arcee do not), so this model cannot be exported")
    if m.ffn_activation != "silu":  # ungated: Arcee (Llama with down(act(up x)), transformers >= 4.53)
        if m.qk_norm or m.qkv_bias != m.attn_out_bias:
            raise AbotError(f"model.ffn_activation '{m.ffn_activation}' with model.qk_norm {m.qk_norm}, "
                            f"model.qkv_bias {m.qkv_bias} and model.attn_out_bias {m.attn_out_bias}: Arcee (the "
                            "architecture with an ungated MLP) has Llama's attention: no q/k norms, and biases on "
                            "q, k, v and o together or on none")
        return "ArceeForCausalLM", "arcee", {"hidden_act": m.ffn_activation, "attention_bias": m.qkv_bias,
                                             "mlp_bias": False}
    qwen = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": m.n_layers}
    if m.qk_norm:
        if m.qkv_bias != m.attn_out_bias:
            raise AbotError(f"model.qk_norm with model.qkv_bias {m.qkv_bias} and model.attn_out_bias "
                            f"{m.attn_out_bias}: Qwen3 (the architecture with q/k norms) has biases on q, k, v "
                            "and o together or on none (attention_bias)")
        return "Qwen3ForCausalLM", "qwen3", {**qwen, "attention_bias": m.qkv_bias}
    if m.qkv_bias and not m.attn_out_bias:
        return "Qwen2ForCausalLM", "qwen2", qwen
    if m.attn_out_bias and not m.qkv_bias:
        raise AbotError("model.attn_out_bias without model.qkv_bias: no Hugging Face decoder has a bias on "
                        "o_proj alone (Llama's attention_bias puts biases on q, k, v and o)")
    return "LlamaForCausalLM", "llama", {"attention_bias": m.qkv_bias, "mlp_bias": False, "pretraining_tp": 1}


def hf_tensors(params: dict, cfg: Config) -> dict[str, mx.array]:
    """abot parameters -> Hugging Face state dict (torch's (out, in) layout, each tensor's dtype kept)."""
    hf_architecture(cfg.model)  # refuses what no architecture represents
    return hf.tensors_from_params(params, cfg.model.tie_embeddings)


def hf_config(cfg: Config, dtype: str = "float32") -> dict:
    """config.json: the architecture `hf_architecture` picks, with every field that changes the maths."""
    m = cfg.model
    architecture, model_type, family = hf_architecture(m)
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": m.d_model,
        "intermediate_size": hidden_size(m),
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": kv_heads(m),
        "head_dim": head_dim(m),
        "hidden_act": "silu",  # Arcee's family fields set its own
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": dict(m.rope_scaling) if m.rope_scaling is not None else None,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_seq_len,
        "tie_word_embeddings": m.tie_embeddings,
        **family,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }


def _token(content: str, **extra) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            **extra}


def tokenizer_files(model_max_length: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for the copied SentencePiece model."""
    specials = {PAD_ID: PAD, UNK_ID: UNK, BOS_ID: BOS, EOS_ID: EOS}
    specials.update({FIRST_USER_ID + i: marker for i, marker in enumerate(CHAT_MARKERS)})
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,  # abot trains and generates without BOS
        "add_eos_token": False,
        "add_prefix_space": False,  # the SentencePiece model has no dummy prefix: " a" and "a" differ
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "sp_model_kwargs": {},
        "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
        "additional_special_tokens": list(CHAT_MARKERS),
        "added_tokens_decoder": {str(i): _token(s, special=True) for i, s in sorted(specials.items())},
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE_JINJA,
    }
    special_tokens_map = {"bos_token": _token(BOS), "eos_token": _token(EOS), "unk_token": _token(UNK),
                          "pad_token": _token(PAD), "additional_special_tokens": [_token(m) for m in CHAT_MARKERS]}
    return {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special_tokens_map}


def generation_config() -> dict:
    return {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, END_ID], "pad_token_id": PAD_ID,
            "do_sample": False, "_from_model_config": False}


def check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise AbotError(f"--out {out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise AbotError(f"--out {out_dir}: the folder is not empty; choose a new folder or pass --force")


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, tokenizer_path: str | Path | None = None,
                      say: Callable[[str], None] = print, force: bool = False, merge: bool = False) -> Path:
    """Write the Hugging Face folder for `ckpt_path` into `out_dir`; returns `out_dir`. An adapter checkpoint is
    exported merged into its base with `merge`, else as PEFT adapters (abot.export_peft)."""
    opened, out_dir = open_checkpoint(ckpt_path), Path(out_dir)
    if opened.is_adapter and not merge:
        check_out_dir(out_dir, force)
        return export_peft(opened, out_dir, say)
    cfg = opened.config()
    tensors = hf_tensors(opened.params(), cfg)  # refuses what no architecture has before writing anything
    tokenizer = checkpoint_tokenizer(cfg, opened, tokenizer_path)
    check_out_dir(out_dir, force)
    if cfg.model.dropout > 0:
        say(f"Note: model.dropout {cfg.model.dropout} is dropped (inference only; the exported model has none).")
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.safetensors"
    mx.save_safetensors(str(weights), tensors, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    weights.chmod(0o666 & ~umask)  # safetensors writes 0600; give it the usual permissions of a new file
    dtype = dtype_name(tensors["model.embed_tokens.weight"].dtype)
    written = write_tokenizer(tokenizer, cfg, out_dir, dtype)
    n = sum(t.size for t in tensors.values())
    say(f"Exported {opened.path} (step {opened.step}, {n / 1e6:.2f}M parameters, {dtype}) to {out_dir} as "
        f"{hf_architecture(cfg.model)[0]}: config.json, model.safetensors, {', '.join(written)}.")
    return out_dir


def write_tokenizer(tokenizer, cfg: Config, out_dir: Path, dtype: str = "float32") -> list[str]:
    """config.json and the tokenizer's files (abot's SentencePiece, or a Hugging Face tokenizer's); their names."""
    config = hf_config(cfg, dtype)
    if tokenizer.kind == "huggingface":
        (out_dir / "config.json").write_text(json.dumps({**config, **special_ids(tokenizer)}, indent=2) + "\n")
        return write_hf_tokenizer(tokenizer, out_dir, cfg.model.max_seq_len)
    files = {"config.json": config, "generation_config.json": generation_config(),
             **tokenizer_files(cfg.model.max_seq_len)}
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    shutil.copyfile(tokenizer.path, out_dir / "tokenizer.model")
    return ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
