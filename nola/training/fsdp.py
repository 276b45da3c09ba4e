"""FSDP2 with a lean load: the 4-bit base sharded as it is read, so that more GPUs mean less memory on each.

Launched with `recipes/accelerate/fsdp.yaml`. Every rank builds the model skeleton, then reads, quantises and
`fully_shard`s one decoder layer at a time (`nola.streamed_load`): no rank ever holds the whole model, and each
keeps 1/N of the packed 4-bit weights, the embeddings and the head, plus the (small, whole) quantisation
constants. The packed weights must be stored in a float dtype (`model.quant_storage: bfloat16`) so that FSDP2 can
flatten them with the layer's other tensors; FSDP2 all-gathers raw storage, so the nf4 codes are never converted.

The adapter is attached after sharding, so its tensors are not FSDP parameters: every rank holds the whole (tiny)
adapter, in float32, and its gradients are averaged over ranks by the loop (`average_gradients`), as DDP would.
The engine runs without a mixed-precision policy (it would cast the float32 norms for compute); the forward runs
under the recipe's autocast instead, as one process does, so both compute the same function.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from nola.errors import NolaError
from nola.modeling import (
    ModelSection,
    _DTYPES,
    finish_loaded_model,
    load_model_config,
    prepare_kbit_block,
    quantization_config,
)
from nola.merge import local_checkpoint_dir
from nola.streamed_load import load_streamed


def fsdp_launch() -> bool:
    """Whether accelerate launched this process with an FSDP config. The first call marks the process
    (NOLA_ENGINE=fsdp2), because `make_accelerator` then hides the launch from accelerate itself
    (ACCELERATE_USE_FSDP=false), whose FSDP preparation would re-wrap the already sharded model."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        os.environ["NOLA_ENGINE"] = "fsdp2"
    return os.environ.get("NOLA_ENGINE") == "fsdp2"


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def shard_options(world_size: int, device_type: str, where: str = "the accelerate config") -> dict:
    """`fully_shard`'s options from the launch's FSDP settings (accelerate passes them as FSDP_* variables), checked
    first: one line for what this loader cannot serve, before anything loads or is written."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy
    except ImportError:
        raise NolaError(f"{where}: FSDP2 (torch.distributed.fsdp.fully_shard) is not in this torch "
                        f"{torch.__version__}; install torch >= 2.6 or launch with recipes/accelerate/zero3.yaml"
                        ) from None
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise NolaError(f"{where}: fsdp_version must be 2 (nola shards the 4-bit base with FSDP2)")
    if _flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise NolaError(f"{where}: fsdp_activation_checkpointing would checkpoint the layers a second time; leave "
                        f"it false and use model.gradient_checkpointing")
    offload = _flag("FSDP_OFFLOAD_PARAMS")
    if offload and device_type == "cpu":
        raise NolaError(f"{where}: fsdp_offload_params moves shards to host memory, but this run already trains on "
                        f"the CPU (no GPU); set it to false")
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    if reshard not in ("true", "false"):
        if not reshard.isdigit() or int(reshard) < 1 or world_size % int(reshard):
            raise NolaError(f"{where}: fsdp_reshard_after_forward={reshard} must be true, false or a number of ranks "
                            f"that divides the world size {world_size}")
    reshard_after_forward = reshard == "true" if reshard in ("true", "false") else int(reshard)
    return dict(reshard_after_forward=reshard_after_forward,
                offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())


def check_sharded_model(section: ModelSection) -> None:
    if section.load_in_4bit and section.quant_storage == "uint8":
        raise NolaError("model.quant_storage: uint8 packed 4-bit weights cannot be flattened by FSDP with the rest "
                        "of a layer; set model.quant_storage=bfloat16 (the 70b recipes do)")


def shard_block(block: nn.Module, options: dict) -> None:
    """`fully_shard` one block. Its 4-bit weights become plain sharded parameters; each keeps a reference to its
    layer's quantisation state (as a Params4bit does), which is what parameter counts and the adapter's record of
    the quantised layers read. The layer's forward gets the state from the module itself."""
    import bitsandbytes as bnb
    from torch.distributed.fsdp import fully_shard

    fully_shard(block, **options)
    for module in block.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.quant_state is not None:
            module.weight.quant_state = module.quant_state


def load_sharded_model(section: ModelSection, accelerator, mixed_precision: str) -> nn.Module:
    """The base, read and sharded layer by layer over the accelerator's ranks, prepared as `load_model` prepares
    one (frozen, norms in float32, checkpointing), with every tensor FSDP2-sharded."""
    check_sharded_model(section)
    shard = shard_options(accelerator.num_processes, accelerator.device.type)
    quantization = quantization_config(section)
    dtype = _DTYPES[section.compute_dtype if quantization is not None else section.torch_dtype]
    autocast = mixed_precision != "no"

    def prepare_block(block: nn.Module) -> None:
        prepare_kbit_block(block, autocast) if quantization is not None else block.requires_grad_(False)

    directory = local_checkpoint_dir(section.name_or_path, key="model.name_or_path")
    model = load_streamed(load_model_config(section), directory, quantization, dtype, accelerator.device,
                          prepare_block=prepare_block,
                          on_block=lambda block: shard_block(block, shard),
                          trust_remote_code=section.trust_remote_code)
    return finish_loaded_model(model, section, quantized=quantization is not None)
