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
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    AdapterFile,
    file_sha256,
    pack_state,
    read_weights,
    write_adapter,
    write_directory_atomically,
)
from nola.basis import GENERATOR_VERSION
from nola.errors import NolaError
from nola.methods import method_for
from nola.peft.config import PEFT_TYPE, NolaConfig
from nola.peft.model import PREFIX

PEFT_KEY_PREFIX = "base_model.model."
PEFT_ONLY_SETTINGS = ("modules_to_save", "trainable_token_indices")  # trained tensors beyond the coefficients


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
    """A PEFT NOLA adapter directory as nola's `AdapterFile`, which nola's merge, export and `apply_adapter` take as
    they take a read nola adapter. Checked: the generator version (by NolaConfig), no PEFT-only trained modules,
    every module's two coefficient vectors and their lengths. Where PEFT chose the modules by a regex or by its layer
    and exclusion filters, the nola settings name the chosen modules instead."""
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
    for setting in PEFT_ONLY_SETTINGS:
        if getattr(peft_config, setting):
            raise NolaError(f"{config_path}: {setting} trains or changes modules besides NOLA's layers, which a nola "
                            f"adapter does not hold; use the adapter with PEFT")
    base = peft_config.base_model_fingerprint
    modules = base.get("modules") if isinstance(base, dict) else None
    if not isinstance(modules, dict) or set(modules) != set(peft_config.module_seeds):
        raise NolaError(f"{config_path}: base_model_fingerprint.modules must name every module of module_seeds")
    config = peft_config.adapter_config()
    if not same_targets_in_nola(peft_config):  # PEFT-only targeting: name the modules it chose instead
        config = dataclasses.replace(config, target_modules=list(modules))
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
    nola_description = {"format": FORMAT, "format_version": FORMAT_VERSION, "generator_version": GENERATOR_VERSION,
                        "adapter": config.to_dict(), "base_model": base, "weights_sha256": file_sha256(weights_path)}
    return AdapterFile(directory, nola_description, config, values)


def same_targets_in_nola(config: NolaConfig) -> bool:
    """Whether nola's target matching (`all-linear`, or names matched whole or as a dotted suffix, as PEFT matches a
    list) picks the modules PEFT picked with these settings: not for a regex or PEFT's layer and exclusion filters."""
    filtered = config.exclude_modules or config.layers_to_transform is not None or config.layers_pattern
    regex = isinstance(config.target_modules, str) and config.target_modules != "all-linear"
    return not (filtered or regex)


def peft_to_nola(path: str | Path, out_dir: str | Path) -> Path:
    """Write the PEFT NOLA adapter at `path` as a nola adapter directory (atomically)."""
    adapter = read_peft_nola(path)
    state = pack_state(adapter.config, adapter.modules, adapter.values)
    return write_adapter(out_dir, adapter.config, state, adapter.base)
