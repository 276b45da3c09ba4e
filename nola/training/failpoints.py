"""Named points where a test can make a run fail the way real runs fail: killed outright (SIGKILL: no handler, no
cleanup, like the OOM killer or a lost node), fed a non-finite loss, or held between two steps until a stop signal
comes (so a scheduler's preemption lands mid-run without a run long enough to outlast the test's reaction time).
Off unless NOLA_FAILPOINT names the point.

    NOLA_FAILPOINT=checkpoint-write@4     SIGKILL half-way through writing the step-4 checkpoint
    NOLA_FAILPOINT=micro-batch@5          SIGKILL after the first micro-batch's backward of step 5
    NOLA_FAILPOINT=nan-loss@3,4           a NaN loss at steps 3 and 4
    NOLA_FAILPOINT=signal-in-eval@4       SIGTERM to itself in the middle of the evaluation after step 4
    NOLA_FAILPOINT=hold-after@10          after step 10 (and its checkpoint), wait for SIGTERM / SIGUSR1

Crash safety is only believable when tested at the worst moments, and those moments cannot be hit from outside
the process reliably; hence hooks in the code, each a single environment lookup when unused.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

VARIABLE = "NOLA_FAILPOINT"


def armed(name: str, step: int) -> bool:
    """Whether NOLA_FAILPOINT names `name` at this step."""
    spec = os.environ.get(VARIABLE, "")
    point, _, steps = spec.partition("@")
    return point == name and str(step) in steps.split(",")


def kill_if_armed(name: str, step: int) -> None:
    """SIGKILL this process when armed: the hardest stop there is."""
    if armed(name, step):
        os.kill(os.getpid(), signal.SIGKILL)


HOLD_LIMIT_SECONDS = 600  # a hold nobody ends is a test that forgot to: go on rather than hang a job for ever


def hold_if_armed(name: str, step: int, stop_requested: Callable[[], bool]) -> None:
    """Wait, when armed, until `stop_requested()` (a stop signal arrived): the run then stops as it would have
    stopped if the signal had come during the next step."""
    if not armed(name, step):
        return
    deadline = time.monotonic() + HOLD_LIMIT_SECONDS
    while not stop_requested() and time.monotonic() < deadline:
        time.sleep(0.05)
