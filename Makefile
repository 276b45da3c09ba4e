# The commands the README promises. Each sets up .venv first (scripts/setup.sh: idempotent, CPU-safe torch).
# `test` is the fast tier (every module, one end-to-end tiny run; tests marked slow left out), `test-all` the whole
# suite, which CI runs.
# Nothing here reaches the internet at run time: the hub and W&B are forced offline.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
PY := .venv/bin/python
# `make train` runs on the CPU kernels the embedded build is pinned to (nola/embedded.py PINNED_KERNELS; a test keeps
# the two equal), so it prints the same figures on every x86-64 machine with this torch build, whatever its CPU and
# cores. Unpinned, the same 150 steps end with 8 to 18 answers right out of 60, by the CPU's vector kernels
# (bench/results/embedded_default.json).
PINNED := ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 MKL_DYNAMIC=FALSE \
	NOLA_BASIS_BACKEND=eager

.PHONY: setup train test test-all

setup:
	bash scripts/setup.sh

train: setup
	$(OFFLINE) $(PINNED) $(PY) train_llama.py recipes/tiny.yaml

test: setup
	$(OFFLINE) $(PY) -m pytest -q -m "not slow"

test-all: setup
	$(OFFLINE) $(PY) -m pytest -q
