"""The optimizer and learning-rate schedule of a run, and what "skipping" an optimizer step means."""

from __future__ import annotations

import math

import torch

from nola.errors import NolaError
from nola.training.config import RecipeConfig


def make_optimizer(parameters: list[torch.Tensor], config: RecipeConfig) -> torch.optim.Optimizer:
    """AdamW over the adapter's fp32 parameters, or bitsandbytes' paged AdamW (CUDA only)."""
    if config.train.optimizer == "paged_adamw":
        if not torch.cuda.is_available():
            raise NolaError("train.optimizer: paged_adamw needs a CUDA device; use adamw on CPU")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(parameters, lr=config.train.lr, weight_decay=config.train.weight_decay)
    return torch.optim.AdamW(parameters, lr=config.train.lr, weight_decay=config.train.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: RecipeConfig):
    """Warm-up over warmup_ratio of the steps, then constant, linear decay or cosine decay."""
    from transformers import get_scheduler

    names = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
    return get_scheduler(
        names[config.train.lr_scheduler],
        optimizer,
        num_warmup_steps=math.ceil(config.train.warmup_ratio * config.train.max_steps),
        num_training_steps=config.train.max_steps,
    )


def skip_update(optimizer: torch.optim.Optimizer, scaler, unscaled: bool) -> None:
    """Leave the parameters as they are for a step whose loss or gradient is not finite. Under fp16 loss scaling the
    GradScaler must still see the step end: `unscale_` (run by gradient clipping) opened it, and only `update()`
    closes it, backing the scale off so the next step can be finite; skipped, the next clip would raise
    "unscale_() has already been called"."""
    if scaler is not None and unscaled:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
