# The commands the README promises. Each sets up .venv first (scripts/setup.sh: idempotent, CPU-safe torch).
# `test` is the fast tier (every module, one end-to-end tiny run; tests marked slow left out), `test-all` the whole
# suite, which CI runs.
# Nothing here reaches the internet at run time: the hub and W&B are forced offline.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
PY := .venv/bin/python

.PHONY: setup train test test-all

setup:
	bash scripts/setup.sh

train: setup
	$(OFFLINE) $(PY) train_llama.py recipes/tiny.yaml

test: setup
	$(OFFLINE) $(PY) -m pytest -q -m "not slow"

test-all: setup
	$(OFFLINE) $(PY) -m pytest -q
