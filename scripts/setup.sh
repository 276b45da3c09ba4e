#!/usr/bin/env bash
# Create .venv and install nola with its dev tools, choosing the right PyTorch build for this machine.
#
# Why a script and not just `pip install -e .`: with no torch installed, pip resolves `torch` to a multi-GB CUDA
# build even on a CPU-only machine. So torch is settled first:
#   - a torch already visible to the venv (it is created with --system-site-packages, so a user's CUDA build in
#     the system Python counts) is left alone;
#   - on a machine with an NVIDIA driver, plain `torch` (pip's default CUDA build);
#   - otherwise the CPU pin $NOLA_CPU_TORCH (default torch==2.13.0); set $NOLA_TORCH_INDEX_URL to a CPU wheel
#     index if your pip does not find a CPU build of that version by itself.
# Idempotent: a second run with everything installed takes a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${NOLA_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" install torch
  else
    "${PIP[@]}" install ${NOLA_TORCH_INDEX_URL:+--index-url "$NOLA_TORCH_INDEX_URL"} "${NOLA_CPU_TORCH:-torch==2.13.0}"
  fi
fi
stamp="$VENV/.nola-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "${PIP[@]}" install -e ".[dev]"
  touch "$stamp"
fi
"$VENV/bin/python" -c "import torch, nola; print(f'nola {nola.__version__} ready: torch {torch.__version__}, cuda available: {torch.cuda.is_available()}')"
