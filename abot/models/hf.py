"""Hugging Face decoder folders as abot models: config.json -> the `model` section, safetensors <-> parameters.

Llama (2, 3, 3.1, 3.2 with llama3 rope scaling; SmolLM, SmolLM2), Mistral, Qwen2 (q/k/v biases), Qwen3
(per-head q/k norms, head_dim set on its own) and Arcee (Llama with an ungated ReLU² MLP) map onto abot's
transformer exactly (NOTES.md, "Hugging Face decoder checkpoints"). What a config asks for that the transformer
cannot do (experts, a sliding window shorter than the sequence, another activation or rope scaling) is refused
naming the field: a model is never loaded silently wrong. Weights keep the dtype they were saved in (bfloat16
stays bfloat16).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx

from abot import hub
from abot.errors import AbotError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "ArceeForCausalLM")
# Arcee's MLP is ungated, down(act(up x)) (transformers' ArceeMLP): its hidden_act relu2 (AFM-4.5B's) or gelu
# (exact, erf) is abot's ffn_activation of the same name; every other family is SwiGLU (silu).
UNGATED_ACTIVATIONS = ("relu2", "gelu")
CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# abot's block leaves -> Hugging Face's names in a decoder layer, both ways (biases and q/k norms where present).
# Hugging Face linear layers are (out, in) and compute x @ W.T; abot's are (in, out): x @ W. RoPE is the
# rotate-half layout in both, so q and k need no permutation.
LINEARS = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
           "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
VECTORS = {"bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
           "bo": "self_attn.o_proj.bias", "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
           "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight"}
IGNORED = ("rotary_emb.inv_freq",)  # buffers older checkpoints saved; recomputed from the config
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "HuggingFaceTB/SmolLM2-135M"
DOWNLOADED = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]  # what abot reads of a model repository


def is_model_folder(path: str | Path) -> bool:
    """A folder with a config.json: a Hugging Face model (abot run folders hold step_*.ckpt files instead)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def model_folder(path: str | Path, key: str) -> Path | None:
    """`path` as a Hugging Face model folder: itself when it holds a config.json, or a Hub id's snapshot (the
    local cache first); None for anything else, such as an abot checkpoint or run folder."""
    local = Path(path).expanduser()
    if local.exists():
        return local if is_model_folder(local) else None
    return hub_snapshot(str(path), key) if HUB_ID.match(str(path)) else None


def hub_snapshot(repo_id: str, key: str) -> Path:
    """The folder of Hub model `repo_id`: from the local Hugging Face cache, else downloaded. Offline, an id
    that is not in the cache fails at once, saying how to point at a folder instead."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=DOWNLOADED, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    reason = hub.unreachable("HF_HUB_OFFLINE")
    if reason:
        raise AbotError(f"{key}: {repo_id!r} is no file or folder here and no model in the local Hugging Face cache, "
                        f"and the Hub cannot be reached ({reason}); point {key} at the model's folder (config.json, "
                        f"*.safetensors, tokenizer files), e.g. one copied from a machine that ran "
                        f"`huggingface-cli download {repo_id} --local-dir DIR`")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=DOWNLOADED))
    except Exception as err:  # noqa: BLE001 - the hub client raises many types; each means the same here
        raise AbotError(f"{key}: cannot download {repo_id!r} from the Hugging Face Hub ({err})") from None


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise AbotError(f"{folder / CONFIG_FILE}: cannot read it as JSON ({err})") from None
    if not isinstance(config, dict):
        raise AbotError(f"{folder / CONFIG_FILE}: expected a JSON object")
    return config


def _refuse(where: Path, field: str, value: Any, why: str) -> AbotError:
    return AbotError(f"{where / CONFIG_FILE}: {field} is {value!r}; {why}, so abot cannot load this model")


def _rope(hf: dict, where: Path) -> tuple[float, dict | None]:
    """(rope_theta, model.rope_scaling) from transformers 5's `rope_parameters` or the older top-level keys."""
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise _refuse(where, "rope_scaling.rope_type", kind, "abot supports default and llama3 RoPE only")
    missing = [k for k in LLAMA3_KEYS if k not in scaling]
    if missing:
        raise _refuse(where, "rope_scaling", scaling, f"llama3 scaling needs {', '.join(missing)}")
    return theta, {"rope_type": "llama3", **{k: scaling[k] for k in LLAMA3_KEYS}}


