"""LoRA, the baseline NOLA compresses: A and B are plain trained matrices.

Variants, by setting: `init: random` starts A from the same seeded kaiming-uniform A0 NOLA uses and B = 0, as LoRA;
`init: svd` starts A0, B0 from the base weight's top singular triplets and leaves the base holding the residual
(PiSSA; nola/svd_init.py), the factors kept for the adapter file (`residual_a`, `residual_b`) because no seed
regenerates them; `freeze_a` keeps A at its start and trains B alone (LoRA-FA), A stored beside B.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from nola.matrices import initial_a
from nola.methods.base import AdapterMethod, Factors
from nola.svd_init import check_svd_ranks, dense_weight, subtract_from_base, svd_factors

if TYPE_CHECKING:  # annotations only: the config module imports the registry
    from nola.adapter_config import AdapterConfig


class Lora(AdapterMethod):
    name = "lora"

    def create(self, layer: nn.Module, config: AdapterConfig, seed: int, dtype: torch.dtype, device: torch.device,
               factors: Factors | None) -> None:
        lora_a = torch.zeros(layer.rank, layer.in_features, dtype=dtype, device=device)
        lora_b = torch.zeros(layer.out_features, layer.rank, dtype=dtype, device=device)
        if device.type != "meta":
            if factors is not None:
                lora_a.copy_(factors[0])
                lora_b.copy_(factors[1])
            else:
                lora_a.copy_(initial_a(seed, layer.rank, layer.in_features, dtype, device))
        # What init: svd subtracted from the base, kept (on the CPU, outside the module's state: no engine syncs,
        # casts or partitions it) for the adapter file, which needs it to rebuild the residual from the original base.
        if self.base_weight_start(config):
            layer.residual = tuple(t.clone() if t.is_meta else t.cpu().clone() for t in (lora_a, lora_b))
        # LoRA-FA: a frozen parameter, not a buffer: DDP would broadcast a buffer before every forward.
        layer.lora_a = nn.Parameter(lora_a, requires_grad=not config.freeze_a)
        layer.lora_b = nn.Parameter(lora_b)

    def stored_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        stored = {"lora_a": layer.lora_a, "lora_b": layer.lora_b}
        if layer.residual is not None:
            stored.update(residual_a=layer.residual[0], residual_b=layer.residual[1])
        return stored

    def matrices(self, layer: nn.Module) -> Factors:
        return layer.lora_a, layer.lora_b

    def stored_shapes(self, config: AdapterConfig, out_features: int, in_features: int
                      ) -> dict[str, tuple[int, ...]]:
        shapes = {"lora_a": (config.rank, in_features), "lora_b": (out_features, config.rank)}
        if self.base_weight_start(config):
            shapes.update(residual_a=(config.rank, in_features), residual_b=(out_features, config.rank))
        return shapes

    def matrices_from_values(self, config: AdapterConfig, values: dict[str, torch.Tensor], seed: int | None,
                             out_features: int, in_features: int, largest_shape: tuple[int, int]) -> Factors:
        return values["lora_a"].float(), values["lora_b"].float()

    def frozen_tensor_setting(self, config: AdapterConfig) -> str | None:
        return "adapter.freeze_a: true" if config.freeze_a else None

    def base_weight_start(self, config: AdapterConfig) -> str | None:
        return "adapter.init: svd" if config.init == "svd" else None

    def check_targets(self, model: nn.Module, names: list[str], config: AdapterConfig) -> None:
        if self.base_weight_start(config):
            check_svd_ranks(model, names, config.rank)

    def initial_factors(self, name: str, base_layer: nn.Module, config: AdapterConfig, seed: int,
                        residuals: dict[str, Factors] | None) -> Factors | None:
        if not self.base_weight_start(config) or base_layer.weight.is_meta:
            return None
        factors = residuals[name] if residuals is not None else svd_factors(dense_weight(base_layer), config.rank,
                                                                            config.scale, seed)
        subtract_from_base(base_layer, *factors, config.scale)
        return factors

    def start_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor] | None:
        if layer.residual is None:
            return None
        return {"lora_a": layer.residual[0], "lora_b": layer.residual[1]}

    def residual_factors(self, config: AdapterConfig, values: dict[str, torch.Tensor]) -> Factors | None:
        if not self.base_weight_start(config):
            return None
        return values["residual_a"], values["residual_b"]
