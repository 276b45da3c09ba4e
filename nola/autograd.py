"""Σᵢ cᵢ·basisᵢ as an autograd function that regenerates the basis in backward instead of saving it.

Autograd would otherwise keep every generated basis chunk alive until backward (num_basis × numel floats per
matrix, the memory NOLA exists to avoid). Here forward saves nothing but the seed and shape; backward regenerates
the same chunks and projects the incoming gradient onto them: ∂L/∂cᵢ = ⟨∂L/∂M, basisᵢ⟩. Exact, because the basis
is a pure function of its coordinates.
"""

from __future__ import annotations

import torch

from nola.basis import DEFAULT_CHUNK_BYTES, combine_basis, project_onto_basis


class _BasisCombination(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coefficients: torch.Tensor, seed: int, stream: int, numel: int, chunk_bytes: int):
        ctx.seed, ctx.stream, ctx.chunk_bytes = seed, stream, chunk_bytes
        ctx.num_basis = coefficients.numel()
        return combine_basis(coefficients, seed, stream, numel, chunk_bytes)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = None
        if ctx.needs_input_grad[0]:
            grad = project_onto_basis(grad_output.contiguous(), ctx.seed, ctx.stream, ctx.num_basis, ctx.chunk_bytes)
        return grad, None, None, None, None


def basis_combination(
    coefficients: torch.Tensor, seed: int, stream: int, numel: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> torch.Tensor:
    """Differentiable Σᵢ coefficients[i]·basis_i, flat (numel,), in the coefficients' dtype and device."""
    return _BasisCombination.apply(coefficients, seed, stream, numel, chunk_bytes)
