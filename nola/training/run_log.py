"""Where a run's numbers go: `metrics.jsonl` (one JSON object per line) and Weights & Biases, from rank 0 only.

W&B is offline by default (files under output_dir/wandb, `wandb sync` uploads later), online when the recipe says
so, or disabled. The run id can be pinned (log.wandb_run_id) so a requeued SLURM job continues the same W&B run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nola.training.config import LogSection


class RunLog:
    """Append metrics to output_dir/metrics.jsonl and W&B; a no-op on ranks other than 0."""

    def __init__(self, output_dir: Path, section: LogSection, run_config: dict, enabled: bool,
                 resumed_step: int | None = None) -> None:
        self.enabled = enabled
        self.wandb_run = None
        self._metrics = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "metrics.jsonl"
        if resumed_step is not None:
            _drop_lines_after(path, resumed_step)
        self._metrics = open(path, "a", encoding="utf-8")
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
        self._to_wandb(lambda run: run.log(values, step=step))

    def summary(self, values: dict) -> None:
        """Run-level facts (parameter counts, adapter bytes, final losses) for the W&B run summary."""
        self._to_wandb(lambda run: run.summary.update(values))

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        self._to_wandb(lambda run: run.finish())

    def _to_wandb(self, action) -> None:
        """W&B is a reporter, not part of training: if its service dies (SLURM signals every process of a job,
        wandb's own included) or its network fails, say so once and go on with metrics.jsonl alone."""
        if self.wandb_run is None:
            return
        try:
            action(self.wandb_run)
        except Exception as error:  # any failure of the W&B client or its service process
            print(f"warning: W&B logging stopped ({type(error).__name__}: {error}); metrics.jsonl continues",
                  file=sys.stderr)
            self.wandb_run = None


@dataclass
class LogWindow:
    """The optimizer steps since the last metrics line: their token-weighted mean loss and their throughput, so
    each line reports its own window, not the run's average."""

    first_step: int
    start: float = field(default_factory=lambda: time.perf_counter())  # the clock of the call, as in rates()
    weighted_loss: float = 0.0  # Σ step loss x its response tokens, over the steps that updated
    loss_tokens: int = 0
    tokens: int = 0  # attended tokens of every step, skipped ones included (they cost the same time)
    paused_seconds: float = 0.0  # eval and checkpoint time inside the window: not training, not counted

    def add(self, tokens: int, loss: float | None = None, loss_tokens: int = 0) -> None:
        self.tokens += tokens
        if loss is not None:
            self.weighted_loss += loss * loss_tokens
            self.loss_tokens += loss_tokens

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent in the block out of the window's throughput: an eval or a checkpoint write between
        two steps would otherwise read as slow training in the window it falls in."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - started

    def rates(self, step: int) -> dict[str, float]:
        """Mean loss, tokens per second and seconds per step from `first_step` to `step`, pauses left out."""
        elapsed = time.perf_counter() - self.start - self.paused_seconds
        return {"loss": self.weighted_loss / self.loss_tokens if self.loss_tokens else float("nan"),
                "tokens_per_s": self.tokens / elapsed, "seconds_per_step": elapsed / (step - self.first_step)}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: allocated CUDA memory on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _drop_lines_after(path: Path, step: int) -> None:
    """Forget the metrics of steps a resumed run will repeat (those after its checkpoint), so the file reads as one
    uninterrupted run. Rewritten beside and renamed over: a crash here leaves the old file or the new one."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if _step_of(line) is not None and _step_of(line) <= step]
    staging = path.with_name(path.name + ".tmp")
    staging.write_text("".join(kept), encoding="utf-8")
    os.replace(staging, path)


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a torn line (a crash mid-write), which is dropped."""
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
