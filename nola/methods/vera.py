"""VeRA (Kopiczko et al. 2024), the extreme-compression peer of NOLA: A = Λ_d·A_s, B = Λ_b·B_s with A_s, B_s frozen
random projections shared by all layers (regenerated from the run seed), and only the vectors d (r, starting at
0.1) and b (out, starting at 0) trained.

The shared pair is drawn as PEFT's VeRA draws it: one A_s (r × the widest adapted in) and one B_s (the widest out
× r), kaiming-uniform in ±√6/√fan_in of the full matrix (fan_in: the widest in for A_s, r for B_s), each layer
computing with their top-left slices. The widest shape is the layer's `largest_shape` (attach sets it from the
targets) and the adapter file's largest module (merge), so both regenerate the same slices."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from nola.matrices import vera_matrices
from nola.methods.base import AdapterMethod, Factors

# VeRA's initial d: the value of its reference implementation (PEFT's VeraConfig.d_initial).
VERA_D_INITIAL = 0.1

if TYPE_CHECKING:  # annotations only: the config module imports the registry
    from nola.adapter_config import AdapterConfig


class Vera(AdapterMethod):
    name = "vera"

    def create(self, layer: nn.Module, config: AdapterConfig, seed: int, dtype: torch.dtype, device: torch.device,
               factors: Factors | None) -> None:
        layer.projection_seed = config.seed  # the run's: VeRA's projections are shared by every layer
        layer.vera_d = nn.Parameter(torch.full((layer.rank,), VERA_D_INITIAL, dtype=dtype, device=device))
        layer.vera_b = nn.Parameter(torch.zeros(layer.out_features, dtype=dtype, device=device))

    def stored_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        return {"vera_d": layer.vera_d, "vera_b": layer.vera_b}

    frozen_draw = "peft-kaiming-uniform-shared-v2"  # v1 (before): ±1/√fan_in of each layer's own slice

    def matrices(self, layer: nn.Module) -> Factors:
        return vera_matrices(layer.vera_d, layer.vera_b, layer.projection_seed, layer.in_features, layer.out_features,
                             layer.largest_shape[1])

    def stored_shapes(self, config: AdapterConfig, out_features: int, in_features: int
                      ) -> dict[str, tuple[int, ...]]:
        return {"vera_d": (config.rank,), "vera_b": (out_features,)}

    def matrices_from_values(self, config: AdapterConfig, values: dict[str, torch.Tensor], seed: int | None,
                             out_features: int, in_features: int, largest_shape: tuple[int, int]) -> Factors:
        return vera_matrices(values["vera_d"].float(), values["vera_b"].float(), config.seed, in_features,
                             out_features, largest_shape[1])
