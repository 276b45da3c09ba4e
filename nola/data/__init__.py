"""The data stage: records -> template -> token ids with labels on the answers -> batches (padded or packed).

    sources.load_records (JSON / JSONL / Parquet / hub; formats checks each record of data.format)
    -> examples.prepare_data (split; templates / conversations render and tokenise; drop what teaches nothing)
    -> batching.StepBatches (schedule; collate, or packing's rows with block-diagonal masks)

Every random choice (validation split, batch order) comes from a `random.Random` seeded by the run's seed and the
epoch, never from the global RNG: the same recipe yields the same batches in any process, and a resumed run can
rebuild the exact schedule from (seed, epoch, index).
"""

from nola.data.batching import FINGERPRINT_DEFAULTS, StepBatches, batch_schedule, collate, data_fingerprint
from nola.data.examples import (
    Example,
    PreparedData,
    build_example,
    prepare_data,
    tokenize_records,
    validation_count,
)
from nola.data.formats import Record
from nola.data.sources import load_records
from nola.data.templates import IGNORE_INDEX, PROMPT_NO_INPUT, PROMPT_WITH_INPUT, RESPONSE_HEADER, format_prompt

__all__ = [
    "FINGERPRINT_DEFAULTS",
    "IGNORE_INDEX",
    "PROMPT_NO_INPUT",
    "PROMPT_WITH_INPUT",
    "RESPONSE_HEADER",
    "Example",
    "PreparedData",
    "Record",
    "StepBatches",
    "batch_schedule",
    "build_example",
    "collate",
    "data_fingerprint",
    "format_prompt",
    "load_records",
    "prepare_data",
    "tokenize_records",
    "validation_count",
]
