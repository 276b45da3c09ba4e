"""The glue between the loop and its engine (accelerate: one process, DDP, or DeepSpeed ZeRO): building the
Accelerator, what gradient accumulation means on each engine, the global token count, gradient averaging for the
deferred NOLA projection, and flags every rank agrees on."""

from __future__ import annotations

import importlib.util
import os
from contextlib import nullcontext

import torch

from nola.errors import NolaError
from nola.inject import set_deferred_projection
from nola.methods import method_for
from nola.training.config import RecipeConfig
from nola.training.fsdp import fsdp_launch


def deepspeed_launch() -> bool:
    """Whether accelerate launched this process with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(config: RecipeConfig):
    """accelerate's Accelerator for this launch. Without CUDA, plain multi-process launches (DDP, and FSDP2, which
    nola drives itself) run as CPU processes over gloo (`cpu=True`); DeepSpeed launches keep their engine (DeepSpeed
    has a CPU accelerator), with the batch, accumulation and clipping its JSON leaves as "auto" filled from the
    recipe."""
    from accelerate import Accelerator

    if fsdp_launch():
        # nola shards the model itself, as it loads (nola.training.fsdp); accelerate's own FSDP preparation would
        # re-wrap it and cast the float32 norms under a mixed-precision policy. So the accelerator is a plain
        # multi-process one, and the recipe passes it the optimizer alone.
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    if not deepspeed_launch():
        return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.train.mixed_precision)
    if importlib.util.find_spec("deepspeed") is None:
        raise NolaError("the accelerate config launches DeepSpeed, which is not installed in this environment; "
                        "`pip install deepspeed`, or launch with recipes/accelerate/fsdp.yaml or ddp.yaml")
    from accelerate import PartialState
    from accelerate.utils import DeepSpeedPlugin

    if not torch.cuda.is_available():
        # accelerate 1.15 only picks gloo for CPU processes when cpu=True, which turns DeepSpeed off; naming the
        # backend first keeps DeepSpeed and still gives every process its rank (else each believes it is alone).
        PartialState(backend="gloo")
    plugin = DeepSpeedPlugin(gradient_accumulation_steps=config.train.grad_accum_steps,
                             gradient_clipping=config.train.max_grad_norm)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.train.micro_batch_size
    plugin.deepspeed_config["train_batch_size"] = (
        config.train.micro_batch_size * config.train.grad_accum_steps * world_size
    )
    # The engine runs in fp32 and the forward under autocast (`autocast_forward`), not in DeepSpeed's bf16 mode: that
    # mode casts every float parameter, so A = A0 + Σ αᵢUᵢ would be formed from bf16 coefficients (a 14% error on
    # the first update) and packed 4-bit storage of another float dtype would be converted, destroying it. Autocast
    # keeps parameters as they are and computes exactly as a DDP run does.
    return Accelerator(deepspeed_plugin=plugin, mixed_precision="no",
                       gradient_accumulation_steps=config.train.grad_accum_steps)


def check_trainable_dtypes(model: torch.nn.Module) -> None:
    """Every trainable tensor must still be float32 (float64 on a float64 base) after the engine wrapped the model: an
    engine that cast them (a DeepSpeed JSON with bf16 or fp16 "enabled": true rather than "auto") would train
    bf16-rounded coefficients, silently."""
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and parameter.dtype not in (torch.float32, torch.float64):
            raise NolaError(f"train: {name} is {str(parameter.dtype).split('.')[-1]} after the engine's set-up: the "
                            f"DeepSpeed config casts parameters; leave its bf16/fp16 \"enabled\" at \"auto\" (nola "
                            f"autocasts the forward and keeps the adapter in float32)")


def gradient_scale(accelerator, grad_accum_steps: int, use_deepspeed: bool) -> int:
    """What a micro-batch's loss is multiplied by so that the step's gradient is that of the mean loss over its
    global tokens: DDP and DeepSpeed average gradients over ranks, and DeepSpeed also divides each micro-batch's
    loss by its accumulation count; this undoes both."""
    return accelerator.num_processes * (grad_accum_steps if use_deepspeed else 1)


def accumulation_context(accelerator, model, use_deepspeed: bool, deferred: bool, last_micro_batch: bool):
    """Gradients are reduced across ranks on a step's last micro-batch only. DeepSpeed decides its optimizer step
    from accelerate's sync flag, which `accumulate` sets on every grad_accum_steps-th call (left alone, the flag stays
    on and DeepSpeed would step after every micro-batch); DDP skips the all-reduce under `no_sync`. With deferred
    projection the coefficient gradients only exist after `project_deferred_gradients`, so DDP never syncs and
    `average_gradients` reduces them instead."""
    if use_deepspeed:
        return accelerator.accumulate(model)
    return nullcontext() if last_micro_batch and not deferred else accelerator.no_sync(model)


def use_deferred_projection(config: RecipeConfig, model, use_deepspeed: bool, is_main: bool) -> bool:
    """Turn on deferred projection for the NOLA layers when the recipe asks and the loop owns the backward. DeepSpeed
    runs backward and the optimizer step inside its engine, with no point between them to project: there the layers
    keep projecting per micro-batch, and the log says so."""
    if not config.train.deferred_projection or not method_for(config.adapter.method).defers_projection:
        return False
    if use_deepspeed:
        if is_main:
            print("nola: train.deferred_projection is not available under DeepSpeed (its engine owns backward and "
                  "step): projecting NOLA gradients per micro-batch")
        return False
    return set_deferred_projection(model, True) > 0


def average_gradients(accelerator, parameters: list[torch.Tensor]) -> None:
    """Average `.grad` over ranks in one all-reduce, as DDP would: for the deferred path, whose coefficient gradients
    appear after backward. A NOLA adapter's gradients are kilobytes, far less traffic than LoRA's."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])
    flat = accelerator.reduce(flat, reduction="mean")
    for parameter, gradient in zip(parameters, flat.split([p.numel() for p in parameters])):
        parameter.grad = gradient.view_as(parameter)


def global_token_counts(accelerator, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """A step's response tokens (the loss's denominator, at least 1) and attended tokens (its throughput), summed over
    the micro-batches of every rank, in one all-reduce before the first forward."""
    local = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches),
                          sum(int(b["attention_mask"].sum()) for b in micro_batches)], device=accelerator.device)
    label_tokens, tokens = accelerator.reduce(local, reduction="sum").tolist()
    return max(int(label_tokens), 1), int(tokens)


def agreed_flags(accelerator, *flags: bool) -> list[bool]:
    """Each flag true on any rank, the same answer on every rank (one small all-reduce), so that all ranks take
    the same branch at a stop request or a non-finite loss."""
    local = torch.tensor([float(flag) for flag in flags], device=accelerator.device)
    return [bool(value > 0) for value in accelerator.reduce(local, reduction="sum").tolist()]
