"""Adapter files: a directory with `adapter_config.json` and `adapter_model.safetensors`.

The JSON says everything needed to rebuild the adapter but its trained values: the adapter settings with every
module's seed, the basis generator's version, the base model's fingerprint (adapted module names and shapes) and the
SHA-256 of the tensor file. The safetensors file holds the trained tensors only: coefficients for NOLA (packed codes
for 3/4-bit), A and B for LoRA; never seeds, bases or A0, which are regenerated.

Loading checks each of those facts and fails with one line naming the first mismatch, before touching the model.
Saving writes a temporary directory and renames it into place, so a reader sees the old adapter or the new one,
never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from nola.adapter_config import AdapterConfig
from nola.basis import GENERATOR_VERSION
from nola.errors import NolaError
from nola.inject import adapted_modules, adapter_config_of, attach, base_fingerprint, find_target_modules
from nola.quant import code_bytes, pack_codes, unpack_codes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "nola-adapter"
FORMAT_VERSION = 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    """Flush a file or directory entry to disk, so a rename after it cannot expose unwritten data."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_directory_atomically(path: Path, write_into) -> None:
    """Call `write_into(tmp_dir)`, fsync what it wrote, then rename tmp_dir to `path` (replacing an old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        write_into(temporary)
        for child in temporary.iterdir():
            _fsync_path(child)
        _fsync_path(temporary)
        previous = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            os.rename(path, previous)
        os.rename(temporary, path)
        _fsync_path(path.parent)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def adapter_state(model: nn.Module, values: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors an adapter file stores, keyed `<module>.<tensor>` (packed codes and grid for quantised NOLA).

    `values` (parameter name -> full tensor) stands in for the model's own tensors when those are partitioned
    across processes (DeepSpeed ZeRO-3) and were gathered by the caller."""
    config = adapter_config_of(model)
    state = {}
    for name, module in adapted_modules(model):
        for short_name, tensor in module.trainable_tensors().items():
            key = f"{name}.{short_name}"
            tensor = values[key] if values is not None else tensor
            if config.quant_bits and module.method == "nola":
                state[f"{key}.codes"], state[f"{key}.grid"] = pack_codes(tensor, config.quant_bits)
            else:
                state[key] = tensor.detach().cpu().contiguous()
    return state


def save_adapter(model: nn.Module, path: str | os.PathLike, values: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapter to directory `path` atomically; returns the path. See `adapter_state` for values."""
    config = adapter_config_of(model)
    state = adapter_state(model, values)
    fingerprint = base_fingerprint(model)

    def write_into(directory: Path) -> None:
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        description = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "generator_version": GENERATOR_VERSION,
            "adapter": config.to_dict(),
            "base_model": {"modules": fingerprint},
            "weights_sha256": file_sha256(directory / WEIGHTS_FILE),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(description, indent=2) + "\n")

    write_directory_atomically(Path(path), write_into)
    return Path(path)


def read_adapter_description(path: str | os.PathLike) -> dict:
    """Parse and check `adapter_config.json` of an adapter directory (format, generator version, file hash)."""
    directory = Path(path)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise NolaError(f"{directory}: not a nola adapter directory ({required.name} is missing)")
    try:
        description = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NolaError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise NolaError(f"{config_path}: not a nola adapter config (format is not {FORMAT!r})")
    if description.get("format_version") != FORMAT_VERSION:
        raise NolaError(f"{config_path}: format_version {description.get('format_version')!r}, expected {FORMAT_VERSION}")
    if description.get("generator_version") != GENERATOR_VERSION:
        raise NolaError(
            f"{config_path}: basis generator {description.get('generator_version')!r} differs from this nola's "
            f"{GENERATOR_VERSION!r}; its bases cannot be regenerated"
        )
    if description.get("weights_sha256") != file_sha256(weights_path):
        raise NolaError(f"{weights_path}: corrupted or truncated (SHA-256 differs from {CONFIG_FILE})")
    if not isinstance(description.get("adapter"), dict) or not isinstance(description.get("base_model"), dict):
        raise NolaError(f"{config_path}: missing 'adapter' or 'base_model' section")
    return description


def _check_fingerprint(model: nn.Module, config: AdapterConfig, expected: dict, config_path: Path) -> None:
    """Fail naming the first module whose presence or shape differs between the adapter and `model`."""
    found = {}
    for name in find_target_modules(model, config.target_modules):
        module = model.get_submodule(name)
        found[name] = [module.out_features, module.in_features]
    for name, shape in expected.items():
        if name not in found:
            raise NolaError(f"{config_path}: adapter is for another base model (module {name} not found in it)")
        if list(shape) != found[name]:
            raise NolaError(
                f"{config_path}: adapter is for another base model ({name} is {found[name][0]}x{found[name][1]}, "
                f"adapter expects {shape[0]}x{shape[1]})"
            )
    extra = sorted(set(found) - set(expected))
    if extra:
        raise NolaError(f"{config_path}: adapter is for another base model (module {extra[0]} is not in the adapter)")


def _read_weights(weights_path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises several types for a damaged header
        raise NolaError(f"{weights_path}: unreadable safetensors file ({error})") from None


def _expected_shapes(config: AdapterConfig, fingerprint: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    """The tensor keys and shapes a file for this config and base must hold, known before anything is attached."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (out_features, in_features) in fingerprint.items():
        if config.method == "lora":
            shapes[f"{name}.lora_a"] = (config.rank, in_features)
            shapes[f"{name}.lora_b"] = (out_features, config.rank)
            continue
        for short_name, count in (("coefficients_a", config.basis_size_a), ("coefficients_b", config.basis_size_b)):
            if config.quant_bits:
                shapes[f"{name}.{short_name}.codes"] = (code_bytes(count, config.quant_bits),)
                shapes[f"{name}.{short_name}.grid"] = (2,)
            else:
                shapes[f"{name}.{short_name}"] = (count,)
    return shapes


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Attach the adapter saved at `path` to `model` (which must carry none yet) and load its tensors.

    Every check (format, generator, file hash, base fingerprint, tensor names and shapes) runs before the model
    is touched, so a failed load leaves the model as it was.
    """
    directory = Path(path)
    weights_path = directory / WEIGHTS_FILE
    description = read_adapter_description(directory)
    config = AdapterConfig.from_dict(description["adapter"], where=str(directory / CONFIG_FILE))
    fingerprint = description["base_model"].get("modules", {})
    _check_fingerprint(model, config, fingerprint, directory / CONFIG_FILE)
    state = _read_weights(weights_path)
    shapes = _expected_shapes(config, fingerprint)
    for key in sorted(set(shapes) | set(state)):
        if key not in state:
            raise NolaError(f"{weights_path}: tensor {key} is missing")
        if key not in shapes:
            raise NolaError(f"{weights_path}: unexpected tensor {key}")
        if tuple(state[key].shape) != shapes[key]:
            raise NolaError(f"{weights_path}: {key} has shape {tuple(state[key].shape)}, expected {shapes[key]}")
    attach(model, config)
    with torch.no_grad():
        for name, module in adapted_modules(model):
            for short_name, parameter in module.trainable_tensors().items():
                key = f"{name}.{short_name}"
                if config.quant_bits and module.method == "nola":
                    value = unpack_codes(state[f"{key}.codes"], state[f"{key}.grid"], parameter.numel(), config.quant_bits)
                else:
                    value = state[key]
                parameter.copy_(value.to(parameter.dtype))
    return model
