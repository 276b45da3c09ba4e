"""`train_llama.py`, with every adapted layer noting what its forward computes with: the dtype of the coefficients
(or LoRA matrices) and of the materialised A and B, and whether autocast is on. Each rank writes what it saw to
`$NOLA_DTYPE_RECORD.<rank>.json` at exit.

A test-side wrapper rather than a hook in the product: it exists to catch an engine (DeepSpeed's bf16 mode) casting
the adapter behind the trainer's back, which only a look inside the forward shows.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

import torch

from nola.layers import AdaptedLinear

REPO_ROOT = Path(__file__).resolve().parents[1]
seen: set[tuple[str, str, str, bool]] = set()
adapter_matrices = AdaptedLinear.adapter_matrices


def recording_adapter_matrices(self):
    a, b = adapter_matrices(self)
    trained = next(iter(self.stored_tensors().values()))
    seen.add((str(trained.dtype), str(a.dtype), str(b.dtype), torch.is_autocast_enabled(a.device.type)))
    return a, b


def write_record() -> None:
    rank = os.environ.get("RANK", "0")
    records = [dict(zip(("parameter", "a", "b", "autocast"), entry)) for entry in sorted(seen)]
    Path(f"{os.environ['NOLA_DTYPE_RECORD']}.{rank}.json").write_text(json.dumps(records))


AdaptedLinear.adapter_matrices = recording_adapter_matrices
atexit.register(write_record)
sys.argv = [str(REPO_ROOT / "train_llama.py"), *sys.argv[1:]]
sys.path.insert(0, str(REPO_ROOT))
runpy.run_path(sys.argv[0], run_name="__main__")
