"""`abot export` of an adapter checkpoint without --merge: the adapters in PEFT's format.

PEFT (NOTES.md): `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, lora_dropout) and
`adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight`
(out, r), torch's layout: abot's A (in, r) and B (r, out) transposed. The module names are the Hugging Face
ones of abot.models.hf (model.layers.{i}.self_attn.q_proj, ...). DoRA adds `use_dora: true` and each module's
`.lora_magnitude_vector` (out,): PEFT's m over `weight.norm(dim=1)` of its (out, in) weight is abot's m over
the (in, out) weight's column norm, the same numbers. A quantized base (QLoRA) is exported merged (--merge).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import mlx.core as mx

from abot.config_rules import ADAPTER_TARGETS
from abot.errors import AbotError
from abot.models import hf
from abot.restore import Opened


def peft_tensors(adapters: dict) -> dict[str, mx.array]:
    """PEFT's tensor names and (out, in) layouts for an abot LoRA or DoRA adapter tree."""
    out = {}
    for i, block in enumerate(adapters["blocks"]):
        for name, leaf in block.items():
            module = f"base_model.model.model.layers.{i}.{hf.LINEARS[name]}"
            out[f"{module}.lora_A.weight"] = mx.contiguous(leaf["lora_a"].T)
            out[f"{module}.lora_B.weight"] = mx.contiguous(leaf["lora_b"].T)
            if "magnitude" in leaf:  # DoRA (PEFT drops the ".weight" of its DoRA layer's parameter here)
                out[f"{module}.lora_magnitude_vector"] = leaf["magnitude"]
    return out


def peft_config(cfg, base_path: str) -> dict:
    a = cfg.adapter
    modules = sorted({hf.LINEARS[ADAPTER_TARGETS[t]].split(".")[-1] for t in a.targets})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path, "r": a.rank,
            "lora_alpha": a.alpha, "lora_dropout": a.dropout, "target_modules": modules, "bias": "none",
            "fan_in_fan_out": False, "use_dora": a.kind == "dora", "inference_mode": True}


def export_peft(opened: Opened, out_dir: Path, say: Callable[[str], None] = print) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` of a LoRA or DoRA checkpoint into `out_dir`."""
    cfg = opened.config()
    a = cfg.adapter
    if a.kind not in ("lora", "dora") or a.quantize_bits is not None:
        what = f"adapter.kind '{a.kind}'" if a.quantize_bits is None else f"a {a.quantize_bits}-bit quantized base"
        raise AbotError(f"{opened.path}: abot exports PEFT's format for LoRA and DoRA on a float base only, and this "
                        f"checkpoint has {what}; pass --merge to export the merged model as a Hugging Face folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = peft_tensors(opened.trained())
    mx.save_safetensors(str(out_dir / "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    base = opened.meta["base"]["path"]
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config(cfg, base), indent=2) + "\n")
    say(f"Exported the {a.kind.upper()} adapters of {opened.path} (step {opened.step}, {len(tensors)} tensors) to "
        f"{out_dir} in PEFT's format: adapter_config.json, adapter_model.safetensors (base: {base}; --merge writes the merged "
        "model instead).")
    return out_dir
