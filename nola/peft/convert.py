"""Both ways between nola's adapter directory and PEFT's NOLA one, bit for bit.

The two hold the same numbers: float32 coefficients per module, the module seeds, the basis generator's version
and the base's fingerprint. Only names differ: nola keys a tensor `<module>.coefficients_a`, PEFT
`base_model.model.<module>.nola_coefficients_a`, and the settings sit in nola's `adapter` section or in PEFT's
flat config. So a conversion renames and never recomputes; converting there and back gives the same tensors and
settings. A quantised-coefficient adapter (`quant_bits`) has no PEFT form: PEFT's NOLA layer trains and stores
float32 coefficients (export it with merge_and_export.py --format peft-lora instead).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from nola.adapter_io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterFile,
    pack_state,
    read_weights,
    write_adapter,
    write_directory_atomically,
)
from nola.errors import NolaError
from nola.methods import method_for
from nola.peft.config import PEFT_TYPE, NolaConfig
from nola.peft.model import PREFIX

PEFT_KEY_PREFIX = "base_model.model."


def peft_key(module: str, short: str) -> str:
    """PEFT's file key of one of nola's tensors (`coefficients_a` of a module -> ...<module>.nola_coefficients_a)."""
    return f"{PEFT_KEY_PREFIX}{module}.{PREFIX}{short}"


def is_peft_nola_directory(path: str | Path) -> bool:
    """Whether `path` holds a PEFT adapter of type NOLA (its adapter_config.json says so)."""
    try:
        return json.loads((Path(path) / CONFIG_FILE).read_text()).get("peft_type") == PEFT_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def nola_to_peft(adapter: AdapterFile, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter` (a nola NOLA adapter, read and verified) as a PEFT NOLA adapter directory, atomically."""
    peft_config = NolaConfig.from_adapter(adapter.config, base_model_fingerprint=adapter.base,
                                           base_model_name_or_path=base_model_name_or_path, task_type="CAUSAL_LM",
                                           inference_mode=True)
    tensors = {}
    for key, value in adapter.values.items():
        module, _, short = key.rpartition(".")
        tensors[peft_key(module, short)] = value.contiguous()

    def write_into(directory: Path) -> None:
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps(peft_config.to_dict(), indent=2, sort_keys=True) + "\n")

    write_directory_atomically(Path(out_dir), write_into)
    return Path(out_dir)


def read_peft_nola(path: str | Path) -> AdapterFile:
    """A PEFT NOLA adapter directory as nola's `AdapterFile` (settings, values, base fingerprint), checked: the
    generator version (by NolaConfig), every module's two coefficient vectors and their lengths."""
    directory = Path(path)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not is_peft_nola_directory(directory) or not weights_path.is_file():
        raise NolaError(f"{directory}: not a PEFT NOLA adapter (adapter_config.json with peft_type NOLA and "
                        f"{WEIGHTS_FILE})")
    description = json.loads(config_path.read_text())
    known = {field.name for field in dataclasses.fields(NolaConfig)}
    unknown = sorted(set(description) - known)
    if unknown:
        raise NolaError(f"{config_path}: unknown NolaConfig key {unknown[0]!r}")
    peft_config = NolaConfig(**description)
    config = peft_config.adapter_config()
    base = peft_config.base_model_fingerprint
    modules = base.get("modules") if isinstance(base, dict) else None
    if not isinstance(modules, dict) or set(modules) != set(config.module_seeds):
        raise NolaError(f"{config_path}: base_model_fingerprint.modules must name every module of module_seeds")
    stored = read_weights(weights_path)
    values: dict[str, torch.Tensor] = {}
    for name, (out_features, in_features) in modules.items():
        for short, shape in method_for(config.method).stored_shapes(config, out_features, in_features).items():
            tensor = stored.pop(peft_key(name, short), None)
            if tensor is None or tuple(tensor.shape) != shape:
                found = "missing" if tensor is None else f"of shape {tuple(tensor.shape)}"
                raise NolaError(f"{weights_path}: {peft_key(name, short)} is {found}, expected {shape}")
            values[f"{name}.{short}"] = tensor
    if stored:
        raise NolaError(f"{weights_path}: unexpected tensor {sorted(stored)[0]}")
    return AdapterFile(directory, {"adapter": config.to_dict(), "base_model": base}, config, values)


def peft_to_nola(path: str | Path, out_dir: str | Path) -> Path:
    """Write the PEFT NOLA adapter at `path` as a nola adapter directory (atomically)."""
    adapter = read_peft_nola(path)
    state = pack_state(adapter.config, adapter.modules, adapter.values)
    return write_adapter(out_dir, adapter.config, state, adapter.base)
