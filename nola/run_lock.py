"""One run per output directory: two runs writing the same checkpoints and metrics would interleave them into
something neither can resume from. The lock is an flock on output_dir/.nola.lock, so it dies with its process (no
stale lock after a crash or SIGKILL); the file itself stays and says who held it last."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from nola.errors import NolaError

LOCK_FILE = ".nola.lock"


def acquire_run_lock(output_dir: Path):
    """Lock `output_dir` for this process (creating it) and return the open lock file, which must stay open for the
    run; a one-line NolaError naming the holder if another run has it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise NolaError(f"train.output_dir: {output_dir} is in use by another run ({holder}); wait for it to end or "
                        f"choose another output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle
