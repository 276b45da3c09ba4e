"""Prompt templates (`data.template`): the text a record becomes before tokenisation, and which of it is trained.

    alpaca     the Stanford Alpaca prompt, the response trained (Alpaca records; the default for them)
    llama2     LLaMA-2-chat's `<s>[INST] ... [/INST] ... </s>` exchanges (nola/data/conversations.py)
    tokenizer  the tokenizer's own chat_template (the default for `messages`)
    none       the record's own text: a prompt/completion pair joined, a text record as it is

Which template suits which format is checked once, before anything is tokenised.
"""

from __future__ import annotations

from nola.data.formats import Record
from nola.errors import NolaError

IGNORE_INDEX = -100  # label of a position that carries no loss (prompt, padding)
TEMPLATES = ("alpaca", "llama2", "tokenizer", "none")
DEFAULT_TEMPLATE = {"alpaca": "alpaca", "messages": "tokenizer", "prompt_completion": "none", "text": "none"}
SUITABLE = {"alpaca": ("alpaca", "llama2", "tokenizer"), "messages": ("llama2", "tokenizer"),
            "prompt_completion": ("none", "llama2", "tokenizer"), "text": ("none",)}


def resolve_template(data_format: str, template: str | None) -> str:
    """The template a run renders records of `data_format` with: the one asked for, or the format's default."""
    template = DEFAULT_TEMPLATE[data_format] if template is None else template
    if template not in TEMPLATES:
        raise NolaError(f"data.template: {template!r} is not one of {', '.join(TEMPLATES)}")
    if template not in SUITABLE[data_format]:
        raise NolaError(f"data.template: {template} does not render {data_format} records (use "
                        f"{' or '.join(SUITABLE[data_format])})")
    return template

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


def format_prompt(record: Record) -> str:
    """The Alpaca prompt for a record; records with an empty `input` use the template without one."""
    if record.get("input", "").strip():
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Where two tokenisations stop agreeing: how every template finds a boundary (the end of a prompt, the start
    of a turn) on the tokenisation of the whole text, so no seam gets a token the whole text would not have."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length
