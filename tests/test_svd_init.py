"""LoRA-FA (`adapter.freeze_a`) and SVD-initialised LoRA (`adapter.init: svd`) as a library: the SVD itself, the
identity at step 0, what trains, and that the adapter file, the merged checkpoint and the PEFT export all reproduce
the trained model on the *original* base (the residual is rebuilt from the factors the file keeps)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import nola
from nola.adapter_io import read_adapter
from nola.export import export_peft_lora
from nola.inject import adapters_disabled
from nola.merge import checkpoint_shards, linear_weight_modules, merge_checkpoint, read_headers
from nola.modeling import ModelSection, load_model
from nola.svd_init import top_singular_triplets
from nola.training.config import load_recipe
from nola.training.preflight import check_frozen_adapter_engine
from tests.conftest import REPO_ROOT, tiny_llama
from tests.test_export import IDS, logits, with_random_coefficients

SVD = nola.AdapterConfig(method="lora", rank=4, alpha=8, seed=5, init="svd")
SVD_FA = nola.AdapterConfig(method="lora", rank=4, alpha=8, seed=5, init="svd", freeze_a=True)
FA = nola.AdapterConfig(method="lora", rank=4, alpha=8, seed=5, freeze_a=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(directory)
    return directory


def decaying_matrix(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """A float64 matrix with singular values from 1 down to 1e-3, like a trained projection's."""
    generator = torch.Generator().manual_seed(seed)
    rank = min(rows, columns)
    left = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(columns, rank, generator=generator, dtype=torch.float64)).Q
    return left @ torch.diag(torch.logspace(0, -3, rank, dtype=torch.float64)) @ right.T


@pytest.mark.parametrize("shape, rank", [((96, 64), 4), ((64, 96), 8), ((20, 12), 8)])
def test_the_randomized_svd_finds_the_top_singular_triplets(shape, rank):
    weight = decaying_matrix(*shape)
    u, s, vh = top_singular_triplets(weight, rank, seed=3)
    exact_u, exact_s, exact_vh = torch.linalg.svd(weight, full_matrices=False)
    assert torch.allclose(s, exact_s[:rank], rtol=1e-6)
    best = exact_u[:, :rank] @ torch.diag(exact_s[:rank]) @ exact_vh[:rank]
    assert (u @ torch.diag(s) @ vh - best).norm() <= 1e-6 * best.norm()
    again = top_singular_triplets(weight, rank, seed=3)  # a function of (W, r, seed): resumes and ranks agree
    assert all(torch.equal(x, y) for x, y in zip((u, s, vh), again))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_an_svd_start_computes_the_base_model_at_step_0(dtype, tolerance):
    base = tiny_llama(dtype)
    model = nola.attach(copy.deepcopy(base), SVD)
    layer = model.model.layers[0].self_attn.q_proj
    original = base.model.layers[0].self_attn.q_proj.weight
    assert (layer.base_layer.weight - original).abs().max() > 1e-2  # the base now holds the residual
    top = torch.linalg.svdvals(original.double())[:4]
    assert torch.allclose(torch.linalg.svdvals((layer.scale * layer.lora_b @ layer.lora_a).double())[:4], top,
                          rtol=1e-4)  # and the adapter the top-4 part of W
    assert (logits(model) - logits(base)).abs().max() <= tolerance


@pytest.mark.parametrize("config", [FA, SVD_FA], ids=["random", "svd"])
def test_lora_fa_trains_b_alone(config):
    model = nola.attach(tiny_llama(), config)
    layers = [module for _, module in nola.adapted_modules(model)]
    assert nola.parameter_report(model)["trainable_params"] == config.rank * sum(m.out_features for m in layers)
    frozen_a, initial_b = [m.lora_a.detach().clone() for m in layers], [m.lora_b.detach().clone() for m in layers]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(m.lora_a.grad is None and m.lora_a not in optimizer.state for m in layers)
    assert all(m.lora_b in optimizer.state for m in layers)
    assert all(torch.equal(m.lora_a, a) for m, a in zip(layers, frozen_a))
    assert all(not torch.equal(m.lora_b, b) for m, b in zip(layers, initial_b))  # B trained


