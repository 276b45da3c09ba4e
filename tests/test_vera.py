"""VeRA (adapter.method: vera), the extreme-compression peer of NOLA: frozen random A, B shared by all layers,
scaled by trained vectors d and b. Checked against an independent dense formula (float64 gradients), against the
distribution of PEFT's own projections, against PEFT's own VeRA given the same frozen matrices, and through the
pipeline as users run it (recipes/7b.yaml: nf4 + double quant, bf16 compute and autocast, gradient checkpointing),
trained, saved, reloaded and merged."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import nola
from nola.adapter_io import read_adapter
from nola.basis import STREAM_VERA_A, STREAM_VERA_B, generate_basis
from nola.errors import NolaError
from nola.methods.vera import VERA_D_INITIAL
from nola.matrices import vera_bound, vera_matrices, vera_projection
from tests.conftest import run_train, shared_data, tiny_llama
from tests.conftest import entry_point

CONFIG = nola.AdapterConfig(method="vera", rank=16, alpha=16, seed=3)
IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 8, 4]])


def dense_reference(module: nola.AdaptedLinear, seed: int) -> torch.Tensor:
    """ΔW = (alpha/r)·Λ_b·B·Λ_d·A written out from the seeded basis, independently of nola.matrices: A and B the
    top-left slices of the shared pair (r × widest in, widest out × r), kaiming-uniform with gain √2 as PEFT draws
    it, so bound √6/√fan_in of the full matrix: the widest in for A, r for B. (Until issue 24 this read 1/√in of
    the layer's own slice and 1/√r: a variance 6x too small, and a different bound on each layer narrower than the
    widest.)"""
    rank, dtype, widest_in = module.rank, module.vera_d.dtype, module.largest_shape[1]
    a = generate_basis(seed, STREAM_VERA_A, 0, rank, module.in_features).to(dtype) * math.sqrt(6 / widest_in)
    b = generate_basis(seed, STREAM_VERA_B, 0, rank, module.out_features).to(dtype).t() * math.sqrt(6 / rank)
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
    a, b_matrix = vera_matrices(d, b, layer.projection_seed, layer.in_features, layer.out_features,
                                layer.largest_shape[1])
    return b_matrix @ a


def test_the_frozen_projections_are_shared_slices_of_the_widest_and_the_same_on_every_run():
    model = nola.attach(tiny_llama(), CONFIG)
    layers = [m for _, m in nola.adapted_modules(model)]
    q, k, gate, down = (next(m for n, m in nola.adapted_modules(model) if n.endswith(s))
                        for s in ("q_proj", "k_proj", "gate_proj", "down_proj"))
    assert all(m.largest_shape == (48, 48) for m in layers)  # gate/up: 48 out, down: 48 in
    (a_q, b_q), (a_k, b_k) = q.adapter_matrices(), k.adapter_matrices()  # d = 0.1 everywhere: products compare
    assert torch.equal(a_q, a_k) and torch.equal(a_q, down.adapter_matrices()[0][:, :32])
    assert torch.equal(b_k, b_q[:16]) and torch.equal(b_q, gate.adapter_matrices()[1][:32])
    narrow = vera_projection(3, STREAM_VERA_A, 16, 32, 96, torch.float32, torch.device("cpu"))
    wide = vera_projection(3, STREAM_VERA_A, 16, 96, 96, torch.float32, torch.device("cpu"))
    assert torch.equal(narrow, wide[:, :32])  # one bound, that of the full matrix: a slice, bit for bit
    assert vera_projection(3, STREAM_VERA_A, 16, 32, 96, torch.float32, torch.device("cpu")) is narrow  # cached
    other_seed = nola.attach(tiny_llama(), nola.AdapterConfig(method="vera", rank=16, alpha=16, seed=4))
    assert not torch.equal(next(m for _, m in nola.adapted_modules(other_seed)).adapter_matrices()[0],
                           layers[0].adapter_matrices()[0])


def test_the_projections_have_the_distribution_of_peft_vera_kaiming_init():
    """PEFT draws vera_A (r × widest in) and vera_B (widest out × r) with its `_kaiming_init`: uniform, bound
    √6/√fan_in of the full matrix. Ours, generated at the same full shapes (LLaMA-7B's largest, all-linear), have
    the same bound (never exceeded, approached) and the same std as PEFT's own draw; only the generator differs."""
    from peft.tuners.vera.model import _kaiming_init

    rank, (out_features, in_features) = 16, (11008, 11008)
    generator = torch.Generator().manual_seed(0)
    theirs = (_kaiming_init((rank, in_features), generator=generator),
              _kaiming_init((out_features, rank), generator=generator))
    ours = vera_matrices(torch.ones(rank), torch.ones(out_features), 3, in_features, out_features, in_features)
    for mine, peft_draw, fan_in in zip(ours, theirs, (in_features, rank)):
        assert mine.shape == peft_draw.shape
        bound = vera_bound(fan_in)
        assert peft_draw.abs().max() <= bound <= peft_draw.abs().max() * (1 + 1e-3)  # PEFT's bound, pinned
        assert bound * (1 - 1e-3) <= mine.abs().max() <= bound
        torch.testing.assert_close(mine.std(), peft_draw.std(), rtol=1e-2, atol=0)  # both bound/√3
        assert abs(mine.mean()) < 1e-2 * bound


def test_vera_computes_what_peft_vera_computes_given_the_same_frozen_matrices():
    """PEFT shares one vera_A (r × widest in) and vera_B (widest out × r) across layers and each layer computes
    with their top-left slices. On every projection of the tiny LLaMA (five distinct shapes), ours are such slices
    of one pair, the full A being down_proj's (48 in) and the full B gate_proj's (48 out): copying that pair (and
    d, b) into PEFT must reproduce the logits."""
    from peft import VeraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = nola.AdapterConfig(method="vera", rank=8, alpha=8, seed=3, target_modules=targets)
    ours = nola.attach(tiny_llama(), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in (p for p in ours.parameters() if p.requires_grad):
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    theirs = get_peft_model(tiny_llama(), VeraConfig(r=8, target_modules=targets, vera_dropout=0.0))
    modules = dict(nola.adapted_modules(ours))
    down, gate = modules["model.layers.0.mlp.down_proj"], modules["model.layers.0.mlp.gate_proj"]
    shared_a = down.adapter_matrices()[0] / down.vera_d[:, None]
    shared_b = gate.adapter_matrices()[1] / gate.vera_b[:, None]
    copied = 0
    with torch.no_grad():
        assert theirs.base_model.vera_A["default"].shape == (8, down.largest_shape[1]) == shared_a.shape
        assert theirs.base_model.vera_B["default"].shape == (gate.largest_shape[0], 8) == shared_b.shape
        theirs.base_model.vera_A["default"].copy_(shared_a)
        theirs.base_model.vera_B["default"].copy_(shared_b)
        for name, module in theirs.named_modules():
            if hasattr(module, "vera_lambda_d") and "default" in getattr(module, "vera_lambda_d", {}):
                copied += 1
                assert module.vera_A["default"] is theirs.base_model.vera_A["default"]  # one pair, shared
                mine = modules[name.removeprefix("base_model.model.")]
                module.vera_lambda_d["default"].copy_(mine.vera_d)
                module.vera_lambda_b["default"].copy_(mine.vera_b)
        assert copied == 14  # seven projections in each of two layers
        torch.testing.assert_close(theirs(IDS).logits, ours(IDS).logits, rtol=1e-5, atol=1e-5)
        assert (ours(IDS).logits - tiny_llama()(IDS).logits).abs().max() > 1e-2, "adapter inert: vacuous"


def test_a_vera_file_of_the_earlier_projections_is_refused_not_rebuilt_with_the_new_ones(tmp_path):
    """The projections are not stored: a file saved before they matched PEFT's would load into another model
    without a word. Its record says how they were drawn; a file without it, or of another draw, is one line."""
    model = nola.attach(tiny_llama(), CONFIG)
    with torch.no_grad():
        for module in dict(nola.adapted_modules(model)).values():
            module.vera_b.normal_()
    directory = nola.save_adapter(model, tmp_path / "adapter")
    description = json.loads((directory / "adapter_config.json").read_text())
    assert description["frozen_draw"] == "peft-kaiming-uniform-shared-v2"
    read_adapter(directory)
    del description["frozen_draw"]  # as every VeRA file before issue 24
    (directory / "adapter_config.json").write_text(json.dumps(description))
    with pytest.raises(NolaError, match=r"adapter_config.json: its frozen vera tensors were drawn as an earlier "
                                        r"nola drew them, this nola draws them as peft-kaiming-uniform-shared-v2"):
        read_adapter(directory)


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
