"""Crash safety and clean stops: SIGKILL at the worst moments (mid-step, mid-checkpoint-write) on one and two
processes, SIGTERM/SIGUSR1, a write limit while checkpointing, non-finite losses, two runs on one directory.

The standard is the uninterrupted run with the same seed: a killed-and-resumed run must end with the same adapter,
bit for bit on CPU, and lose at most the work since its last checkpoint."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from nola.training.checkpoint import verify_checkpoint
from tests.conftest import REPO_ROOT, free_port, metrics, run_train, script_environment

pytestmark = pytest.mark.slow  # every test kills, signals or resumes training subprocesses: `make test-all`

# 8 optimizer steps of 2 accumulated micro-batches, a checkpoint every 2, a cosine schedule: every piece of state a
# resume must restore changes from step to step.
RECIPE = ["recipes/tiny.yaml", "train.max_steps=8", "train.save_steps=2", "train.eval_steps=4", "train.logging_steps=1",
          "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.lr_scheduler=cosine",
          "train.save_total_limit=null", "train.sample_generations=0", "log.wandb_mode=disabled"]
TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
       "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def launcher(processes: int) -> list[str]:
    return [*TWO, "--main_process_port", str(free_port())] if processes == 2 else []


def adapter(output_dir):
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def assert_identical(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[k], expected[k]) for k in expected), "the resumed run differs from the whole one"


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, tmp_path_factory):
    """{process count: output dir} of runs that were never interrupted."""
    runs = {}
    for processes in (1, 2):
        output = tmp_path_factory.mktemp(f"whole-{processes}")
        per_process_batch = 2 if processes == 1 else 1  # the same global batch of 4 sequences
        run_train(cache_dir, *RECIPE, f"train.micro_batch_size={per_process_batch}", f"train.output_dir={output}",
                  launcher=launcher(processes))
        runs[processes] = output
    return runs


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("kill_point, resumes_from", [("micro-batch@5", 4), ("checkpoint-write@4", 2)])
def test_sigkill_then_auto_resume_ends_with_the_same_adapter(cache_dir, uninterrupted, tmp_path, processes,
                                                              kill_point, resumes_from):
    output = tmp_path / "run"
    batch = f"train.micro_batch_size={2 if processes == 1 else 1}"
    killed = run_train(cache_dir, *RECIPE, batch, f"train.output_dir={output}", "train.resume_from=auto",
                       launcher=launcher(processes), check=False, NOLA_FAILPOINT=kill_point)
    assert killed.returncode != 0 and not (output / "adapter").exists()
    if kill_point.startswith("checkpoint-write"):
        assert list((output / "checkpoints").glob(".step-4.tmp-*")), "the kill did not land mid-write"
        assert not (output / "checkpoints" / "step-4").exists()
    resumed = run_train(cache_dir, *RECIPE, batch, f"train.output_dir={output}", "train.resume_from=auto",
                        launcher=launcher(processes))
    assert f'checkpoints/step-{resumes_from}"' in resumed.stdout
    assert_identical(adapter(output), adapter(uninterrupted[processes]))
    assert not list((output / "checkpoints").glob(".step-*")), "leftovers of the killed writer remain"
    steps = [m["step"] for m in metrics(output) if "loss" in m]
    assert steps == list(range(1, 9)), "metrics.jsonl repeats or misses steps"


def start_training(cache_dir, output, processes: int, *extra: str, **environment: str) -> subprocess.Popen:
    batch = f"train.micro_batch_size={2 if processes == 1 else 1}"
    command = [*(launcher(processes) or [sys.executable]), "train_llama.py", *RECIPE, batch, *extra,
               f"train.output_dir={output}"]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=script_environment(cache_dir, **environment),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(output, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (output / "metrics.jsonl").is_file() and any(
                m.get("step", 0) >= step and "loss" in m for m in metrics(output)):
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.mark.parametrize("processes, signal_number", [(1, signal.SIGUSR1), (2, signal.SIGTERM)])
def test_a_stop_signal_checkpoints_the_last_step_and_resume_finishes_identically(
        cache_dir, uninterrupted, tmp_path, processes, signal_number):
    output = tmp_path / "run"
    # Held after step 3 (a failpoint) until the signal comes, so it lands mid-run however slow the machine.
    training = start_training(cache_dir, output, processes, "train.resume_from=auto", NOLA_FAILPOINT="hold-after@3")
    wait_for_step(output, 3, training)
    training.send_signal(signal_number)  # for two processes: to accelerate launch, which passes it on
    _, stderr = training.communicate(timeout=300)
    if processes == 1:
        assert training.returncode == 75, stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if "nola: stopped by" in line]
    assert stopped and "resume with train.resume_from=auto" in stopped[0], stderr[-3000:]
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert step == 3  # no step 4: the checkpoint holds the last completed step, not a started one
    verify_checkpoint(output / "checkpoints" / f"step-{step}")
    resumed = run_train(cache_dir, *RECIPE, f"train.micro_batch_size={2 if processes == 1 else 1}",
                        f"train.output_dir={output}", "train.resume_from=auto", launcher=launcher(processes))
    assert f'checkpoints/step-{step}"' in resumed.stdout
    assert_identical(adapter(output), adapter(uninterrupted[processes]))


def test_a_write_limit_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(cache_dir, tmp_path):
    output = tmp_path / "run"
    run_train(cache_dir, *RECIPE, "train.max_steps=2", f"train.output_dir={output}")
    limit = (output / "checkpoints" / "step-2" / "optimizer.safetensors").stat().st_size // 2

    def limit_file_size():  # what `ulimit -f` does: writing past it fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "train_llama.py", *RECIPE, "train.max_steps=4", f"train.output_dir={output}",
               "train.resume_from=auto"]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=script_environment(cache_dir), capture_output=True,
                               text=True, preexec_fn=limit_file_size, timeout=600)
    assert completed.returncode == 2, completed.stderr[-3000:]
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "checkpoints/step-4: cannot be written (File too large)" in last, last
    assert "Traceback" not in completed.stderr
    verify_checkpoint(output / "checkpoints" / "step-2")
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-2"]


def test_a_non_finite_loss_skips_the_step_and_training_goes_on(cache_dir, tmp_path):
    output = tmp_path / "run"
    run_train(cache_dir, *RECIPE, "train.max_steps=5", f"train.output_dir={output}", NOLA_FAILPOINT="nan-loss@3")
    summary = json.loads((output / "run.json").read_text())
    assert summary["steps"] == 5 and summary["nonfinite_steps"] == 1
    assert [m["step"] for m in metrics(output) if "nonfinite_step" in m] == [3]
    assert all(torch.isfinite(t).all() for t in adapter(output).values())


def test_non_finite_steps_in_a_row_stop_the_run_with_the_last_good_state(cache_dir, tmp_path):
    output = tmp_path / "run"
    completed = run_train(cache_dir, *RECIPE, "train.save_steps=1", "train.max_nonfinite_steps=3",
                          f"train.output_dir={output}", check=False, NOLA_FAILPOINT="nan-loss@2,3,4")
    assert completed.returncode == 2
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train: 3 steps in a row (to step 4) had a non-finite loss"), last
    checkpoints = output / "checkpoints"
    good, stopped = (load_file(checkpoints / f"step-{n}" / "trainable.safetensors") for n in (1, 4))
    assert_identical(stopped, good)  # nothing of the three bad steps reached the coefficients


def test_a_second_run_on_the_same_output_dir_is_refused(cache_dir, tmp_path):
    output = tmp_path / "run"
    first = start_training(cache_dir, output, 1, "train.max_steps=400")
    try:
        wait_for_step(output, 1, first)
        second = run_train(cache_dir, *RECIPE, f"train.output_dir={output}", check=False)
        assert second.returncode == 2
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: train.output_dir: {output} is in use by another run (pid {first.pid}"), last
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    assert first.returncode == 75
    # The refused run wrote nothing: one step-0 evaluation (the first run's), every later step logged once.
    losses = [m["step"] for m in metrics(output) if "loss" in m]
    assert [m["step"] for m in metrics(output) if "eval_loss" in m].count(0) == 1
    assert len(losses) == len(set(losses))


def test_a_stop_signal_during_evaluation_checkpoints_at_once_and_resume_finishes_identically(
        cache_dir, uninterrupted, tmp_path):
    """SIGTERM arriving in the middle of the eval after step 4 stops the run between two eval batches (a scheduler's
    grace period is seconds, an evaluation can take minutes), with the step-4 checkpoint written."""
    output = tmp_path / "run"
    stopped = run_train(cache_dir, *RECIPE, "train.micro_batch_size=2", "train.eval_max_batches=null",
                        f"train.output_dir={output}", "train.resume_from=auto", check=False,
                        NOLA_FAILPOINT="signal-in-eval@4")
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert "stopped by SIGTERM after step 4" in stopped.stderr and "Traceback" not in stopped.stderr
    verify_checkpoint(output / "checkpoints" / "step-4")
    assert not [m for m in metrics(output) if m["step"] == 4 and "eval_loss" in m], "the evaluation ran to its end"
    run_train(cache_dir, *RECIPE, "train.micro_batch_size=2", "train.eval_max_batches=null",
              f"train.output_dir={output}", "train.resume_from=auto")
    assert_identical(adapter(output), adapter(uninterrupted[1]))


def test_a_resumed_run_keeps_its_counters_and_times_its_first_window_right(cache_dir, tmp_path):
    """The non-finite count goes on across a resume, and the first logging window after it covers only the steps it
    ran: tokens_per_s x seconds_per_step x steps in the window = the tokens of those steps."""
    output = tmp_path / "run"
    run_train(cache_dir, *RECIPE, "train.max_steps=4", "train.logging_steps=3", f"train.output_dir={output}",
              NOLA_FAILPOINT="nan-loss@3")
    tokens_at_4 = json.loads((output / "checkpoints" / "step-4" / "trainer_state.json").read_text())["tokens_seen"]
    run_train(cache_dir, *RECIPE, "train.max_steps=6", "train.logging_steps=3", f"train.output_dir={output}",
              "train.resume_from=auto")
    summary = json.loads((output / "run.json").read_text())
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == 1
    window = [m for m in metrics(output) if m["step"] == 6 and "loss" in m][0]
    assert window["tokens_per_s"] * window["seconds_per_step"] * 2 == pytest.approx(
        summary["tokens_seen"] - tokens_at_4, rel=1e-9)
