"""3- and 4-bit coefficients, as in the NOLA paper: uniform quantisation trained with a straight-through estimator.

Each coefficient vector is quantised on its own [min, max] range to 2^bits levels. Training sees the quantised
values in the forward pass while the gradient flows to the full-precision coefficients unchanged (straight-through),
so the model learns to live with the rounding. Storage keeps only the codes, packed bit by bit, and the range.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (3, 4)


def _quantization_grid(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, low, step) such that low + codes·step is the nearest grid value to each entry."""
    levels = 2**bits - 1
    low, high = values.min(), values.max()
    step = (high - low) / levels
    step = torch.where(step > 0, step, torch.ones_like(step))  # a constant vector is exact at code 0
    codes = torch.round((values - low) / step).clamp_(0, levels)
    return codes, low, step


class _StraightThroughQuantize(torch.autograd.Function):
    """Forward returns the grid values exactly (they must equal what a saved adapter reloads); backward is identity.

    The common idiom `values + (rounded - values).detach()` is off the grid by a rounding error, which would make
    training and the saved adapter disagree.
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, bits: int) -> torch.Tensor:
        codes, low, step = _quantization_grid(values, bits)
        return low + codes * step

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def fake_quantize(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Forward: the quantised values; backward: identity (straight-through estimator)."""
    return _StraightThroughQuantize.apply(values, bits)


def pack_codes(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a coefficient vector and return (packed uint8 bit stream, float32 [low, step])."""
    codes, low, step = _quantization_grid(values.detach().float().cpu(), bits)
    shifts = torch.arange(bits, dtype=torch.int64)
    code_bits = (codes.to(torch.int64).unsqueeze(1) >> shifts) & 1  # (n, bits), least significant first
    stream = code_bits.reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    packed = (stream.reshape(-1, 8) << torch.arange(8, dtype=torch.int64)).sum(dim=1).to(torch.uint8)
    return packed, torch.stack([low, step]).to(torch.float32)


def unpack_codes(packed: torch.Tensor, grid: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: float32 coefficient values low + code·step, `count` of them."""
    stream = (packed.to(torch.int64).unsqueeze(1) >> torch.arange(8, dtype=torch.int64)) & 1
    code_bits = stream.reshape(-1)[: count * bits].reshape(count, bits)
    codes = (code_bits << torch.arange(bits, dtype=torch.int64)).sum(dim=1)
    low, step = grid.to(torch.float32)
    return low + codes.to(torch.float32) * step


def code_bytes(count: int, bits: int) -> int:
    """Bytes of the packed bit stream holding `count` codes of `bits` bits."""
    return (count * bits + 7) // 8


def packed_bytes(count: int, bits: int) -> int:
    """Bytes a packed vector of `count` codes occupies on disk, its float32 [low, step] grid included."""
    return code_bytes(count, bits) + 8


def pack_vectors(vectors: list[torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """Several coefficient vectors as two tensors: their byte-aligned packed codes end to end, and one [low, step]
    row per vector. Two tensors instead of two per vector keep the safetensors header from outweighing the codes."""
    packed = [pack_codes(vector, bits) for vector in vectors]
    return {"codes": torch.cat([codes for codes, _ in packed]), "grids": torch.stack([grid for _, grid in packed])}


def unpack_vectors(codes: torch.Tensor, grids: torch.Tensor, counts: list[int], bits: int) -> list[torch.Tensor]:
    """Inverse of `pack_vectors`, given each vector's length."""
    vectors, offset = [], 0
    for count, grid in zip(counts, grids):
        size = code_bytes(count, bits)
        vectors.append(unpack_codes(codes[offset : offset + size], grid, count, bits))
        offset += size
    return vectors
