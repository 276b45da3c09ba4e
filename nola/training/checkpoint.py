"""Training checkpoints: `output_dir/checkpoints/step-N/`, complete or absent.

A checkpoint holds the adapter (the same files as a final adapter), the trainable tensors at full precision (a
quantised adapter's packed file alone would not resume exactly), the optimizer state as safetensors plus its
JSON-able parts, the scheduler state, RNG states and the data position, and a manifest of every file's size and
SHA-256. It is written into a temporary directory and renamed into place, so a crash mid-write leaves at most a
hidden temporary directory, never a `step-N` that looks complete; a crash while replacing a `step-N` never leaves
no copy of it (see `recover_replaced`). Loading verifies the manifest; `latest` skips
(with a warning) a checkpoint that fails it in favour of the previous good one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nola.adapter_io import file_sha256, fsync_path, save_adapter, write_directory_atomically
from nola.errors import NolaError
from nola.training.failpoints import kill_if_armed

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
TRAINABLE_TENSORS = "trainable.safetensors"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class TrainingState:
    """What a checkpoint needs of the model and optimizer, gathered into full tensors on the CPU."""

    values: dict[str, torch.Tensor]  # parameter name -> full trainable value
    moments: dict[str, torch.Tensor]  # "<parameter name>.<state key>" -> optimizer state tensor
    meta: dict  # step count, learning rates, non-tensor optimizer state


def _manifest_of(directory: Path) -> dict[str, dict]:
    return {
        str(path.relative_to(directory)): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _optimizer_chain(optimizer) -> list:
    """accelerate's wrapper, DeepSpeed's ZeRO optimizer (if any), ..., the torch optimizer (step count and lr)."""
    chain = [optimizer]
    while hasattr(chain[-1], "optimizer") and chain[-1].optimizer is not chain[-1]:
        chain.append(chain[-1].optimizer)
    return chain


def _base_optimizer(optimizer) -> torch.optim.Optimizer:
    return _optimizer_chain(optimizer)[-1]


def _create_deepspeed_optimizer_state(optimizer) -> None:
    """ZeRO creates its Adam state (and the per-parameter views into it) at the first step, which a resumed run
    has not taken: create it, zero-filled, for ZeRO's flat fp32 partitions (stage 1/2 and stage 3 name them
    differently); the restore that follows fills it."""
    chain = _optimizer_chain(optimizer)
    base = chain[-1]
    if any(ADAM_MOMENTS[0] in entry for entry in base.state.values()):
        return
    for wrapper in chain[:-1]:
        partitions = getattr(wrapper, "single_partition_of_fp32_groups", None) or getattr(
            wrapper, "fp32_partitioned_groups_flat", None) or []
        for partition in partitions:
            base.state[partition] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(partition)
                                                                  for k in ADAM_MOMENTS}}
        if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
            wrapper._lazy_init_hp_params_optimizer_state()


def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().contiguous() for key, value in tensors.items() if value is not None}


def gather_training_state(model: nn.Module, optimizer, deepspeed: bool = False) -> TrainingState:
    """Every trainable parameter's full value and optimizer moments, keyed by parameter name, plus the step count
    and learning rates: the same files whatever engine and process count wrote them, so a checkpoint resumes on
    another. Under DeepSpeed the values are assembled from the ZeRO partitions, a collective: every rank must call
    this, in the same order."""
    values, moments, scalars = {}, {}, {}
    for name, parameter in _trainable(model):
        if deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            values[name] = safe_get_full_fp32_param(parameter)
            for key in ADAM_MOMENTS:
                moments[f"{name}.{key}"] = safe_get_full_optimizer_state(parameter, key)
            continue
        values[name] = parameter
        for key, value in optimizer.state.get(parameter, {}).items():
            if isinstance(value, torch.Tensor):
                moments[f"{name}.{key}"] = value
            else:
                scalars[f"{name}.{key}"] = value
    base = _base_optimizer(optimizer)
    steps = [float(state["step"]) for state in base.state.values() if "step" in state]
    meta = {"step": steps[0] if steps else 0.0, "lr": [group["lr"] for group in base.param_groups],
            "scalars": scalars}
    return TrainingState(_on_cpu(values), _on_cpu(moments), meta)


def _copy_into_parameter(parameter: nn.Parameter, value: torch.Tensor) -> None:
    """Write the copy that forward reads. DeepSpeed keeps it apart from its fp32 master, and under ZeRO-3 it is
    partitioned: gather it, write it, and let DeepSpeed partition it again from rank 0's copy."""
    if hasattr(parameter, "ds_id"):
        import deepspeed

        context = deepspeed.zero.GatheredParameters([parameter], modifier_rank=0)
    else:
        context = nullcontext()
    with context, torch.no_grad():
        parameter.copy_(value.to(parameter.device, parameter.dtype))


