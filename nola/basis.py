"""The counter-based random basis: every value is a pure function of (seed, stream, basis index, element index).

Why not `torch.rand` under a seed, as the official NOLA code does: the global generator is shared state (seeding it
changes dropout, data order and everything else), its values differ between CPU and CUDA, and a generator stream
can only be produced in order, so it cannot be regenerated piecewise. A hash of the element's coordinates has none of
these problems: any chunk of any basis can be regenerated on any device, in any order, in any process, bit for bit.

The hash is Chris Wellons' "lowbias32" (two rounds of multiply and xorshift) written in int32 torch ops, which wrap
on overflow on every torch backend. Its input is the element index XOR a per-basis key; keys are themselves hashed
from the seed, a stream tag (A0, A basis, B basis) and the basis index, so distinct bases never share a key. The top
24 bits become a float in [-1, 1) exactly representable in float32 (and so in any wider dtype): the basis is
bit-identical whatever dtype the coefficients use. Scaling (1/sqrt(num_basis), or the kaiming bound for A0) is
applied by callers, never baked into the values.

`GENERATOR_VERSION` names this exact function. Changing a constant or an operation changes every basis and so
silently invalidates every saved adapter: tests pin golden checksums, and adapter files record the version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

GENERATOR_VERSION = "lowbias32-xor-v1"

# Stream tags keep the frozen A0, the A basis and the B basis of one module independent of each other, and of
# VeRA's shared frozen projections (method vera: seeded by the run seed, not a module's).
STREAM_A0 = 0x0A0A0A0A
STREAM_A = 0x1B1B1B1B
STREAM_B = 0x2C2C2C2C
STREAM_VERA_A = 0x3D3D3D3D
STREAM_VERA_B = 0x4E4E4E4E

_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)  # the same 32-bit pattern, as a signed int32
_TO_UNIT = 2.0**-23  # 24-bit integer -> [0, 2) step, then shifted to [-1, 1)
# 8 MiB keeps the ~12 elementwise passes of a chunk in cache: measured 3.6x faster than 64 MiB on 2 cores.
DEFAULT_CHUNK_BYTES = 8 * 2**20


def _to_int32(value: int) -> int:
    """Reinterpret the low 32 bits of a Python int as a signed int32 (what torch stores)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _logical_shift_xor_(x: torch.Tensor, shift: int, scratch: torch.Tensor) -> None:
    """x ^= x >>> shift, in place. torch's >> is arithmetic on int32, so the sign bits are masked off."""
    torch.bitwise_right_shift(x, shift, out=scratch)
    scratch.bitwise_and_((1 << (32 - shift)) - 1)
    x.bitwise_xor_(scratch)


def _lowbias32_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """The lowbias32 hash applied in place to an int32 tensor; `scratch` is a same-shaped int32 work buffer."""
    _logical_shift_xor_(x, 16, scratch)
    x.mul_(_MUL1)
    _logical_shift_xor_(x, 15, scratch)
    x.mul_(_MUL2)
    _logical_shift_xor_(x, 16, scratch)
    return x


def basis_keys(seed: int, stream: int, basis_indices: torch.Tensor) -> torch.Tensor:
    """Per-basis int32 keys: hash(hash(basis index) XOR hash(seed XOR stream)).

    Both hashes are bijections of 32-bit words, so different basis indices of one (seed, stream) always get
    different keys.
    """
    seed_word = torch.tensor([_to_int32(seed ^ stream)], dtype=torch.int32, device=basis_indices.device)
    seed_key = _lowbias32_(seed_word, torch.empty_like(seed_word))
    keys = basis_indices.to(torch.int32).clone()
    _lowbias32_(keys, torch.empty_like(keys))
    keys.bitwise_xor_(seed_key)
    return _lowbias32_(keys, torch.empty_like(keys))


