"""Alpaca instruction data: records -> prompt template -> token ids with response-only labels -> batches.

    load_records (JSON / JSONL / Parquet / hub) -> prepare_data (split, tokenise, drop) -> batch_schedule -> collate

Every random choice (validation split, batch order) comes from a `random.Random` seeded by the run's seed and the
epoch, never from the global RNG: the same recipe yields the same batches in any process, and a resumed run can
rebuild the exact schedule from (seed, epoch, index).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nola.errors import NolaError

# The Stanford Alpaca prompt templates (tatsu-lab/stanford_alpaca), used by QLoRA and the NOLA paper's LLaMA runs.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
RESPONSE_HEADER = "### Response:\n"
IGNORE_INDEX = -100  # label of a position that carries no loss (prompt, padding)

Record = dict[str, str]
Example = dict[str, list[int]]  # {"input_ids": [...], "labels": [...]}


def format_prompt(record: Record) -> str:
    """The Alpaca prompt for a record; records with an empty `input` use the template without one."""
    if record.get("input", "").strip():
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def _check_record(record: object, where: str) -> Record:
    if not isinstance(record, dict):
        raise NolaError(f"{where}: expected an object with instruction/input/output, got {type(record).__name__}")
    for key in ("instruction", "output"):
        if key not in record:
            raise NolaError(f"{where}: missing key {key!r}")
    for key in ("instruction", "input", "output"):
        if key in record and record[key] is not None and not isinstance(record[key], str):
            raise NolaError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    return {key: record.get(key) or "" for key in ("instruction", "input", "output")}


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (what JSON requires); a file saved in another encoding is named with the line and
    byte offset of its first undecodable byte, so it can be found and re-saved."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise NolaError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset "
                        f"{error.start}); save the file as UTF-8") from None


def _read_json(path: Path) -> list[Record]:
    text = _read_text(path)
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise NolaError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(content, list):
        raise NolaError(f"{path}: expected a JSON list of records, got {type(content).__name__}")
    return [_check_record(record, f"{path}: record {number}") for number, record in enumerate(content, 1)]


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise NolaError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
        records.append(_check_record(record, f"{path}: line {number}"))
    return records


def _read_parquet(path: Path) -> list[dict]:
    """The file's rows; a damaged or truncated file (pyarrow raises ArrowInvalid, or OSError for a corrupt footer)
    is one line with pyarrow's reason, less the path it repeats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        reason = reason.removeprefix(f"Could not open Parquet input source '{path}': ")
        raise NolaError(f"{path}: not a readable Parquet file ({reason})") from None


def _read_rows(rows, where: str) -> list[Record]:
    return [_check_record(dict(row), f"{where}: row {number}") for number, row in enumerate(rows, 1)]


def load_records(source: str | Path) -> list[Record]:
    """Instruction records from a local .json (list), .jsonl or .parquet file, or a hub dataset's train split."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            records = _read_json(path)
        elif suffix == ".jsonl":
            records = _read_jsonl(path)
        elif suffix == ".parquet":
            records = _read_rows(_read_parquet(path), str(path))
        else:
            raise NolaError(f"{path}: unsupported data file type {suffix!r} (use .json, .jsonl or .parquet)")
    elif path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise NolaError(f"data.path: no such data file: {source}")
    else:
        records = _load_hub_dataset(str(source))
    if not records:
        raise NolaError(f"data.path: {source} holds no records")
    return records


def _load_hub_dataset(name: str) -> list[Record]:
    import datasets

    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as error:  # offline, unknown name, no train split: all one user-facing problem
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NolaError(f"data.path: cannot load hub dataset {name!r} ({reason})") from None
    return _read_rows(rows, f"hub dataset {name}")


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids with BOS as the tokenizer adds it, but never a trailing EOS (we place EOS ourselves)."""
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    return [ids[:-1] if ids and ids[-1] == eos else ids for ids in encoded]


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def _truncate_prompt(prompt_ids: list[int], source_max_len: int, header_length: int) -> list[int]:
    """Cut an over-long prompt in the middle: the head keeps BOS, the preamble and the instruction's start; the
    tail keeps the response header, so the model always sees where its answer begins."""
    if len(prompt_ids) <= source_max_len:
        return prompt_ids
    tail = min(header_length, source_max_len // 2)
    return prompt_ids[: source_max_len - tail] + prompt_ids[len(prompt_ids) - tail :]


def build_example(
    prompt_ids: list[int], joined_ids: list[int], eos_token_id: int, source_max_len: int, target_max_len: int,
    train_on_source: bool, header_length: int,
) -> Example | None:
    """Token ids and labels for one record from its prompt's ids and the ids of prompt+response tokenised as one
    text (tokenising the two apart leaves a spurious space token at the seam). The boundary is where the joined
    ids stop agreeing with the prompt's. The response gets EOS when it fits whole within target_max_len.
    None when no response token survives (nothing to learn from)."""
    boundary = _common_prefix_length(prompt_ids, joined_ids)
    source = _truncate_prompt(joined_ids[:boundary], source_max_len, header_length)
    target = (joined_ids[boundary:] + [eos_token_id])[:target_max_len]
    if boundary == len(joined_ids):
        return None  # an empty response: only EOS, which teaches nothing but stopping
    labels = (source if train_on_source else [IGNORE_INDEX] * len(source)) + target
    return {"input_ids": source + target, "labels": labels, "prompt_length": len(source)}


def tokenize_records(
    records: list[Record], tokenizer, source_max_len: int, target_max_len: int, train_on_source: bool
) -> list[Example | None]:
    """`build_example` for each record (None where a record has no response left), tokenising in batches."""
    if tokenizer.eos_token_id is None:
        raise NolaError("data.tokenizer: the tokenizer has no EOS token")
    prompts = [format_prompt(record) for record in records]
    prompt_ids = _token_ids(tokenizer, prompts)
    joined_ids = _token_ids(tokenizer, [prompt + record["output"] for prompt, record in zip(prompts, records)])
    header_length = len(tokenizer(RESPONSE_HEADER, add_special_tokens=False)["input_ids"]) + 1
    return [
        build_example(p, j, tokenizer.eos_token_id, source_max_len, target_max_len, train_on_source, header_length)
        for p, j in zip(prompt_ids, joined_ids)
    ]


@dataclass
class PreparedData:
    train: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)
    dropped: int = 0  # records with no response token left (empty output)


