"""The adapted Linear: a frozen base layer (nn.Linear or bitsandbytes Linear4bit) plus a low-rank update.

    y = base(x) + (alpha / r) · B(A(dropout(x)))

method "nola":  A = A0 + Σᵢ αᵢ·Uᵢ/√k_A  (r × in),   B = Σⱼ βⱼ·Vⱼ/√k_B  (out × r)
method "lora":  A, B plain matrices (the baselines). init "random": A from the same seeded A0, B = 0, as LoRA;
                init "svd": A0, B0 from the base weight's top singular triplets, the base holding the residual
                (nola/svd_init.py). freeze_a: A stays as initialised (frozen) and only B trains (LoRA-FA).
method "vera":  A = Λ_d·A_s, B = Λ_b·B_s with A_s, B_s frozen random projections shared by all layers (VeRA,
                Kopiczko et al. 2024): only the vectors d (r, starting at 0.1) and b (out, starting at 0) train.

A0 is the frozen kaiming-uniform matrix LoRA would start from, regenerated from the seed; α = β = 0 at start, so
the adapted layer equals the base layer exactly until the first update. Only α and β are parameters: the bases are
never stored. A and B are materialised once per coefficient values and reused by every forward until the
coefficients change (nola/matrices.py), so a step pays for one forward basis pass whatever its micro-batches.

Coefficients are float32 whatever the base dtype (bf16 coefficients round small updates away), float64 when the base
is float64 so that exactness can be checked.
"""

from __future__ import annotations

import torch
from torch import nn

from nola.adapter_config import AdapterConfig
from nola.matrices import MaterializedMatrices, initial_a, vera_matrices
from nola.quant import fake_quantize


def base_layer_types() -> tuple[type, ...]:
    """Linear layer classes that can be adapted: nn.Linear, plus bitsandbytes' 4-bit Linear when installed."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # bitsandbytes is optional for plain float models
        return (nn.Linear,)
    return (nn.Linear, bnb.nn.Linear4bit)


# VeRA's initial d: the value of its reference implementation (PEFT's VeraConfig.d_initial).
VERA_D_INITIAL = 0.1


def coefficient_dtype(base_layer: nn.Module) -> torch.dtype:
    """float64 for a float64 base (exactness checks), float32 otherwise (including bf16 and 4-bit bases)."""
    return torch.float64 if base_layer.weight.dtype == torch.float64 else torch.float32


class AdaptedLinear(nn.Module):
    """A frozen base Linear plus a NOLA or LoRA update; `base_layer` keeps the original module untouched."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, seed: int,
                 svd_factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """`svd_factors`: (A0, B0) of an `init: svd` LoRA, already subtracted from `base_layer`'s weight."""
        super().__init__()
        self.base_layer = base_layer
        self.method = config.method
        self.rank = config.rank
        self.scale = config.scale
        self.seed = seed
        self.quant_bits = config.quant_bits
        self.chunk_bytes = config.basis_chunk_bytes
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        dtype = coefficient_dtype(base_layer)
        self.residual: tuple[torch.Tensor, torch.Tensor] | None = None  # (A0, B0) of init: svd
        if self.method == "nola":
            self.coefficients_a = nn.Parameter(torch.zeros(config.basis_size_a, dtype=dtype, device=device))
            self.coefficients_b = nn.Parameter(torch.zeros(config.basis_size_b, dtype=dtype, device=device))
            self.materialized = MaterializedMatrices(seed, self.rank, self.in_features, self.out_features,
                                                     self.chunk_bytes)
        elif self.method == "vera":
            self.projection_seed = config.seed  # the run's: VeRA's projections are shared by every layer
            self.vera_d = nn.Parameter(torch.full((self.rank,), VERA_D_INITIAL, dtype=dtype, device=device))
            self.vera_b = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))
        else:
            self._init_lora(config, seed, dtype, device, svd_factors)

    def _init_lora(self, config: AdapterConfig, seed: int, dtype: torch.dtype, device: torch.device,
                   svd_factors: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        lora_a = torch.zeros(self.rank, self.in_features, dtype=dtype, device=device)
        lora_b = torch.zeros(self.out_features, self.rank, dtype=dtype, device=device)
        if device.type != "meta":
            if svd_factors is not None:
                lora_a.copy_(svd_factors[0])
                lora_b.copy_(svd_factors[1])
            else:
                lora_a.copy_(initial_a(seed, self.rank, self.in_features, dtype, device))
        # What init: svd subtracted from the base, kept (on the CPU, outside the module's state: no engine syncs,
        # casts or partitions it) for the adapter file, which needs it to rebuild the residual from the original base.
        if config.init == "svd":
            self.residual = tuple(t.clone() if t.is_meta else t.cpu().clone() for t in (lora_a, lora_b))
        # LoRA-FA: a frozen parameter, not a buffer: DDP would broadcast a buffer before every forward.
        self.lora_a = nn.Parameter(lora_a, requires_grad=not config.freeze_a)
        self.lora_b = nn.Parameter(lora_b)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """What an adapter file stores of this layer, by short name: the trained tensors, plus a frozen A (LoRA-FA)
        and the factors subtracted from the base (init: svd), which no seed regenerates."""
        if self.method == "nola":
            return {"coefficients_a": self.coefficients_a, "coefficients_b": self.coefficients_b}
        if self.method == "vera":
            return {"vera_d": self.vera_d, "vera_b": self.vera_b}
        stored = {"lora_a": self.lora_a, "lora_b": self.lora_b}
        if self.residual is not None:
            stored.update(residual_a=self.residual[0], residual_b=self.residual[1])
        return stored

    def _coefficients(self, values: torch.Tensor) -> torch.Tensor:
        """Coefficients as the forward uses them: fake-quantised when training with quant_bits."""
        return fake_quantize(values, self.quant_bits) if self.quant_bits else values

    def adapter_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in the coefficient dtype, differentiable with respect to the trainable tensors."""
        if self.method == "lora":
            return self.lora_a, self.lora_b
        if self.method == "vera":
            return vera_matrices(self.vera_d, self.vera_b, self.projection_seed, self.in_features, self.out_features)
        return self.materialized.matrices(self._coefficients(self.coefficients_a),
                                          self._coefficients(self.coefficients_b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        a, b = self.adapter_matrices()
        compute_dtype = x.dtype if x.dtype.is_floating_point else a.dtype
        update = lora_update(self.dropout(x).to(compute_dtype), a.to(compute_dtype), b.to(compute_dtype), self.scale)
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        sizes = f"k_A={self.coefficients_a.numel()}, k_B={self.coefficients_b.numel()}, " if self.method == "nola" else ""
        return f"method={self.method}, rank={self.rank}, {sizes}scale={self.scale:g}, seed={self.seed}"


def lora_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · B·A·x for a batch of row vectors: the one place the low-rank product is computed.

    Materialised matrices run through this same function, so they reproduce the layer bit for bit.
    """
    return (x @ a.t()) @ b.t() * scale
