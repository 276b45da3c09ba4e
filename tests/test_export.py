"""Merge and export: merged checkpoints (fp32 and 4-bit bases), PEFT LoRA adapters, compact NOLA adapters, and the
checks that refuse a wrong base, all against the logits of the adapter model they came from."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import nola
import nola.adapter_config
from nola.adapter_io import read_adapter
from nola.export import export_nola, export_peft_lora
from nola.merge import INDEX_FILE, checkpoint_shards, linear_weight_modules, merge_checkpoint, read_headers
from nola.modeling import ModelSection, load_model
from tests.conftest import REPO_ROOT, run_script, shared_data, tiny_llama
from tests.conftest import entry_point

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 101, 7, 64, 3, 17, 88]])
CONFIG = nola.AdapterConfig(rank=4, alpha=8, num_basis=32, seed=5)
# Coefficient size of adapters on the real tiny LLaMA that go through the script's float32 check: 0.5 drives its
# hidden states into the thousands, far beyond what training reaches, where float32 rounding alone exceeds the
# check's budget (which is relative to the logits' span); 0.05 still moves the logits by a fifth of their span.
CLI_SIZE = 0.05


def with_random_coefficients(model, seed: int = 0, size: float = 0.5):
    """Coefficients large enough that the adapter visibly changes the logits (a merge that drops it must fail).
    On a pretrained model a smaller `size` keeps the activations near their trained range, as training does."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * size)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny LLaMA checkpoint in several safetensors shards, as big checkpoints come."""
    directory = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(directory, max_shard_size="40KB")
    assert (directory / INDEX_FILE).is_file()
    return directory


def adapter_on(base_dir, config: nola.AdapterConfig, directory, size: float = 0.5):
    """(adapter model, adapter directory) with random coefficients (see `with_random_coefficients`) on the fp32
    base."""
    model = with_random_coefficients(nola.attach(AutoModelForCausalLM.from_pretrained(base_dir), config), size=size)
    return model, nola.save_adapter(model, directory / "adapter")


METHOD_CONFIGS = {"nola": CONFIG, "lora": nola.AdapterConfig(method="lora", rank=4, alpha=8, seed=5),
                  "vera": nola.AdapterConfig(method="vera", rank=4, alpha=4, seed=5)}


@pytest.fixture(scope="module", params=list(METHOD_CONFIGS))
def adapted(base_dir, tmp_path_factory, request):
    """For NOLA and for the baselines a user compares it with: plain LoRA and VeRA."""
    config = METHOD_CONFIGS[request.param]
    return adapter_on(base_dir, config, tmp_path_factory.mktemp("adapter"))


def test_merged_checkpoint_reproduces_the_adapter_model(base_dir, adapted, tmp_path):
    model, adapter_dir = adapted
    files = merge_checkpoint(base_dir, read_adapter(adapter_dir), tmp_path / "merged", torch.float32,
                             max_shard_bytes=30_000)
    assert len(files) > 1 and (tmp_path / "merged" / INDEX_FILE).is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert (logits(base) - logits(model)).abs().max() > 1e-2, "the adapter changes nothing: vacuous comparison"
    assert (logits(merged) - logits(model)).abs().max() <= 1e-5
    assert not list(tmp_path.glob(".merged*")), "temporary directory left behind"


def test_merged_checkpoint_is_saved_in_the_dtype_asked_for(base_dir, adapted, tmp_path):
    model, adapter_dir = adapted
    merge_checkpoint(base_dir, read_adapter(adapter_dir), tmp_path / "merged", torch.bfloat16)
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert (logits(merged) - logits(model)).abs().max() <= 0.05  # bf16 rounding of the weights, no more


def test_merge_from_a_4bit_base_uses_the_weights_training_saw(base_dir, tmp_path):
    section = ModelSection(name_or_path=str(base_dir), load_in_4bit=True, compute_dtype="float32")
    quantised = with_random_coefficients(nola.attach(load_model(section, torch.device("cpu")), CONFIG))
    adapter_dir = nola.save_adapter(quantised, tmp_path / "adapter")
    recorded = read_adapter(adapter_dir).base["quantization"]
    assert recorded["quant_type"] == "nf4" and "model.layers.1.mlp.down_proj" in recorded["modules"]
    merge_checkpoint(base_dir, read_adapter(adapter_dir), tmp_path / "merged", torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(merged) - logits(quantised)).abs().max() <= 1e-4
    float_base = with_random_coefficients(nola.attach(AutoModelForCausalLM.from_pretrained(base_dir), CONFIG))
    assert (logits(float_base) - logits(quantised)).abs().max() > 1e-3, "4-bit made no difference: vacuous"


