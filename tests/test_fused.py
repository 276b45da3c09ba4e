"""The fused (torch.compile) basis kernels: the same basis values as the eager generator, bit for bit, the same
contractions up to float rounding, and a fallback to eager that announces itself."""

from __future__ import annotations

import pytest
import torch

from nola import NolaError, fused
from nola.basis import STREAM_A, STREAM_B, combine_basis, generate_basis, project_onto_basis

SHAPES = [(7, 23), (128, 4096), (33, 11008 + 5)]  # odd sizes: k not a power of two, numel not a multiple of 16


@pytest.fixture
def compiled(monkeypatch):
    """The compiled backend, strictly (no fallback). Without a working torch.compile (no C++ compiler) there is
    nothing to compare: skip, naming why."""
    monkeypatch.setenv("NOLA_BASIS_BACKEND", "compiled")
    try:
        fused.combine(torch.ones(2), 1, STREAM_A, 16, 1 << 20)
    except Exception as error:  # inductor signals a missing toolchain with many exception types
        pytest.skip(f"torch.compile does not work here ({type(error).__name__}: {str(error)[:200]})")


@pytest.mark.parametrize("num_basis, numel", SHAPES)
def test_compiled_kernels_see_exactly_the_eager_basis_values(compiled, num_basis, numel):
    """A one-hot coefficient vector makes the fused combination return one basis row, and a one-hot gradient makes
    the fused projection return one basis column: both must equal the eager generator's values bit for bit."""
    basis = generate_basis(11, STREAM_B, 0, num_basis, numel)
    for row in (0, num_basis // 2, num_basis - 1):
        one_hot = torch.zeros(num_basis)
        one_hot[row] = 1.0
        assert torch.equal(fused.combine(one_hot, 11, STREAM_B, numel, 1 << 20), basis[row])
    for column in (0, numel // 3, numel - 1):
        one_hot = torch.zeros(numel)
        one_hot[column] = 1.0
        assert torch.equal(fused.project(one_hot, 11, STREAM_B, num_basis, 1 << 20), basis[:, column])


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("num_basis, numel", SHAPES)
def test_compiled_and_eager_contractions_agree(compiled, dtype, tolerance, num_basis, numel):
    coefficients = torch.randn(num_basis, dtype=dtype)
    gradient = torch.randn(numel, dtype=dtype)
    dense = generate_basis(5, STREAM_A, 0, num_basis, numel).to(dtype)
    for result, eager, exact in [
        (fused.combine(coefficients, 5, STREAM_A, numel, 1 << 20), combine_basis(coefficients, 5, STREAM_A, numel),
         coefficients @ dense),
        (fused.project(gradient, 5, STREAM_A, num_basis, 1 << 20), project_onto_basis(gradient, 5, STREAM_A, num_basis),
         dense @ gradient),
    ]:
        assert result.dtype == dtype
        scale = exact.abs().max().item()
        assert (result - exact).abs().max().item() <= tolerance * scale
        assert (eager - exact).abs().max().item() <= tolerance * scale


def test_auto_falls_back_to_eager_with_a_warning_and_compiled_does_not(monkeypatch):
    def broken(name):
        def kernel(*arguments):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return kernel

    monkeypatch.setattr(fused, "_kernel", broken)
    monkeypatch.setattr(fused, "_failed_devices", set())
    coefficients = torch.randn(9)
    monkeypatch.setenv("NOLA_BASIS_BACKEND", "compiled")
    with pytest.raises(RuntimeError, match="InvalidCxxCompiler"):
        fused.combine(coefficients, 3, STREAM_A, 50, 1 << 20)
    monkeypatch.setenv("NOLA_BASIS_BACKEND", "auto")
    with pytest.warns(UserWarning, match="using the eager basis path"):
        result = fused.combine(coefficients, 3, STREAM_A, 50, 1 << 20)
    assert torch.equal(result, combine_basis(coefficients, 3, STREAM_A, 50, 1 << 20))
    assert fused._failed_devices == {"cpu"}  # later calls go straight to eager, without another warning


def test_an_unknown_backend_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("NOLA_BASIS_BACKEND", "triton")
    with pytest.raises(NolaError, match=r"^NOLA_BASIS_BACKEND='triton': expected one of auto, compiled, eager$"):
        fused.combine(torch.ones(3), 1, STREAM_A, 10, 1 << 20)
