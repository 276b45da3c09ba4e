"""Where a run's numbers go: `metrics.jsonl` (one JSON object per line) and Weights & Biases, from rank 0 only.

W&B is offline by default (files under output_dir/wandb, `wandb sync` uploads later), online when the recipe says
so, or disabled. The run id can be pinned (log.wandb_run_id) so a requeued SLURM job continues the same W&B run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from nola.config import LogSection


class RunLog:
    """Append metrics to output_dir/metrics.jsonl and W&B; a no-op on ranks other than 0."""

    def __init__(self, output_dir: Path, section: LogSection, run_config: dict, enabled: bool) -> None:
        self.enabled = enabled
        self.wandb_run = None
        self._metrics = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")
        if section.wandb_mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=section.wandb_project,
                name=section.wandb_run_name,
                id=section.wandb_run_id,
                resume="allow" if section.wandb_run_id else None,
                mode=section.wandb_mode,
                dir=str(output_dir),
                config=run_config,
            )

    def log(self, step: int, values: dict[str, float]) -> None:
        """One line of metrics at an optimizer step; non-finite values are written as null (valid JSON)."""
        if not self.enabled:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()}
        self._metrics.write(json.dumps({"step": step, **clean}) + "\n")
        self._metrics.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def summary(self, values: dict) -> None:
        """Run-level facts (parameter counts, adapter bytes, final losses) for the W&B run summary."""
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
