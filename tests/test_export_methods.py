"""VeRA and SVD-LoRA-FA through merge and export, numerically: the merged checkpoint (hf format) and the PEFT LoRA
export (loaded by real peft) against the base + adapter model they came from, on a float32 base and on the shipped
4-bit recipe settings (recipes/7b.yaml's model section: nf4, double quant, bf16 compute and autocast). Both sides
compute in float32 with the very weights they hold (`in_float32_arithmetic`): the merge's claim is about weights,
and bf16 arithmetic on either side would blur a scale error into its rounding (the export check's own budget, in
tests/test_recipes.py). Then the PEFT export of an SVD start through the script: a rank-2r LoRA, reported so."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import nola
from nola.adapter_io import read_adapter
from nola.export import export_peft_lora
from nola.merge import checkpoint_shards, linear_weight_modules, merge_checkpoint, read_headers
from nola.modeling import load_model
from nola.svd_init import dense_weight
from nola.training.config import load_recipe
from tests.conftest import REPO_ROOT, shared_data, tiny_llama
from tests.conftest import entry_point
from tests.test_export import METHOD_CONFIGS, adapter_on, logits, with_random_coefficients
from tests.test_svd_init import SVD, SVD_FA

METHODS = {"vera": METHOD_CONFIGS["vera"], "svd-lora-fa": SVD_FA}
SHIPPED_4BIT = "recipes/7b.yaml"
EXACT = 1e-5  # float32 rounding of the same function, computed in another order


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny LLaMA stored in bfloat16, as LLaMA checkpoints are: the float32 load and the recipe's bf16 load both
    hold its exact values, so a merge into float32 can be compared exactly with either."""
    directory = tmp_path_factory.mktemp("bf16-base")
    tiny_llama(torch.bfloat16).save_pretrained(directory)
    return directory


def load_base(directory, quantised: bool):
    """The base as training loads it: float32, or as the shipped 4-bit recipe's model section says."""
    if not quantised:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    recipe = load_recipe(REPO_ROOT / SHIPPED_4BIT, [f"model.name_or_path={directory}"])
    assert (recipe.model.quant_type, recipe.model.double_quant, recipe.model.compute_dtype) == ("nf4", True,
                                                                                               "bfloat16")
    return load_model(recipe.model, torch.device("cpu"), recipe.train.mixed_precision).eval()


def in_float32_arithmetic(model):
    """`model` computing in float32 with the weights it holds: each bitsandbytes 4-bit layer becomes a float32
    Linear of its dequantised weight (bitsandbytes' own 4-bit matmul rounds like bf16 when no gradient is needed,
    whatever the compute dtype), bf16 weights are widened (exactly), and nothing runs under autocast."""
    from bitsandbytes.nn import Linear4bit

    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            assert module.bias is None
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            dense.weight.data = dense_weight(module)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    for parameter in model.parameters():
        if parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()
    return model


def served_on_the_original_base(adapter_dir, quantised: bool, base_dir):
    """What the PEFT export of an SVD start is by construction: the trained update B·A − B0·A0 on the original
    base (a rank-2r LoRA [A; A0], [B, −B0] at the same scale), written out from the adapter file's tensors with
    nola's own LoRA layers. On a 4-bit base that is not the trained model: training's base was the re-quantised
    residual, which the original base cannot be."""
    config = read_adapter(adapter_dir).config
    pair = dataclasses.replace(config, init="random", freeze_a=False, rank=2 * config.rank, alpha=2 * config.alpha)
    model = nola.attach(load_base(base_dir, quantised), pair)
    stored = load_file(adapter_dir / "adapter_model.safetensors")
    with torch.no_grad():
        for name, module in nola.adapted_modules(model):
            module.lora_a.copy_(torch.cat([stored[f"{name}.lora_a"], stored[f"{name}.residual_a"]]))
            module.lora_b.copy_(torch.cat([stored[f"{name}.lora_b"], -stored[f"{name}.residual_b"]], dim=1))
    return model


@pytest.mark.parametrize("quantised", [False, True], ids=["float32", "nf4-bf16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_the_merge_and_the_peft_export_compute_the_adapter_model(base_dir, tmp_path, method, quantised):
    from peft import PeftModel

    trained = with_random_coefficients(nola.attach(load_base(base_dir, quantised), METHODS[method]))
    adapter_dir = nola.save_adapter(trained, tmp_path / "adapter")
    adapter = read_adapter(adapter_dir)
    assert bool(adapter.base.get("quantization")) == quantised
    expected = logits(in_float32_arithmetic(trained))
    original = logits(in_float32_arithmetic(load_base(base_dir, quantised)))
    assert (expected - original).abs().max() > 1e-1, "the adapter changes nothing: vacuous comparison"

    merge_checkpoint(base_dir, adapter, tmp_path / "hf", torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)  # plain transformers
    assert (logits(merged) - expected).abs().max() <= EXACT

    base_modules = linear_weight_modules(read_headers(checkpoint_shards(base_dir)))
    export_peft_lora(adapter, tmp_path / "peft", torch.float32, str(base_dir), base_modules)
    served = in_float32_arithmetic(PeftModel.from_pretrained(load_base(base_dir, quantised), tmp_path / "peft"))
    if quantised and method == "svd-lora-fa":
        reference = logits(in_float32_arithmetic(served_on_the_original_base(adapter_dir, quantised, base_dir)))
        assert (reference - expected).abs().max() > 1e-3, "4-bit re-quantisation made no difference: vacuous"
    else:
        reference = expected
    assert (logits(served) - reference).abs().max() <= EXACT


def test_the_peft_export_of_an_svd_start_is_a_rank_2r_lora_and_says_so(tmp_path, capsys):
    """B·A − B0·A0 on the original base: r and lora_alpha 2r (scaling 1, alpha/r folded into B), what the script
    prints, what peft builds, and the logits the trained model computes (the script's check, in float32)."""
    from peft import PeftModel

    base = shared_data("stories260K-hf")  # a real tokenizer for the check's prompts
    _, adapter_dir = adapter_on(base, SVD, tmp_path, size=0.05)  # a pretrained model's range: see CLI_SIZE
    out = tmp_path / "peft"
    code = entry_point("merge_and_export")(["--base", str(base), "--adapter", str(adapter_dir), "--out", str(out),
                                           "--format", "peft-lora", "--dtype", "fp32"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    rank = 2 * SVD.rank
    assert f"PEFT LoRA adapter: {out} (" in printed.out and f"r={rank})" in printed.out, printed.out
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config.get("rank_pattern", {})) == (rank, rank, {})
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    layers = [module for module in served.modules() if "default" in getattr(module, "lora_A", {})]
    assert len(layers) == len(read_adapter(adapter_dir).modules)
    assert all((m.r["default"], m.scaling["default"], m.lora_A["default"].weight.shape[0]) == (rank, 1.0, rank)
               for m in layers)
