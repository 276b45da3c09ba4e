"""The two autograd functions of NOLA: the basis combination, and the reuse of matrices already materialised.

Both regenerate the basis in backward instead of saving it: autograd would otherwise keep every generated basis
value alive until backward (num_basis × numel floats per matrix, the memory NOLA exists to avoid). Backward projects
the incoming gradient onto the same regenerated basis: ∂L/∂cᵢ = ⟨∂L/∂M, basisᵢ⟩, exact because the basis is a pure
function of its coordinates.
"""

from __future__ import annotations

import torch

from nola.basis import DEFAULT_CHUNK_BYTES
from nola.fused import combine, project


class _BasisCombination(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coefficients: torch.Tensor, seed: int, stream: int, numel: int, chunk_bytes: int):
        ctx.seed, ctx.stream, ctx.chunk_bytes = seed, stream, chunk_bytes
        ctx.num_basis = coefficients.numel()
        return combine(coefficients, seed, stream, numel, chunk_bytes)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = None
        if ctx.needs_input_grad[0]:
            grad = project(grad_output, ctx.seed, ctx.stream, ctx.num_basis, ctx.chunk_bytes)
        return grad, None, None, None, None


def basis_combination(
    coefficients: torch.Tensor, seed: int, stream: int, numel: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> torch.Tensor:
    """Differentiable Σᵢ coefficients[i]·basis_i, flat (numel,), in the coefficients' dtype and device."""
    return _BasisCombination.apply(coefficients, seed, stream, numel, chunk_bytes)


class _ReusedCombination(torch.autograd.Function):
    """Forward hands back a combination computed earlier for these very coefficients; backward is the projection.

    This is what lets the forward basis pass run once per optimizer step while every micro-batch (and every
    gradient-checkpointing recompute) still gets its exact coefficient gradient when `backward()` returns.
    """

    @staticmethod
    def forward(ctx, coefficients: torch.Tensor, matrix: torch.Tensor, seed: int, stream: int, scale: float,
                chunk_bytes: int):
        ctx.seed, ctx.stream, ctx.scale, ctx.chunk_bytes = seed, stream, scale, chunk_bytes
        ctx.num_basis = coefficients.numel()
        return matrix.view_as(matrix)  # a new tensor object: the cached one must not take a grad_fn

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = project(grad_output, ctx.seed, ctx.stream, ctx.num_basis, ctx.chunk_bytes) * ctx.scale
        return grad, None, None, None, None, None


def reused_combination(
    coefficients: torch.Tensor, matrix: torch.Tensor, seed: int, stream: int, scale: float, chunk_bytes: int
) -> torch.Tensor:
    """`matrix` (= a constant + scale·Σᵢ coefficients[i]·basis_i, computed earlier from these very coefficients),
    differentiable in `coefficients`."""
    return _ReusedCombination.apply(coefficients, matrix, seed, stream, scale, chunk_bytes)
