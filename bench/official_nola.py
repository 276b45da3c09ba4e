"""NOLA as the official research code computes it, re-implemented for the benchmark (the baseline we must beat).

What the algorithm does (UCDvision/NOLA, llama/qlora/peft/tuners/lora.py, `GenerateParams` + `NOLALinear`), which
this module reproduces step for step in our own code:
- each of LoRA's A (r × in) and B (out × r) is a frozen matrix (A: kaiming-uniform, B: zeros) plus
  Σᵢ cᵢ·Wᵢ/√k, with k trainable coefficients per matrix;
- forward seeds the *global* torch generator with the module's seed, draws the whole basis W (k × rows × cols,
  uniform in [-1, 1)) at once, contracts it with an einsum, then reseeds the global generator from a random draw;
- backward does the same draw again and contracts the incoming gradient with the whole basis.
So every forward and backward materialises k × rows × cols floats from torch.rand and never fuses anything.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _GenerateParams(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coefficients: torch.Tensor, rows: int, cols: int, seed: int) -> torch.Tensor:
        ctx.rows, ctx.cols, ctx.seed = rows, cols, seed
        ctx.save_for_backward(coefficients)
        basis = _draw_basis(coefficients, rows, cols, seed)
        return torch.einsum("b,boi->oi", coefficients, basis)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (coefficients,) = ctx.saved_tensors
        basis = _draw_basis(coefficients, ctx.rows, ctx.cols, ctx.seed)
        flat = basis.permute(1, 2, 0).reshape(-1, coefficients.numel())
        return torch.einsum("d,dl->l", grad_output.flatten().to(flat.dtype), flat), None, None, None


def _draw_basis(coefficients: torch.Tensor, rows: int, cols: int, seed: int) -> torch.Tensor:
    """The whole basis from the global generator, which is then reseeded from a random draw (as the original)."""
    reseed = int(torch.randint(int(1e10), (1,)))
    torch.manual_seed(seed)
    basis = torch.zeros(coefficients.numel(), rows, cols, device=coefficients.device, dtype=coefficients.dtype)
    nn.init.uniform_(basis, a=-1.0, b=1.0)
    basis = basis * (1.0 / math.sqrt(coefficients.numel()))
    torch.manual_seed(reseed)
    return basis


class OfficialNolaLinear(nn.Module):
    """A frozen base Linear plus the official NOLA update: base(x) + scale · (x Aᵀ) Bᵀ."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, num_basis: int, seed: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.scale, self.seed = rank, alpha / rank, seed
        in_features, out_features = base_layer.in_features, base_layer.out_features
        frozen_a = torch.empty(rank, in_features)
        nn.init.kaiming_uniform_(frozen_a, a=math.sqrt(5))
        self.register_buffer("frozen_a", frozen_a)
        self.register_buffer("frozen_b", torch.zeros(out_features, rank))
        self.coefficients_a = nn.Parameter(torch.zeros(num_basis))
        self.coefficients_b = nn.Parameter(torch.zeros(num_basis))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        a = self.frozen_a + _GenerateParams.apply(self.coefficients_a, *self.frozen_a.shape, self.seed)
        b = self.frozen_b + _GenerateParams.apply(self.coefficients_b, *self.frozen_b.shape, self.seed + 1)
        update = (x.to(a.dtype) @ a.t()) @ b.t() * self.scale
        return result + update.to(result.dtype)


def attach_official(model: nn.Module, rank: int, alpha: float, num_basis: int, targets: tuple[str, ...]) -> int:
    """Replace every Linear whose name ends in one of `targets` (the official code's matching); returns the count."""
    names = [name for name, module in model.named_modules() if name.split(".")[-1] in targets]
    for index, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        adapted = OfficialNolaLinear(base, rank, alpha, num_basis, seed=1000 + 2 * index)
        setattr(parent, child, adapted.to(base.weight.device))
    return len(names)
