# The two commands the README promises. Both set up .venv first (scripts/setup.sh: idempotent, CPU-safe torch).
# Nothing here reaches the internet at run time: the hub and W&B are forced offline.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
PY := .venv/bin/python

.PHONY: setup train test

setup:
	bash scripts/setup.sh

train: setup
	$(OFFLINE) $(PY) train_llama.py recipes/tiny.yaml

test: setup
	$(OFFLINE) $(PY) -m pytest -q