def restore_training_state(model: nn.Module, optimizer, state: TrainingState, deepspeed: bool = False) -> None:
    """Put gathered values and moments back into (possibly partitioned) parameters and optimizer state."""
    if deepspeed:
        _create_deepspeed_optimizer_state(optimizer)
    for name, parameter in _trainable(model):
        value = state.values[name]
        if deepspeed:
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            safe_set_full_fp32_param(parameter, value.to(parameter.device))
            for key in ADAM_MOMENTS:
                moment = state.moments.get(f"{name}.{key}")  # absent when saved before the first step
                if moment is not None:
                    safe_set_full_optimizer_state(parameter, moment.to(parameter.device), key)
        else:
            prefix = f"{name}."
            optimizer.state[parameter] = {
                **{k[len(prefix):]: v.to(parameter.device) for k, v in state.moments.items() if k.startswith(prefix)},
                **{k[len(prefix):]: v for k, v in state.meta["scalars"].items() if k.startswith(prefix)},
            }
            if optimizer.state[parameter]:  # DeepSpeed keeps one step count for all; torch's Adam wants one each
                optimizer.state[parameter].setdefault("step", torch.tensor(state.meta["step"]))
        _copy_into_parameter(parameter, value)
    base = _base_optimizer(optimizer)
    for entry in base.state.values():
        if isinstance(entry.get("step"), torch.Tensor):
            entry["step"] = torch.full_like(entry["step"], state.meta["step"])
        elif "step" in entry:
            entry["step"] = type(entry["step"])(state.meta["step"])
    for group, lr in zip(base.param_groups, state.meta["lr"]):
        group["lr"] = lr


