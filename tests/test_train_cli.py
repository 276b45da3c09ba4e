"""End to end through `train_llama.py`: the embedded default learns, resume is exact, 4-bit real LLaMA trains,
the 70B dry run counts right, and CLI mistakes are one line with exit code 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, metrics, shared_data
from tests.conftest import run_train as train
from tests.conftest import entry_point
from tests.test_bad_inputs import assert_one_line_error


def test_make_train_learns_and_prints_the_figures_the_readme_quotes(cache_dir, tmp_path):
    """`make train` exactly (the tiny recipe on the pinned kernels, nothing overridden but where it writes): the
    embedded default learns, every output is written, and its figures are those of the committed artefact the
    README quotes (bench/results/answer_accuracy.json, run "make-train"). The pins make them the same on every
    x86-64 CPU, so a change that moves them fails here until the bench is rerun and the README with it."""
    from nola.embedded import PINNED_KERNELS

    output = tmp_path / "run"
    completed = train(cache_dir, "recipes/tiny.yaml", f"train.output_dir={output}", **PINNED_KERNELS)
    evals = [m["eval_loss"] for m in metrics(output) if "eval_loss" in m]
    assert len(evals) == 7 and evals[-1] < 0.5 * evals[0], evals
    losses = [m for m in metrics(output) if "loss" in m]
    assert {"lr", "grad_norm", "tokens_per_s", "seconds_per_step", "peak_memory_mb"} <= set(losses[0])
    summary = json.loads((output / "run.json").read_text())
    assert summary["steps"] == 150 and summary["trainable_params"] == summary["adapted_modules"] * 2 * 256
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-100", "step-150"]
    assert list((output / "wandb").glob("offline-run-*")), "no offline W&B run written"
    assert "generations after training" in completed.stdout
    after = [line for line in completed.stdout.splitlines() if line.startswith("after training:  answer accuracy")]
    assert after and "capital" in after[0], completed.stdout[-2000:]
    families = summary["answer_families"]
    assert summary["answer_examples"] == sum(f["n"] for f in families.values()) == 60
    assert summary["answer_accuracy"] == pytest.approx(sum(f["correct"] for f in families.values()) / 60)
    assert summary["answer_accuracy_before"] < summary["answer_accuracy"]

    artefact = json.loads((REPO_ROOT / "bench" / "results" / "answer_accuracy.json").read_text())
    published = next(run for run in artefact["runs"] if run["name"] == "make-train")
    for key in ("answer_correct", "answer_accuracy_before", "answer_families", "first_eval_loss", "final_eval_loss"):
        assert summary[key] == published[key], (key, summary[key], published[key])
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"{summary['answer_correct']}/60" in readme and f"{summary['final_eval_loss']:.2f}" in readme


@pytest.mark.slow
def test_resumed_run_reaches_the_same_coefficients(cache_dir, tmp_path):
    common = ["recipes/tiny.yaml", "train.max_steps=8", "train.save_steps=4", "train.eval_steps=100",
              "train.sample_generations=0", "log.wandb_mode=disabled", "train.save_total_limit=null",
              "train.lr_scheduler=cosine"]
    train(cache_dir, *common, f"train.output_dir={tmp_path / 'whole'}")
    train(cache_dir, *common, f"train.output_dir={tmp_path / 'resumed'}",
          f"train.resume_from={tmp_path / 'whole' / 'checkpoints' / 'step-4'}")
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    halfway = load_file(tmp_path / "whole" / "checkpoints" / "step-4" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all((whole[k] == resumed[k]).all() for k in whole), "resume diverged from the uninterrupted run"
    assert any((whole[k] != halfway[k]).any() for k in whole), "steps 5-8 changed nothing: vacuous comparison"
    summaries = [json.loads((tmp_path / name / "run.json").read_text()) for name in ("whole", "resumed")]
    assert summaries[0]["first_eval_loss"] == summaries[1]["first_eval_loss"]  # the step-0 loss, not the resumed one


@pytest.mark.slow
def test_training_on_the_source_still_prompts_generation_with_the_prompt_only(cache_dir, tmp_path):
    completed = train(cache_dir, "recipes/tiny.yaml", "data.train_on_source=true", "train.max_steps=1",
                      "train.sample_generations=1", "train.max_new_tokens=4", "log.wandb_mode=disabled",
                      f"train.output_dir={tmp_path / 'run'}")
    prompt_line = completed.stdout.split("--- generations after training ---")[1].splitlines()[1]
    assert "### Response:" in prompt_line


@pytest.mark.slow
def test_auto_resume_continues_from_the_latest_checkpoint(cache_dir, tmp_path):
    output = tmp_path / "run"
    common = ["recipes/tiny.yaml", "train.save_steps=2", "train.eval_steps=100", "train.sample_generations=0",
              "log.wandb_mode=disabled", f"train.output_dir={output}", "train.resume_from=auto"]
    train(cache_dir, *common, "train.max_steps=2")
    completed = train(cache_dir, *common, "train.max_steps=4")
    assert f'"resumed_from": "{output / "checkpoints" / "step-2"}"' in completed.stdout
    assert [m["step"] for m in metrics(output) if "loss" in m] == [2, 4]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nola", "lora"])
def test_real_tiny_llama_in_nf4_learns_alpaca(tmp_path, cache_dir, method):
    model_dir = shared_data("stories260K-hf")
    alpaca = shared_data("alpaca/alpaca_subset.json")
    output = tmp_path / method
    train(cache_dir, "recipes/tiny.yaml", f"model.name_or_path={model_dir}", f"data.path={alpaca}",
          "model.load_in_4bit=true", "model.compute_dtype=float32", f"adapter.method={method}", "adapter.rank=4",
          "adapter.num_basis=64", f"train.lr={1e-2 if method == 'nola' else 3e-3}", "train.max_steps=40",
          "train.eval_steps=40", "train.save_steps=40", "data.validation_size=64", "data.source_max_len=160",
          "data.target_max_len=96", "train.sample_generations=0", "log.wandb_mode=disabled",
          f"train.output_dir={output}", f"mmlu.path={shared_data('mmlu/zero_shot_mmlu_val.json')}",
          "mmlu.max_examples=24", "mmlu.at_start=true")
    evals = [m["eval_loss"] for m in metrics(output) if "eval_loss" in m]
    assert evals[-1] < evals[0] - 0.05, evals
    summary = json.loads((output / "run.json").read_text())
    mmlu = [m for m in metrics(output) if "mmlu_accuracy" in m]
    assert [m["step"] for m in mmlu] == [0, 40] and summary["mmlu_examples"] == 24
    assert summary["mmlu_accuracy"] == mmlu[-1]["mmlu_accuracy"] and 0 <= summary["mmlu_accuracy"] <= 1
    assert summary["adapted_modules"] == 5 * 7
    # NOLA: 35 modules x (64 + 64) coefficients. LoRA rank 4: rank x (in + out) for q, o (64, 64), k, v (64, 32),
    # gate, up (64, 172) and down (172, 64), over 5 layers: 26x more.
    expected = 35 * 2 * 64 if method == "nola" else 5 * 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 172) * 3)
    assert summary["trainable_params"] == expected


@pytest.mark.slow
def test_a_4bit_base_with_bf16_compute_and_no_autocast_trains_and_resumes(tmp_path, cache_dir):
    """The README's way to train any local checkpoint, in 4-bit: recipes/tiny.yaml has compute_dtype bfloat16 and
    mixed_precision "no". It used to die at the first eval (a bf16 head fed float32 hidden states), and its resume
    was refused because the preflight read the recipe's config_json instead of the checkpoint's config."""
    output = tmp_path / "run"
    common = ["recipes/tiny.yaml", f"model.name_or_path={shared_data('stories260K-hf')}",
              f"data.path={shared_data('alpaca/alpaca_subset.json')}", "model.load_in_4bit=true",
              "model.config_json=recipes/models/llama-2-7b.json", "data.validation_size=16", "train.eval_steps=2",
              "train.save_steps=2", "train.sample_generations=1", "train.max_new_tokens=4", "log.wandb_mode=disabled",
              f"train.output_dir={output}", "train.resume_from=auto"]
    train(cache_dir, *common, "train.max_steps=2")
    resumed = train(cache_dir, *common, "train.max_steps=3")
    assert f'"resumed_from": "{output / "checkpoints" / "step-2"}"' in resumed.stdout
    evals = [m["eval_loss"] for m in metrics(output) if "eval_loss" in m]
    assert len(evals) == 3 and all(math.isfinite(loss) for loss in evals)
    recorded = json.loads((output / "adapter" / "adapter_config.json").read_text())["base_model"]
    assert recorded["quantization"]["dtype"] == "bfloat16" and recorded["embedding"]["dtype"] == "float32"
    assert recorded["mixed_precision"] == "no"


def test_dry_run_of_the_70b_recipe_prints_the_paper_count():
    completed = subprocess.run([sys.executable, "train_llama.py", "recipes/70b.yaml", "--dry-run"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=300, check=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["trainable_params"] == 573_440 and report["adapted_modules"] == 560
    assert report["adapter_bytes"] == 4 * 573_440
    assert 30 < report["estimated_gpu_memory_gib"] < 80
    sharded = [report["zero3_gpu_memory_gib"][n] for n in ("2", "4", "8")]
    assert sharded == sorted(sharded, reverse=True) and sharded[0] < report["estimated_gpu_memory_gib"]


def test_a_cli_mistake_ends_the_process_with_exit_code_2_and_one_line(cache_dir, tmp_path):
    """The process as a user sees it: exit code 2, the error the last line of stderr, alone, no traceback."""
    output = tmp_path / "out"
    completed = train(cache_dir, "recipes/tiny.yaml", "train.max_step=3", f"train.output_dir={output}", check=False)
    assert completed.returncode == 2, completed.stderr[-2000:]
    # Library chatter (progress bars, warnings) may come first; the error is the last line, alone, no traceback.
    lines = completed.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "did you mean 'train.max_steps'" in errors[0], completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr
    assert not output.exists(), "a failed run left an output directory behind"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["recipes/missing.yaml"], "recipes/missing.yaml: no such recipe file"),
        (["recipes/tiny.yaml", "data.path=/no/such/data.json"], "/no/such/data.json"),
        (["recipes/tiny.yaml", "model.name_or_path=/no/such/model"], "model.name_or_path: no such directory"),
        (["recipes/tiny.yaml", "adapter.target_modules=[attention]"], "matches no Linear layer"),
    ],
)
def test_cli_mistakes_are_one_line_with_exit_code_2(cache_dir, tmp_path, monkeypatch, capsys, arguments, message):
    """train_llama.py's main() in this process (what the process above runs, without a Python start-up each)."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("NOLA_CACHE_DIR", str(cache_dir))
    output = tmp_path / "out"
    code = entry_point("train")([*arguments, f"train.output_dir={output}", "log.wandb_mode=disabled"])
    assert_one_line_error(code, capsys.readouterr().err, message)
    assert not output.exists(), "a failed run left an output directory behind"
