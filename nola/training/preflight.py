"""Everything that can be checked before a weight is loaded, so a mistake costs seconds, not a 70B load: the engine
can honour the precision, the base is a safetensors checkpoint, the data holds usable records, the target modules
exist in the architecture (built on the meta device), a checkpoint to resume from matches the recipe's adapter,
base and data order, and no other run holds the output directory. `plan_run` runs them all, in that order, and
returns what they settled as one `RunPlan`; nothing is written before it returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from nola import embedded
from nola.adapter_io import AdapterFile, check_base_model, read_adapter
from nola.data import FINGERPRINT_DEFAULTS, PreparedData, StepBatches, data_fingerprint, load_records, prepare_data
from nola.data.templates import resolve_template
from nola.errors import NolaError
from nola.fused import requested_backend
from nola.inject import find_target_modules
from nola.merge import checkpoint_shards
from nola.methods import method_for
from nola.mmlu import load_mmlu
from nola.modeling import ModelSection, build_meta_model, check_model_source, load_tokenizer
from nola.training.checkpoint import latest_valid_checkpoint, read_trainer_state, remove_unfinished, verify_checkpoint
from nola.training.config import RecipeConfig
from nola.training.distributed import deepspeed_launch
from nola.training.fsdp import check_sharded_model, fsdp_launch, shard_options
from nola.training.run_lock import acquire_run_lock

# Adapter settings a checkpoint must share with the recipe to resume (chunk size is a runtime setting).
_RESUME_ADAPTER_KEYS = ("method", "rank", "alpha", "basis_size_a", "basis_size_b", "target_modules", "seed",
                        "dropout", "quant_bits", "init", "freeze_a")


def check_data(config: RecipeConfig, data: PreparedData, record_count: int) -> None:
    if not data.train:
        raise NolaError(f"data.path: {config.data.path} has no usable training record ({record_count} read, "
                        f"{data.dropped} without a response, {len(data.validation)} held out for validation)")


def check_architecture(config: RecipeConfig, model_section: ModelSection) -> nn.Module:
    """The model skeleton on the meta device, after checking the adapter's target modules exist in it."""
    skeleton = build_meta_model(model_section)
    targets = find_target_modules(skeleton, config.adapter.target_modules)
    method_for(config.adapter.method).check_targets(skeleton, targets, config.adapter)
    return skeleton


def check_resume(resume_dir: Path, config: RecipeConfig, skeleton: nn.Module, fingerprint: dict,
                 saved_data: dict) -> AdapterFile:
    """Refuse a checkpoint this recipe cannot continue exactly: another adapter, base or data order. Returns the
    checkpoint's adapter file, read once here for the run (an SVD start rebuilds its residual base from it)."""
    adapter = read_adapter(resume_dir / "adapter")
    mine = config.adapter_config()
    for key in _RESUME_ADAPTER_KEYS:
        theirs, ours = getattr(adapter.config, key), getattr(mine, key)
        if theirs != ours:
            name = "train.seed" if key == "seed" else f"adapter.{key}"
            raise NolaError(f"train.resume_from: {resume_dir} was trained with {name}={theirs!r}, this recipe has "
                            f"{ours!r}")
    check_base_model(skeleton, adapter)
    for key, value in fingerprint.items():
        theirs = saved_data.get(key, FINGERPRINT_DEFAULTS.get(key, value))
        if theirs != value:
            hint = (" (keep micro_batch_size x grad_accum_steps x processes the same: the data order depends on it)"
                    if key == "global_batch" else "")
            raise NolaError(f"train.resume_from: {resume_dir} was trained with {key}={theirs}, this run "
                            f"has {key}={value}{hint}")
    return adapter


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



def check_precision(config: RecipeConfig) -> None:
    """Refuse the precision settings a DeepSpeed run cannot honour: fp16 needs loss scaling, which DeepSpeed does only
    in its own fp16 mode, and that mode casts the NOLA coefficients to fp16."""
    if deepspeed_launch() and config.train.mixed_precision == "fp16":
        raise NolaError("train.mixed_precision: fp16 is not supported under DeepSpeed (its fp16 mode casts the "
                        "adapter's float32 parameters to fp16); use bf16, or fp16 without DeepSpeed")


