"""The paper's recipes end to end, as users run them: recipes/7b.yaml, 70b.yaml (nf4 stored as bfloat16) and
7b_lora.yaml loaded as files, with only model/data paths, step counts, batch sizes, sequence and MMLU sizes
overridden. Every dtype, precision, quantisation and checkpointing key stays as shipped: nf4 + double quant, bf16
compute, bf16 autocast, gradient checkpointing, W&B offline.

Each cell (recipe x engine: one process, 2 DDP processes, ZeRO-2, ZeRO-3 and, for 70b, FSDP2 over 2
processes) trains on the real tiny LLaMA, with the adapter's dtypes recorded inside every forward. Every engine's
checkpoint is killed mid-step and resumed in one cell (KILLED: five cells that cover the five engines and the three
recipes); each recipe's adapter then goes through every tool once, where the engine no longer matters (the adapter
file is the same format whatever wrote it): generate.py, evaluate.py (loss and MMLU), merge_and_export.py in all
three formats (each export reloaded by the loader its users have: transformers, peft, nola) — every one exiting 0
without a traceback.

Tolerances of the export checks (the reference is the adapter model as trained: nf4 from bf16 weights, bf16
embeddings and head, bf16 autocast, whose logits are bf16 — one ulp is 2^-7 of their magnitude):
- peft-lora: the same 4-bit base and autocast with peft's LoRA layers: within 2 ulps of the largest logit.
- hf: the merged weights rounded to bf16 and run in bf16 without the nf4 kernels: another bf16 computation of the same
  function, within 4 ulps of the largest logit (measured: about 3, whatever the adapter), while the adapter itself
  moves the logits by at least 6 ulps, so that a merge that lost the adapter would fail. (A small scale error would
  pass: the float32 merge tests in test_export.py, to 1e-4, are what catch those.)
- nola --bits 4: the coefficients are re-quantised (a real change), so the check is the eval loss, within 5%.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.conftest import metrics, run_main, run_script, shared_data
from tests.test_distributed import TWO_PROCESSES, accelerate

pytestmark = pytest.mark.slow  # every shipped recipe on every engine, killed and resumed: `make test-all`

RECIPES = ("7b", "70b", "7b_lora")
ENGINES = {"one": None, "ddp": TWO_PROCESSES["ddp-config"], "zero2": TWO_PROCESSES["zero2"],
           "zero3": TWO_PROCESSES["zero3"],
           "fsdp": ("--config_file", "recipes/accelerate/fsdp.yaml", "--num_processes", "2")}
# FSDP2 flattens the packed 4-bit weights with the rest of a layer: only the recipes that store them as bfloat16
# (the 70b ones) run under it; the others are refused in one line (tests/test_fsdp.py).
CELLS = [(r, e) for e in ENGINES for r in RECIPES if e != "fsdp" or r == "70b"]
# Killed mid-step and resumed: each engine once (its own checkpoint writer and reader), each recipe at least once.
KILLED = [("7b", "one"), ("7b", "zero2"), ("70b", "ddp"), ("70b", "fsdp"), ("7b_lora", "zero3")]
TOOLED = [("7b", "zero2"), ("70b", "fsdp"), ("7b_lora", "zero3")]  # each recipe's adapter through every tool
STEPS, KILLED_AT = 20, 15  # enough steps for the adapters to move the logits well above bf16 noise
PLAIN_STEPS = 6  # a cell that is neither killed nor tooled: the engine trains the recipe, checkpoints and evaluates
MMLU_EXAMPLES = 8


def steps_of(cell: tuple[str, str]) -> int:
    return STEPS if cell in KILLED or cell in TOOLED else PLAIN_STEPS


def sizes(engine: str, steps: int) -> list[str]:
    """Steps, batch and sequence sizes: 8 sequences a step on any split; a checkpoint and an eval half-way."""
    micro_batch = 4 if ENGINES[engine] is None else 2
    return [f"train.max_steps={steps}", f"train.save_steps={steps // 2}", f"train.eval_steps={steps // 2}",
            "train.logging_steps=1", f"train.micro_batch_size={micro_batch}", "train.grad_accum_steps=2",
            "train.eval_max_batches=2", "data.validation_size=16", "data.source_max_len=96",
            "data.target_max_len=64", f"mmlu.max_examples={MMLU_EXAMPLES}", "mmlu.max_length=256"]


def paths(output_dir) -> list[str]:
    return [f"model.name_or_path={shared_data('stories260K-hf')}",
            f"data.path={shared_data('alpaca/alpaca_subset.json')}",
            f"mmlu.path={shared_data('mmlu/zero_shot_mmlu_val.json')}", f"train.output_dir={output_dir}"]


def train(cache_dir, recipe: str, engine: str, output_dir, steps: int = STEPS, **environment: str):
    """train_llama.py RECIPE through the dtype recorder, under the engine's launcher."""
    launcher = accelerate(*ENGINES[engine]) if ENGINES[engine] else None
    return run_script(cache_dir, "tests/record_forward_dtypes.py", f"recipes/{recipe}.yaml", *paths(output_dir),
                      *sizes(engine, steps), *environment.pop("extra", ()), launcher=launcher, check=False,
                      environment={"NOLA_DTYPE_RECORD": str(output_dir / "dtypes"), **environment})