def _fill_codes(keys: torch.Tensor, numel: int, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Write the 24-bit codes of the basis rows for `keys` (count,) into `out` (count, numel) as float32 integers
    in [0, 2^24) (exact), using `scratch` as int32 work space. The basis value is code·2^-23 - 1.

    `out` and `scratch` each hold count * numel 4-byte words: those two buffers are the whole working memory.
    """
    hashed = scratch
    spare = out.view(torch.int32)
    elements = torch.arange(numel, dtype=torch.int32, device=keys.device)
    torch.bitwise_xor(elements.unsqueeze(0), keys.unsqueeze(1), out=hashed)
    _lowbias32_(hashed, spare)
    hashed.bitwise_right_shift_(8)
    hashed.bitwise_and_(0xFFFFFF)
    return out.copy_(hashed)


def _fill_unit_uniform(keys: torch.Tensor, numel: int, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """The basis values themselves (see `_fill_codes` for the buffers): uniform in [-1, 1), float32."""
    return _fill_codes(keys, numel, out, scratch).mul_(_TO_UNIT).sub_(1.0)


def generate_basis(
    seed: int, stream: int, start: int, count: int, numel: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Basis rows start .. start+count-1 of (seed, stream), each `numel` values uniform in [-1, 1), float32.

    Row i, element e is the same number whatever `start`/`count` chunking produced it and on whatever device.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    keys = basis_keys(seed, stream, torch.arange(start, start + count, device=device))
    out = torch.empty(count, numel, dtype=torch.float32, device=device)
    scratch = torch.empty(count, numel, dtype=torch.int32, device=device)
    return _fill_unit_uniform(keys, numel, out, scratch)


def basis_rows_per_chunk(numel: int, dtype: torch.dtype, chunk_bytes: int) -> int:
    """How many basis rows fit in `chunk_bytes` of working memory (at least one).

    A chunk costs two 4-byte words per element (the float32 rows and the int32 hash scratch), plus a converted
    copy when the coefficients are wider than float32.
    """
    bytes_per_row = 8 * numel
    if dtype != torch.float32:
        bytes_per_row += torch.finfo(dtype).bits // 8 * numel
    return max(1, chunk_bytes // bytes_per_row)


def _iter_chunks(
    seed: int, stream: int, num_basis: int, numel: int, dtype: torch.dtype, device: torch.device, chunk_bytes: int,
    fill: Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor], torch.Tensor],
) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, rows) chunk after chunk, rows written by `fill` (values or codes) into two reused work buffers."""
    rows_per_chunk = min(num_basis, basis_rows_per_chunk(numel, dtype, chunk_bytes))
    out = torch.empty(rows_per_chunk, numel, dtype=torch.float32, device=device)
    scratch = torch.empty(rows_per_chunk, numel, dtype=torch.int32, device=device)
    for start in range(0, num_basis, rows_per_chunk):
        count = min(rows_per_chunk, num_basis - start)
        keys = basis_keys(seed, stream, torch.arange(start, start + count, device=device))
        rows = fill(keys, numel, out[:count], scratch[:count])
        yield start, rows if dtype == torch.float32 else rows.to(dtype)


def iter_basis_chunks(
    seed: int,
    stream: int,
    num_basis: int,
    numel: int,
    dtype: torch.dtype,
    device: torch.device,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
):
    """Yield (start, rows) over all `num_basis` rows, `rows` in `dtype`, never holding more than `chunk_bytes`.

    The two work buffers are allocated once and reused for every chunk, so peak memory stays at one chunk; a
    yielded `rows` tensor is therefore only valid until the next iteration.
    """
    yield from _iter_chunks(seed, stream, num_basis, numel, dtype, device, chunk_bytes, _fill_unit_uniform)


def combine_basis(
    coefficients: torch.Tensor, seed: int, stream: int, numel: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> torch.Tensor:
    """Σᵢ coefficients[i] · basis_i as a flat (numel,) tensor in the coefficients' dtype and device.

    The eager path: chunks of codes contracted with coefficients·2^-23, minus Σ coefficients once at the end (the
    value map code·2^-23 - 1 folded into the contraction saves two passes over every chunk).
    """
    scaled = coefficients * _TO_UNIT
    result = torch.zeros(numel, dtype=coefficients.dtype, device=coefficients.device)
    for start, codes in _iter_chunks(seed, stream, coefficients.numel(), numel, coefficients.dtype,
                                     coefficients.device, chunk_bytes, _fill_codes):
        result.addmv_(codes.t(), scaled[start : start + codes.shape[0]])
    return result.sub_(coefficients.sum())


def project_onto_basis(
    gradient: torch.Tensor, seed: int, stream: int, num_basis: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> torch.Tensor:
    """⟨gradient, basis_i⟩ for every basis row i: the transpose of `combine_basis`, used by its backward."""
    flat = gradient.reshape(-1)
    result = torch.empty(num_basis, dtype=flat.dtype, device=flat.device)
    for start, codes in _iter_chunks(seed, stream, num_basis, flat.numel(), flat.dtype, flat.device, chunk_bytes,
                                     _fill_codes):
        torch.mv(codes, flat, out=result[start : start + codes.shape[0]])
    return result.mul_(_TO_UNIT).sub_(flat.sum())


def reference_value(seed: int, stream: int, basis_index: int, element_index: int) -> float:
    """The generator in plain Python integers: the specification the torch code must match bit for bit."""

    def lowbias32(x: int) -> int:
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * _MUL1) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * (_MUL2 & 0xFFFFFFFF)) & 0xFFFFFFFF
        x ^= x >> 16
        return x

    key = lowbias32(lowbias32(basis_index) ^ lowbias32(seed ^ stream))
    word = lowbias32(element_index ^ key)
    return (word >> 8) * _TO_UNIT - 1.0
