"""Records -> training examples: token ids with labels on the answers only (the Alpaca response, or a
conversation's assistant turns: nola/data/conversations.py), the validation split, what is dropped.

Every random choice (the validation split) comes from a `random.Random` seeded by the run's seed, never the global
RNG, so every process builds the same examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from nola.data.formats import Record
from nola.data.conversations import conversation_example
from nola.data.templates import IGNORE_INDEX, RESPONSE_HEADER, common_prefix_length, format_prompt, resolve_template
from nola.errors import NolaError

Example = dict  # {"input_ids": [...], "labels": [...], "prompt_length": int, "reference_end": int (conversations)}


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids with BOS as the tokenizer adds it, but never a trailing EOS (we place EOS ourselves)."""
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    return [ids[:-1] if ids and ids[-1] == eos else ids for ids in encoded]


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
    boundary = common_prefix_length(prompt_ids, joined_ids)
    source = _truncate_prompt(joined_ids[:boundary], source_max_len, header_length)
    target = (joined_ids[boundary:] + [eos_token_id])[:target_max_len]
    if boundary == len(joined_ids):
        return None  # an empty response: only EOS, which teaches nothing but stopping
    labels = (source if train_on_source else [IGNORE_INDEX] * len(source)) + target
    return {"input_ids": source + target, "labels": labels, "prompt_length": len(source)}


def tokenize_records(
    records: list[Record], tokenizer, source_max_len: int, target_max_len: int, train_on_source: bool,
    data_format: str = "alpaca", template: str | None = None, max_seq_len: int | None = None,
    source: str = "data.path",
) -> list[Example | None]:
    """One example per record (None where a record has nothing left to learn from). Alpaca records under the
    Alpaca template: `build_example`, tokenising in batches, prompt and response cut at source_max_len and
    target_max_len. Every other format or template: `conversation_example`, cut at max_seq_len (default: the two
    lengths' sum)."""
    if tokenizer.eos_token_id is None:
        raise NolaError("data.tokenizer: the tokenizer has no EOS token")
    template = resolve_template(data_format, template)
    if template != "alpaca":
        limit = max_seq_len or source_max_len + target_max_len
        return [conversation_example(tokenizer, record, template, limit, train_on_source, f"{source}: record {n}")
                for n, record in enumerate(records, 1)]
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
    dropped: int = 0  # records with nothing to learn: an empty answer, or none left within the length limits


def validation_count(validation_size: float, num_records: int) -> int:
    """A fraction below 1 of the records, or a whole count."""
    return int(validation_size) if validation_size >= 1 else round(validation_size * num_records)


def prepare_data(
    records: list[Record], tokenizer, source_max_len: int, target_max_len: int, validation_size: float,
    seed: int, train_on_source: bool = False, data_format: str = "alpaca", template: str | None = None,
    max_seq_len: int | None = None, source: str = "data.path",
) -> PreparedData:
    """Split records into train/validation (a seeded permutation, so the split is the same for every process and
    does not depend on tokenisation), then tokenise both and drop records with nothing to learn."""
    count = validation_count(validation_size, len(records))
    if count >= len(records):
        raise NolaError(f"data.validation_size: {validation_size} leaves no training records out of {len(records)}")
    order = list(range(len(records)))
    random.Random(f"validation-split:{seed}").shuffle(order)
    examples = tokenize_records(records, tokenizer, source_max_len, target_max_len, train_on_source, data_format,
                                template, max_seq_len, source)
    validation = [examples[i] for i in sorted(order[:count]) if examples[i] is not None]
    train = [examples[i] for i in sorted(order[count:]) if examples[i] is not None]
    return PreparedData(train=train, validation=validation, dropped=sum(e is None for e in examples))
