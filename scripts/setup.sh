#!/usr/bin/env bash
# Create .venv and install nola with its dev tools at the exact versions of constraints.txt (the tree the whole
# suite last passed on), choosing the right PyTorch build for this machine.
#
# Why pinned: pyproject.toml's ranges admit every future release, and one upstream release (peft 0.22,
# transformers 5.25) was enough to turn a fresh clone red. constraints.txt makes a clone next month install what
# passed today; `make refresh-constraints` moves it to the newest releases and runs the whole suite on them.
#
# Why a script and not just `pip install -e .`: with no torch installed, pip resolves `torch` to a multi-GB CUDA
# build even on a CPU-only machine. So torch is settled first, at the constrained release:
#   - a torch already visible to the venv (it is created with --system-site-packages, so a user's CUDA build in
#     the system Python counts) is left alone, even at another release (its pin is then dropped, and said);
#   - on a machine with an NVIDIA driver, that release from the default index (a CUDA build);
#   - otherwise $NOLA_CPU_TORCH (default: that release, whose CPU wheel pip finds here); set $NOLA_TORCH_INDEX_URL
#     to a CPU wheel index if your pip does not find a CPU build of it by itself.
# NOLA_CONSTRAINTS=none installs the newest release of everything but torch instead (what `make
# refresh-constraints` does, in a venv of its own); torch stays at constraints.txt's release (or the venv's own),
# since the newest torch on an index is a CUDA build that a CPU-only machine cannot use.
# Idempotent: a second run with everything installed takes a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${NOLA_VENV:-.venv}
CONSTRAINTS=${NOLA_CONSTRAINTS:-constraints.txt}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)
torch_pins=$CONSTRAINTS
if [ "$CONSTRAINTS" = none ]; then
  torch_pins=constraints.txt
fi
pinned_torch=$(grep -E '^torch==' "$torch_pins" || echo torch)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" install "$pinned_torch"
  else
    "${PIP[@]}" install ${NOLA_TORCH_INDEX_URL:+--index-url "$NOLA_TORCH_INDEX_URL"} "${NOLA_CPU_TORCH:-$pinned_torch}"
  fi
fi
present=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
effective="$VENV/.nola-constraints.txt"
if [ "$CONSTRAINTS" = none ]; then
  # the newest release of everything but torch, which stays the build settled above
  echo "torch==$present" > "$effective"
  constraint_args=(-c "$effective" --upgrade --upgrade-strategy eager)
else
  # the torch in the venv stays: pin the rest, and torch only where it is the tested release
  if [ "$pinned_torch" = "torch==$present" ]; then
    cp "$CONSTRAINTS" "$effective"
  else
    grep -v -E '^torch==' "$CONSTRAINTS" > "$effective"
    echo "setup: keeping torch $present (the suite was tested on $pinned_torch)"
  fi
  constraint_args=(-c "$effective")
fi
stamp="$VENV/.nola-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || { [ "$CONSTRAINTS" != none ] && [ "$CONSTRAINTS" -nt "$stamp" ]; }; then
  "${PIP[@]}" install "${constraint_args[@]}" -e ".[dev]"
  touch "$stamp"
fi
"$VENV/bin/python" -c "import torch, nola; print(f'nola {nola.__version__} ready: torch {torch.__version__}, cuda available: {torch.cuda.is_available()}')"
