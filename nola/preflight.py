"""Everything that can be checked before a weight is loaded, so a mistake costs seconds, not a 70B load: the data
holds usable records, the target modules exist in the architecture (built on the meta device), a checkpoint to
resume from matches the recipe's adapter, base and data order, and no other run holds the output directory."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from nola.adapter_io import check_base_model, read_adapter
from nola.config import ModelSection, RecipeConfig
from nola.data import PreparedData
from nola.errors import NolaError
from nola.inject import find_target_modules
from nola.modeling import build_meta_model
from nola.run_lock import acquire_run_lock

# Adapter settings a checkpoint must share with the recipe to resume (chunk size is a runtime setting).
_RESUME_ADAPTER_KEYS = ("method", "rank", "alpha", "basis_size_a", "basis_size_b", "target_modules", "seed",
                        "dropout", "quant_bits")


def check_data(config: RecipeConfig, data: PreparedData, record_count: int) -> None:
    if not data.train:
        raise NolaError(f"data.path: {config.data.path} has no usable training record ({record_count} read, "
                        f"{data.dropped} without a response, {len(data.validation)} held out for validation)")


def check_architecture(config: RecipeConfig, model_section: ModelSection) -> nn.Module:
    """The model skeleton on the meta device, after checking the adapter's target modules exist in it."""
    skeleton = build_meta_model(model_section)
    find_target_modules(skeleton, config.adapter.target_modules)
    return skeleton


def check_resume(resume_dir: Path, config: RecipeConfig, skeleton: nn.Module, data_fingerprint: dict,
                 saved_data: dict) -> None:
    """Refuse a checkpoint this recipe cannot continue exactly: another adapter, base or data order."""
    adapter = read_adapter(resume_dir / "adapter")
    mine = config.adapter_config()
    for key in _RESUME_ADAPTER_KEYS:
        theirs, ours = getattr(adapter.config, key), getattr(mine, key)
        if theirs != ours:
            name = "train.seed" if key == "seed" else f"adapter.{key}"
            raise NolaError(f"train.resume_from: {resume_dir} was trained with {name}={theirs!r}, this recipe has "
                            f"{ours!r}")
    check_base_model(skeleton, adapter)
    for key, value in data_fingerprint.items():
        if key in saved_data and saved_data[key] != value:
            hint = (" (keep micro_batch_size x grad_accum_steps x processes the same: the data order depends on it)"
                    if key == "global_batch" else "")
            raise NolaError(f"train.resume_from: {resume_dir} was trained with {key}={saved_data[key]}, this run "
                            f"has {key}={value}{hint}")


def lock_output_dir(output_dir: Path, accelerator):
    """Rank 0 takes the run lock and tells the others whether it got it, so every rank fails together."""
    from accelerate.utils import broadcast_object_list

    handle, refusal = None, [None]
    if accelerator.is_main_process:
        try:
            handle = acquire_run_lock(output_dir)
        except NolaError as error:
            refusal = [str(error)]
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal, from_process=0)
    if refusal[0] is not None:
        raise NolaError(refusal[0])
    return handle

