"""The adapted Linear: exact gradients, identity at init, materialised matrices, 4-bit bases, quantised coefficients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from nola import AdapterConfig
from nola.autograd import basis_combination
from nola.basis import STREAM_A
from nola.layers import AdaptedLinear
from nola.quant import fake_quantize, pack_codes, unpack_codes


def adapted(in_features=12, out_features=10, dtype=torch.float64, **settings) -> AdaptedLinear:
    base = nn.Linear(in_features, out_features, dtype=dtype)
    config = AdapterConfig(**{"rank": 3, "alpha": 6.0, "num_basis": 7, **settings})
    return AdaptedLinear(base, config, seed=1234)


def test_gradcheck_of_the_basis_combination():
    coefficients = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: basis_combination(c, 5, STREAM_A, 23, 8 * 23 * 2), (coefficients,))


@pytest.mark.parametrize("num_basis_b", [None, 4])
def test_gradcheck_of_the_adapter_function_in_alpha_beta_and_x(num_basis_b):
    layer = adapted(num_basis_b=num_basis_b)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    alphas = torch.randn_like(layer.coefficients_a, requires_grad=True)
    betas = torch.randn_like(layer.coefficients_b, requires_grad=True)

    def adapter_function(x, alphas, betas):
        return functional_call(layer, {"coefficients_a": alphas, "coefficients_b": betas}, (x,))

    assert torch.autograd.gradcheck(adapter_function, (x, alphas, betas))


def test_adapted_layer_equals_base_at_initialisation_and_has_no_stored_basis():
    layer = adapted(dtype=torch.float32)
    x = torch.randn(4, 12)
    assert torch.equal(layer(x), layer.base_layer(x))
    names = {name for name, _ in layer.named_parameters()} | {name for name, _ in layer.named_buffers()}
    assert names == {"coefficients_a", "coefficients_b", "base_layer.weight", "base_layer.bias"}


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 0.0), (torch.float32, 1e-5)])
def test_materialised_matrices_reproduce_the_layer_in_a_plain_lora_forward(dtype, tolerance):
    layer = adapted(dtype=dtype)
    with torch.no_grad():
        layer.coefficients_a.copy_(torch.randn(7, dtype=dtype))
        layer.coefficients_b.copy_(torch.randn(7, dtype=dtype))
        a, b = (t.detach() for t in layer.adapter_matrices())
        assert a.shape == (3, 12) and b.shape == (10, 3)
        x = torch.randn(6, 12, dtype=dtype)
        plain_lora = layer.base_layer(x) + (x @ a.t()) @ b.t() * (6.0 / 3)
        difference = (layer(x) - plain_lora).abs().max().item()
    assert difference <= tolerance


def test_a_training_step_trains_only_coefficients_and_leaves_the_global_rng_alone():
    layer = adapted(dtype=torch.float32)
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    for parameter in layer.base_layer.parameters():
        parameter.requires_grad_(False)
    x = torch.randn(8, 12)
    target = torch.randn(8, 10)
    rng_before = torch.get_rng_state()
    for _ in range(2):
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        assert layer.coefficients_a.grad is not None and layer.coefficients_b.grad is not None
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert layer.coefficients_a.abs().sum() > 0 and layer.coefficients_b.abs().sum() > 0


def test_lora_method_is_the_plain_baseline_with_the_same_a0():
    nola_layer = adapted(dtype=torch.float32)
    lora_layer = adapted(dtype=torch.float32, method="lora")
    assert {n for n, p in lora_layer.named_parameters() if "base_layer" not in n} == {"lora_a", "lora_b"}
    assert torch.equal(lora_layer.lora_a.detach(), nola_layer.adapter_matrices()[0].detach())
    assert lora_layer.lora_a.shape == (3, 12) and lora_layer.lora_b.abs().sum() == 0


def test_four_bit_base_layer_trains_coefficients():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    float_base = nn.Linear(64, 32, bias=False)
    quantised = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    quantised.load_state_dict(float_base.state_dict())
    quantised = quantised.to("cpu")  # quantises the weights
    layer = AdaptedLinear(quantised, AdapterConfig(rank=4, num_basis=16), seed=9)
    assert layer.coefficients_a.dtype == torch.float32
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), quantised(x))
    layer(x).pow(2).sum().backward()
    assert layer.coefficients_b.grad.abs().sum() > 0


def test_coefficients_and_their_optimizer_state_stay_float32_on_a_bf16_base():
    """bf16 has 8 mantissa bits: an update below 2^-8 of a coefficient would round away. Coefficients, their
    gradients and AdamW's moments are float32 whatever the base, while A and B meet bf16 activations in bf16."""
    layer = AdaptedLinear(nn.Linear(64, 32, dtype=torch.bfloat16), AdapterConfig(rank=4, num_basis=16), seed=9)
    for parameter in layer.base_layer.parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.AdamW([layer.coefficients_a, layer.coefficients_b], lr=1e-6)
    with torch.no_grad():
        layer.coefficients_a.fill_(1.0)
        layer.coefficients_b.fill_(1.0)
    before = layer.coefficients_a.detach().clone()
    output = layer(torch.randn(3, 64, dtype=torch.bfloat16))
    assert output.dtype == torch.bfloat16
    output.float().pow(2).sum().backward()
    optimizer.step()
    assert layer.coefficients_a.grad.dtype == torch.float32
    assert all(state.dtype == torch.float32 for group in optimizer.state.values() for state in group.values()
               if state.dim() > 0)
    change = (layer.coefficients_a.detach() - before).abs()
    assert 0 < change.min() and change.max() < 2e-6  # updates of ~lr, which bf16 (spacing 2^-7 at 1) would lose


@pytest.mark.parametrize("bits", [3, 4])
def test_quantised_coefficients_use_straight_through_gradients_and_pack_exactly(bits):
    values = torch.randn(1000, requires_grad=True)
    quantised = fake_quantize(values, bits)
    assert quantised.detach().unique().numel() <= 2**bits
    assert (quantised - values).abs().max() <= (values.max() - values.min()) / (2**bits - 1) / 2 + 1e-6
    quantised.sum().backward()
    assert torch.equal(values.grad, torch.ones(1000))
    packed, grid = pack_codes(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (1000 * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, grid, 1000, bits), quantised.detach())


def test_constant_coefficients_quantise_to_themselves():
    zeros = torch.zeros(10)
    assert torch.equal(fake_quantize(zeros, 4), zeros)
    packed, grid = pack_codes(zeros, 3)
    assert torch.equal(unpack_codes(packed, grid, 10, 3), zeros)