@pytest.mark.parametrize("config", [SVD, SVD_FA, FA], ids=["svd", "svd-fa", "fa"])
def test_the_adapter_file_merge_and_peft_export_reproduce_the_trained_model_on_the_original_base(
        base_dir, tmp_path, config):
    from peft import PeftModel

    trained = with_random_coefficients(nola.attach(AutoModelForCausalLM.from_pretrained(base_dir), config))
    adapter_dir = nola.save_adapter(trained, tmp_path / "adapter")
    stored = load_file(adapter_dir / "adapter_model.safetensors")
    assert ("model.layers.0.mlp.up_proj.residual_a" in stored) == (config.init == "svd")
    original = AutoModelForCausalLM.from_pretrained(base_dir)
    assert (logits(original) - logits(trained)).abs().max() > 1e-2, "training changed nothing: vacuous"
    with adapters_disabled(trained):  # the base's function (A0, B0 back on top of an SVD start's residual)
        assert (logits(trained) - logits(original)).abs().max() <= 1e-5
    assert (logits(original) - logits(trained)).abs().max() > 1e-2  # and the trained model again after it

    loaded = nola.load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    assert (logits(loaded) - logits(trained)).abs().max() <= 1e-5

    adapter = read_adapter(adapter_dir)
    merge_checkpoint(base_dir, adapter, tmp_path / "merged", torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(merged) - logits(trained)).abs().max() <= 1e-5

    base_modules = linear_weight_modules(read_headers(checkpoint_shards(base_dir)))
    export_peft_lora(adapter, tmp_path / "peft", torch.float32, str(base_dir), base_modules)
    rank = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"]
    assert rank == (2 * config.rank if config.init == "svd" else config.rank)  # B·A − B0·A0 is rank 2r
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "peft").eval()
    assert (logits(served) - logits(trained)).abs().max() <= 1e-5


def test_a_4bit_svd_start_merges_into_the_re_quantised_residual_it_trained_on(base_dir, tmp_path):
    section = ModelSection(name_or_path=str(base_dir), load_in_4bit=True, compute_dtype="float32")
    base = load_model(section, torch.device("cpu"))
    before = logits(base)
    trained = nola.attach(base, SVD)
    step_0 = (logits(trained) - before).abs().max()
    quantisation = (logits(AutoModelForCausalLM.from_pretrained(base_dir)) - before).abs().max()
    # The re-quantised residual is not the base, but re-quantising costs about what quantising did.
    assert 0 < step_0 <= 2 * quantisation, (step_0, quantisation)
    with_random_coefficients(trained)
    adapter_dir = nola.save_adapter(trained, tmp_path / "adapter")
    merge_checkpoint(base_dir, read_adapter(adapter_dir), tmp_path / "merged", torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(merged) - logits(trained)).abs().max() <= 1e-4
    reloaded = nola.load_adapter(load_model(section, torch.device("cpu")), adapter_dir)
    assert (logits(reloaded) - logits(trained)).abs().max() <= 1e-5


def test_lora_fa_and_svd_starts_are_refused_under_zero3():
    config = load_recipe(REPO_ROOT / "recipes/7b_lora.yaml", ["adapter.freeze_a=true"])
    zero3 = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    zero2 = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    with pytest.raises(nola.NolaError, match="adapter.freeze_a: true is not supported under DeepSpeed ZeRO-3"):
        check_frozen_adapter_engine(config, zero3)
    check_frozen_adapter_engine(config, zero2)


@pytest.mark.parametrize("values, message", [
    (dict(method="nola", init="svd"), "adapter.init: svd is for method lora"),
    (dict(method="nola", freeze_a=True), "adapter.freeze_a: true is for method lora"),
    (dict(method="lora", init="pissa"), "adapter.init: 'pissa' is not one of random, svd"),
    (dict(method="lora", freeze_a="yes"), "adapter.freeze_a: must be true or false"),
])
def test_bad_settings_are_one_line_errors(values, message):
    with pytest.raises(nola.NolaError, match=message):
        nola.AdapterConfig(**values)


def test_a_rank_above_a_layers_smaller_side_is_refused_before_any_weight_changes():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(nola.NolaError, match=r"adapter.rank: 40 exceeds the smaller side of model.layers.0"):
        nola.attach(model, nola.AdapterConfig(method="lora", rank=40, init="svd"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