def test_peft_lora_export_loads_in_peft_and_reproduces_the_adapter_model(base_dir, adapted, tmp_path):
    from peft import PeftModel

    model, adapter_dir = adapted
    base_modules = linear_weight_modules(read_headers(checkpoint_shards(base_dir)))
    export_peft_lora(read_adapter(adapter_dir), tmp_path / "peft", torch.float32, str(base_dir), base_modules)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(nola.adapter_config.LLAMA_LINEAR_MODULES)  # leaf names, as vLLM wants
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 48)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (32, 4)
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "peft").eval()
    assert (logits(served) - logits(model)).abs().max() <= 1e-5


def test_peft_target_modules_name_single_layers_when_the_adapter_covers_only_those(base_dir, tmp_path):
    config = nola.AdapterConfig(rank=2, num_basis=8, target_modules=["layers.0.self_attn.q_proj"])
    _, adapter_dir = adapter_on(base_dir, config, tmp_path)
    base_modules = linear_weight_modules(read_headers(checkpoint_shards(base_dir)))
    export_peft_lora(read_adapter(adapter_dir), tmp_path / "peft", torch.float32, str(base_dir), base_modules)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]


def test_a_merged_model_refuses_the_adapter_it_already_holds(base_dir, tmp_path):
    _, adapter_dir = adapter_on(base_dir, CONFIG, tmp_path)
    merge_checkpoint(base_dir, read_adapter(adapter_dir), tmp_path / "merged", torch.float32)
    with pytest.raises(nola.NolaError, match="already has this adapter merged in"):
        nola.load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), adapter_dir)
    with pytest.raises(nola.NolaError, match="already has this adapter merged in"):
        merge_checkpoint(tmp_path / "merged", read_adapter(adapter_dir), tmp_path / "twice", torch.float32)


def test_format_1_quantised_adapters_still_read(base_dir, tmp_path):
    """Version 1 stored two tensors per quantised vector; the same values must come back from it."""
    from safetensors.torch import save_file

    from nola.adapter_io import CONFIG_FILE, WEIGHTS_FILE, file_sha256
    from nola.quant import pack_codes

    config = nola.AdapterConfig(rank=4, alpha=8, num_basis=32, seed=5, quant_bits=3)
    _, current = adapter_on(base_dir, config, tmp_path / "v2")
    adapter = read_adapter(current)
    old = tmp_path / "v1"
    old.mkdir()
    tensors = {}
    for key, value in adapter.values.items():
        tensors[f"{key}.codes"], tensors[f"{key}.grid"] = pack_codes(value, 3)
    save_file(tensors, str(old / WEIGHTS_FILE))
    description = {**adapter.description, "format_version": 1, "weights_sha256": file_sha256(old / WEIGHTS_FILE)}
    (old / CONFIG_FILE).write_text(json.dumps(description))
    reread = read_adapter(old).values
    assert reread.keys() == adapter.values.keys()
    assert all(torch.allclose(reread[k], adapter.values[k], rtol=0, atol=1e-6) for k in reread)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: compares CUDA and CPU nf4")
def test_nf4_quantisation_on_cuda_matches_the_cpu_merge():
    """The merge re-quantises on the CPU what bitsandbytes quantised on the GPU at training time."""
    from nola.merge import as_trained

    weight = torch.randn(512, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for double_quant in (False, True):
        recorded = {"dtype": "bfloat16", "blocksize": 64, "double_quant": double_quant, "quant_type": "nf4"}
        assert torch.equal(as_trained(weight.cuda(), recorded).cpu(), as_trained(weight, recorded))


def test_quantised_nola_export_is_a_seventh_of_the_size_and_close(base_dir, tmp_path):
    model, adapter_dir = adapter_on(base_dir, CONFIG, tmp_path)
    full = export_nola(read_adapter(adapter_dir), tmp_path / "fp32", bits=None)
    four = export_nola(read_adapter(adapter_dir), tmp_path / "q4", bits=4)
    weights = "adapter_model.safetensors"
    assert (four / weights).stat().st_size <= (full / weights).stat().st_size / 7
    reloaded = nola.load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), four)
    difference = (logits(reloaded) - logits(model)).abs().max()
    effect = (logits(model) - logits(AutoModelForCausalLM.from_pretrained(base_dir))).abs().max()
    assert 0 < difference < effect  # 4-bit rounding of Gaussian coefficients: lossy, but nearer than the base
    same = nola.load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), full)
    assert torch.equal(logits(same), logits(model))


