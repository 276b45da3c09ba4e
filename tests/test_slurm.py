"""The SLURM scripts on a real SLURM: scripts/slurm/local_cluster.sh brings up munged + slurmctld + slurmd on this
host (installing Debian's slurm-wlm when root), then jobs are submitted with sbatch exactly as a user would."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from tests.conftest import REPO_ROOT, shared_data

pytestmark = pytest.mark.slow  # every test runs jobs through a real SLURM: `make test-all`

CLUSTER = REPO_ROOT / "scripts" / "slurm" / "local_cluster.sh"
STATE = "/tmp/nola-slurm-tests"
TRAIN = ["recipes/tiny.yaml", "train.micro_batch_size=4", "train.eval_steps=50", "train.sample_generations=0"]


def train_70b() -> list[str]:
    """recipes/70b.yaml (4-bit nf4 base, quant_storage bfloat16, gradient checkpointing, bf16) scaled down to the
    real tiny LLaMA in ../shared/data: what FSDP2 shards (a skip naming the data if it is not there)."""
    return ["recipes/70b.yaml", f"model.name_or_path={shared_data('stories260K-hf')}",
            f"data.path={shared_data('alpaca/alpaca_subset.json')}", "mmlu.path=null", "train.micro_batch_size=2",
            "train.grad_accum_steps=2", "data.validation_size=16", "data.source_max_len=96",
            "data.target_max_len=64", "train.eval_max_batches=2"]


@pytest.fixture(scope="module")
def slurm(cache_dir):
    if os.geteuid() != 0 and not shutil.which("slurmctld"):
        pytest.skip("SLURM is not installed and installing it needs root")
    environment = {**os.environ, "NOLA_SLURM_DIR": STATE, "NOLA_SLURMCTLD_PORT": "6917", "NOLA_SLURMD_PORT": "6918"}
    subprocess.run(["bash", str(CLUSTER), "start"], env=environment, check=True, timeout=300)
    yield {**environment, "SLURM_CONF": f"{STATE}/slurm.conf", "NOLA_CACHE_DIR": str(cache_dir),
           "NOLA_PROCESSES_PER_NODE": "2", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(["bash", str(CLUSTER), "stop"], env=environment, check=True, timeout=120)


def submit(environment, script, log, *arguments) -> str:
    completed = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", "--cpus-per-task=2", "--nodes=1", f"scripts/slurm/{script}",
         *map(str, arguments)],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip().split(";")[0]


def job_state(environment, job: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], env=environment, capture_output=True, text=True).stdout
    return re.search(r"JobState=(\w+)", shown).group(1)


def wait_until(environment, job: str, log, done, timeout: float = 600) -> None:
    """Poll (sbatch --wait polls at up to 32 s intervals) until `done()`; fail fast if the job fails."""
    deadline = time.monotonic() + timeout
    while not done():
        state = job_state(environment, job)
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), (state, log.read_text())
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.3)


def start_requeued_job(environment, job: str, log) -> None:
    """SLURM holds a requeued job back for a while before it is eligible again; let it start sooner, but safely.
    Started at once, it fails (seen in CI: FAILED, no restart output; slurmctld.log: "Killing non-startable batch
    JobId=N: Job credential revoked"): slurmd refuses a launch whose credential is not newer, at 1 s resolution,
    than the revocation of the previous instance's. So: pending, the node idle again, 2 s, then start."""
    wait_until(environment, job, log, lambda: job_state(environment, job) == "PENDING")
    wait_until(environment, job, log, lambda: node_state(environment) == "idle")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=environment, check=True)


def node_state(environment) -> str:
    """The one node's short state: idle, alloc, mix, comp (still completing a job), ..."""
    shown = subprocess.run(["sinfo", "-h", "-o", "%t"], env=environment, capture_output=True, text=True).stdout
    return shown.strip().rstrip("*~#")


@pytest.mark.parametrize("script", ["train_1node.sbatch", "train_multinode.sbatch"])
def test_a_job_trains_and_writes_its_adapter(slurm, tmp_path, script):
    output, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm, script, log, *TRAIN, "train.max_steps=4", "train.save_steps=2", f"train.output_dir={output}")
    wait_until(slurm, job, log, lambda: job_state(slurm, job) == "COMPLETED")
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((output / "run.json").read_text())["steps"] == 4
    text = log.read_text()
    assert f"nola: job {job} (restart 0) on 1 node(s) x 2 process(es)" in text
    assert '"processes": 2' in text
    assert [p.name.endswith(f"-nola-{job}") for p in (output / "wandb").glob("offline-run-*")] == [True]


