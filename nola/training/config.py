"""The recipe schema: YAML recipe + `dotted.key=value` overrides -> one validated `RecipeConfig`.

The dataclasses below are the single source of truth for recipe keys, their types and defaults; recipes/*.yaml
document each key with a comment. Every mistake (unknown key, wrong type, out-of-range value) is raised as a
one-line NolaError naming the file and the key, before any model or data is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from nola.adapter_config import AdapterConfig
from nola.data.templates import resolve_template
from nola.errors import NolaError
from nola.modeling import ModelSection


@dataclass
class DataSection:
    path: str = "embedded:tiny-instructions"
    format: Literal["alpaca", "messages", "prompt_completion", "text"] = "alpaca"  # nola/data/formats.py
    template: Literal["alpaca", "llama2", "tokenizer", "none"] | None = None  # null: the format's own default
    tokenizer: str | None = None  # defaults to model.name_or_path
    source_max_len: int = 384  # alpaca template: prompt tokens kept
    target_max_len: int = 512  # alpaca template: response tokens kept, EOS included
    max_seq_len: int | None = None  # other templates: tokens per example; packing: per row (null: the sum above)
    packing: bool = False  # several examples per row, each attending to itself only (nola/data/packing.py)
    train_on_source: bool = False
    validation_size: float = 0.05  # a fraction in (0, 1), or a whole number of records
    split_seed: int | None = None  # seed of the train/validation split; null = train.seed
    group_by_length: bool = True

    def sequence_length(self) -> int:
        """Tokens per example under a chat template, and per packed row: max_seq_len, or the Alpaca lengths' sum."""
        return self.max_seq_len or self.source_max_len + self.target_max_len

    def packed_length(self) -> int | None:
        """The row length when packing, None when not."""
        return self.sequence_length() if self.packing else None


@dataclass
class TrainSection:
    max_steps: int = 200
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.9
    optimizer: Literal["adamw", "paged_adamw"] = "adamw"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    logging_steps: int = 10
    eval_steps: int = 50
    eval_max_batches: int | None = None
    save_steps: int = 50
    save_total_limit: int | None = 3
    output_dir: str = "runs/tiny"
    resume_from: str | None = None  # "auto", a checkpoint directory, or null
    seed: int = 0
    sample_generations: int = 3
    max_new_tokens: int = 48
    answer_accuracy: int = 0
    max_nonfinite_steps: int = 5  # consecutive steps with a NaN/inf loss or gradient (skipped) before the run stops
    deferred_projection: bool = True  # NOLA: project gradients onto the bases once per step, not per micro-batch


@dataclass
class MmluSection:
    path: str | None = None  # QLoRA-format MMLU file or a cais/mmlu-schema hub dataset; null = no MMLU eval
    shots: int = 5  # demonstrations per prompt when prompts are built from a hub dataset
    max_examples: int | None = None  # score the first N questions only (quick checks)
    batch_size: int = 4
    max_length: int = 4096  # longer prompts keep their end (the question)
    at_start: bool = False  # also score the base before training, for a baseline


@dataclass
class LogSection:
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "nola"
    wandb_run_name: str | None = None
    wandb_run_id: str | None = None


@dataclass
class RecipeConfig:
    model: ModelSection = field(default_factory=ModelSection)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    mmlu: MmluSection = field(default_factory=MmluSection)
    log: LogSection = field(default_factory=LogSection)

    def adapter_config(self) -> AdapterConfig:
        """The core AdapterConfig, its module seeds derived from train.seed (the one seed of a run)."""
        return dataclasses.replace(self.adapter, seed=self.train.seed, module_seeds={})

    def split_seed(self) -> int:
        """The seed of the train/validation split: data.split_seed when set, else train.seed. A separate seed lets
        runs of different seeds be compared on the same held-out records."""
        return self.train.seed if self.data.split_seed is None else self.data.split_seed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Keys of AdapterConfig that a recipe does not set: the run's seed is train.seed, module seeds are derived.
_DERIVED_ADAPTER_KEYS = ("seed", "module_seeds")

