"""Sequence packing (`data.packing: true`): several examples in one row of `data.max_seq_len` tokens, so a step
spends no compute on padding, without any example seeing another.

Rows: best-fit decreasing bin packing of the epoch's examples (the longest first, each into the fullest row it
still fits), from an order seeded by (seed, epoch), so the rows of an epoch are a pure function of the two and
every rank builds the same. The batch schedule then deals rows as it deals examples unpacked.

Isolation, which packing done naively lacks (with SDPA or eager attention, examples in one row attend to each other
unless told otherwise; position ids alone do not tell them): positions restart at 0 for every example, and the
attention mask is block-diagonal and causal, one block per example (a padding position is a block of its own, so
no softmax row is empty). SDPA takes it as a boolean mask, eager attention as an additive one; FlashAttention's
varlen path takes the restarting position ids alone, the rows laid end to end (`attention_inputs`). The first
label of every example is ignored: unpacked, no token predicts it either, so a packed row's summed loss is the sum
of its examples' losses.
"""

from __future__ import annotations

import bisect
import random

import torch

from nola.data.examples import Example
from nola.data.templates import IGNORE_INDEX


def pack_rows(lengths: list[int], order: list[int], max_seq_len: int) -> list[list[int]]:
    """Rows of example indices (from `order`), each holding at most `max_seq_len` tokens: best-fit decreasing.
    Ties in length keep `order`, so the result is a function of the order alone."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: the fullest row that fits comes first
    for index in sorted(order, key=lambda i: -lengths[i]):
        position = bisect.bisect_left(free, (lengths[index], -1))
        if position == len(free):
            rows.append([index])
            bisect.insort(free, (max_seq_len - lengths[index], len(rows) - 1))
            continue
        room, row = free.pop(position)
        rows[row].append(index)
        bisect.insort(free, (room - lengths[index], row))
    return rows


def epoch_rows(lengths: list[int], max_seq_len: int, seed: int, epoch: int) -> list[list[int]]:
    """The packed rows of one epoch, in a seeded order: a pure function of (lengths, max_seq_len, seed, epoch)."""
    rng = random.Random(f"packing:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows = pack_rows(lengths, order, max_seq_len)
    rng.shuffle(rows)
    return rows


def collate_packed(rows: list[list[Example]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch of packed rows: input_ids, labels (each example's first one ignored), position_ids that
    restart per example, `packed_mask`, the block-diagonal causal mask (batch, 1, width, width; True = attend),
    and `attention_mask`, 1 on example tokens and 0 on padding (what is padding, as in a padded batch), right-padded
    to the longest row."""
    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.arange(width).repeat(len(rows), 1) + len(rows) * width  # padding: one block per position
    for r, row in enumerate(rows):
        start = 0
        for number, example in enumerate(row):
            length = len(example["input_ids"])
            span = slice(start, start + length)
            input_ids[r, span] = torch.tensor(example["input_ids"])
            labels[r, span] = torch.tensor(example["labels"])
            labels[r, start] = IGNORE_INDEX
            position_ids[r, span] = torch.arange(length)
            segments[r, span] = number
            tokens[r, span] = 1
            start += length
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    mask = (segments[:, :, None] == segments[:, None, :]) & causal
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "packed_mask": mask[:, None],
            "attention_mask": tokens}


def model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`attention_inputs` for `model`'s attention implementation (looked up through DDP / DeepSpeed wrappers; an
    unknown one gets the additive mask, which every implementation that takes a 4D mask reads right)."""
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    implementation = getattr(getattr(inner, "config", None), "_attn_implementation", None) or "eager"
    return attention_inputs(batch, implementation)


def attention_inputs(batch: dict[str, torch.Tensor], implementation: str) -> dict[str, torch.Tensor]:
    """What the model's forward takes of a batch: input_ids and attention_mask (padded batch), or for a packed one
    the mask its attention implementation reads, with the restarting position ids. An additive mask is float32:
    added to bf16 scores it promotes them, and eager attention takes its softmax in float32 anyway.

    FlashAttention finds packed sequences from restarting position ids only in a batch of one row (transformers'
    `_is_packed_sequence`), so its rows are laid end to end as one: every row begins with an example, whose first
    label is ignored, so no loss crosses from one row into the next (the caller reshapes the labels alike)."""
    if "packed_mask" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if "flash" in implementation:  # varlen: cu_seqlens from the restarting position ids
        return {name: value.reshape(1, -1) for name, value in inputs.items()}
    mask = batch["packed_mask"]
    if implementation != "sdpa":  # eager and the others add the mask to the scores
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return {**inputs, "attention_mask": mask}
