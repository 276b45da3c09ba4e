"""Examples -> this rank's micro-batches, one optimizer step at a time, resumable from (seed, epoch, index).

The batch order comes from a `random.Random` seeded by the run's seed and the epoch, never from the global RNG:
the same recipe yields the same batches in any process, and a resumed run rebuilds the exact schedule.
"""

from __future__ import annotations

import random

import torch

from nola.data.examples import Example
from nola.data.packing import collate_packed, epoch_rows
from nola.data.templates import IGNORE_INDEX
from nola.errors import NolaError


def batch_schedule(
    lengths: list[int], micro_batch_size: int, grad_accum_steps: int, seed: int, epoch: int, group_by_length: bool,
    num_replicas: int = 1, rank: int = 0,
) -> list[list[list[int]]]:
    """This rank's share of one epoch: for each optimizer step, its micro-batches (lists of example indices).

    Each step consumes `micro_batch_size x grad_accum_steps x num_replicas` consecutive examples of a permutation
    seeded by (seed, epoch). Which examples form a step depends on that product only, never on how it is split, so
    8 processes x 1 micro-batch and 1 process x 8 micro-batches train on the same global batches and a checkpoint
    resumes on another process count. Ranks take disjoint slices; the last incomplete step is dropped (every rank
    runs the same number of steps). With group_by_length, each window of 64 steps is sorted by length before it is
    cut, so micro-batches hold similar lengths (less padding), and the steps are then shuffled.
    """
    rng = random.Random(f"batches:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    per_rank = micro_batch_size * grad_accum_steps
    step_size = per_rank * num_replicas
    order = order[: len(order) - len(order) % step_size]
    if group_by_length:
        window = step_size * 64
        order = [
            index
            for start in range(0, len(order), window)
            for index in sorted(order[start : start + window], key=lambda i: -lengths[i])
        ]
    steps = [order[i : i + step_size] for i in range(0, len(order), step_size)]
    if group_by_length:
        rng.shuffle(steps)
    schedule = []
    for step in steps:
        mine = step[rank * per_rank : (rank + 1) * per_rank]
        schedule.append([mine[i : i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)])
    return schedule


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: padding is masked out of attention and carries no label."""
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        labels[row, :length] = torch.tensor(example["labels"])
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class StepBatches:
    """An endless, resumable stream of this rank's micro-batches, one optimizer step at a time: epoch after epoch
    of `batch_schedule`. Its position (epoch, step within the epoch) is all a checkpoint needs to continue exactly,
    on any split of the same global batch.

    With `packed_length` (data.packing) the schedule deals the epoch's packed rows (nola/data/packing.py) instead
    of examples: micro_batch_size counts rows, and each micro-batch is a packed one."""

    def __init__(self, examples: list[Example], micro_batch_size: int, grad_accum_steps: int, seed: int,
                 group_by_length: bool, num_replicas: int, rank: int, pad_token_id: int,
                 packed_length: int | None = None) -> None:
        self.examples = examples
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.settings = dict(micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps, seed=seed,
                             group_by_length=group_by_length, num_replicas=num_replicas, rank=rank)
        self.global_batch = micro_batch_size * grad_accum_steps * num_replicas
        self.pad_token_id = pad_token_id
        self.packed_length = packed_length
        self.rows: list[list[int]] = []  # packing: this epoch's rows of example indices
        self.epoch, self.index = 0, 0
        self._schedule = self._epoch_schedule(0)

    def _epoch_schedule(self, epoch: int) -> list[list[list[int]]]:
        lengths, unit = self.lengths, "training examples"
        if self.packed_length is not None:
            self.rows = epoch_rows(self.lengths, self.packed_length, self.settings["seed"], epoch)
            lengths, unit = [sum(self.lengths[i] for i in row) for row in self.rows], "packed rows"
        schedule = batch_schedule(lengths, epoch=epoch, **self.settings)
        if not schedule:
            raise NolaError(f"data: {len(lengths)} {unit} do not fill one global batch of {self.global_batch} "
                            f"(micro_batch_size x grad_accum_steps x processes)")
        return schedule

    def seek(self, epoch: int, index: int) -> None:
        self.epoch, self.index = epoch, index
        self._schedule = self._epoch_schedule(epoch)

    def next(self) -> list[dict[str, torch.Tensor]]:
        if self.index >= len(self._schedule):
            self.seek(self.epoch + 1, 0)
        micro_batches = self._schedule[self.index]
        self.index += 1
        if self.packed_length is not None:
            return [collate_packed([[self.examples[i] for i in self.rows[r]] for r in rows], self.pad_token_id)
                    for rows in micro_batches]
        return [collate([self.examples[i] for i in indices], self.pad_token_id) for indices in micro_batches]


# What a checkpoint written before a fingerprint key existed had: Alpaca records, unpacked.
FINGERPRINT_DEFAULTS = {"packed_length": None, "data_format": "alpaca", "template": "alpaca", "max_seq_len": None}


def data_fingerprint(stream: StepBatches, split_seed: int, data_format: str = "alpaca", template: str = "alpaca",
                     max_seq_len: int | None = None) -> dict:
    """What fixes the training examples and their order: a checkpoint resumes exactly only on the same. The
    length a chat template cuts conversations at counts; under the Alpaca template max_seq_len cuts nothing."""
    return {"global_batch": stream.global_batch, "seed": stream.settings["seed"], "split_seed": split_seed,
            "group_by_length": stream.settings["group_by_length"], "train_examples": len(stream.examples),
            "packed_length": stream.packed_length, "data_format": data_format, "template": template,
            "max_seq_len": None if template == "alpaca" else max_seq_len}