def _check_supported(hf: dict, where: Path) -> str:
    """The architecture name, after refusing every field abot's transformer cannot honour."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise _refuse(where, "architectures", hf.get("architectures"), f"abot imports {', '.join(ARCHITECTURES)}")
    act = ffn_activation(hf, arch)
    if arch == "ArceeForCausalLM" and act not in UNGATED_ACTIVATIONS:
        raise _refuse(where, "hidden_act", act, f"abot's ungated MLP takes {' or '.join(UNGATED_ACTIVATIONS)}")
    if arch != "ArceeForCausalLM" and act != "silu":
        raise _refuse(where, "hidden_act", act, "abot's transformer uses SiLU (SwiGLU) only")
    for key in EXPERT_KEYS:
        if hf.get(key):
            raise _refuse(where, key, hf[key], "mixture-of-experts layers are not supported")
    if hf.get("mlp_bias"):
        raise _refuse(where, "mlp_bias", True, "abot's MLP has no biases")
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", arch == "MistralForCausalLM")
    if uses_window and window and window < hf.get("max_position_embeddings", 0):
        raise _refuse(where, "sliding_window", window, "sliding-window attention shorter than the longest "
                      "sequence is not supported (abot attends to every earlier token)")
    layer_types = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
    if layer_types:
        raise _refuse(where, "layer_types", layer_types[0], "abot supports full attention layers only")
    return arch


def model_section(hf: dict, where: Path) -> dict:
    """abot's `model` section for a Hugging Face config.json (`where`: its folder, named in errors)."""
    arch = _check_supported(hf, where)
    try:
        d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        theta, scaling = _rope(hf, where)
        bias = bool(hf.get("attention_bias", False))
        return {
            "name": "transformer", "vocab_size": int(hf["vocab_size"]), "n_layers": int(hf["num_hidden_layers"]),
            "d_model": d, "n_heads": heads, "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
            "head_dim": int(hf.get("head_dim") or d // heads), "mlp_hidden": int(hf["intermediate_size"]),
            "mlp_multiple": int(hf["intermediate_size"]) / d, "dropout": 0.0,
            "max_seq_len": int(hf.get("max_position_embeddings", 4096)), "rope_theta": theta,
            "rope_scaling": scaling, "ffn_activation": ffn_activation(hf, arch),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and none on o; Llama, Mistral and Qwen3 put attention_bias on all four.
            "qkv_bias": arch == "Qwen2ForCausalLM" or bias, "attn_out_bias": arch != "Qwen2ForCausalLM" and bias,
            "qk_norm": arch == "Qwen3ForCausalLM",
        }
    except KeyError as err:
        raise AbotError(f"{where / CONFIG_FILE}: no {err.args[0]!r}; is this a decoder model's config?") from None


def ffn_activation(hf: dict, arch: str) -> str:
    """config.json's hidden_act, with each family's default where it has none."""
    return hf.get("hidden_act", "relu2" if arch == "ArceeForCausalLM" else "silu")


def read_tensors(folder: Path) -> dict[str, mx.array]:
    """Every tensor of the folder's safetensors files (sharded ones through model.safetensors.index.json)."""
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
    if not files:
        raise AbotError(f"{folder}: no model weights ({WEIGHTS_FILE}, or the shards {INDEX_FILE} lists); "
                        "download the whole model folder")
    tensors: dict[str, mx.array] = {}
    for name in files:
        if not (folder / name).is_file():
            raise AbotError(f"{folder / name}: listed in {INDEX_FILE} but missing; download the whole model folder")
        tensors.update(mx.load(str(folder / name)))
    return tensors


def params_from_tensors(tensors: dict[str, mx.array], model: dict, folder: Path) -> dict:
    """The abot parameter tree of `tensors` for the `model` section (from `model_section`), checked name by name."""
    left = {k: v for k, v in tensors.items() if not k.endswith(IGNORED)}

    def take(name: str) -> mx.array:
        if name not in left:
            raise AbotError(f"{folder}: the weights have no tensor {name!r}, which its config.json implies; "
                            "the folder is incomplete or its config.json does not describe these weights")
        return left.pop(name)

    blocks = []
    for i in range(model["n_layers"]):
        prefix = f"model.layers.{i}."
        block = {ours: take(f"{prefix}{theirs}.weight").T for ours, theirs in LINEARS.items()
                 if ours != "w_gate" or model["ffn_activation"] == "silu"}
        wanted = ["attn_norm", "mlp_norm"] + (["bq", "bk", "bv"] if model["qkv_bias"] else []) \
            + (["bo"] if model["attn_out_bias"] else []) + (["q_norm", "k_norm"] if model["qk_norm"] else [])
        block.update({ours: take(prefix + VECTORS[ours]) for ours in wanted})
        blocks.append(block)
    params = {"embed": take("model.embed_tokens.weight"), "blocks": blocks, "final_norm": take("model.norm.weight")}
    if model["tie_embeddings"]:
        left.pop("lm_head.weight", None)  # some tied checkpoints store the embedding a second time
    else:
        params["head"] = take("lm_head.weight").T
    if left:
        extra = sorted(left)
        raise AbotError(f"{folder}: {len(extra)} tensors that config.json does not explain (e.g. {extra[0]!r}); "
                        "abot refuses to load a model partly")
    return params


def tensors_from_params(params: dict, tie_embeddings: bool) -> dict[str, mx.array]:
    """The Hugging Face state dict of abot parameters: names and (out, in) layouts, dtypes kept, so a folder
    loaded and written back unchanged gives the same tensors bit for bit."""
    def linear(w: mx.array) -> mx.array:
        return mx.contiguous(w.T)

    out = {"model.embed_tokens.weight": params["embed"]}
    for i, block in enumerate(params["blocks"]):
        out.update({f"model.layers.{i}.{theirs}.weight": linear(block[ours]) for ours, theirs in LINEARS.items()
                    if ours in block})
        out.update({f"model.layers.{i}.{theirs}": block[ours] for ours, theirs in VECTORS.items() if ours in block})
    out["model.norm.weight"] = params["final_norm"]
    if not tie_embeddings:
        out["lm_head.weight"] = linear(params["head"])
    return out
