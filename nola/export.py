"""Exporting an adapter for other tools: a standard PEFT LoRA adapter, or a compact NOLA adapter.

PEFT LoRA: NOLA's update is a rank-r LoRA update whose A and B happen to be generated, so materialising them gives
an ordinary LoRA adapter that peft, vLLM and TGI load as they would any other. PEFT computes (lora_alpha / r)·B·A;
our scale is folded into B and lora_alpha set to r, so no serving stack's handling of alpha can change the result.
An SVD-initialised LoRA trained on a residual base; on the original base its update is B·A − B0·A0, exported as a
rank-2r LoRA (PEFT's own conversion of PiSSA adapters), so it is served on the unmodified base like any other.

Compact NOLA: the coefficients and seeds only, optionally re-quantised to 3 or 4 bits after training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from nola.adapter_io import AdapterFile, pack_state, write_adapter, write_directory_atomically
from nola.lora_form import adapter_factors, lora_rank
from nola.methods import method_for

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


def peft_target_modules(adapted: list[str], base_modules: set[str]) -> list[str]:
    """PEFT's target_modules: the leaf names (q_proj, ...), which vLLM checks an adapter against, when the adapter
    covers every base module of those names; else the full names, so PEFT adds no layer the adapter lacks."""
    leaves = {name.rsplit(".", 1)[-1] for name in adapted}
    covered = {name for name in base_modules if name.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if covered == set(adapted) else sorted(adapted)


def export_peft_lora(adapter: AdapterFile, out_dir: Path, dtype: torch.dtype, base_name: str,
                     base_modules: set[str]) -> Path:
    """Write `adapter` as a PEFT LoRA adapter directory (atomically). `base_modules`: the base's Linear names."""
    config = adapter.config
    tensors = {}
    for name in adapter.modules:
        a, b = adapter_factors(adapter, name)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (b * config.scale).to(dtype).contiguous()
    rank = lora_rank(adapter)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": rank,
        "lora_alpha": rank,  # scaling 1: alpha/r is already in lora_B
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": peft_target_modules(list(adapter.modules), base_modules),
    }

    def write_into(directory: Path) -> None:
        save_file(tensors, str(directory / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")

    write_directory_atomically(out_dir, write_into)
    return out_dir


def export_nola(adapter: AdapterFile, out_dir: Path, bits: int | None) -> Path:
    """Write the compact NOLA adapter, its coefficients re-quantised to `bits` (3 or 4) when given."""
    config = adapter.config
    if bits is not None and method_for(config.method).quantizable:
        config = dataclasses.replace(config, quant_bits=bits)
    state = pack_state(config, adapter.modules, adapter.values)
    return write_adapter(out_dir, config, state, adapter.base)