# Ranges beyond the types: (key, check, what it must be). The adapter's own ranges live in AdapterConfig.
_RANGES = [
    ("data.source_max_len", lambda v: v > 0, "> 0"),
    ("data.target_max_len", lambda v: v > 0, "> 0"),
    ("data.validation_size", lambda v: v >= 0 and (v < 1 or float(v).is_integer()), "a fraction in [0, 1) or a count"),
    ("data.split_seed", lambda v: v is None or v >= 0, ">= 0"),
    ("data.max_seq_len", lambda v: v is None or v > 0, "> 0"),
    ("train.max_steps", lambda v: v >= 1, ">= 1"),
    ("train.micro_batch_size", lambda v: v >= 1, ">= 1"),
    ("train.grad_accum_steps", lambda v: v >= 1, ">= 1"),
    ("train.lr", lambda v: v > 0, "> 0"),
    ("train.weight_decay", lambda v: v >= 0, ">= 0"),
    ("train.warmup_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("train.max_grad_norm", lambda v: v > 0, "> 0"),
    ("train.logging_steps", lambda v: v >= 1, ">= 1"),
    ("train.eval_steps", lambda v: v >= 1, ">= 1"),
    ("train.eval_max_batches", lambda v: v is None or v >= 1, ">= 1"),
    ("train.save_steps", lambda v: v >= 1, ">= 1"),
    ("train.save_total_limit", lambda v: v is None or v >= 1, ">= 1"),
    ("train.seed", lambda v: v >= 0, ">= 0"),
    ("train.sample_generations", lambda v: v >= 0, ">= 0"),
    ("train.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("train.answer_accuracy", lambda v: v >= 0, ">= 0"),
    ("train.max_nonfinite_steps", lambda v: v >= 1, ">= 1"),
    ("mmlu.shots", lambda v: 0 <= v <= 5, "in [0, 5] (the dev split holds 5 per subject)"),
    ("mmlu.max_examples", lambda v: v is None or v >= 1, ">= 1"),
    ("mmlu.batch_size", lambda v: v >= 1, ">= 1"),
    ("mmlu.max_length", lambda v: v >= 16, ">= 16"),
]


def _type_name(annotation: object) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _matches(value: object, annotation: object) -> bool:
    """Does a YAML value fit a field annotation (the few forms the schema uses)?"""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _coerce_number(value: object, annotation: object) -> object:
    """Ints to floats for float keys, and numeric strings too: YAML 1.1 reads `2e-4` (no dot) as a string."""
    accepts_float = annotation is float or float in typing.get_args(annotation)
    if not accepts_float or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _section_types(section_class: type) -> dict[str, object]:
    return typing.get_type_hints(section_class)


def _apply(config: RecipeConfig, key: str, value: object, where: str) -> None:
    """Set `section.name` = value on `config` after checking the key exists and the value's type fits."""
    sections = {f.name: f.type for f in dataclasses.fields(RecipeConfig)}
    section_name, _, name = key.partition(".")
    if section_name not in sections or not name:
        raise NolaError(f"{where}: unknown key {key!r}{_suggest(key, _all_keys())}")
    section = getattr(config, section_name)
    hints = _section_types(type(section))
    if section_name == "adapter" and name in _DERIVED_ADAPTER_KEYS:
        raise NolaError(f"{where}: {key} is derived, not set: use train.seed")
    if name not in hints:
        raise NolaError(f"{where}: unknown key {key!r}{_suggest(key, _all_keys())}")
    annotation = hints[name]
    value = _coerce_number(value, annotation)
    if not _matches(value, annotation):
        raise NolaError(f"{where}: {key} must be {_type_name(annotation)}, got {value!r}")
    setattr(section, name, value)


def _all_keys() -> list[str]:
    return [
        f"{section.name}.{name}"
        for section in dataclasses.fields(RecipeConfig)
        for name in _section_types(typing.get_type_hints(RecipeConfig)[section.name])
        if not (section.name == "adapter" and name in _DERIVED_ADAPTER_KEYS)
    ]


def _flatten(mapping: dict, where: str) -> list[tuple[str, object]]:
    pairs = []
    for section, values in mapping.items():
        if not isinstance(values, dict):
            raise NolaError(f"{where}: top-level key {section!r} must be a section (a mapping of keys)")
        pairs.extend((f"{section}.{name}", value) for name, value in values.items())
    return pairs


def parse_override(text: str) -> tuple[str, object]:
    """`dotted.key=value` -> (key, value); the value is read as YAML, so `3`, `1e-3`, `true`, `null`, `[a, b]` type."""
    key, separator, raw = text.partition("=")
    if not separator or not key.strip():
        raise NolaError(f"override {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> RecipeConfig:
    """Read a YAML recipe, apply overrides, and validate everything; one-line NolaError on the first problem."""
    path = Path(path)
    if not path.is_file():
        raise NolaError(f"{path}: no such recipe file")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise NolaError(f"{path}:{line} not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(content, dict):
        raise NolaError(f"{path}: a recipe must be a mapping of sections")
    config = RecipeConfig()
    for key, value in _flatten(content, str(path)):
        _apply(config, key, value, str(path))
    for override in overrides:
        key, value = parse_override(override)
        _apply(config, key, value, f"override {override!r}")
    validate(config, str(path))
    return config


def check_data_rendering(config: RecipeConfig, template: str, where: str) -> None:
    """What packing and answer accuracy need of the data's template."""
    data = config.data
    if data.packing and template == "alpaca" and data.sequence_length() < data.source_max_len + data.target_max_len:
        raise NolaError(f"{where}: data.max_seq_len: packed rows of {data.max_seq_len} tokens cannot hold Alpaca "
                        f"examples of up to source_max_len + target_max_len = "
                        f"{data.source_max_len + data.target_max_len}")
    if config.train.answer_accuracy and template != "alpaca":
        raise NolaError(f"{where}: train.answer_accuracy scores Alpaca answers (it reads the instruction back from "
                        f"the prompt), not {template} conversations: set it to 0")


def validate(config: RecipeConfig, where: str) -> None:
    """Range checks that types alone do not express."""
    try:
        config.adapter_config()  # re-runs AdapterConfig's own checks on the overridden values
        template = resolve_template(config.data.format, config.data.template)
    except NolaError as error:
        raise NolaError(f"{where}: {error}") from None
    for key, check, requirement in _RANGES:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if not check(value):
            raise NolaError(f"{where}: {key} must be {requirement}, got {value!r}")
    check_data_rendering(config, template, where)
    resume = config.train.resume_from
    if resume not in (None, "auto") and not Path(resume).is_dir():
        raise NolaError(f"{where}: train.resume_from: {resume!r} is not 'auto', null or a checkpoint directory")
