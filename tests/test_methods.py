"""The methods behind one interface (nola/methods/): each keeps its promise to the code around it, and no other
module of nola/ branches on a method's name."""

from __future__ import annotations

import ast

import pytest
import torch
from torch import nn

from nola import AdapterConfig
from nola.layers import AdaptedLinear
from nola.methods import METHODS, AdapterMethod, method_for
from tests.conftest import REPO_ROOT

VARIANTS = {
    "nola": dict(method="nola", num_basis=9, num_basis_b=5),
    "nola-4bit": dict(method="nola", num_basis=9, quant_bits=4),
    "lora": dict(method="lora"),
    "lora-fa": dict(method="lora", freeze_a=True),
    "lora-svd": dict(method="lora", init="svd"),
    "vera": dict(method="vera"),
}
# The only modules of nola/ that may name a method: the registry (with the methods' own modules) and the config.
MAY_NAME_METHODS = ("nola/methods/", "nola/adapter_config.py")
NAMES = set(METHODS) | {"svd", "random"}


def layer_for(variant: str) -> tuple[AdaptedLinear, AdapterConfig]:
    config = AdapterConfig(rank=3, alpha=6.0, seed=5, **VARIANTS[variant])
    base = nn.Linear(12, 10)
    factors = method_for(config.method).initial_factors("layer", base, config, 77, None)
    layer = AdaptedLinear(base, config, seed=77, factors=factors)
    with torch.no_grad():
        for tensor in layer.stored_tensors().values():
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(tensor.numel())))
    return layer, config


def test_the_registry_holds_every_method_by_its_name():
    assert list(METHODS) == ["nola", "lora", "vera"]
    assert all(isinstance(m, AdapterMethod) and m.name == name for name, m in METHODS.items())
    assert [name for name, m in METHODS.items() if m.quantizable] == ["nola"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_stored_shapes_describe_what_the_layer_stores(variant):
    layer, config = layer_for(variant)
    stored = {name: tuple(t.shape) for name, t in layer.stored_tensors().items()}
    assert stored == layer.method.stored_shapes(config, 10, 12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_matrices_from_stored_values_are_the_layers_matrices_bit_for_bit(variant):
    """What merge and export rebuild without a model is exactly what the layer computes with."""
    layer, config = layer_for(variant)
    values = {name: t.detach().clone() for name, t in layer.stored_tensors().items()}
    if config.quant_bits:  # a file holds the coefficients as quantised: as the forward uses them
        from nola.quant import fake_quantize

        values = {name: fake_quantize(v, config.quant_bits) for name, v in values.items()}
    with torch.no_grad():
        expected = layer.adapter_matrices()
    rebuilt = layer.method.matrices_from_values(config, values, 77, 10, 12, layer.largest_shape)
    assert all(torch.equal(a.float(), b) for a, b in zip(expected, rebuilt))


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_base_weight_start_hooks_agree(variant):
    """A start that changes the base keeps its factors; every other start leaves base and file alone."""
    layer, config = layer_for(variant)
    method = layer.method
    changes_base = method.base_weight_start(config) is not None
    values = {name: t.detach() for name, t in layer.stored_tensors().items()}
    assert (layer.residual is not None) == changes_base
    assert (method.residual_factors(config, values) is not None) == changes_base
    assert (method.start_tensors(layer) is not None) == changes_base
    assert (method.frozen_tensor_setting(config) is not None) == config.freeze_a


def test_no_module_outside_the_registry_and_config_branches_on_a_method_name():
    offenders = []
    for path in sorted((REPO_ROOT / "nola").rglob("*.py")):
        relative = path.relative_to(REPO_ROOT).as_posix()
        if relative.startswith(MAY_NAME_METHODS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                operands += [e for o in operands if isinstance(o, (ast.Tuple, ast.List, ast.Set)) for e in o.elts]
                names = [o.value for o in operands if isinstance(o, ast.Constant) and o.value in NAMES]
                if names:
                    offenders.append(f"{relative}:{node.lineno} compares with {names[0]!r}")
    assert not offenders, offenders
