"""`NolaConfig`: a PEFT config whose fields are nola's own adapter settings (the recipe's `adapter:` section).

Why nola's names and not PEFT-style `r` / `lora_alpha`: the same adapter is trained from a recipe, from PEFT or
from TRL, and one name per setting keeps recipes, adapter files and this config readable side by side. Validity is
`AdapterConfig`'s (one set of rules), and an invalid value fails in one line when the config is built.

What makes a saved adapter rebuildable: every module's seed (`module_seeds`), the basis generator's version
(`generator_version`) and the base model's fingerprint (`base_model_fingerprint`: adapted module shapes, an
input-embedding sample, and the 4-bit settings merge needs), all recorded when the adapter is injected and written
to adapter_config.json. A config read back with another generator version is refused when built; one whose base
differs (module shapes, adapted modules, embedding weights), when it is injected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from nola.adapter_config import AdapterConfig
from nola.basis import DEFAULT_CHUNK_BYTES, GENERATOR_VERSION
from nola.errors import NolaError
from nola.methods.nola import NAME as NOLA


class PeftTypeName(str):
    """A peft type that is a string, as PEFT's mappings accept, with the `.value` of PeftType's enum members:
    transformers' adapter integration reads `peft_config.peft_type.value` (its load_adapter, delete_adapter)."""

    @property
    def value(self) -> str:
        return str.__str__(self)


# Settings nola's AdapterConfig and NolaConfig share, by the same names.
SHARED_SETTINGS = ("rank", "alpha", "num_basis", "num_basis_a", "num_basis_b", "seed", "dropout", "basis_chunk_bytes",
                   "target_modules", "module_seeds")
PEFT_TYPE = PeftTypeName("NOLA")  # PEFT's enum is closed to third parties (registration: nola/peft/__init__.py)


@dataclass
class NolaConfig(PeftConfig):
    """NOLA adapter settings for `peft.get_peft_model`, TRL's `SFTTrainer(peft_config=...)` and PeftModel files.

    rank, alpha, num_basis (num_basis_a / num_basis_b), seed, dropout, basis_chunk_bytes: as in a recipe's
    `adapter:` section (nola/adapter_config.py). target_modules: "all-linear" (PEFT's expansion: every Linear but
    the output head), a list of module-name suffixes, or a regex, as for any PEFT method.
    """

    rank: int = field(default=8, metadata={"help": "r, the inner dimension of ΔW = B·A"})
    alpha: float = field(default=16.0, metadata={"help": "ΔW is scaled by alpha / rank, as in LoRA"})
    num_basis: int = field(default=256, metadata={"help": "basis size of A and B (trainable numbers per matrix)"})
    num_basis_a: Optional[int] = field(default=None, metadata={"help": "basis size of A, if not num_basis"})
    num_basis_b: Optional[int] = field(default=None, metadata={"help": "basis size of B, if not num_basis"})
    seed: int = field(default=0, metadata={"help": "run seed: every module's seed derives from it and its name"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    basis_chunk_bytes: int = field(default=DEFAULT_CHUNK_BYTES, metadata={"help": "basis working memory"})
    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear", metadata={"help": "'all-linear', module-name suffixes, or a regex"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules left alone"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "other modules trained and saved"})
    trainable_token_indices: Optional[Union[list[int], dict]] = field(default=None, metadata={"help": "PEFT's"})
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "PEFT's; refused by NOLA"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "layer list name"})
    module_seeds: dict[str, int] = field(default_factory=dict, metadata={"help": "recorded at injection"})
    base_model_fingerprint: dict = field(default_factory=dict, metadata={"help": "recorded at injection"})
    generator_version: str = field(default=GENERATOR_VERSION, metadata={"help": "the basis generator's version"})

    def __post_init__(self) -> None:
        # nola's refusals first: PEFT's own checks (peft 0.22 refuses layers_to_transform with a string
        # target_modules in its words) would otherwise speak before ours, on some PEFT versions and not others
        if self.generator_version != GENERATOR_VERSION:
            raise NolaError(f"NolaConfig: basis generator {self.generator_version!r} differs from this nola's "
                            f"{GENERATOR_VERSION!r}; the adapter's bases cannot be regenerated")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise NolaError(f"NolaConfig.layers_to_transform: needs target_modules as a list of module names, not "
                            f"{self.target_modules!r} (PEFT would adapt every layer)")
        if self.target_parameters:
            raise NolaError("NolaConfig.target_parameters: NOLA adapts Linear modules, not bare parameters")
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self.adapter_config()  # validates, in nola's words

    @classmethod
    def from_adapter(cls, adapter: AdapterConfig, **peft_settings) -> "NolaConfig":
        """The PEFT config of a NOLA `AdapterConfig` (a recipe's `adapter:` section, an adapter file's), plus PEFT's
        own settings (task_type, base_model_name_or_path, ...)."""
        if adapter.method != NOLA or adapter.quant_bits:
            raise NolaError(f"NolaConfig: adapter method {adapter.method!r}"
                            f"{f' with {adapter.quant_bits}-bit coefficients' if adapter.quant_bits else ''} has no "
                            f"PEFT NOLA form (PEFT's NOLA layer trains float32 coefficients)")
        return cls(**{name: getattr(adapter, name) for name in SHARED_SETTINGS}, **peft_settings)

    def adapter_config(self) -> AdapterConfig:
        """The same settings as nola's `AdapterConfig` (method NOLA): what the layers and the file converter use."""
        targets = self.target_modules
        if targets is None:  # PEFT's default targets for the model type: for LLaMA, its seven projections
            targets = "all-linear"
        elif isinstance(targets, set):  # PEFT expands "all-linear" into a set of names
            targets = sorted(targets)
        settings = {name: getattr(self, name) for name in SHARED_SETTINGS}
        return AdapterConfig(method=NOLA, **{**settings, "target_modules": targets,
                                               "module_seeds": dict(self.module_seeds)})
