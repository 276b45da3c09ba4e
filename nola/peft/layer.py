"""The PEFT layer of NOLA: PEFT's adapter bookkeeping (several named adapters, set / disable / delete / merge)
around nola's own arithmetic.

Nothing of the method is re-implemented here. Per adapter a layer holds the two coefficient vectors (float32, in
`ParameterDict`s as PEFT's tuners hold theirs) and a `MaterializedMatrices` cache; A and B come from
`coefficient_matrices` and the update from `add_update`, the very functions `AdaptedLinear` runs, so for the same
seed and coefficients the two layers compute the same output bit for bit, and merging writes nola's merge.

Coefficients stay float32. TRL casts the trainable parameters of a quantised model to bf16 (peft #2889); bf16
coefficients round a small update away, so the layer puts untrained (all-zero, so losslessly cast) coefficients
back to float32 at the next forward, and refuses in one line coefficients that were cast after they trained.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn

from nola.errors import NolaError
from nola.layers import add_update, coefficient_dtype
from nola.matrices import MaterializedMatrices
from nola.methods.nola import coefficient_matrices
from nola.peft.config import NolaConfig


class NolaLayer(BaseTunerLayer):
    """PEFT's view of a NOLA layer: what is trained (`adapter_layer_names`) and the per-adapter settings."""

    adapter_layer_names = ("nola_coefficients_a", "nola_coefficients_b")
    other_param_names = ("nola_rank", "nola_scale", "nola_dropout", "nola_materialized")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        self.nola_coefficients_a = nn.ParameterDict({})
        self.nola_coefficients_b = nn.ParameterDict({})
        self.nola_rank: dict[str, int] = {}
        self.nola_scale: dict[str, float] = {}
        self.nola_dropout = nn.ModuleDict({})
        self.nola_materialized: dict[str, MaterializedMatrices] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config: NolaConfig, seed: int, inference_mode: bool = False) -> None:
        """Add adapter `adapter_name`: zero coefficients (the layer equals its base), its seed's basis cache."""
        base = self.get_base_layer()
        settings = config.adapter_config()
        dtype, device = coefficient_dtype(base), base.weight.device
        self.nola_coefficients_a[adapter_name] = nn.Parameter(torch.zeros(settings.basis_size_a, dtype=dtype,
                                                                          device=device))
        self.nola_coefficients_b[adapter_name] = nn.Parameter(torch.zeros(settings.basis_size_b, dtype=dtype,
                                                                          device=device))
        self.nola_rank[adapter_name] = settings.rank
        self.nola_scale[adapter_name] = settings.scale
        self.nola_dropout[adapter_name] = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.nola_materialized[adapter_name] = MaterializedMatrices(seed, settings.rank, self.in_features,
                                                                    self.out_features, settings.basis_chunk_bytes)
        # PEFT's _move_adapter_to_device_of_base_layer would also cast to the base's (bf16) dtype: not done
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def adapter_matrices(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one adapter, float32, differentiable in its coefficients."""
        alphas = self._float32_coefficients(self.nola_coefficients_a, adapter_name)
        betas = self._float32_coefficients(self.nola_coefficients_b, adapter_name)
        return coefficient_matrices(self.nola_materialized[adapter_name], alphas, betas, None)

    def _float32_coefficients(self, parameters: nn.ParameterDict, adapter_name: str) -> torch.Tensor:
        parameter = parameters[adapter_name]
        wanted = coefficient_dtype(self.get_base_layer())
        if parameter.dtype != wanted:
            if not parameter.is_meta and bool(parameter.detach().any()):
                raise NolaError(f"nola: coefficients of adapter {adapter_name!r} were cast to {parameter.dtype} "
                                f"after training (bf16 coefficients lose the update; TRL casts trainable "
                                f"parameters of quantised models, peft #2889): keep them {wanted}")
            parameter.data = parameter.data.to(wanted)  # all zeros (or no values yet): the cast lost nothing
        return parameter

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scale·B·A of one adapter, float32 (out × in), without autograd: what merging adds to the base."""
        with torch.no_grad():
            a, b = self.adapter_matrices(adapter_name)
            return (b.float() @ a.float()) * self.nola_scale[adapter_name]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or named) adapters' updates to the base weight: in float32, then cast to the weight's
        dtype, as nola's merge writes a checkpoint (a 4-bit base is dequantised and quantised again)."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.nola_coefficients_a:
                continue
            weight = self.get_base_weight()
            merged = (weight.float() + self.get_delta_weight(name).to(weight.device)).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise NolaError(f"nola: merging adapter {name!r} gives non-finite weights; the adapter is broken")
            self.set_base_weight(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract merged updates again (exact for a float32 base; a lower-precision one keeps a rounding)."""
        if not self.merged:
            warnings.warn("nola: already unmerged, nothing to do")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.get_base_weight()
            self.set_base_weight((weight.float() - self.get_delta_weight(name).to(weight.device)).to(weight.dtype))


class Linear(nn.Module, NolaLayer):
    """NOLA on an nn.Linear or a bitsandbytes Linear4bit (the base layer is kept as `base_layer`)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: NolaConfig, seed: int) -> None:
        super().__init__()
        NolaLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, seed)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.nola_coefficients_a:
                a, b = self.adapter_matrices(name)
                result = add_update(result, x, a, b, self.nola_scale[name], self.nola_dropout[name])
        return result

    def __repr__(self) -> str:
        return "nola." + super().__repr__()
