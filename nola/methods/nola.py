"""NOLA: A = A0 + Σᵢ αᵢ·Uᵢ/√k_A (r × in), B = Σⱼ βⱼ·Vⱼ/√k_B (out × r); only the coefficients α, β
train.

A0 is the frozen kaiming-uniform matrix LoRA would start from and Uᵢ, Vⱼ the seeded random bases, all regenerated
from the module's seed (nola/basis.py), never stored. α = β = 0 at the start, so the adapted layer equals its base
until the first update. A and B are materialised once per coefficient values (nola/matrices.py); with
`adapter.quant_bits` the coefficients pass through a straight-through fake quantiser first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from nola.matrices import MaterializedMatrices, nola_matrices
from nola.methods.base import AdapterMethod, Factors
from nola.quant import fake_quantize

if TYPE_CHECKING:  # annotations only: the config module imports the registry
    from nola.adapter_config import AdapterConfig


def coefficient_matrices(materialized: MaterializedMatrices, alphas: torch.Tensor, betas: torch.Tensor,
                         quant_bits: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one NOLA layer as its forward uses them: the coefficients fake-quantised when training with
    quant_bits, then the cached materialisation. Shared by `AdaptedLinear` and the PEFT layer (nola/peft/), so both
    compute the same function with the same kernels."""
    if quant_bits:
        alphas, betas = fake_quantize(alphas, quant_bits), fake_quantize(betas, quant_bits)
    return materialized.matrices(alphas, betas)


NAME = "nola"  # adapter.method; nola/peft/ (NOLA's PEFT form) refers to the method by it


class Nola(AdapterMethod):
    name = NAME
    quantizable = True
    defers_projection = True

    def create(self, layer: nn.Module, config: AdapterConfig, seed: int, dtype: torch.dtype, device: torch.device,
               factors: Factors | None) -> None:
        layer.coefficients_a = nn.Parameter(torch.zeros(config.basis_size_a, dtype=dtype, device=device))
        layer.coefficients_b = nn.Parameter(torch.zeros(config.basis_size_b, dtype=dtype, device=device))
        layer.materialized = MaterializedMatrices(seed, layer.rank, layer.in_features, layer.out_features,
                                                  layer.chunk_bytes)

    def stored_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        return {"coefficients_a": layer.coefficients_a, "coefficients_b": layer.coefficients_b}

    def matrices(self, layer: nn.Module) -> Factors:
        return coefficient_matrices(layer.materialized, layer.coefficients_a, layer.coefficients_b, layer.quant_bits)

    def stored_shapes(self, config: AdapterConfig, out_features: int, in_features: int
                      ) -> dict[str, tuple[int, ...]]:
        return {"coefficients_a": (config.basis_size_a,), "coefficients_b": (config.basis_size_b,)}

    def matrices_from_values(self, config: AdapterConfig, values: dict[str, torch.Tensor], seed: int | None,
                             out_features: int, in_features: int, largest_shape: tuple[int, int]) -> Factors:
        return nola_matrices(values["coefficients_a"].float(), values["coefficients_b"].float(), seed, config.rank,
                             in_features, out_features, config.basis_chunk_bytes)

    def describe(self, layer: nn.Module) -> str:
        return f"k_A={layer.coefficients_a.numel()}, k_B={layer.coefficients_b.numel()}, "
