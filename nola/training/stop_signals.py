"""A graceful stop on SIGTERM / SIGUSR1, what SLURM (and torchrun, and Kubernetes) send before preemption or the
time limit: the handler only records the request; the training loop notices it at the next micro-batch boundary,
agreed on by all ranks, writes a checkpoint of the last completed step and exits with EXIT_PREEMPTED, which
scripts/slurm/launch.sh reads as "requeue me"."""

from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: try again later
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Records SIGTERM / SIGUSR1 instead of dying on them (main thread only; a no-op elsewhere)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._record)

    def _record(self, number, frame) -> None:
        self.received = signal.Signals(number).name

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


class Preempted(Exception):
    """Raised out of the training loop after the stop checkpoint is written."""

    def __init__(self, signal_name: str, step: int, checkpoint) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint} written: resume with "
                         f"train.resume_from=auto")
        self.checkpoint = checkpoint
