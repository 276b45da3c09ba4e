"""Scoring a model on Alpaca-format examples: the summed token loss of a batch, and the mean over a set, split
across ranks when training runs on several (used by training's eval steps and by scripts/evaluate.py)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nola.data import collate
from nola.data.packing import model_inputs


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions (fp32 logits), and how many there were: of a padded
    batch, or of a packed one (each example attending to itself only)."""
    logits = model(**model_inputs(model, batch)).logits
    return logits_loss_sum(logits, batch["labels"].reshape(logits.shape[:2]))  # FlashAttention: rows end to end


def logits_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`token_loss_sum` of logits already computed."""
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, int((targets != -100).sum())


def rank_batches(count: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's strided share of `count` items in batches, the same number of batches on every rank (padded
    with empty batches): every forward pass is then matched on all ranks, which ZeRO-3 (parameters gathered per
    layer) and DDP (buffers broadcast per forward) need to avoid a hang."""
    mine = list(range(rank, count, world))
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    return batches + [[] for _ in range(math.ceil(math.ceil(count / world) / batch_size) - len(batches))]


@torch.no_grad()
def evaluate(model, examples, micro_batch_size: int, pad_token_id: int, accelerator=None,
             max_batches: int | None = None, interrupt: Callable[[], None] | None = None) -> float:
    """Mean token loss over `examples`: each rank scores its share and the sums are reduced over ranks when an
    accelerator is given; alone, on the model's device. `interrupt` runs before each batch (on every rank alike:
    the ranks have equally many batches) and may raise to abandon the evaluation."""
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator else next(model.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    batches = rank_batches(len(examples), micro_batch_size, rank, world)
    for indices in batches[:max_batches]:
        if interrupt is not None:
            interrupt()
        chosen = [examples[i] for i in indices] or examples[:1]  # a padding batch still runs, uncounted
        batch = {k: v.to(device) for k, v in collate(chosen, pad_token_id).items()}
        loss, tokens = token_loss_sum(model, batch)
        if indices:
            totals += torch.tensor([loss.item(), tokens], dtype=torch.float64, device=device)
    if accelerator is not None:
        totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    return (totals[0] / totals[1].clamp(min=1)).item()