def validation_count(validation_size: float, num_records: int) -> int:
    """A fraction below 1 of the records, or a whole count."""
    return int(validation_size) if validation_size >= 1 else round(validation_size * num_records)


def prepare_data(
    records: list[Record], tokenizer, source_max_len: int, target_max_len: int, validation_size: float,
    seed: int, train_on_source: bool = False,
) -> PreparedData:
    """Split records into train/validation (a seeded permutation, so the split is the same for every process and
    does not depend on tokenisation), then tokenise both and drop records with nothing to learn."""
    count = validation_count(validation_size, len(records))
    if count >= len(records):
        raise NolaError(f"data.validation_size: {validation_size} leaves no training records out of {len(records)}")
    order = list(range(len(records)))
    random.Random(f"validation-split:{seed}").shuffle(order)
    examples = tokenize_records(records, tokenizer, source_max_len, target_max_len, train_on_source)
    validation = [examples[i] for i in sorted(order[:count]) if examples[i] is not None]
    train = [examples[i] for i in sorted(order[count:]) if examples[i] is not None]
    return PreparedData(train=train, validation=validation, dropped=sum(e is None for e in examples))


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
    on any split of the same global batch."""

    def __init__(self, examples: list[Example], micro_batch_size: int, grad_accum_steps: int, seed: int,
                 group_by_length: bool, num_replicas: int, rank: int, pad_token_id: int) -> None:
        self.examples = examples
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.settings = dict(micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps, seed=seed,
                             group_by_length=group_by_length, num_replicas=num_replicas, rank=rank)
        self.global_batch = micro_batch_size * grad_accum_steps * num_replicas
        self.pad_token_id = pad_token_id
        self.epoch, self.index = 0, 0
        self._schedule = self._epoch_schedule(0)

    def _epoch_schedule(self, epoch: int) -> list[list[list[int]]]:
        schedule = batch_schedule(self.lengths, epoch=epoch, **self.settings)
        if not schedule:
            raise NolaError(f"data: {len(self.examples)} training examples do not fill one global batch of "
                            f"{self.global_batch} (micro_batch_size x grad_accum_steps x processes)")
        return schedule

    def seek(self, epoch: int, index: int) -> None:
        self.epoch, self.index = epoch, index
        self._schedule = self._epoch_schedule(epoch)

    def next(self) -> list[dict[str, torch.Tensor]]:
        if self.index >= len(self._schedule):
            self.seek(self.epoch + 1, 0)
        micro_batches = self._schedule[self.index]
        self.index += 1
        return [collate([self.examples[i] for i in indices], self.pad_token_id) for indices in micro_batches]


def data_fingerprint(stream: StepBatches, split_seed: int) -> dict:
    """What fixes the training examples and their order: a checkpoint resumes exactly only on the same."""
    return {"global_batch": stream.global_batch, "seed": stream.settings["seed"], "split_seed": split_seed,
            "group_by_length": stream.settings["group_by_length"], "train_examples": len(stream.examples)}