def cell_id(cell: tuple[str, str]) -> str:
    return f"{cell[0]}-{cell[1]}"


@pytest.fixture(scope="module")
def cells(cache_dir, tmp_path_factory):
    """Each cell's run, made once for every test that names the cell: the recipe on the engine; a KILLED cell's
    run is SIGKILLed in the middle of step KILLED_AT and resumed to the end."""
    made = {}

    def run(key: tuple[str, str]) -> dict:
        if key not in made:
            recipe, engine = key
            output_dir = tmp_path_factory.mktemp(f"{recipe}-{engine}")
            steps = steps_of(key)
            made[key] = {"recipe": recipe, "engine": engine, "output": output_dir, "steps": steps}
            if key in KILLED:
                killed = train(cache_dir, recipe, engine, output_dir, steps, NOLA_FAILPOINT=f"micro-batch@{KILLED_AT}")
                made[key].update(killed=killed, finished_when_killed=(output_dir / "adapter").exists())
            made[key]["finished"] = train(cache_dir, recipe, engine, output_dir, steps,
                                          extra=["train.resume_from=auto"] if key in KILLED else [])
        return made[key]

    return run


@pytest.fixture
def cell(cells, request) -> dict:
    return cells(request.param)


def assert_clean(completed, what: str) -> None:
    assert completed.returncode == 0, f"{what} exited {completed.returncode}:\n{completed.stderr[-3000:]}"
    assert "Traceback" not in completed.stderr, f"{what}:\n{completed.stderr[-3000:]}"


@pytest.mark.parametrize("cell", CELLS, indirect=True, ids=cell_id)
def test_every_engine_trains_every_recipe_to_its_end(cell):
    assert_clean(cell["finished"], "the run")
    rows = metrics(cell["output"])
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, cell["steps"] + 1))
    assert all(row["seconds_per_step"] > 0 for row in rows if "loss" in row)
    summary = json.loads((cell["output"] / "run.json").read_text())
    assert summary["steps"] == cell["steps"] and summary["mmlu_examples"] == MMLU_EXAMPLES
    assert 0 <= summary["mmlu_accuracy"] <= 1 and 0 <= summary["mmlu_micro_accuracy"] <= 1
    assert summary["final_eval_loss"] == pytest.approx([r for r in rows if "eval_loss" in r][-1]["eval_loss"])
    assert (cell["output"] / "checkpoints" / f"step-{cell['steps'] // 2}").is_dir()


@pytest.mark.parametrize("cell", KILLED, indirect=True, ids=cell_id)
def test_a_killed_run_resumes_and_ends_like_one_run(cell):
    assert cell["killed"].returncode != 0 and not cell["finished_when_killed"]
    assert_clean(cell["finished"], "the resumed run")
    assert "checkpoints/step-10" in cell["finished"].stdout  # resumed from the step-10 checkpoint, not from scratch
    rows = metrics(cell["output"])
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, STEPS + 1))  # none lost or repeated


