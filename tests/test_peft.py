"""NOLA as a PEFT method (nola/peft/), against the real peft: the same layer as nola's, PEFT's counts and files,
conversion both ways, merge_and_unload against nola's merge, and PEFT's usual verbs. TRL: tests/test_peft_trl.py.

Every 4-bit check uses the shipped 7b recipe's model and adapter settings (nf4, double quant, bf16 compute), scaled
down to the real tiny LLaMA."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("peft", reason="nola[peft] extra not installed")

from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402

import nola  # noqa: E402
from nola.adapter_io import CONFIG_FILE, WEIGHTS_FILE, apply_adapter, read_adapter, save_adapter  # noqa: E402
from nola.errors import NolaError  # noqa: E402
from nola.inject import base_description_of  # noqa: E402
from nola.merge import merge_checkpoint  # noqa: E402
from nola.modeling import disable_bnb_cpu_repacking, quantization_config  # noqa: E402
from nola.peft import NolaConfig, NolaLayer  # noqa: E402
from nola.peft.convert import read_peft_nola  # noqa: E402
from nola.training.config import load_recipe  # noqa: E402
from tests.conftest import REPO_ROOT, shared_data, tiny_llama  # noqa: E402

SMALL = dict(rank=4, alpha=8.0, num_basis=16, seed=3)


def recipe_adapter(**overrides) -> nola.AdapterConfig:
    """The 7b recipe's adapter section, sizes scaled down."""
    settings = [f"adapter.{key}={value}" for key, value in {"num_basis": 16, **overrides}.items()]
    return load_recipe(REPO_ROOT / "recipes" / "7b.yaml", settings).adapter_config()


