"""The adapted Linear: a frozen base layer (nn.Linear or bitsandbytes Linear4bit) plus a low-rank update.

    y = base(x) + (alpha / r) · B(A(dropout(x)))

How A and B are parameterised is the method's business (nola/methods/: NOLA, the LoRA baselines, VeRA): the layer
holds the base, the settings every method shares, and the tensors its method registers on it. Every method's
update runs through the same `lora_update`, so any of them can be merged or exported as an ordinary LoRA pair.

Trained tensors are float32 whatever the base dtype (bf16 coefficients round small updates away), float64 when the
base is float64 so that exactness can be checked.
"""

from __future__ import annotations

import torch
from torch import nn

from nola.adapter_config import AdapterConfig
from nola.matrices import MaterializedMatrices
from nola.methods import method_for


def base_layer_types() -> tuple[type, ...]:
    """Linear layer classes that can be adapted: nn.Linear, plus bitsandbytes' 4-bit Linear when installed."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # bitsandbytes is optional for plain float models
        return (nn.Linear,)
    return (nn.Linear, bnb.nn.Linear4bit)


def coefficient_dtype(base_layer: nn.Module) -> torch.dtype:
    """float64 for a float64 base (exactness checks), float32 otherwise (including bf16 and 4-bit bases)."""
    return torch.float64 if base_layer.weight.dtype == torch.float64 else torch.float32


class AdaptedLinear(nn.Module):
    """A frozen base Linear plus a low-rank update; `base_layer` keeps the original module untouched."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, seed: int,
                 factors: tuple[torch.Tensor, torch.Tensor] | None = None,
                 largest_shape: tuple[int, int] | None = None) -> None:
        """`factors`: what the method's `initial_factors` subtracted from `base_layer` (an `init: svd` LoRA).
        `largest_shape`: (out, in), each the largest over all the layers the adapter adapts, for state they share
        (VeRA's one pair of projections is sized for it); a layer on its own is its own largest."""
        super().__init__()
        self.base_layer = base_layer
        self.method = method_for(config.method)
        self.rank = config.rank
        self.scale = config.scale
        self.seed = seed
        self.quant_bits = config.quant_bits
        self.chunk_bytes = config.basis_chunk_bytes
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.largest_shape = largest_shape or (self.out_features, self.in_features)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.residual: tuple[torch.Tensor, torch.Tensor] | None = None  # (A0, B0) of a start that changed the base
        self.materialized: MaterializedMatrices | None = None  # a method with a basis cache (NOLA) sets it
        self.method.create(self, config, seed, coefficient_dtype(base_layer), base_layer.weight.device, factors)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """What an adapter file stores of this layer, by short name: the trained tensors, plus frozen ones no seed
        regenerates (a LoRA-FA's A, the factors an SVD start subtracted from the base)."""
        return self.method.stored_tensors(self)

    def adapter_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in the trained tensors' dtype, differentiable with respect to them."""
        return self.method.matrices(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_update(self.base_layer(x), x, *self.adapter_matrices(), self.scale, self.dropout)

    def extra_repr(self) -> str:
        return (f"method={self.method.name}, rank={self.rank}, {self.method.describe(self)}scale={self.scale:g}, "
                f"seed={self.seed}")


def add_update(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
               dropout: nn.Module) -> torch.Tensor:
    """`result` (the base layer's output) plus the update of input `x`, computed in x's dtype (the autocast one
    under bf16 autocast, A and B cast down to it) and added in the result's: the one forward rule of every adapted
    layer, nola's own and the PEFT one (nola/peft/), so both compute the same function bit for bit."""
    compute_dtype = x.dtype if x.dtype.is_floating_point else a.dtype
    update = lora_update(dropout(x).to(compute_dtype), a.to(compute_dtype), b.to(compute_dtype), scale)
    return result + update.to(result.dtype)


def lora_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · B·A·x for a batch of row vectors: the one place the low-rank product is computed.

    Materialised matrices run through this same function, so they reproduce the layer bit for bit.
    """
    return (x @ a.t()) @ b.t() * scale