def test_merge_streams_shards_instead_of_holding_the_model(tmp_path):
    """A ~190 MB fp32 checkpoint in 16 MB shards merges, in a fresh process, with under 40% of the model's size in
    extra peak memory: one input tensor and one output shard at a time, never the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=1000)
    model = LlamaForCausalLM(config)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(tmp_path / "base", max_shard_size="16MB")
    nola.save_adapter(nola.attach(model, nola.AdapterConfig(rank=8, num_basis=64)), tmp_path / "adapter")
    del model
    script = textwrap.dedent(f"""
        import resource, torch
        from nola.adapter_io import read_adapter
        from nola.merge import merge_checkpoint
        adapter = read_adapter({str(tmp_path / 'adapter')!r})
        import transformers, bitsandbytes  # imported by the merge: not part of what it holds
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        merge_checkpoint({str(tmp_path / 'base')!r}, adapter, {str(tmp_path / 'merged')!r}, torch.float32,
                         max_shard_bytes=16 * 2**20)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    """)
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    growth = int(completed.stdout.split()[-1])
    assert model_bytes > 150e6 and len(list((tmp_path / "merged").glob("model-*.safetensors"))) >= 10
    assert growth < 0.4 * model_bytes, (growth, model_bytes)


def test_merge_refuses_another_base_before_writing(base_dir, adapted, tmp_path):
    _, adapter_dir = adapted
    other = tmp_path / "other"
    tiny_llama(init_seed=1).save_pretrained(other)  # same shapes, other weights
    with pytest.raises(nola.NolaError, match="adapter is for another base model .its model.embed_tokens.weight"):
        merge_checkpoint(other, read_adapter(adapter_dir), tmp_path / "merged", torch.float32)
    wider = tmp_path / "wider"
    tiny_llama(hidden_size=40).save_pretrained(wider)
    with pytest.raises(nola.NolaError, match="another base model"):
        merge_checkpoint(wider, read_adapter(adapter_dir), tmp_path / "merged", torch.float32)
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))


@pytest.mark.slow
@pytest.mark.parametrize("export_format, options", [("hf", ["--dtype", "fp32"]), ("peft-lora", ["--dtype", "fp32"]),
                                                     ("nola", ["--bits", "4", "--eval-data", "{eval}"])])
def test_merge_and_export_cli_prints_sizes_and_logit_differences(cache_dir, embedded_adapter, tmp_path,
                                                                   export_format, options):
    from nola.embedded import instruction_records

    out, eval_data = tmp_path / export_format, tmp_path / "eval.json"
    eval_data.write_text(json.dumps(instruction_records(count=200, seed=7)))
    options = [option.format(eval=eval_data) for option in options]
    completed = run_script(cache_dir, "scripts/merge_and_export.py", "--base", "embedded:tiny-llama", "--adapter",
                           embedded_adapter, "--out", out, "--format", export_format, *options)
    difference = float(completed.stdout.split("over 3 prompts: ")[1].split()[0])
    if export_format == "nola":
        assert "4-bit coefficients" in completed.stdout and "smaller than the input adapter" in completed.stdout
        losses = completed.stdout.split(f"eval loss on {eval_data} (200 records)")[1]
        adapter_loss, export_loss = (float(losses.split(name)[1].split(",")[0].split()[0])
                                     for name in ("adapter ", "export "))
        assert abs(adapter_loss - export_loss) < 0.05 * adapter_loss
    else:
        assert difference <= 1e-4, completed.stdout
    assert " MB" in completed.stdout or " bytes" in completed.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--format", "hf", "--bits", "4"], "--bits: quantised coefficients are a nola-format option, not hf"),
        (["--format", "hf", "--base", "{tmp}/nowhere"], "model.name_or_path: no such directory"),
        (["--format", "nola", "--adapter", "{full}"], "not a nola adapter directory"),
        (["--format", "nola", "--out", "{full}"], "is not empty (pass --overwrite to replace it)"),
        (["--format", "hf", "--max-shard-size", "lots"], "--max-shard-size: 'lots' is not a size"),
        (["--format", "hf", "--base", "{pickle}"], "only PyTorch .bin weights"),
        (["--format", "peft-lora", "--base", "{other}"], "adapter is for another base model"),
        (["--format", "nola", "--out", "{adapter}/export"], "overlaps --adapter"),
        (["--format", "nola", "--bits", "4", "--adapter", "{three_bit}"], "trained with 3-bit coefficients"),
        (["--format", "hf", "--max-shard-size", "inf"], "--max-shard-size: 'inf' is not a size"),
    ],
)
def test_merge_and_export_mistakes_are_one_line(cache_dir, embedded_adapter, tmp_path, arguments, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    pickle_base = tmp_path / "pickle"
    pickle_base.mkdir()
    (pickle_base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickle_base / "pytorch_model.bin").write_bytes(b"not loaded")
    defaults = {"--base": "embedded:tiny-llama", "--adapter": str(embedded_adapter), "--out": str(tmp_path / "out")}
    tiny_llama().save_pretrained(tmp_path / "other")  # a LLaMA of other shapes than the embedded one
    three_bit = export_nola(read_adapter(embedded_adapter), tmp_path / "three-bit", bits=3)
    given = [a.format(tmp=tmp_path, full=tmp_path / "full", pickle=pickle_base, other=tmp_path / "other",
                      adapter=embedded_adapter, three_bit=three_bit) for a in arguments]
    for flag, value in defaults.items():
        if flag not in given:
            given += [flag, value]
    completed = run_script(cache_dir, "scripts/merge_and_export.py", *given, "--check-prompts", "0", check=False)
    assert completed.returncode == 2, completed.stderr[-2000:]
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], completed.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (embedded_adapter / "export").exists()
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_an_index_naming_files_outside_the_checkpoint_is_refused(tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base, max_shard_size="40KB")
    index = json.loads((base / INDEX_FILE).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    (base / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(nola.NolaError, match="shard name '../../etc/passwd' is not a file in"):
        checkpoint_shards(base)


def test_an_export_over_its_check_tolerance_fails_the_command_and_leaves_out_as_it_was(tmp_path, monkeypatch,
                                                                                       capsys):
    """A merge whose update is 1% too large (a bug a bf16 check would not see, the float32 one must): exit code 2,
    one line with the measured difference, the tolerance and the export, and --out as it was before the command;
    the same command with the correct merge then replaces it."""
    import nola.merge

    base = shared_data("stories260K-hf")  # a real tokenizer for the check's prompts
    _, adapter_dir = adapter_on(base, CONFIG, tmp_path, size=CLI_SIZE)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    arguments = ["--base", str(base), "--adapter", str(adapter_dir), "--out", str(out), "--format", "hf",
                 "--dtype", "fp32", "--overwrite"]
    correct = nola.merge.adapter_delta
    monkeypatch.setattr(nola.merge, "adapter_delta", lambda adapter, name: 1.01 * correct(adapter, name))
    capsys.readouterr()  # what making the adapter printed (bitsandbytes' import warnings) is not the command's
    code = entry_point("merge_and_export")(arguments)
    printed = capsys.readouterr()
    assert code == 2, printed.err[-3000:]
    lines = printed.err.strip().splitlines()
    found = re.fullmatch(rf"error: logit check of the hf export to {re.escape(str(out))} failed: max \|logit "
                         rf"difference\| (\S+) > tolerance (\S+) \(4 x \(float32 eps .*\); the export was "
                         rf"deleted and {re.escape(str(out))} left as it was .*", lines[-1])
    assert len(lines) == 1 and found, printed.err
    difference, tolerance = float(found.group(1)), float(found.group(2))
    assert difference > tolerance > 0
    assert f"over 3 prompts: {found.group(1)} " in printed.out and f"tolerance {found.group(2)}: " in printed.out
    assert "merged model:" not in printed.out  # nothing claims the export was written
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"], "the unchecked export was left"

    monkeypatch.undo()
    assert entry_point("merge_and_export")(arguments) == 0, capsys.readouterr().err[-3000:]
    assert f"merged model: {out} (" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
