"""Basis generation fused with its contraction: Σᵢ cᵢ·Uᵢ and ⟨G, Uᵢ⟩ without ever writing the basis to memory.

The eager path in basis.py generates a chunk of rows into a buffer, then contracts it: about fifteen passes over
memory per basis value. Here the same generator (`_fill_unit_uniform`, the very function the eager path runs) is
traced by torch.compile inside the contraction; inductor fuses hash, conversion and multiply-add into one reduction
loop, so each basis value lives in a register for a few instructions and is gone. On this class of 2-core CPU that
is ~10x the eager throughput, on CUDA a single kernel. Shapes are compiled dynamic: one kernel per device and dtype
serves every module shape and basis size.

Backend choice (`NOLA_BASIS_BACKEND`): `auto` (default) compiles where torch.compile works and falls back to eager
with one warning where it does not (no C++ compiler, an unsupported device); `compiled` makes a failure an error;
`eager` never compiles. Both backends produce the same basis values bit for bit (tested with one-hot
coefficients); contractions agree to float rounding, since the summation order differs.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from nola.basis import _fill_unit_uniform, basis_keys, combine_basis, project_onto_basis
from nola.errors import NolaError

BACKENDS = ("auto", "compiled", "eager")
_PROJECT_PARTS = 16
_compiled: dict[str, object] = {}
_failed_devices: set[str] = set()


def _unit_basis(keys: torch.Tensor, numel: int) -> torch.Tensor:
    """The (count × numel) basis values for `keys`: under torch.compile, a fused expression, never a buffer."""
    count = keys.shape[0]
    out = torch.empty(count, numel, dtype=torch.float32, device=keys.device)
    scratch = torch.empty(count, numel, dtype=torch.int32, device=keys.device)
    return _fill_unit_uniform(keys, numel, out, scratch)


def _combine_kernel(coefficients: torch.Tensor, keys: torch.Tensor, numel: int) -> torch.Tensor:
    return (coefficients.unsqueeze(1) * _unit_basis(keys, numel)).sum(0)


def _project_kernel(padded_gradient: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Each row's sum split into 16 partial sums: measured 1.7x the throughput of one long reduction on 2 CPU cores
    (inductor vectorises and parallelises it better), and a more accurate sum. The caller pads the gradient with
    zeros to a multiple of 16 (padding inside the compiled graph measured slower): the basis then runs past the
    true length, but its values there meet zeros and add exactly nothing."""
    parts = padded_gradient.view(1, _PROJECT_PARTS, -1)
    basis = _unit_basis(keys, padded_gradient.numel()).view(keys.shape[0], _PROJECT_PARTS, -1)
    return (basis * parts).sum(2).sum(1)


def requested_backend() -> str:
    """The backend asked for in NOLA_BASIS_BACKEND (default auto); anything else is a one-line error."""
    backend = os.environ.get("NOLA_BASIS_BACKEND", "auto")
    if backend not in BACKENDS:
        raise NolaError(f"NOLA_BASIS_BACKEND={backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend


def _kernel(name: str):
    if name not in _compiled:
        function = {"combine": _combine_kernel, "project": _project_kernel}[name]
        _compiled[name] = torch.compile(function, dynamic=True)
    return _compiled[name]


def _run_compiled(name: str, device: torch.device, *arguments) -> torch.Tensor | None:
    """The compiled kernel's result, or None where this device cannot compile (auto falls back to eager)."""
    backend = requested_backend()
    if backend == "eager" or device.type in _failed_devices:
        return None
    try:
        with torch.no_grad():  # one guard state wherever it is called from: forward, backward, eval, the optimizer step
            return _kernel(name)(*arguments)
    except Exception as error:  # inductor reports a missing compiler or an unsupported device in many types
        if backend == "compiled":
            raise
        _failed_devices.add(device.type)
        warnings.warn(f"nola: torch.compile of the basis kernels failed on {device.type} ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); using the eager basis path", stacklevel=3)
        return None


@functools.lru_cache(maxsize=16384)
def _keys(seed: int, stream: int, num_basis: int, device: torch.device) -> torch.Tensor:
    """A matrix's basis keys, computed once: ~30 tiny tensor ops that cost more than a small fused kernel."""
    return basis_keys(seed, stream, torch.arange(num_basis, device=device))


def combine(coefficients: torch.Tensor, seed: int, stream: int, numel: int, chunk_bytes: int) -> torch.Tensor:
    """Σᵢ coefficients[i]·basisᵢ, flat (numel,), in the coefficients' dtype and device."""
    keys = _keys(seed, stream, coefficients.numel(), coefficients.device)
    result = _run_compiled("combine", coefficients.device, coefficients, keys, numel)
    if result is None:
        return combine_basis(coefficients, seed, stream, numel, chunk_bytes)
    return result.to(coefficients.dtype)  # float32 basis x bf16 coefficients promotes: keep the caller's dtype


def project(gradient: torch.Tensor, seed: int, stream: int, num_basis: int, chunk_bytes: int) -> torch.Tensor:
    """⟨gradient, basisᵢ⟩ for i < num_basis: the transpose of `combine`, in the gradient's dtype."""
    flat = gradient.reshape(-1)
    keys = _keys(seed, stream, num_basis, flat.device)
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % _PROJECT_PARTS))
    result = _run_compiled("project", flat.device, padded, keys)
    if result is None:
        return project_onto_basis(flat, seed, stream, num_basis, chunk_bytes)
    return result.to(flat.dtype)
