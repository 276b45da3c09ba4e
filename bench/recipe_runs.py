"""One training run of a bench, through the project's own `train_llama.py` (never a second training loop), read back
from what the run writes: metrics.jsonl (the eval-loss curve) and run.json (the parameter report).

Shared by the benches that compare adapters (baselines.py, fidelity.py), so they measure exactly what users run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def run_recipe(recipe: str, overrides: list[str], output_dir: Path, label: str) -> dict:
    """Train `recipe` with `overrides` into `output_dir`; exit with the run's last stderr when it fails.

    Returns {"eval_loss": [[step, loss], ...], "trainable_params", "seconds"}."""
    command = [sys.executable, "train_llama.py", recipe, *overrides, f"train.output_dir={output_dir}",
               "log.wandb_mode=disabled"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.exit(f"error: {label} failed:\n{completed.stderr[-2000:]}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((output_dir / "run.json").read_text())
    return {"eval_loss": [[row["step"], row["eval_loss"]] for row in rows if "eval_loss" in row],
            "trainable_params": summary["trainable_params"], "seconds": round(time.perf_counter() - started, 1)}


def pyplot():
    """matplotlib's pyplot on the file-only backend, or a one-line exit naming the extra that installs it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: the plot needs matplotlib: pip install -e '.[bench]' (the JSON is written)")
    return plt


def save_figure(figure, path: Path) -> None:
    """Lay out and write a bench's figure as a PNG beside its JSON."""
    figure.tight_layout()
    figure.savefig(path, dpi=120)
