"""Training checkpoints: `output_dir/checkpoints/step-N/`, complete or absent.

A checkpoint holds the adapter (the same files as a final adapter), the trainable tensors at full precision (a
quantised adapter's packed file alone would not resume exactly), the optimizer state as safetensors plus its
JSON-able parts, the scheduler state, RNG states and the data position, and a manifest of every file's size and
SHA-256. It is written into a temporary directory and renamed into place, so a crash mid-write leaves at most a
hidden temporary directory, never a `step-N` that looks complete. Loading verifies the manifest; `latest` skips
(with a warning) a checkpoint that fails it in favour of the previous good one.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nola.adapter_io import file_sha256, save_adapter, write_directory_atomically
from nola.errors import NolaError

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
TRAINABLE_TENSORS = "trainable.safetensors"


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that trains, by name, detached on CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _manifest_of(directory: Path) -> dict[str, dict]:
    return {
        str(path.relative_to(directory)): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors for safetensors, everything else for JSON)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict,
) -> Path:
    """Write a complete checkpoint to `directory` atomically."""
    optimizer_tensors, optimizer_rest = _split_optimizer_state(optimizer.state_dict())
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()

    def write_into(temporary: Path) -> None:
        save_adapter(model, temporary / "adapter")
        save_file(trainable_tensors(model), str(temporary / TRAINABLE_TENSORS))
        save_file(optimizer_tensors, str(temporary / OPTIMIZER_TENSORS))
        save_file(rng, str(temporary / "rng.safetensors"))
        state = {
            **trainer_state,
            "optimizer": optimizer_rest,
            "scheduler": scheduler.state_dict(),
            "python_random": _python_random_state(),
        }
        (temporary / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        (temporary / MANIFEST).write_text(json.dumps(_manifest_of(temporary), indent=1) + "\n")

    write_directory_atomically(directory, write_into)
    return directory


def _python_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def verify_checkpoint(directory: Path) -> None:
    """Raise NolaError unless every file listed in the manifest is present with its size and hash."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise NolaError(f"{directory}: not a checkpoint ({MANIFEST} is missing)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise NolaError(f"{manifest_path}: not valid JSON") from None
    for name, facts in manifest.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != facts["bytes"] or file_sha256(path) != facts["sha256"]:
            raise NolaError(f"{directory}: checkpoint file {name} is missing or corrupted")


def checkpoint_step(directory: Path) -> int | None:
    prefix, _, number = directory.name.partition("-")
    return int(number) if prefix == "step" and number.isdigit() else None


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """step-N directories, oldest first (temporary and foreign entries ignored)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def latest_valid_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint that passes verification; broken ones are skipped with a warning."""
    for candidate in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify_checkpoint(candidate)
            return candidate
        except NolaError as error:
            warnings.warn(f"skipping checkpoint: {error}", stacklevel=2)
    return None


def rotate_checkpoints(checkpoints_dir: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` checkpoints."""
    if keep is None:
        return
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore adapter values, optimizer, scheduler and RNG states in place; returns the trainer state."""
    verify_checkpoint(directory)
    state = json.loads((directory / STATE_FILE).read_text())
    saved = load_file(directory / TRAINABLE_TENSORS)
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(parameters) or any(saved[n].shape != p.shape for n, p in parameters.items()):
        raise NolaError(f"{directory}: checkpoint adapter does not match this run's adapter configuration")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(saved[name].to(parameter.dtype))
    optimizer.load_state_dict(_join_optimizer_state(load_file(directory / OPTIMIZER_TENSORS), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(directory / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return state
