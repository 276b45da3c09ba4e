"""A and B once per coefficient values: one forward basis pass per optimizer step whatever the micro-batches,
checkpoint recomputes and evals; and the deferred backward projection, exact against the per-micro-batch path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import nola
import nola.autograd
import nola.matrices
from nola import AdapterConfig, discard_deferred_gradients, project_deferred_gradients, set_deferred_projection
from nola.layers import AdaptedLinear
from nola.matrices import nola_matrices


def two_layer_model(dtype=torch.float64, **settings) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8)).to(dtype)
    config = AdapterConfig(**{"rank": 4, "alpha": 8.0, "num_basis": 20, **settings})
    model[0], model[2] = AdaptedLinear(model[0], config, seed=11), AdaptedLinear(model[2], config, seed=12)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for layer in (model[0], model[2]):
        for coefficients in layer.stored_tensors().values():
            coefficients.requires_grad_(True)
            with torch.no_grad():
                coefficients.normal_()
    return model


def coefficient_grads(model) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.requires_grad]


class BasisPasses:
    """Counts forward (combine) and backward (project) basis passes, by matrix."""

    def __init__(self, monkeypatch) -> None:
        self.combine = self.project = 0
        original_combine, original_project = nola.autograd.combine, nola.autograd.project

        def combine(*arguments):
            self.combine += 1
            return original_combine(*arguments)

        def project(*arguments):
            self.project += 1
            return original_project(*arguments)

        monkeypatch.setattr(nola.autograd, "combine", combine)
        monkeypatch.setattr(nola.autograd, "project", project)
        monkeypatch.setattr(nola.matrices, "project", project)


def test_one_forward_basis_pass_per_step_for_all_micro_batches_recomputes_and_evals(monkeypatch):
    model = two_layer_model()
    passes = BasisPasses(monkeypatch)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        for _ in range(4):  # micro-batches, each through a gradient-checkpointed forward
            x = torch.randn(3, 16, dtype=torch.float64)
            checkpoint(model, x, use_reentrant=False).pow(2).sum().backward()
        with torch.no_grad():
            model(torch.randn(2, 16, dtype=torch.float64))  # an eval between micro-batches reuses them too
        optimizer.step()
        optimizer.zero_grad()
        assert passes.combine == 4 * (step + 1)  # A and B of 2 layers, once per step
        assert passes.project == 16 * (step + 1)  # per micro-batch (the default): A and B of 2 layers x 4


@pytest.mark.parametrize("quant_bits", [None, 4])
def test_deferred_projection_equals_the_per_micro_batch_gradients(monkeypatch, quant_bits):
    per_micro_batch = two_layer_model(quant_bits=quant_bits)
    deferred = copy.deepcopy(per_micro_batch)
    assert set_deferred_projection(deferred, True) == 2
    batches = [torch.randn(5, 16, dtype=torch.float64) for _ in range(4)]
    for x in batches:
        per_micro_batch(x).pow(2).sum().backward()
    passes = BasisPasses(monkeypatch)
    for x in batches:
        checkpoint(deferred, x, use_reentrant=False).pow(2).sum().backward()
    assert passes.project == 0 and all(g is None for g in coefficient_grads(deferred))
    project_deferred_gradients(deferred)
    assert passes.project == 4  # once per matrix for the whole step
    for mine, reference in zip(coefficient_grads(deferred), coefficient_grads(per_micro_batch)):
        assert torch.allclose(mine, reference, rtol=1e-12, atol=1e-9 * reference.abs().max().item())
    project_deferred_gradients(deferred)  # nothing pending: a second call adds nothing
    for mine, reference in zip(coefficient_grads(deferred), coefficient_grads(per_micro_batch)):
        assert torch.allclose(mine, reference, rtol=1e-12, atol=1e-9 * reference.abs().max().item())


def test_deferred_gradients_must_be_projected_before_the_coefficients_change():
    model = two_layer_model()
    set_deferred_projection(model, True)
    model(torch.randn(2, 16, dtype=torch.float64)).sum().backward()
    with torch.no_grad():
        model[0].coefficients_a.add_(1.0)
    with pytest.raises(RuntimeError, match="project_deferred_gradients"):
        model(torch.randn(2, 16, dtype=torch.float64))
    discard_deferred_gradients(model)  # a skipped step: the pending gradients are dropped
    model(torch.randn(2, 16, dtype=torch.float64)).sum().backward()
    project_deferred_gradients(model)
    assert all(g is not None for g in coefficient_grads(model))


@pytest.mark.parametrize("change", ["in-place update", "load_state_dict"])
def test_the_cache_follows_every_change_of_the_coefficients(change):
    model = two_layer_model()
    x = torch.randn(3, 16, dtype=torch.float64)
    before = model(x)
    new_values = {name: value + 0.5 for name, value in model.state_dict().items() if "coefficients" in name}
    with torch.no_grad():
        if change == "in-place update":
            for name, parameter in model.named_parameters():
                if name in new_values:
                    parameter.copy_(new_values[name])
        else:
            model.load_state_dict(new_values, strict=False)
    after = model(x)
    layer = model[0]
    a, b = nola_matrices(layer.coefficients_a.detach(), layer.coefficients_b.detach(), layer.seed, layer.rank,
                         layer.in_features, layer.out_features, layer.chunk_bytes)
    assert torch.equal(layer.adapter_matrices()[0], a) and torch.equal(layer.adapter_matrices()[1], b)
    assert not torch.allclose(before, after)


def test_cached_matrices_stay_out_of_autograd_and_out_of_the_state_dict():
    model = two_layer_model()
    model(torch.randn(2, 16, dtype=torch.float64)).sum().backward()
    with torch.no_grad():
        a, b = model[0].adapter_matrices()
    assert a.grad_fn is None and b.grad_fn is None and not a.requires_grad
    assert all("coefficients" in name or "base_layer" in name for name in model.state_dict())


def adapted_llama(quant_bits=None):
    from tests.conftest import tiny_llama

    return nola.attach(tiny_llama(torch.float64), AdapterConfig(rank=2, num_basis=16, quant_bits=quant_bits))


def training_gradients(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


IDS = torch.tensor([[1, 4, 9, 16, 25, 36, 49, 64]])


@pytest.mark.parametrize("quant_bits", [None, 4])
def test_an_inference_mode_forward_does_not_poison_the_cache_for_training(monkeypatch, quant_bits):
    """A forward under torch.inference_mode() fills the cache with inference tensors, through which autograd cannot
    record; the next training forward must treat them as a miss, and give the gradients of a model that never ran
    one."""
    reference = training_gradients(adapted_llama(quant_bits), IDS)
    model = adapted_llama(quant_bits)
    with torch.inference_mode():
        inference_logits = model(IDS).logits
    gradients = training_gradients(model, IDS)
    assert gradients.keys() == reference.keys()
    for name, gradient in gradients.items():
        assert torch.equal(gradient, reference[name]), name
    passes = BasisPasses(monkeypatch)
    with torch.inference_mode():  # and back: the cache refilled in normal mode serves inference mode as it is
        assert torch.allclose(model(IDS).logits, inference_logits, rtol=0, atol=1e-12)
    assert passes.combine == 0


@pytest.mark.parametrize("quant_bits", [None, 4])
def test_a_cache_filled_in_training_serves_inference_mode_and_training_again(monkeypatch, quant_bits):
    model = adapted_llama(quant_bits)
    reference = training_gradients(model, IDS)
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits
    passes = BasisPasses(monkeypatch)
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, expected)
    assert passes.combine == 0  # a hit: tensors made in normal mode are fine inside inference mode
    for name, gradient in training_gradients(model, IDS).items():
        assert torch.equal(gradient, reference[name]), name