def capture_rng() -> dict:
    """Every RNG state a step may draw from (torch CPU and CUDA, Python's): taken when a step starts, so a checkpoint
    written by a stop in the middle of the step resumes with the draws that step will make again."""
    rng = {"torch": torch.get_rng_state(), "python": _python_random_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def save_checkpoint(directory: Path, model: nn.Module, training_state: TrainingState, scheduler,
                    trainer_state: dict, rng: dict | None = None) -> Path:
    """Write a complete checkpoint to `directory` atomically (on one rank, from a state gathered on all), with the
    RNG states `rng` (from `capture_rng`; now by default)."""
    rng = rng or capture_rng()
    rng_tensors = {key: value for key, value in rng.items() if isinstance(value, torch.Tensor)}

    def write_into(temporary: Path) -> None:
        save_adapter(model, temporary / "adapter", values=training_state.values, atomic=False)  # inside ours
        save_file(training_state.values, str(temporary / TRAINABLE_TENSORS))
        kill_if_armed("checkpoint-write", trainer_state["step"])
        save_file(training_state.moments, str(temporary / OPTIMIZER_TENSORS))
        save_file(rng_tensors, str(temporary / "rng.safetensors"))
        state = {
            **trainer_state,
            "optimizer": training_state.meta,
            "scheduler": scheduler.state_dict(),
            "python_random": rng["python"],
        }
        (temporary / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        (temporary / MANIFEST).write_text(json.dumps(_manifest_of(temporary), indent=1) + "\n")

    write_directory_atomically(directory, write_into)
    return directory


def _python_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def recover_replaced(checkpoints_dir: Path) -> list[Path]:
    """Rename back the old copy of a `step-N` that a writer killed while replacing it left aside, and return the
    checkpoints so restored.

    Where the filesystem cannot exchange two directories, `write_directory_atomically` replaces `step-N` with two
    renames: `step-N` to `.step-N.old-PID`, then the new copy to `step-N`. A kill between them leaves no `step-N`
    and the complete old copy aside; deleting it as a leftover would leave no copy of that step at all. So a
    `.step-N.old-*` whose `step-N` is missing and which verifies (the newest first, if several) is renamed back.
    Run by `latest_valid_checkpoint` (auto-resume looks before the run lock is taken) and by `remove_unfinished`.
    Safe without the lock: rename never replaces a non-empty `step-N`, and a live writer's `.old` copy lacks its
    `step-N` for two renames only, far shorter than verifying it takes, so at worst that writer's save fails with
    its old copy in place."""
    recovered = []
    if not checkpoints_dir.is_dir():
        return recovered
    candidates = []
    for leftover in checkpoints_dir.glob(".step-*.old-*"):
        name = leftover.name[1:].rpartition(".old-")[0]
        try:
            if leftover.is_dir() and checkpoint_step(Path(name)) is not None:
                candidates.append((leftover.stat().st_mtime_ns, name, leftover))
        except OSError:  # gone meanwhile
            continue
    for _, name, leftover in sorted(candidates, reverse=True):
        target = checkpoints_dir / name
        if target.exists() or not leftover.is_dir():
            continue
        try:
            verify_checkpoint(leftover)
            os.rename(leftover, target)
        except (NolaError, OSError):
            continue  # broken (deleted as a leftover), or gone or `step-N` back meanwhile
        fsync_path(checkpoints_dir)
        warnings.warn(f"recovered checkpoint {target} from {leftover.name}, left by a run killed while replacing it",
                      stacklevel=2)
        recovered.append(target)
    return recovered


def remove_unfinished(checkpoints_dir: Path) -> None:
    """Recover what a writer killed while replacing a checkpoint set aside (`recover_replaced`), then delete what
    killed writers left: hidden temporary and replaced directories (`.step-N.tmp-PID`, `.step-N.old-PID`). Only
    called while holding the run lock, so no live writer owns them."""
    recover_replaced(checkpoints_dir)
    if checkpoints_dir.is_dir():
        for leftover in checkpoints_dir.glob(".step-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def verify_checkpoint(directory: Path) -> None:
    """Raise NolaError unless every file listed in the manifest is present with its size and hash."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise NolaError(f"{directory}: not a checkpoint ({MANIFEST} is missing)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise NolaError(f"{manifest_path}: not valid JSON") from None
    if not isinstance(manifest, dict):
        raise NolaError(f"{manifest_path}: not a checkpoint manifest")
    for name, facts in manifest.items():
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not isinstance(facts, dict):
            raise NolaError(f"{manifest_path}: entry {name!r} points outside the checkpoint")
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
    """The newest checkpoint that passes verification; broken ones are skipped with a warning. A complete copy
    that a killed writer left aside while replacing it is first put back (`recover_replaced`)."""
    recover_replaced(checkpoints_dir)
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


def read_trainer_state(directory: Path) -> dict:
    """The JSON state of a verified checkpoint (step, data position, global batch, ...)."""
    verify_checkpoint(directory)
    return json.loads((directory / STATE_FILE).read_text())


def load_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, deepspeed: bool = False) -> dict:
    """Restore adapter values, optimizer, scheduler and RNG states in place; returns the trainer state. Under
    DeepSpeed every rank must call it (restoring partitions is a collective)."""
    state = read_trainer_state(directory)
    values = load_file(directory / TRAINABLE_TENSORS)
    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in _trainable(model)}
    if set(values) != set(shapes) or any(tuple(values[name].shape) != shape for name, shape in shapes.items()):
        raise NolaError(f"{directory}: checkpoint adapter does not match this run's adapter configuration")
    training_state = TrainingState(values, load_file(directory / OPTIMIZER_TENSORS), state["optimizer"])
    restore_training_state(model, optimizer, training_state, deepspeed)
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(directory / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return state
