"""The training loop's policies, in-process (no subprocess), by driving `FineTuneRecipe` and its phases on a toy
model: the embedded tiny LLaMA through recipes/7b.yaml (and 7b_lora.yaml) as shipped, nf4 + double quant, bf16
autocast, gradient checkpointing, with only paths, steps and sizes overridden.

- a non-finite step is skipped (parameters unchanged) and counted; N in a row stop the run with a checkpoint;
- a stop request in the middle of a step checkpoints the last completed step, exactly, and the run resumes;
- gradients accumulated over micro-batches equal those of one big batch;
- log lines, evals and checkpoints fire at the steps their periods say.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from nola.errors import NolaError
from nola.training.config import TrainSection, load_recipe
from nola.training.recipe import FineTuneRecipe, LoopState, due_actions
from nola.training.stop_signals import Preempted
from tests.conftest import REPO_ROOT, metrics

SIZES = ["model.name_or_path=embedded:tiny-llama", "data.path=embedded:tiny-instructions", "mmlu.path=null",
         "data.source_max_len=64", "data.target_max_len=32", "data.validation_size=8", "train.eval_max_batches=1",
         "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.sample_generations=0",
         "train.answer_accuracy=0", "train.logging_steps=1", "train.eval_steps=100", "train.save_steps=1",
         "train.save_total_limit=null", "log.wandb_mode=disabled"]


@pytest.fixture(autouse=True)
def in_process_run(cache_dir, monkeypatch, fresh_accelerate_state):
    """The session's embedded-default cache, and a fresh accelerate state."""
    monkeypatch.setenv("NOLA_CACHE_DIR", str(cache_dir))


def recipe(output_dir, *overrides: str, name: str = "7b") -> FineTuneRecipe:
    return FineTuneRecipe(load_recipe(REPO_ROOT / f"recipes/{name}.yaml",
                                      [*SIZES, f"train.output_dir={output_dir}", *overrides]))


def trained(output_dir, step: int) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "checkpoints" / f"step-{step}" / "trainable.safetensors")


def trainer_state(output_dir, step: int) -> dict:
    return json.loads((output_dir / "checkpoints" / f"step-{step}" / "trainer_state.json").read_text())


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_periodic_actions_are_due_every_period_and_all_at_the_last_step():
    train = TrainSection(max_steps=10, logging_steps=2, eval_steps=3, save_steps=4)
    due = {step: due_actions(step, train) for step in range(1, 11)}
    assert [s for s in due if "log" in due[s]] == [2, 4, 6, 8, 10]
    assert [s for s in due if "eval" in due[s]] == [3, 6, 9, 10]
    assert [s for s in due if "save" in due[s]] == [4, 8, 10]
    assert due[1] == ()


def test_a_run_logs_evaluates_and_saves_at_those_steps(tmp_path):
    summary = recipe(tmp_path, "train.max_steps=5", "train.logging_steps=2", "train.eval_steps=3",
                     "train.save_steps=2").run()
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 5]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 3, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-4", "step-5"]
    assert summary["steps"] == 5 and trainer_state(tmp_path, 4)["step"] == 4
    assert all(r["seconds_per_step"] > 0 and r["tokens_per_s"] > 0 for r in rows if "loss" in r)


def test_the_non_finite_count_runs_until_an_update_and_ignores_loss_scaler_overflows():
    state = LoopState()
    for skipped, overflow in [(True, False), (True, False), (True, True), (False, False), (True, False)]:
        state.count_update(skipped, scaler_overflow=overflow)
    assert (state.step, state.nonfinite_steps, state.nonfinite_in_a_row, state.overflows_in_a_row) == (5, 4, 1, 0)
    state.count_update(True, scaler_overflow=True)
    assert (state.nonfinite_in_a_row, state.overflows_in_a_row) == (1, 1)


def test_a_non_finite_step_is_skipped_counted_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("NOLA_FAILPOINT", "nan-loss@2")
    summary = recipe(tmp_path, "train.max_steps=3").run()
    assert same(trained(tmp_path, 1), trained(tmp_path, 2))  # step 2 left the parameters as they were
    assert not same(trained(tmp_path, 2), trained(tmp_path, 3))  # step 3 trained
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 3
    assert [r["step"] for r in metrics(tmp_path) if r.get("nonfinite_step")] == [2]
    assert (trainer_state(tmp_path, 3)["nonfinite_steps"], trainer_state(tmp_path, 3)["nonfinite_in_a_row"]) == (1, 0)


def test_too_many_non_finite_steps_in_a_row_stop_with_a_checkpoint_of_the_last_good_state(tmp_path, monkeypatch):
    monkeypatch.setenv("NOLA_FAILPOINT", "nan-loss@2,3")
    with pytest.raises(NolaError, match=r"2 steps in a row \(to step 3\) had a non-finite loss"):
        recipe(tmp_path, "train.max_steps=6", "train.max_nonfinite_steps=2").run()
    assert same(trained(tmp_path, 1), trained(tmp_path, 3))
    assert trainer_state(tmp_path, 3)["nonfinite_in_a_row"] == 2
    assert not (tmp_path / "checkpoints" / "step-4").exists() and not (tmp_path / "adapter").exists()


