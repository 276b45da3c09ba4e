"""SVD initialisation of LoRA (`adapter.init: svd`, PiSSA-style): A and B start from the top-r singular triplets of
the base weight W, and the frozen base becomes the residual, so that the adapted layer still computes W at step 0.

    U_r·S_r·V_rᵀ = the rank-r part of W,   B0 = U_r·√S_r / √s,   A0 = √S_r·V_rᵀ / √s   (s = alpha / r)
    base weight <- W − s·B0·A0,   adapted layer = residual + s·B·A,   B = B0 and A = A0 at step 0

The adapter file keeps A0 and B0 (`residual_a`, `residual_b`), so the residual is rebuilt from the original base
without another SVD: merge writes W − s·B0·A0 + s·B·A, and the PEFT export is the rank-2r LoRA [B, −B0]·[A; A0]
on the original base.

On a 4-bit base W is the dequantised weight training sees, and the residual is quantised again with the layer's own
bitsandbytes settings: the adapted layer then equals the base up to that re-quantisation (the trainer reports how
much that moves the logits and the eval loss).

The triplets come from a randomized range finder with power iterations (Halko, Martinsson and Tropp, 2011): a few
matrix products and QRs of an in x (r + 16) sketch per layer, where an exact SVD of each 8192 x 28672 projection of a
70B would take hours. Its sketch is drawn from a generator seeded by the module's seed on the CPU, so the factors
are a function of (W, r, seed) on a given device; when r + 16 covers the smaller side of W the result is exact.
"""

from __future__ import annotations

import torch
from torch import nn

from nola.errors import NolaError

OVERSAMPLING = 16  # extra sketch columns: the top-r subspace converges much faster with a few more
POWER_ITERATIONS = 8  # each raises the spectrum's decay to two more powers


def top_singular_triplets(weight: torch.Tensor, rank: int, seed: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, V_rᵀ) of a float matrix (out x in), by a seeded randomized range finder."""
    rows, columns = weight.shape
    width = min(rank + OVERSAMPLING, rows, columns)
    generator = torch.Generator().manual_seed(seed)
    sketch = torch.randn(columns, width, generator=generator, dtype=weight.dtype).to(weight.device)
    basis = torch.linalg.qr(weight @ sketch).Q  # out x width: spans W's dominant column space
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(weight @ torch.linalg.qr(weight.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ weight, full_matrices=False)
    return (basis @ u)[:, :rank], s[:rank], vh[:rank]


def svd_factors(weight: torch.Tensor, rank: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0), r x in and out x r, with scale·B0·A0 the top-r part of `weight` (its float32 or float64 copy)."""
    u, s, vh = top_singular_triplets(weight, rank, seed)
    root = (s / scale).sqrt()
    return root[:, None] * vh, u * root[None, :]


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as it computes with it, in float32 (float64 for a float64 layer): dequantised for a
    bitsandbytes 4-bit layer."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, quant_state).float()
    return weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)


@torch.no_grad()
def subtract_from_base(layer: nn.Module, a0: torch.Tensor, b0: torch.Tensor, scale: float) -> None:
    """Replace the frozen base weight by the residual W − scale·B0·A0 (re-quantised like the layer, if 4-bit)."""
    weight, dense = layer.weight, dense_weight(layer)
    residual = dense - scale * (b0.to(dense) @ a0.to(dense))
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        weight.copy_(residual.to(weight.dtype))
        return
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(residual.to(quant_state.dtype), blocksize=quant_state.blocksize,
                                  compress_statistics=quant_state.nested, quant_type=quant_state.quant_type,
                                  quant_storage=weight.dtype)
    weight.data = packed.reshape(weight.data.shape)
    weight.quant_state = state


def check_svd_ranks(model: nn.Module, names: list[str], rank: int) -> None:
    """Every target layer must have `rank` singular triplets to split off; checked before any weight changes."""
    for name in names:
        layer = model.get_submodule(name)
        if rank > min(layer.in_features, layer.out_features):
            raise NolaError(f"adapter.rank: {rank} exceeds the smaller side of {name} ({layer.out_features}x"
                            f"{layer.in_features}), which init: svd cannot split into {rank} singular triplets")
