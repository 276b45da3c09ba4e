#!/usr/bin/env bash
# The body of scripts/slurm/*.sbatch, run inside a SLURM allocation: one `accelerate launch` per node through
# srun, machine rank and rendezvous taken from SLURM's variables. `train.resume_from=auto` makes a requeued job
# (preemption, or the time limit: SIGUSR1 five minutes before it requeues the job) continue from its newest valid
# checkpoint, and the W&B run id is the job id, which a requeue keeps, so the curve continues in the same run.
#
# Environment knobs: NOLA_PROCESSES_PER_NODE (default: the node's allocated GPUs, else 1), NOLA_ACCELERATE_CONFIG
# (default recipes/accelerate/ddp.yaml; zero2.yaml / zero3.yaml for DeepSpeed), NOLA_PYTHON (default .venv/bin/python),
# NOLA_MAIN_PORT (default derived from the job id), NOLA_REPO (default the submit directory).
set -euo pipefail
cd "${NOLA_REPO:-$SLURM_SUBMIT_DIR}"
if [ $# -lt 1 ]; then
  echo "usage: sbatch scripts/slurm/<script>.sbatch RECIPE.yaml [dotted.key=value ...]" >&2
  exit 2
fi
python=${NOLA_PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
nodes=${SLURM_NNODES:-1}
per_node=${NOLA_PROCESSES_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
main_address=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
main_port=${NOLA_MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
recipe=$1
shift
echo "nola: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $nodes node(s) x $per_node process(es)," \
     "main $main_address:$main_port, recipe $recipe $*"

# SIGUSR1 (the time limit is near) becomes SIGTERM for every process of the training step (scancel --signal
# signals without terminating; a SIGTERM to srun itself would abort the step): the workers checkpoint their last
# completed step and exit (code 75). The job is then requeued, and the restart resumes from that checkpoint.
requeue=0
trap 'requeue=1; echo "nola: time limit near: checkpointing, then requeueing job $SLURM_JOB_ID"
      scancel --signal=TERM "$SLURM_JOB_ID.0" || true' USR1
# Single quotes: each task reads its own SLURM_NODEID.
# srun no longer inherits sbatch's --cpus-per-task (SLURM >= 22.05): pass it on, or the task gets one core.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} bash -c \
  'exec "$0" -m accelerate.commands.launch --machine_rank "$SLURM_NODEID" "$@"' "$python" \
  --config_file "${NOLA_ACCELERATE_CONFIG:-recipes/accelerate/ddp.yaml}" \
  --num_machines "$nodes" --num_processes $((nodes * per_node)) \
  --main_process_ip "$main_address" --main_process_port "$main_port" \
  train_llama.py "$recipe" train.resume_from=auto "log.wandb_run_id=nola-$SLURM_JOB_ID" "$@" &
srun_pid=$!
# USR1 interrupts `wait`; keep waiting until srun is gone, so the job ends with srun's own exit status.
while :; do
  wait "$srun_pid" && status=0 || status=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
if [ "$requeue" = 1 ] || [ "$status" = 75 ]; then
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