def randomise_coefficients(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(trainable(model).items()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def paired_models(load_base, adapter: nola.AdapterConfig):
    """(PEFT model, nola-attached model) on two identical bases, with the same random coefficients."""
    peft_model = get_peft_model(load_base(), NolaConfig.from_adapter(adapter))
    nola_model = nola.attach(load_base(), adapter)
    randomise_coefficients(peft_model)
    by_module = {name.removeprefix("base_model.model.").replace(".nola_coefficients_", ".coefficients_")
                 .removesuffix(".default"): p for name, p in trainable(peft_model).items()}
    assert by_module.keys() == trainable(nola_model).keys()
    with torch.no_grad():
        for name, parameter in trainable(nola_model).items():
            parameter.copy_(by_module[name])
    return peft_model, nola_model


def tiny_4bit_loader(compute_dtype: str = "bfloat16"):
    """Loads the real tiny LLaMA as the 7b recipe loads its base (nf4, double quant), then PEFT's k-bit prep."""
    from transformers import AutoModelForCausalLM

    section = load_recipe(REPO_ROOT / "recipes" / "7b.yaml",
                          [f"model.name_or_path={shared_data('stories260K-hf')}",
                           f"model.compute_dtype={compute_dtype}"]).model
    assert section.load_in_4bit and section.quant_type == "nf4" and section.double_quant

    def load():
        model = AutoModelForCausalLM.from_pretrained(section.name_or_path, quantization_config=quantization_config(
            section), dtype=getattr(torch, compute_dtype), device_map={"": "cpu"})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        disable_bnb_cpu_repacking(model)
        return model.eval()

    return load


def logits_and_gradients(model: nn.Module, tokens: torch.Tensor, mixed_precision: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision):
        logits = model(tokens).logits
    logits.float().square().mean().backward()
    gradients = [p.grad.clone() for _, p in sorted(trainable(model).items(), key=lambda item: module_key(item[0]))]
    return logits.detach(), gradients


def module_key(name: str) -> str:
    return name.removeprefix("base_model.model.").replace("nola_coefficients_", "coefficients_").removesuffix(
        ".default")


@pytest.mark.parametrize("mixed_precision", [False, True], ids=["fp32", "bf16-autocast"])
def test_peft_layer_equals_adapted_linear_bit_for_bit_on_nn_linear(mixed_precision):
    peft_model, nola_model = paired_models(lambda: tiny_llama(), recipe_adapter())
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    peft_logits, peft_gradients = logits_and_gradients(peft_model, tokens, mixed_precision)
    nola_logits, nola_gradients = logits_and_gradients(nola_model, tokens, mixed_precision)
    assert torch.equal(peft_logits, nola_logits)
    assert all(torch.equal(a, b) for a, b in zip(peft_gradients, nola_gradients))
    assert not torch.equal(peft_logits, tiny_llama()(tokens).logits.detach())  # the coefficients do something


@pytest.mark.parametrize("mixed_precision", [False, True], ids=["fp32", "bf16-autocast"])
def test_peft_layer_equals_adapted_linear_bit_for_bit_on_the_recipes_4bit_base(mixed_precision):
    import bitsandbytes as bnb

    peft_model, nola_model = paired_models(tiny_4bit_loader(), recipe_adapter())
    layers = [m for m in peft_model.modules() if isinstance(m, NolaLayer)]
    assert layers and all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in layers)
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    peft_logits, peft_gradients = logits_and_gradients(peft_model, tokens, mixed_precision)
    nola_logits, nola_gradients = logits_and_gradients(nola_model, tokens, mixed_precision)
    assert torch.equal(peft_logits, nola_logits)
    assert all(torch.equal(a, b) for a, b in zip(peft_gradients, nola_gradients))
    assert all(p.dtype == torch.float32 for p in trainable(peft_model).values())
    # the 4-bit record merge dequantises by: the base's own module names, as nola's attach records them
    recorded = peft_model.peft_config["default"].base_model_fingerprint
    assert recorded["quantization"] == base_description_of(nola_model)["quantization"]
    assert recorded["embedding"] == base_description_of(nola_model)["embedding"]


def test_print_trainable_parameters_gives_the_papers_count_for_the_7b_recipe(capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    adapter = load_recipe(REPO_ROOT / "recipes" / "7b.yaml").adapter_config()
    config = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(config), NolaConfig.from_adapter(adapter))
    model.print_trainable_parameters()
    assert "trainable params: 57,344 " in capsys.readouterr().out
    assert 57_344 == 32 * 7 * 2 * adapter.num_basis


def test_config_fields_are_the_recipes_adapter_keys():
    import yaml

    recipe_keys = set(yaml.safe_load((REPO_ROOT / "recipes" / "7b.yaml").read_text())["adapter"])
    nola_only = {"method", "quant_bits", "init", "freeze_a"}  # other methods' and nola's own quantised storage
    assert recipe_keys - nola_only <= set(NolaConfig.__dataclass_fields__)
    with pytest.raises(NolaError, match=r"^adapter.rank: must be an integer >= 1, got 0$"):
        NolaConfig(rank=0)


def test_save_pretrained_stores_coefficients_only_and_from_pretrained_reproduces_the_logits(tmp_path):
    from safetensors import safe_open

    adapter = recipe_adapter()
    peft_model, nola_model = paired_models(lambda: tiny_llama(), adapter)
    peft_model.save_pretrained(tmp_path / "peft")
    save_adapter(nola_model, tmp_path / "nola")
    peft_file, nola_file = tmp_path / "peft" / WEIGHTS_FILE, tmp_path / "nola" / WEIGHTS_FILE
    with safe_open(str(peft_file), "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    assert all(key.endswith((".nola_coefficients_a", ".nola_coefficients_b")) for key in shapes)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == sum(p.numel() for p in trainable(peft_model).values())
    # same tensor bytes; the headers differ by PEFT's longer key names only (tens of bytes a tensor)
    assert 0 <= peft_file.stat().st_size - nola_file.stat().st_size <= 40 * len(shapes)
    saved = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    assert saved["peft_type"] == "NOLA" and saved["generator_version"] == nola.GENERATOR_VERSION
    assert saved["module_seeds"] == read_adapter(tmp_path / "nola").config.module_seeds
    assert saved["base_model_fingerprint"]["modules"] == read_adapter(tmp_path / "nola").modules

    tokens = torch.randint(0, 128, (2, 7))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    assert isinstance(loaded.peft_config["default"], NolaConfig)
    assert torch.equal(loaded(tokens).logits, peft_model(tokens).logits)
    through_transformers = tiny_llama()  # transformers' own adapter loading reads peft_type.value
    through_transformers.load_adapter(str(tmp_path / "peft"))
    assert torch.equal(through_transformers(tokens).logits, peft_model(tokens).logits)


def test_a_mismatched_generator_version_or_base_fails_in_one_line(tmp_path):
    peft_model = get_peft_model(tiny_llama(), NolaConfig(**SMALL))
    peft_model.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / CONFIG_FILE
    original = json.loads(config_path.read_text())

    with pytest.raises(NolaError, match=r"^NolaConfig: adapter is for another base model \(model.layers.0.mlp."
                                        r"down_proj is 64x96, the adapter expects 32x48\)$"):
        PeftModel.from_pretrained(tiny_llama(hidden_size=64, intermediate_size=96), tmp_path / "adapter")
    with pytest.raises(NolaError, match=r"^NolaConfig: adapter is for another base model \(its model.embed_tokens."
                                        r"weight values differ"):
        PeftModel.from_pretrained(tiny_llama(init_seed=1), tmp_path / "adapter")
    config_path.write_text(json.dumps({**original, "generator_version": "philox-v0"}))
    with pytest.raises(NolaError, match=r"^NolaConfig: basis generator 'philox-v0' differs from this nola's"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")


def run_convert(*arguments: str) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_adapter", REPO_ROOT / "scripts" / "convert_adapter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(arguments))


def test_conversion_both_ways_is_bit_exact_and_loads_in_either_library(tmp_path):
    adapter = recipe_adapter()
    peft_model, nola_model = paired_models(lambda: tiny_llama(), adapter)
    save_adapter(nola_model, tmp_path / "nola")
    assert run_convert("--adapter", str(tmp_path / "nola"), "--out", str(tmp_path / "as-peft")) == 0
    assert run_convert("--adapter", str(tmp_path / "as-peft"), "--out", str(tmp_path / "back")) == 0
    original, back = read_adapter(tmp_path / "nola"), read_adapter(tmp_path / "back")
    assert back.config == original.config and back.base == original.base
    assert back.values.keys() == original.values.keys()
    assert all(torch.equal(back.values[k], original.values[k]) for k in original.values)

    tokens = torch.randint(0, 128, (2, 7))
    from_converted = PeftModel.from_pretrained(tiny_llama(), tmp_path / "as-peft")
    assert torch.equal(from_converted(tokens).logits, nola_model(tokens).logits)
    peft_model.save_pretrained(tmp_path / "peft")  # and PEFT's own file into nola's format
    assert run_convert("--adapter", str(tmp_path / "peft"), "--out", str(tmp_path / "from-peft")) == 0
    assert torch.equal(nola.load_adapter(tiny_llama(), tmp_path / "from-peft")(tokens).logits,
                       peft_model(tokens).logits)


def test_peft_only_targeting_converts_to_the_modules_it_chose(tmp_path):
    peft_model = get_peft_model(tiny_llama(), NolaConfig(**SMALL, exclude_modules=["o_proj"]))
    randomise_coefficients(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = read_peft_nola(tmp_path / "peft")
    assert len(adapter.modules) == 12 and not any(name.endswith("o_proj") for name in adapter.modules)
    tokens = torch.randint(0, 128, (2, 7))
    assert torch.equal(apply_adapter(tiny_llama(), adapter)(tokens).logits, peft_model(tokens).logits)


def test_conversion_refuses_what_has_no_peft_nola_form_in_one_line(tmp_path, capsys):
    lora = nola.attach(tiny_llama(), nola.AdapterConfig(method="lora", rank=2))
    save_adapter(lora, tmp_path / "lora")
    assert run_convert("--adapter", str(tmp_path / "lora"), "--out", str(tmp_path / "out")) == 2
    assert capsys.readouterr().err.strip() == ("error: NolaConfig: adapter method 'lora' has no PEFT NOLA form "
                                               "(PEFT's NOLA layer trains float32 coefficients)")
    assert not (tmp_path / "out").exists()

    quantised = nola.attach(tiny_llama(), nola.AdapterConfig(**SMALL, quant_bits=4))
    save_adapter(quantised, tmp_path / "4bit")
    assert run_convert("--adapter", str(tmp_path / "4bit"), "--out", str(tmp_path / "out")) == 2
    assert "with 4-bit coefficients has no PEFT NOLA form" in capsys.readouterr().err

    get_peft_model(tiny_llama(), NolaConfig(**SMALL, modules_to_save=["lm_head"])).save_pretrained(tmp_path / "mts")
    assert run_convert("--adapter", str(tmp_path / "mts"), "--out", str(tmp_path / "out")) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'mts' / CONFIG_FILE}: modules_to_save trains or "
                                               f"changes modules besides NOLA's layers, which a nola adapter does "
                                               f"not hold; use the adapter with PEFT")
    assert run_convert("--adapter", str(tmp_path / "lora"), "--out", str(tmp_path)) == 2  # holds the input
    assert "overlaps --adapter" in capsys.readouterr().err
    assert (tmp_path / "lora" / WEIGHTS_FILE).is_file()

    get_peft_model(tiny_llama(), NolaConfig(**SMALL)).save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    assert run_convert("--adapter", str(tmp_path / "peft"), "--out", str(tmp_path / "out")) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {weights}: unreadable safetensors file") and "\n" not in error
    assert not (tmp_path / "out").exists()


def test_merge_and_unload_equals_nolas_merge(tmp_path):
    peft_model, nola_model = paired_models(lambda: tiny_llama(), recipe_adapter())
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    save_adapter(nola_model, tmp_path / "adapter")
    merge_checkpoint(base_dir, read_adapter(tmp_path / "adapter"), tmp_path / "merged", torch.float32)
    from safetensors.torch import load_file

    expected = load_file(str(tmp_path / "merged" / "model.safetensors"))
    merged = peft_model.merge_and_unload().state_dict()
    assert not any(isinstance(m, NolaLayer) for m in peft_model.modules())
    changed = [key for key in expected if not torch.equal(expected[key], tiny_llama().state_dict()[key])]
    assert len(changed) == 14  # every adapted projection of both layers
    assert all(torch.equal(merged[key], expected[key]) for key in expected)


def test_several_adapters_set_disable_delete_and_unload():
    tokens = torch.randint(0, 128, (2, 7))
    base_logits = tiny_llama()(tokens).logits
    model = get_peft_model(tiny_llama(), NolaConfig(**SMALL), adapter_name="first")
    model.add_adapter("second", NolaConfig(**{**SMALL, "seed": 4}))
    randomise_coefficients(model)  # the active one
    model.set_adapter("second")
    randomise_coefficients(model, seed=1)
    second = model(tokens).logits
    model.set_adapter("first")
    first = model(tokens).logits
    assert not torch.equal(first, second) and not torch.equal(first, base_logits)
    assert set(trainable(model)) == {n for n, _ in model.named_parameters() if n.endswith(".first")}
    with model.disable_adapter():
        assert torch.equal(model(tokens).logits, base_logits)
    assert torch.equal(model(tokens).logits, first)
    model.delete_adapter("second")
    assert list(model.peft_config) == ["first"]
    assert not any(".second" in name for name, _ in model.named_parameters())
    unloaded = model.unload()
    assert not any(isinstance(m, NolaLayer) for m in unloaded.modules())
    assert torch.equal(unloaded(tokens).logits, base_logits)


def test_unsupported_module_types_are_refused_in_one_line_naming_them():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(NolaError, match=r"^NolaConfig.target_modules: transformer.h.0.attn.c_attn is a Conv1D; NOLA "
                                        r"adapts torch.nn.Linear and bitsandbytes Linear4bit only"):
        get_peft_model(gpt2, NolaConfig(**SMALL, target_modules=["c_attn"]))
    with pytest.raises(NolaError, match=r"^NolaConfig.target_modules: model.embed_tokens is a Embedding"):
        get_peft_model(tiny_llama(), NolaConfig(**SMALL, target_modules=["embed_tokens"]))


def test_coefficients_keep_float32_through_trls_cast_and_module_to():
    model = get_peft_model(tiny_llama(), NolaConfig(**SMALL))
    randomise_coefficients(model)
    trained = {name: p.detach().clone() for name, p in trainable(model).items()}
    for parameter in trainable(model).values():  # what TRL does to a quantised model's trainable parameters
        parameter.data = parameter.data.to(torch.bfloat16)
    model.to(torch.bfloat16)
    assert all(torch.equal(p, trained[name]) and p.dtype == torch.float32 for name, p in trainable(model).items())
    assert model.base_model.model.lm_head.weight.dtype == torch.bfloat16
    for parameter in trainable(model).values():  # new values, or a higher precision, do go through
        parameter.data = torch.zeros_like(parameter.data)
    assert all(not p.any() for p in trainable(model).values())


def test_coefficients_replaced_by_lower_precision_ones_are_refused_in_one_line():
    model = get_peft_model(tiny_llama(), NolaConfig(**SMALL))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.nola_coefficients_a["default"] = nn.Parameter(torch.zeros(16, dtype=torch.bfloat16))
    with pytest.raises(NolaError, match=r"^nola: coefficients of adapter 'default' are torch.bfloat16, not "
                                        r"torch.float32 \(lower-precision coefficients lose the update\)"):
        model(torch.randint(0, 128, (1, 5)))


def test_a_low_cpu_mem_usage_load_onto_a_bf16_base_keeps_the_coefficients_exact(tmp_path):
    model = get_peft_model(tiny_llama(), NolaConfig(**SMALL))
    randomise_coefficients(model)
    model.save_pretrained(tmp_path / "adapter")
    saved = {module_key(name): p.detach().clone() for name, p in trainable(model).items()}
    loaded = PeftModel.from_pretrained(tiny_llama(torch.bfloat16), tmp_path / "adapter", low_cpu_mem_usage=True)
    values = {module_key(name): p.detach() for name, p in loaded.named_parameters() if "nola_" in name}
    assert values.keys() == saved.keys()
    assert all(values[key].dtype == torch.float32 and torch.equal(values[key], saved[key]) for key in saved)


def test_one_config_serves_several_models():
    config = NolaConfig(**SMALL)
    first = get_peft_model(tiny_llama(), config)
    second = get_peft_model(tiny_llama(init_seed=1, hidden_size=64, intermediate_size=96), config)
    assert not config.module_seeds and not config.base_model_fingerprint  # the caller's config is left as it was
    assert first.peft_config["default"].base_model_fingerprint["modules"]["model.layers.0.mlp.down_proj"] == [32, 48]
    assert second.peft_config["default"].base_model_fingerprint["modules"]["model.layers.0.mlp.down_proj"] == [64, 96]


@pytest.mark.parametrize("settings, message", [
    (dict(layers_to_transform=[0]), r"^NolaConfig.layers_to_transform: needs target_modules as a list of module "
                                     r"names, not 'all-linear'"),
    (dict(target_parameters=["mlp.experts"]), r"^NolaConfig.target_parameters: NOLA adapts Linear modules"),
    (dict(target_modules=[]), r"^adapter.target_modules: must be 'all-linear' or a list of names, got \[\]$"),
])
def test_settings_nola_cannot_honour_are_refused_in_one_line(settings, message):
    with pytest.raises(NolaError, match=message):
        NolaConfig(**SMALL, **settings)


@pytest.mark.parametrize("settings", [dict(layers_to_transform=[0]), dict(target_parameters=["mlp.experts"])])
def test_nola_refuses_before_peft_checks_so_every_peft_version_gets_the_same_line(settings, monkeypatch):
    """peft 0.22 added its own ValueError for layers_to_transform with a string target_modules; a later PEFT may add
    others. nola's refusals run before PEFT's checks, so the line is nola's on every version the range admits."""
    from peft.config import PeftConfig

    def peft_objects(self):
        raise ValueError("a check of some PEFT release")

    monkeypatch.setattr(PeftConfig, "__post_init__", peft_objects)
    with pytest.raises(NolaError, match=r"^NolaConfig\."):
        NolaConfig(**SMALL, **settings)


def test_a_deeper_base_with_the_same_first_layers_is_refused(tmp_path):
    save_adapter(nola.attach(tiny_llama(), nola.AdapterConfig(**SMALL)), tmp_path / "nola")  # all-linear
    assert run_convert("--adapter", str(tmp_path / "nola"), "--out", str(tmp_path / "adapter")) == 0
    deeper = tiny_llama(num_hidden_layers=3)
    deeper.load_state_dict(tiny_llama().state_dict(), strict=False)  # layers 0 and 1, embeddings: the same
    with pytest.raises(NolaError, match=r"^NolaConfig: adapter is for another base model \(module model.layers.2.mlp."
                                        r"down_proj is not in the adapter\)$"):
        PeftModel.from_pretrained(deeper, tmp_path / "adapter")


def test_merging_into_the_4bit_base_warns_that_it_re_quantises():
    model = get_peft_model(tiny_4bit_loader()(), NolaConfig.from_adapter(recipe_adapter()))
    randomise_coefficients(model)
    with pytest.warns(UserWarning, match="merging into a 4-bit weight re-quantises it"):
        model.merge_adapter()