# engine: (NOLA_ACCELERATE_CONFIG or None for launch.sh's default DDP, what the launch's JSON line says, further
# recipe overrides). Each run holds after step HELD_AT (a failpoint: it waits there for the scheduler's signal), so
# the preemption lands mid-run however slow the machine, and the run needs only a few steps beyond it.
HELD_AT, MAX_STEPS = 10, 14
REQUEUED = {
    "ddp": (None, '"processes": 2', []),
    "ddp-packed": (None, '"packed_length": 192', ["data.packing=true"]),
    "fsdp2": ("recipes/accelerate/fsdp.yaml", '"distributed_type": "FSDP2", "processes": 2', []),
}


@pytest.mark.parametrize("engine", list(REQUEUED))
def test_a_requeued_job_resumes_from_its_checkpoint_in_the_same_wandb_run(slurm, tmp_path, engine):
    """Preempted (scontrol requeue) after its step-10 checkpoint, the job restarts and `train.resume_from=auto`
    continues from its newest checkpoint: DDP on the tiny recipe (padded, and packed: the packed rows of an epoch
    are rebuilt from its seed), FSDP2 (lean sharded load) on a scaled-down 70b."""
    config, launch_line, overrides = REQUEUED[engine]
    environment = {**slurm, "NOLA_FAILPOINT": f"hold-after@{HELD_AT}",
                   **({"NOLA_ACCELERATE_CONFIG": config} if config else {})}
    recipe = train_70b() if engine == "fsdp2" else TRAIN
    output, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(environment, "train_1node.sbatch", log, *recipe, *overrides, f"train.max_steps={MAX_STEPS}",
                 "train.save_steps=5", "train.logging_steps=1", f"train.output_dir={output}")
    wait_until(slurm, job, log, lambda: (output / "checkpoints" / f"step-{HELD_AT}").is_dir())
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True)  # preempted mid-run, as a scheduler would
    start_requeued_job(slurm, job, log)
    wait_until(slurm, job, log, lambda: job_state(slurm, job) == "COMPLETED")
    text = log.read_text()
    assert f"nola: job {job} (restart 1)" in text
    assert text.count(launch_line) == 2, text[-4000:]  # both starts ran on this engine, 2 processes each
    resumed = re.findall(r'"resumed_from": "[^"]*/checkpoints/step-(\d+)"', text)
    assert len(resumed) == 1 and 10 <= int(resumed[0]) < MAX_STEPS  # resumed mid-run, not after it finished
    runs = sorted(p.name for p in (output / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-nola-{job}") for name in runs)
    assert json.loads((output / "run.json").read_text())["steps"] == MAX_STEPS
    metrics = output / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, MAX_STEPS + 1)), "steps were lost or repeated across the requeue"


def test_the_time_limit_signal_checkpoints_then_requeues_losing_no_step(slurm, tmp_path):
    """SIGUSR1 to the batch shell, as `--signal=B:USR1@300` sends it before the time limit: the training processes
    checkpoint their last completed step (no periodic checkpoint exists), the job requeues itself and resumes there."""
    output, log = tmp_path / "run", tmp_path / "job.out"
    job = submit({**slurm, "NOLA_FAILPOINT": "hold-after@5"}, "train_1node.sbatch", log, *TRAIN,
                 "train.max_steps=8", "train.save_steps=1000", "train.logging_steps=1", f"train.output_dir={output}")
    metrics = output / "metrics.jsonl"
    wait_until(slurm, job, log, lambda: metrics.is_file() and '"step": 5,' in metrics.read_text())
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    start_requeued_job(slurm, job, log)
    wait_until(slurm, job, log, lambda: job_state(slurm, job) == "COMPLETED")
    text = log.read_text()
    assert "nola: time limit near: checkpointing, then requeueing" in text
    resumed = re.findall(r'"resumed_from": "[^"]*/checkpoints/step-(\d+)"', text)
    assert len(resumed) == 1 and 5 <= int(resumed[0]) < 8, "\n".join(l for l in text.splitlines() if "train:" not in l)[-4000:]
    assert json.loads((output / "run.json").read_text())["steps"] == 8
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, 9)), "steps were lost or repeated across the requeue"
