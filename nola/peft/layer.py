"""The PEFT layer of NOLA: PEFT's adapter bookkeeping (several named adapters, set / disable / delete / merge)
around nola's own arithmetic.

Nothing of the method is re-implemented here. Per adapter a layer holds the two coefficient vectors (float32, in
`ParameterDict`s as PEFT's tuners hold theirs) and a `MaterializedMatrices` cache; A and B come from
`coefficient_matrices` and the update from `add_update`, the very functions `AdaptedLinear` runs, so for the same
seed and coefficients the two layers compute the same output bit for bit, and merging into a float base writes
the weights nola's merge writes.

Coefficients stay float32. TRL casts every trainable parameter of a quantised model to bf16 (peft #2889), and
PEFT's device placement casts adapters to the base layer's dtype; bf16 coefficients round a small update away. So
the coefficients are `Float32Coefficients`, which ignore an assignment that only lowers the precision of the values
they hold, and the layer moves them between devices without changing their dtype.
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


class Float32Coefficients(nn.Parameter):
    """A coefficient vector that keeps its precision: `p.data = p.data.to(torch.bfloat16)` (what TRL does to the
    trainable parameters of a quantised model, and `module.to(dtype)` to every parameter) leaves it as it is,
    because those are its own values at a lower precision. Any other assignment (new values, another device, a
    higher precision) goes through."""

    @property
    def data(self) -> torch.Tensor:
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        current = torch.Tensor.data.__get__(self)
        if not (current.is_meta or value.is_meta) and is_lower_precision_copy(value, current):
            return
        torch.Tensor.data.__set__(self, value)


def is_lower_precision_copy(value: torch.Tensor, current: torch.Tensor) -> bool:
    """Whether `value` is `current` cast to a floating dtype of fewer bits, on the same device."""
    return (value.dtype.is_floating_point and current.dtype.is_floating_point
            and torch.finfo(value.dtype).bits < torch.finfo(current.dtype).bits
            and value.shape == current.shape and value.device == current.device
            and torch.equal(value, current.to(value.dtype)))


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
        for parameters, size in ((self.nola_coefficients_a, settings.basis_size_a),
                                 (self.nola_coefficients_b, settings.basis_size_b)):
            parameters[adapter_name] = Float32Coefficients(torch.zeros(size, dtype=dtype, device=device))
        self.nola_rank[adapter_name] = settings.rank
        self.nola_scale[adapter_name] = settings.scale
        self.nola_dropout[adapter_name] = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.nola_materialized[adapter_name] = MaterializedMatrices(seed, settings.rank, self.in_features,
                                                                    self.out_features, settings.basis_chunk_bytes)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """PEFT's placement (after loading an adapter, or adding one) without its cast to the base layer's dtype:
        the coefficients go to the base's device and stay float32."""
        base = self.get_base_layer()
        device = device if device is not None else base.weight.device
        for parameters in (self.nola_coefficients_a, self.nola_coefficients_b):
            parameter = parameters.get(adapter_name)
            if parameter is not None and not parameter.is_meta:
                parameter.data = parameter.data.to(device)

    def adapter_matrices(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one adapter, float32, differentiable in its coefficients."""
        alphas, betas = self.nola_coefficients_a[adapter_name], self.nola_coefficients_b[adapter_name]
        wanted = coefficient_dtype(self.get_base_layer())
        if alphas.dtype != wanted or betas.dtype != wanted:
            raise NolaError(f"nola: coefficients of adapter {adapter_name!r} are {alphas.dtype}, not {wanted} "
                            f"(lower-precision coefficients lose the update): something replaced them")
        return coefficient_matrices(self.nola_materialized[adapter_name], alphas, betas, None)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scale·B·A of one adapter, float32 (out × in), without autograd: what merging adds to the base."""
        with torch.no_grad():
            a, b = self.adapter_matrices(adapter_name)
            return (b.float() @ a.float()) * self.nola_scale[adapter_name]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or named) adapters' updates to the base weight, in float32, then cast to the weight's
        dtype. A 4-bit base is dequantised and quantised again, which rounds: PEFT's LoRA warns of the same, and
        nola's merge_and_export.py writes a float checkpoint instead."""
        names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.nola_coefficients_a]
        if names and self.quantization_backend is not None:
            warnings.warn("nola: merging into a 4-bit weight re-quantises it, so outputs change by more than the "
                          "update (and unmerge does not restore the original); merge_and_export.py --format hf "
                          "writes the merge as float weights")
        for name in names:
            weight = self.get_base_weight()
            merged = (weight.float() + self.get_delta_weight(name).to(weight.device)).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise NolaError(f"nola: merging adapter {name!r} gives non-finite weights; the adapter is broken")
            self.set_base_weight(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract merged updates again (up to float rounding on a float base; re-quantised on a 4-bit one)."""
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
