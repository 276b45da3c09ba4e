"""Attaching adapters to Hugging Face LLaMA models: targets, seeds, freezing, the paper's parameter counts."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import nola
from nola.inject import module_seed
from tests.conftest import REPO_ROOT, tiny_llama

LLAMA_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def meta_llama(size: str) -> LlamaForCausalLM:
    settings = json.loads((REPO_ROOT / "recipes" / "models" / f"llama-2-{size}.json").read_text())
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**settings))


# The NOLA paper's LLaMA-2 table: rank 16, num_basis per matrix 128 / 256 / 512, and its rank-1 LoRA column.
@pytest.mark.parametrize(
    "size, num_basis, nola_params, lora_rank1_params",
    [("7b", 128, 57_344, 2_498_560), ("13b", 256, 143_360, 3_911_680), ("70b", 512, 573_440, 12_943_360)],
)
def test_trainable_parameter_counts_match_the_paper_on_meta_llama2(size, num_basis, nola_params, lora_rank1_params):
    model = nola.attach(meta_llama(size), nola.AdapterConfig(rank=16, alpha=4, num_basis=num_basis))
    report = nola.parameter_report(model)
    assert report["trainable_params"] == nola_params
    assert report["adapter_bytes"] == 4 * nola_params
    assert report["adapted_modules"] == 7 * model.config.num_hidden_layers
    lora = nola.attach(meta_llama(size), nola.AdapterConfig(method="lora", rank=1, alpha=16))
    assert nola.parameter_report(lora)["trainable_params"] == lora_rank1_params


def test_all_linear_adapts_the_seven_projections_and_freezes_the_rest():
    model = nola.attach(tiny_llama(), nola.AdapterConfig(rank=2, num_basis=8))
    names = [name for name, _ in nola.adapted_modules(model)]
    assert len(names) == 7 * 2 and {n.rsplit(".", 1)[1] for n in names} == LLAMA_PROJECTIONS
    assert "model.layers.0.self_attn.q_proj" in names and not any("lm_head" in n for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.coefficients_{s}" for n in names for s in "ab"}


def test_seeds_derive_from_run_seed_and_module_name():
    first = nola.attach(tiny_llama(), nola.AdapterConfig(rank=2, num_basis=8, seed=5))
    second = nola.attach(tiny_llama(), nola.AdapterConfig(rank=2, num_basis=8, seed=5))
    other = nola.attach(tiny_llama(), nola.AdapterConfig(rank=2, num_basis=8, seed=6))
    seeds = {n: m.seed for n, m in nola.adapted_modules(first)}
    assert seeds == {n: m.seed for n, m in nola.adapted_modules(second)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(seeds[n] != m.seed for n, m in nola.adapted_modules(other))
    assert seeds["model.layers.1.mlp.up_proj"] == module_seed(5, "model.layers.1.mlp.up_proj")


def test_named_targets_and_their_errors():
    model = nola.attach(tiny_llama(), nola.AdapterConfig(rank=2, num_basis=8, target_modules=["q_proj", "v_proj"]))
    assert {n.rsplit(".", 1)[1] for n, _ in nola.adapted_modules(model)} == {"q_proj", "v_proj"}
    with pytest.raises(nola.NolaError, match="already carries"):
        nola.attach(model, nola.AdapterConfig())
    with pytest.raises(nola.NolaError, match="matches no Linear"):
        nola.attach(tiny_llama(), nola.AdapterConfig(target_modules=["attention"]))


@pytest.mark.parametrize(
    "settings, key",
    [({"rank": 0}, "rank"), ({"num_basis": -1}, "num_basis"), ({"method": "dora"}, "method"),
     ({"alpha": 0}, "alpha"), ({"quant_bits": 2}, "quant_bits"), ({"dropout": 1.5}, "dropout")],
)
def test_invalid_adapter_settings_name_the_key(settings, key):
    with pytest.raises(nola.NolaError, match=f"adapter.{key}"):
        nola.AdapterConfig(**settings)


def test_materialize_gives_named_matrices_that_reproduce_the_model():
    model = nola.attach(tiny_llama(torch.float64), nola.AdapterConfig(rank=4, alpha=8, num_basis=16))
    with torch.no_grad():
        for _, module in nola.adapted_modules(model):
            module.coefficients_a.normal_()
            module.coefficients_b.normal_()
    matrices = nola.materialize(model)
    a, b, scale = matrices["model.layers.0.self_attn.q_proj"]
    assert a.shape == (4, 32) and b.shape == (32, 4) and scale == 2.0
    ids = torch.arange(10).unsqueeze(0)
    adapted_logits = model(ids).logits
    merged = tiny_llama(torch.float64)
    with torch.no_grad():
        for name, (a, b, scale) in matrices.items():
            merged.get_submodule(name).weight += scale * b @ a
    assert torch.allclose(merged(ids).logits, adapted_logits, rtol=0, atol=1e-10)