def test_a_stop_request_mid_step_checkpoints_the_last_completed_step_and_the_run_resumes(tmp_path, monkeypatch):
    reference = tmp_path / "uninterrupted"
    recipe(reference, "train.max_steps=4").run()

    import nola.training.recipe as recipe_module

    calls, forward = [], recipe_module.token_loss_sum

    def forward_then_sigterm(model, batch):
        calls.append(1)
        if len(calls) == 6:  # step 3, second micro-batch: the first one's backward already ran
            os.kill(os.getpid(), signal.SIGTERM)  # recorded by the run's handler, honoured at this micro-batch
        return forward(model, batch)

    stopped = tmp_path / "stopped"
    monkeypatch.setattr(recipe_module, "token_loss_sum", forward_then_sigterm)
    with pytest.raises(Preempted, match="stopped by SIGTERM after step 2"):
        recipe(stopped, "train.max_steps=4").run()
    assert len(calls) == 6 and not (stopped / "checkpoints" / "step-3").exists()
    assert same(trained(stopped, 2), trained(reference, 2))  # the half-done step left no trace
    assert trainer_state(stopped, 2)["step_in_epoch"] == 2  # the resumed run redoes step 3

    monkeypatch.setattr(recipe_module, "token_loss_sum", forward)
    recipe(stopped, "train.max_steps=4", "train.resume_from=auto").run()
    assert same(trained(stopped, 4), trained(reference, 4))
    assert [r["step"] for r in metrics(stopped) if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("name", ["7b", "7b_lora"])
def test_gradients_accumulated_over_micro_batches_equal_those_of_one_big_batch(tmp_path, name):
    """The same 4 sequences as 1 x 4, 2 x 2 and 4 x 1: the loss is the mean over the step's response tokens and
    the gradient is its gradient, however the step is split (bf16 autocast: equal to bf16 rounding)."""
    gradients, losses = {}, {}
    for micro_batch, accumulation in [(4, 1), (2, 2), (1, 4)]:
        run = recipe(tmp_path / f"{micro_batch}x{accumulation}", f"train.micro_batch_size={micro_batch}",
                     f"train.grad_accum_steps={accumulation}", "train.max_steps=1", name=name)
        try:
            run.setup()
            result = run.accumulate(run.plan.stream.next())
            gradients[micro_batch] = torch.cat([p.grad.reshape(-1) for p in run.parameters])
            losses[micro_batch] = result.loss_sum.item() / result.label_tokens
        finally:
            run.release()
    big = gradients[4]
    assert big.abs().max() > 0
    for micro_batch in (2, 1):
        assert losses[micro_batch] == pytest.approx(losses[4], rel=1e-5)
        assert torch.allclose(gradients[micro_batch], big, rtol=1e-2, atol=1e-2 * big.abs().max().item())
        assert (gradients[micro_batch] - big).norm() <= 1e-2 * big.norm()  # measured: 0.0025 (bf16 autocast)


def test_split_seed_holds_the_held_out_records_fixed_across_run_seeds(tmp_path):
    """Comparing seeds needs the same validation records; by default the split follows train.seed. A checkpoint
    records the split seed, so a resume on another split (other training records) is refused."""
    from accelerate.state import AcceleratorState

    from nola.training.preflight import plan_run

    def held_out(name: str, *overrides: str) -> list[list[int]]:
        run = recipe(tmp_path / name, *overrides)
        plan = plan_run(run.config, run.accelerator)
        plan.run_lock.close()
        return [example["input_ids"] for example in plan.data.validation]

    reference = held_out("seed0", "train.seed=0")
    assert held_out("seed1-split0", "train.seed=1", "data.split_seed=0") == reference
    assert held_out("seed1", "train.seed=1") != reference
    first = recipe(tmp_path / "resumed", "train.max_steps=1", "data.split_seed=0")
    first.run()
    first.plan.run_lock.close()
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = recipe(tmp_path / "resumed", "train.max_steps=2", "data.split_seed=1", "train.resume_from=auto")
    with pytest.raises(NolaError, match="was trained with split_seed=0, this run has split_seed=1"):
        plan_run(resumed.config, resumed.accelerator)


def test_a_resume_reports_the_before_training_figures_its_fresh_start_measured(tmp_path, monkeypatch):
    """Answers and samples 'before training' are measured once, before step 1, and kept with the run: a resume (a
    SLURM requeue resumes many times) reports the stored ones instead of measuring its checkpoint again."""
    import nola.training.recipe as recipe_module

    passes, measure = [], recipe_module.answer_accuracy
    monkeypatch.setattr(recipe_module, "answer_accuracy", lambda *a, **k: passes.append(1) or measure(*a, **k))
    evaluations = ["train.answer_accuracy=4", "train.sample_generations=1", "train.max_new_tokens=4"]
    fresh = recipe(tmp_path / "fresh", "train.max_steps=2", *evaluations).run()
    assert len(passes) == 2  # before and after
    stored = trainer_state(tmp_path / "fresh", 1)
    assert stored["answers_before"]["answer_examples"] == 4 and len(stored["samples_before"]) == 1

    passes.clear()
    resumed = recipe(tmp_path / "resumed", "train.max_steps=2", *evaluations,
                     f"train.resume_from={tmp_path / 'fresh' / 'checkpoints' / 'step-1'}")
    summary = resumed.run()
    assert len(passes) == 1  # after training only
    assert summary["answer_accuracy_before"] == fresh["answer_accuracy_before"]
    assert resumed.state.samples_before == stored["samples_before"]
    assert trainer_state(tmp_path / "resumed", 2)["answers_before"] == stored["answers_before"]


def test_the_answer_pass_honours_a_stop_signal_between_its_batches(tmp_path, monkeypatch):
    """A SIGTERM during the answer-accuracy pass after the last step stops it at the next batch, with the last
    step checkpointed and no final adapter: the resumed run redoes the pass, and only it."""
    from transformers.generation.utils import GenerationMixin

    calls, generate = [], GenerationMixin.generate

    def generate_then_sigterm(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the answer pass after training (two batches of 16 and 4 before it)
            os.kill(os.getpid(), signal.SIGTERM)
        return generate(model, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", generate_then_sigterm)
    output = tmp_path / "run"
    evaluations = ["data.validation_size=20", "train.answer_accuracy=20", "train.max_new_tokens=2",
                   "train.max_steps=1"]
    with pytest.raises(Preempted, match="stopped by SIGTERM after step 1"):
        recipe(output, *evaluations).run()
    assert len(calls) == 3, "the answer pass ran past the stop request"
    assert (output / "checkpoints" / "step-1").is_dir() and not (output / "adapter").exists()
    summary = recipe(output, *evaluations, "train.resume_from=auto").run()
    assert len(calls) == 5 and summary["answer_examples"] == 20


def test_persistent_fp16_overflows_stop_the_run_with_the_last_good_state(tmp_path, monkeypatch):
    """fp16 loss scaling skips a step whose gradient overflows and halves the scale; overflowing step after step
    (the scale already tiny) is no longer calibration, and the run stops with one line instead of skipping on."""
    import nola.training.recipe as recipe_module

    class HalvingScaler:  # the part of torch's GradScaler the loop uses, on a CPU
        scale = 2.0**16

        def update(self) -> None:
            self.scale /= 2

        def get_scale(self) -> float:
            return self.scale

        def state_dict(self) -> dict:
            return {"scale": self.scale}

    monkeypatch.setattr(recipe_module, "MAX_SCALER_OVERFLOWS_IN_A_ROW", 3)
    run = recipe(tmp_path, "train.max_steps=10", "train.save_steps=100")
    try:
        run.setup()
        run.scaler = HalvingScaler()
        monkeypatch.setattr(run.accelerator, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
        with pytest.raises(NolaError, match=r"^train: 3 steps in a row \(to step 3\) overflowed in fp16 and were "
                                            r"skipped, the loss scale now 8.19e\+03; stopped with the last good "
                                            r"state in .*step-3: use train.mixed_precision=bf16"):
            run.train()
    finally:
        run.release()
    assert trainer_state(tmp_path, 3)["overflows_in_a_row"] == 3 and trainer_state(tmp_path, 3)["nonfinite_in_a_row"] == 0
    assert not (tmp_path / "checkpoints" / "step-4").exists()


def test_evaluation_and_checkpoint_time_is_left_out_of_the_throughput_windows(tmp_path, monkeypatch):
    """An eval after every step, each taking 1,000 s of the log's clock (a real clock plus what the evals add, so no
    wall-clock bound depends on the machine's load): the windows' seconds per step stay those of training."""
    import time
    from types import SimpleNamespace

    import nola.training.recipe as recipe_module
    import nola.training.run_log as run_log

    added = [0.0]
    monkeypatch.setattr(run_log, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + added[0]))
    evaluate = recipe_module.evaluate

    def slow_evaluate(*arguments, **settings):
        added[0] += 1000.0
        return evaluate(*arguments, **settings)

    monkeypatch.setattr(recipe_module, "evaluate", slow_evaluate)
    recipe(tmp_path, "train.max_steps=4", "train.logging_steps=2", "train.eval_steps=1").run()
    windows = [r["seconds_per_step"] for r in metrics(tmp_path) if "loss" in r]
    assert added[0] >= 4000 and len(windows) == 2
    assert max(windows) < 500, windows  # 1,000+ s a step if the evals counted


def test_the_recipe_declares_every_attribute_where_the_object_is_made():
    """Reading __init__ tells what a FineTuneRecipe holds: no phase adds an attribute of its own."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(FineTuneRecipe))
    methods = {node.name: node for node in tree.body[0].body if isinstance(node, ast.FunctionDef)}

    def assigned(function: ast.FunctionDef) -> set[str]:
        return {target.attr for node in ast.walk(function) if isinstance(node, (ast.Assign, ast.AnnAssign))
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                for target in (target.elts if isinstance(target, ast.Tuple) else [target])
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                and target.value.id == "self"}

    declared = assigned(methods["__init__"])
    later = {name: assigned(method) - declared for name, method in methods.items() if name != "__init__"}
    assert not any(later.values()), later
