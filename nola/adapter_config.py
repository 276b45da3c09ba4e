"""What an adapter is: the settings that, with the base model, determine every adapter weight but the trained ones.

One dataclass serves the Python API, the recipe's `adapter:` section and the saved `adapter_config.json`, so there
is a single source of truth for names, defaults and validity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from nola.basis import DEFAULT_CHUNK_BYTES
from nola.errors import NolaError
from nola.methods import METHODS, method_for
from nola.quant import SUPPORTED_BITS

INITS = ("random", "svd")

# The seven projections of a LLaMA decoder layer; "all-linear" means these on LLaMA-family models.
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdapterConfig:
    """Settings of a NOLA adapter, or of the LoRA and VeRA baselines it is compared with.

    method: "nola" (A, B as linear combinations of seeded random bases), "lora" (plain trainable A, B) or "vera"
        (VeRA: frozen random A, B shared by all layers, scaled by trained vectors; the extreme-compression peer).
    rank: r, the inner dimension of ΔW = B·A.
    alpha: ΔW is scaled by alpha / rank, as in LoRA.
    num_basis: basis size for both A and B unless num_basis_a / num_basis_b say otherwise ("nola" only).
    target_modules: "all-linear" or a list of module-name suffixes (e.g. ["q_proj", "v_proj"]).
    seed: the run seed; each adapted module derives its own seed from it and its name (VeRA's shared projections
        use it as it is).
    dropout: dropout on the adapter's input (uses torch's global RNG when > 0).
    quant_bits: "nola" only. None, 3 or 4: coefficients trained with a straight-through estimator, stored packed.
    basis_chunk_bytes: working memory for regenerating the basis: a runtime setting, values do not depend on it.
    init: "lora" only. "random": A from the seeded kaiming-uniform A0, B = 0 (LoRA). "svd": A0, B0 from the top-r
        singular triplets of the base weight, and the base replaced by the residual (PiSSA; nola/svd_init.py).
    freeze_a: "lora" only. A stays at its initial value and only B trains (LoRA-FA): r x out parameters per module.
    """

    method: str = "nola"
    rank: int = 8
    alpha: float = 16.0
    num_basis: int = 256
    num_basis_a: int | None = None
    num_basis_b: int | None = None
    target_modules: str | list[str] = "all-linear"
    seed: int = 0
    dropout: float = 0.0
    quant_bits: int | None = None
    basis_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    init: Literal["random", "svd"] = "random"
    freeze_a: bool = False
    module_seeds: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise NolaError(f"adapter.method: {self.method!r} is not one of {', '.join(METHODS)}")
        for name in ("rank", "num_basis", "basis_chunk_bytes"):
            _require_positive_int(name, getattr(self, name))
        for name in ("num_basis_a", "num_basis_b"):
            if getattr(self, name) is not None:
                _require_positive_int(name, getattr(self, name))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise NolaError(f"adapter.alpha: must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise NolaError(f"adapter.dropout: must be in [0, 1), got {self.dropout!r}")
        if self.quant_bits is not None and self.quant_bits not in SUPPORTED_BITS:
            raise NolaError(f"adapter.quant_bits: must be null, 3 or 4, got {self.quant_bits!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise NolaError(f"adapter.seed: must be a non-negative integer, got {self.seed!r}")
        if self.init not in INITS:
            raise NolaError(f"adapter.init: {self.init!r} is not one of {', '.join(INITS)}")
        if not isinstance(self.freeze_a, bool):
            raise NolaError(f"adapter.freeze_a: must be true or false, got {self.freeze_a!r}")
        if self.method != "lora" and (self.init != "random" or self.freeze_a):
            key = "init: svd" if self.init != "random" else "freeze_a: true"
            raise NolaError(f"adapter.{key} is for method lora: {self.method}'s A is a seeded random matrix by "
                            f"design and it trains a few numbers already (use method: lora, or init: random and "
                            f"freeze_a: false)")
        if not method_for(self.method).quantizable and self.quant_bits is not None:
            quantizable = ", ".join(name for name, method in METHODS.items() if method.quantizable)
            raise NolaError(f"adapter.quant_bits is for method {quantizable} (its coefficients are what is "
                            f"quantised), got method {self.method!r}: set quant_bits: null")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                self.target_modules = [self.target_modules]
        elif not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise NolaError(f"adapter.target_modules: must be 'all-linear' or a list of names, got {self.target_modules!r}")
        else:
            self.target_modules = list(self.target_modules)

    @property
    def scale(self) -> float:
        """The LoRA scaling alpha / rank applied to B·A."""
        return self.alpha / self.rank

    @property
    def basis_size_a(self) -> int:
        return self.num_basis_a or self.num_basis

    @property
    def basis_size_b(self) -> int:
        return self.num_basis_b or self.num_basis

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "adapter config") -> "AdapterConfig":
        """Build from a mapping, naming unknown keys instead of failing with a TypeError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise NolaError(f"{where}: unknown adapter key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**values)


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NolaError(f"adapter.{name}: must be an integer >= 1, got {value!r}")
