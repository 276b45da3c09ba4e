"""VeRA (adapter.method: vera), the extreme-compression peer of NOLA: frozen random A, B shared by all layers,
scaled by trained vectors d and b. Checked against an independent dense formula (float64 gradients), against PEFT's
own VeRA given the same frozen matrices, and through the pipeline as users run it (recipes/7b.yaml: nf4 + double
quant, bf16 compute and autocast, gradient checkpointing), trained, saved, reloaded and merged."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import nola
from nola.basis import STREAM_VERA_A, STREAM_VERA_B, generate_basis
from nola.errors import NolaError
from nola.methods.vera import VERA_D_INITIAL
from nola.matrices import vera_projection
from tests.conftest import run_train, shared_data, tiny_llama
from tests.test_bad_inputs import entry_point

CONFIG = nola.AdapterConfig(method="vera", rank=16, alpha=16, seed=3)
IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 8, 4]])


def dense_reference(module: nola.AdaptedLinear, seed: int) -> torch.Tensor:
    """ΔW = (alpha/r)·Λ_b·B·Λ_d·A written out from the seeded basis, independently of nola.matrices."""
    rank, dtype = module.rank, module.vera_d.dtype
    a = generate_basis(seed, STREAM_VERA_A, 0, rank, module.in_features).to(dtype) / math.sqrt(module.in_features)
    b = generate_basis(seed, STREAM_VERA_B, 0, rank, module.out_features).to(dtype).t() / math.sqrt(rank)
    return module.scale * torch.diag(module.vera_b) @ b @ torch.diag(module.vera_d) @ a


def test_vera_starts_as_the_base_and_trains_r_plus_out_numbers_per_layer():
    base = tiny_llama()
    model = nola.attach(tiny_llama(), CONFIG)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)  # b = 0: the update is exactly zero
    modules = dict(nola.adapted_modules(model))
    report = nola.parameter_report(model)
    assert report["trainable_params"] == sum(CONFIG.rank + m.out_features for m in modules.values())
    layer = next(iter(modules.values()))
    assert torch.all(layer.vera_d == VERA_D_INITIAL) and not layer.vera_b.any()


def test_vera_gradients_equal_the_dense_formula_in_float64():
    model = nola.attach(tiny_llama(torch.float64), CONFIG)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    name, layer = next(iter(nola.adapted_modules(model)))
    x = torch.randn(3, layer.in_features, dtype=torch.float64, generator=generator)
    reference = layer.base_layer(x) + x @ dense_reference(layer, CONFIG.seed).t()
    torch.testing.assert_close(layer(x), reference, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda d, b: x @ (layer.scale * vera_delta(layer, d, b)).t(),
                                    (layer.vera_d.detach().clone().requires_grad_(),
                                     layer.vera_b.detach().clone().requires_grad_()))


def vera_delta(layer: nola.AdaptedLinear, d: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from nola.matrices import vera_matrices

    a, b_matrix = vera_matrices(d, b, layer.projection_seed, layer.in_features, layer.out_features)
    return b_matrix @ a


def test_the_frozen_projections_are_shared_slices_of_the_widest_and_the_same_on_every_run():
    model = nola.attach(tiny_llama(), CONFIG)
    layers = [m for _, m in nola.adapted_modules(model)]
    q, k = (next(m for n, m in nola.adapted_modules(model) if n.endswith(s)) for s in ("q_proj", "k_proj"))
    assert torch.equal(q.adapter_matrices()[0] / q.vera_d[:, None], k.adapter_matrices()[0] / k.vera_d[:, None])
    narrow = vera_projection(3, STREAM_VERA_A, 16, 32, torch.float32, torch.device("cpu"))
    wide = vera_projection(3, STREAM_VERA_A, 16, 96, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(narrow * math.sqrt(32), wide[:, :32] * math.sqrt(96), rtol=0, atol=1e-6)
    assert vera_projection(3, STREAM_VERA_A, 16, 32, torch.float32, torch.device("cpu")) is narrow  # one per width
    other_seed = nola.attach(tiny_llama(), nola.AdapterConfig(method="vera", rank=16, alpha=16, seed=4))
    assert not torch.equal(next(m for _, m in nola.adapted_modules(other_seed)).adapter_matrices()[0],
                           layers[0].adapter_matrices()[0])


def test_vera_computes_what_peft_vera_computes_given_the_same_frozen_matrices():
    """PEFT shares one vera_A (r × in) and vera_B (out × r) across layers; on square layers (q_proj, o_proj) ours
    are that one pair too, so copying them (and d, b) into PEFT must reproduce the logits."""
    from peft import VeraConfig, get_peft_model

    config = nola.AdapterConfig(method="vera", rank=8, alpha=8, seed=3, target_modules=["q_proj", "o_proj"])
    ours = nola.attach(tiny_llama(), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in (p for p in ours.parameters() if p.requires_grad):
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    theirs = get_peft_model(tiny_llama(), VeraConfig(r=8, target_modules=["q_proj", "o_proj"], vera_dropout=0.0))
    layer = next(m for _, m in nola.adapted_modules(ours))
    a, b = (t / v[:, None] for t, v in zip(layer.adapter_matrices(), (layer.vera_d, layer.vera_b)))
    copied = 0
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if hasattr(module, "vera_lambda_d") and "default" in getattr(module, "vera_lambda_d", {}):
                copied += 1
                mine = ours.get_submodule(name.removeprefix("base_model.model."))
                module.vera_A["default"].copy_(a)
                module.vera_B["default"].copy_(b)
                module.vera_lambda_d["default"].copy_(mine.vera_d)
                module.vera_lambda_b["default"].copy_(mine.vera_b)
        assert copied == 4  # q_proj and o_proj of both layers
        torch.testing.assert_close(theirs(IDS).logits, ours(IDS).logits, rtol=1e-5, atol=1e-5)
        assert (ours(IDS).logits - tiny_llama()(IDS).logits).abs().max() > 1e-2, "adapter inert: vacuous"


@pytest.mark.parametrize("settings, message", [
    (dict(freeze_a=True), "adapter.freeze_a: true is for method lora"),
    (dict(init="svd"), "adapter.init: svd is for method lora"),
    (dict(quant_bits=4), "adapter.quant_bits is for method nola"),
])
def test_settings_of_other_methods_are_refused(settings, message):
    with pytest.raises(NolaError, match=message):
        nola.AdapterConfig(method="vera", **settings)


def test_a_vera_run_of_the_shipped_recipe_trains_and_every_export_reloads(cache_dir, tmp_path, capsys):
    """recipes/7b.yaml as shipped with method: vera; only paths, steps, sizes and the rank overridden. The export
    script's own checks reload each format and compare it with the adapter model (a failed check exits non-zero)."""
    output, base = tmp_path / "run", shared_data("stories260K-hf")
    run_train(cache_dir, "recipes/7b.yaml", "adapter.method=vera", "adapter.rank=32", "adapter.alpha=32",
              f"model.name_or_path={base}", f"data.path={shared_data('alpaca/alpaca_subset.json')}",
              f"train.output_dir={output}", "train.max_steps=8", "train.save_steps=8", "train.eval_steps=8",
              "train.logging_steps=1", "train.micro_batch_size=4", "train.grad_accum_steps=2",
              "train.eval_max_batches=2", "train.lr=3e-2", "data.validation_size=16", "data.source_max_len=96",
              "data.target_max_len=64", "mmlu.path=null", "train.sample_generations=0", "train.answer_accuracy=0")
    summary = json.loads((output / "run.json").read_text())
    modules = json.loads((output / "adapter" / "adapter_config.json").read_text())["base_model"]["modules"]
    assert summary["trainable_params"] == sum(32 + out for out, _ in modules.values())
    assert summary["final_eval_loss"] < summary["first_eval_loss"]
    stored = load_file(output / "adapter" / "adapter_model.safetensors")
    assert sorted({key.rsplit(".", 1)[1] for key in stored}) == ["vera_b", "vera_d"]
    for fmt in ("hf", "peft-lora", "nola"):
        code = entry_point("merge_and_export")(["--base", str(base), "--adapter", str(output / "adapter"),
                                               "--format", fmt, "--out", str(tmp_path / fmt)])
        printed = capsys.readouterr()
        assert code == 0, printed.err[-3000:]
        assert "max |logit(adapter)" in printed.out
    assert json.loads((tmp_path / "peft-lora" / "adapter_config.json").read_text())["r"] == 32