@pytest.mark.parametrize("cell", CELLS, indirect=True, ids=cell_id)
def test_the_adapter_computes_in_float32_under_bf16_autocast_on_every_engine(cell):
    """DeepSpeed's own bf16 mode would cast the coefficients (and so A = A0 + Σ αᵢUᵢ) to bf16; nola keeps every
    trained tensor and the materialised A and B in float32, the forward under bf16 autocast, on every engine."""
    ranks = 1 if ENGINES[cell["engine"]] is None else 2
    for rank in range(ranks):
        seen = json.loads((cell["output"] / f"dtypes.{rank}.json").read_text())
        assert seen, "no adapted forward was recorded"
        assert {(s["parameter"], s["a"], s["b"]) for s in seen} == {("torch.float32",) * 3}, seen
        assert any(s["autocast"] for s in seen), "the training forward did not run under bf16 autocast"


def logit_check(output: str) -> tuple[float, float, float]:
    """(max |Δlogit|, the adapter's own effect, the logits' span) as merge_and_export.py prints them."""
    found = re.search(r"over \d+ prompts: (\S+) \(the adapter itself moves them by up to (\S+); logits span (\S+);",
                      output)
    assert found, output
    return tuple(float(value) for value in found.groups())


@pytest.mark.parametrize("cell", TOOLED, indirect=True, ids=cell_id)
def test_every_tool_works_on_what_the_recipe_produced(cell, capsys, tmp_path):
    base, adapter = shared_data("stories260K-hf"), cell["output"] / "adapter"
    answers = run_main(capsys, "generate", "--base", base, "--adapter", adapter, "--prompt", "Name three colours.",
                       "--max-new-tokens", "8")
    assert json.loads(answers.splitlines()[-1])["response"]

    eval_data = tmp_path / "eval.json"
    eval_data.write_text(json.dumps(json.loads(shared_data("alpaca/alpaca_subset.json").read_text())[:16]))
    scores = json.loads(run_main(capsys, "evaluate", "--base", base, "--adapter", adapter, "--data", eval_data,
                                 "--mmlu", shared_data("mmlu/zero_shot_mmlu_val.json"), "--mmlu-max-examples",
                                 MMLU_EXAMPLES))
    assert scores["eval_records"] == 16 and 0 < scores["eval_loss"] < 20
    assert scores["mmlu_examples"] == MMLU_EXAMPLES and set(scores["mmlu_subjects"])

    printed = run_main(capsys, "merge_and_export", "--base", base, "--adapter", adapter, "--out", tmp_path / "hf",
                       "--format", "hf")
    difference, effect, span = logit_check(printed)
    ulp = 2.0 ** -7 * span
    assert difference <= 4 * ulp, printed
    assert effect >= 6 * ulp, f"the adapter moves the logits by {effect}: within bf16 noise, the check is vacuous"

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # plain transformers, no nola
    assert merged.dtype == torch.bfloat16 and not hasattr(merged.config, "quantization_config")

    printed = run_main(capsys, "merge_and_export", "--base", base, "--adapter", adapter, "--out",
                       tmp_path / "peft", "--format", "peft-lora")
    difference, effect, span = logit_check(printed)
    assert difference <= 2 * 2.0 ** -7 * span, printed

    bits = ["--bits", "4"] if cell["recipe"] != "7b_lora" else []
    printed = run_main(capsys, "merge_and_export", "--base", base, "--adapter", adapter, "--out", tmp_path / "nola",
                       "--format", "nola", *bits, "--eval-data", eval_data)
    losses = re.search(r"adapter (\S+), nola export (\S+)", printed)
    adapter_loss, export_loss = float(losses.group(1)), float(losses.group(2))
    assert abs(adapter_loss - export_loss) <= 0.05 * adapter_loss, printed
    if not bits:
        assert logit_check(printed)[0] == 0.0, printed  # the same tensors, the same arithmetic


def test_packed_4bit_storage_of_another_float_dtype_survives_deepspeed(cache_dir, tmp_path):
    """nf4 codes stored as float16 under a bf16 ZeRO-2 run: DeepSpeed's bf16 mode would convert that storage to bf16,
    changing the packed bytes (a silently different base). nola keeps the engine in fp32, so the base scores the
    same at step 0 as in one process (bf16 batch-composition noise aside)."""
    storage = ["model.quant_storage=float16", "train.max_steps=1", "mmlu.path=null"]
    losses = []
    for engine in ("one", "zero2"):
        completed = train(cache_dir, "7b", engine, tmp_path / engine, extra=storage)
        assert_clean(completed, engine)
        losses.append(metrics(tmp_path / engine)[0]["eval_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
