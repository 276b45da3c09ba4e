# The commands the README promises. Each sets up $(VENV) first (scripts/setup.sh: idempotent, CPU-safe torch, the
# exact versions of constraints.txt).
# `test` is the fast tier (every module, one end-to-end tiny run; tests marked slow left out), `test-all` the whole
# suite, which CI runs; both print the 25 slowest tests, so the time budget is visible at every run.
# Nothing here reaches the internet at run time: the hub and W&B are forced offline.
VENV ?= .venv
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
PY := $(VENV)/bin/python
# `make train` runs on the CPU kernels the embedded build is pinned to (nola/embedded.py PINNED_KERNELS; a test keeps
# the two equal), so it prints the same figures on every x86-64 machine with this torch build, whatever its CPU and
# cores. Unpinned, the same 150 steps end with 0 to 7 answers right out of 60, by the CPU's vector kernels
# (bench/results/embedded_default.json).
PINNED := ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 MKL_DYNAMIC=FALSE \
	NOLA_BASIS_BACKEND=eager
PYTEST := $(OFFLINE) $(PY) -m pytest -q --durations=25

.PHONY: setup train test test-all refresh-constraints

setup:
	NOLA_VENV=$(VENV) bash scripts/setup.sh

train: setup
	$(OFFLINE) $(PINNED) $(PY) train_llama.py recipes/tiny.yaml

test: setup
	$(PYTEST) -m "not slow"

test-all: setup
	$(PYTEST)

# The newest release of every dependency (torch stays the machine's build) in a venv of its own, frozen into
# constraints.txt, then the whole suite on it: commit constraints.txt if it passes, `git checkout` it if not.
refresh-constraints:
	rm -rf .venv-refresh
	NOLA_VENV=.venv-refresh NOLA_CONSTRAINTS=none bash scripts/setup.sh
	.venv-refresh/bin/python scripts/freeze_constraints.py
	$(MAKE) test-all VENV=.venv-refresh
