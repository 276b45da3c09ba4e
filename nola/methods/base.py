"""The interface every adaptation method implements: what it trains, what A and B it makes of that, what it saves.

Why one interface: each method (NOLA, the LoRA baselines, VeRA) differs only in how a layer's low-rank update
ΔW = scale·B·A is parameterised. Everything around it (the adapted layer, adapter files, merge, export, the trainer)
asks the method through these calls instead of branching on its name, so a new method is one new module plus one
line in the registry (`nola/methods/__init__.py`).

A method is stateless. A layer's tensors live on the layer itself (`AdaptedLinear`), so parameter names stay
`<module>.<tensor>` in state dicts, checkpoints and adapter files; the method creates them there and says what
they mean.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: the config module imports the registry
    from nola.adapter_config import AdapterConfig

Factors = tuple[torch.Tensor, torch.Tensor]  # (A, B), or (A0, B0): r × in and out × r


class AdapterMethod:
    """One parameterisation of ΔW = scale·B·A. Subclasses set `name` and implement the five abstract calls; the
    hooks below them default to "nothing of the kind" (no frozen tensors, no start from the base weights)."""

    name: str = ""
    quantizable: bool = False  # its stored tensors may be trained and stored at 3/4 bits (adapter.quant_bits)
    defers_projection: bool = False  # its gradients pass through a basis projection that can wait for the step
    # The name of how it draws frozen random tensors from the seed besides NOLA's basis (None: it draws none).
    # Recorded in adapter files and checked on reading: a file whose tensors were drawn another way cannot be
    # rebuilt, and rebuilding it anyway would be a silently wrong model.
    frozen_draw: str | None = None

    def create(self, layer: torch.nn.Module, config: AdapterConfig, seed: int, dtype: torch.dtype,
               device: torch.device, factors: Factors | None) -> None:
        """Register the layer's tensors on `layer` (an `AdaptedLinear` with rank, in/out features set).
        `factors`: what `initial_factors` returned for this layer."""
        raise NotImplementedError

    def stored_tensors(self, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What an adapter file stores of this layer, by short name, in file order."""
        raise NotImplementedError

    def matrices(self, layer: torch.nn.Module) -> Factors:
        """The layer's (A, B), r × in and out × r, differentiable in its trainable tensors."""
        raise NotImplementedError

    def stored_shapes(self, config: AdapterConfig, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """{short name: shape} of what `stored_tensors` returns for a layer of this shape: a file is checked
        against it before anything is attached."""
        raise NotImplementedError

    def matrices_from_values(self, config: AdapterConfig, values: dict[str, torch.Tensor], seed: int | None,
                             out_features: int, in_features: int, largest_shape: tuple[int, int]) -> Factors:
        """(A, B) in float32 from one module's stored values (`seed`: the module's; `largest_shape`: the layers'
        `largest_shape`, from all the adapter's modules): the very matrices the layer computes with, made without
        a model, for merge and export."""
        raise NotImplementedError

    def describe(self, layer: torch.nn.Module) -> str:
        """Method-specific sizes for the layer's repr ("" when rank says it all)."""
        return ""

    def frozen_tensor_setting(self, config: AdapterConfig) -> str | None:
        """The setting that makes a layer store a frozen tensor beside its trained ones, or None."""
        return None

    def base_weight_start(self, config: AdapterConfig) -> str | None:
        """The setting that makes the start read (and change) the base weights, or None: such a start needs whole
        float weights, a rank check against their shapes, and the factors it subtracted to rebuild the base."""
        return None

    def check_targets(self, model: torch.nn.Module, names: list[str], config: AdapterConfig) -> None:
        """Refuse, in one line, target layers this config cannot adapt (before anything is changed)."""

    def initial_factors(self, name: str, base_layer: torch.nn.Module, config: AdapterConfig, seed: int,
                        residuals: dict[str, Factors] | None
                        ) -> Factors | None:
        """Factors a start computes from (and subtracts from) the base layer, `residuals` ({name: factors}, an
        adapter file's) standing in for a fresh computation; None for a start that leaves the base alone."""
        return None

    def start_tensors(self, layer: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """For a start that changed the base: the layer's tensors as they were at the start ({short name: value}),
        with which it computes the original base's function again; None when a zero update does that."""
        return None

    def residual_factors(self, config: AdapterConfig, values: dict[str, torch.Tensor]
                         ) -> Factors | None:
        """(A0, B0) subtracted from the base at the start, from one module's stored values; None if none was."""
        return None