def check_frozen_adapter_engine(config: RecipeConfig, accelerator) -> None:
    """Refuse LoRA-FA and SVD starts under DeepSpeed ZeRO-3: it partitions every parameter, the frozen A included
    (nola gathers only trained ones for checkpoints and the final adapter), and a float base as it loads, before
    the SVD could read it. ZeRO-2 and DDP keep both whole."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    method = method_for(config.adapter.method)
    key = method.frozen_tensor_setting(config.adapter) or method.base_weight_start(config.adapter)
    if plugin is not None and plugin.zero_stage == 3 and key:
        raise NolaError(f"{key} is not supported under DeepSpeed ZeRO-3 (it partitions the frozen A and the base "
                        f"weights an SVD start reads); launch with recipes/accelerate/zero2.yaml or ddp.yaml")


def check_sharded_engine(config: RecipeConfig, accelerator) -> None:
    """Under FSDP2 (recipes/accelerate/fsdp.yaml): the launch's settings, a 4-bit storage FSDP can flatten, and no
    SVD start (it reads whole base weights, which no rank holds)."""
    if not fsdp_launch():
        return
    shard_options(accelerator.num_processes, accelerator.device.type)
    check_sharded_model(config.model)
    key = method_for(config.adapter.method).base_weight_start(config.adapter)
    if key:
        raise NolaError(f"{key} is not supported under FSDP (it reads whole base weights, and each rank holds 1/N "
                        f"of them); launch with recipes/accelerate/zero2.yaml or ddp.yaml")


def resolve_resume(config: RecipeConfig, checkpoints_dir: Path, accelerator) -> Path | None:
    """The checkpoint to resume from: `auto` picks the newest valid one (or none), a path must verify. Rank 0
    decides and tells the others, so all ranks resume from the same step even if a checkpoint changes meanwhile."""
    resume = config.train.resume_from
    if resume is None:
        return None
    if resume != "auto":
        verify_checkpoint(Path(resume))
        return Path(resume)
    from accelerate.utils import broadcast_object_list

    choice = [latest_valid_checkpoint(checkpoints_dir) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice, from_process=0)
    return choice[0]


@dataclass
class RunPlan:
    """What the preflight settled: the inputs of the run, read and checked, and the held run lock."""

    model_section: ModelSection  # the recipe's, with an embedded name resolved to its built directory
    tokenizer: object
    data: PreparedData
    stream: StepBatches  # this rank's micro-batches, at the start of the data order
    mmlu_examples: list[dict]
    resume_dir: Path | None
    resume_adapter: AdapterFile | None  # the resume checkpoint's adapter file, as check_resume read it
    run_lock: object  # the open lock file: held until the process ends
    template: str  # data.template, resolved: how the records were rendered (recorded with the adapter)


def plan_run(config: RecipeConfig, accelerator) -> RunPlan:
    """Every check that needs no weights, on every rank, before the base model loads or anything is written (except
    the run lock and the removal of checkpoints a crash left unfinished, both after the last check)."""
    train = config.train
    checkpoints_dir = Path(train.output_dir) / "checkpoints"
    resume_dir = resolve_resume(config, checkpoints_dir, accelerator)
    requested_backend()
    check_precision(config)
    check_frozen_adapter_engine(config, accelerator)
    check_sharded_engine(config, accelerator)
    if not config.model.name_or_path.startswith(embedded.PREFIX):
        if Path(check_model_source(config.model.name_or_path)).is_dir():
            checkpoint_shards(Path(config.model.name_or_path))  # safetensors weights only: refuse .bin pickles now
    with accelerator.main_process_first():  # rank 0 builds the embedded default once; the others then reuse it
        records = load_records(embedded.resolve(config.data.path), config.data.format)
        model_section = dataclasses.replace(config.model, name_or_path=embedded.resolve(config.model.name_or_path))
        mmlu_examples = load_mmlu(config.mmlu.path, config.mmlu.shots) if config.mmlu.path else []
    tokenizer = load_tokenizer(model_section, config.data.tokenizer)
    data = prepare_data(records, tokenizer, config.data.source_max_len, config.data.target_max_len,
                        config.data.validation_size, config.split_seed(), config.data.train_on_source,
                        config.data.format, config.data.template, config.data.sequence_length(), config.data.path)
    check_data(config, data, len(records))
    skeleton = check_architecture(config, model_section)
    template = resolve_template(config.data.format, config.data.template)
    stream = StepBatches(data.train, train.micro_batch_size, train.grad_accum_steps, train.seed,
                         config.data.group_by_length, accelerator.num_processes, accelerator.process_index,
                         tokenizer.pad_token_id, config.data.packed_length())
    resume_adapter = None
    if resume_dir is not None:
        saved = read_trainer_state(resume_dir)
        fingerprint = data_fingerprint(stream, config.split_seed(), config.data.format, template,
                                       config.data.sequence_length())
        # Checkpoints written before the data fingerprint existed record the global batch alone.
        resume_adapter = check_resume(resume_dir, config, skeleton, fingerprint,
                                      saved.get("data", {"global_batch": saved.get("global_batch")}))
    run_lock = lock_output_dir(Path(train.output_dir), accelerator)
    if accelerator.is_main_process:
        remove_unfinished(checkpoints_dir)
    return RunPlan(model_section, tokenizer, data, stream, mmlu_examples[: config.mmlu.max_examples], resume_dir,
                   resume_adapter, run_lock, template)
