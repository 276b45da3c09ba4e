"""One run per output directory: two runs writing the same checkpoints and metrics would interleave them into
something neither can resume from. The lock is an flock on output_dir/.nola.lock, so it dies with its process (no
stale lock after a crash or SIGKILL); the file itself stays and says who held it last."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from itertools import takewhile
from pathlib import Path

from nola.errors import NolaError

LOCK_FILE = ".nola.lock"
# What flock raises where the filesystem has no locks (some NFS, SMB and FUSE mounts).
_NO_LOCKS = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK}


def acquire_run_lock(output_dir: Path):
    """Lock `output_dir` for this process (creating it) and return the open lock file, which must stay open for the
    run; a one-line NolaError naming the holder if another run has it, if output_dir is (or lies under) a file, or
    if its filesystem cannot lock (then nothing is left behind)."""
    missing = list(takewhile(lambda path: not path.exists(), (output_dir, *output_dir.parents)))  # deepest first
    existing = (output_dir, *output_dir.parents)[len(missing)]
    if not existing.is_dir():
        where = "" if existing == output_dir else f"cannot create {output_dir}: "
        raise NolaError(f"train.output_dir: {where}{existing} is a file, not a directory; choose another output_dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    lock_path = output_dir / LOCK_FILE
    new_lock_file = not lock_path.exists()
    handle = open(lock_path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise NolaError(f"train.output_dir: {output_dir} is in use by another run ({holder}); wait for it to end or "
                        f"choose another output_dir") from None
    except OSError as error:
        if error.errno not in _NO_LOCKS:
            raise
        handle.close()
        if new_lock_file:
            lock_path.unlink()
        for directory in missing:
            directory.rmdir()
        raise NolaError(f"train.output_dir: the filesystem of {output_dir} does not support file locks "
                        f"({os.strerror(error.errno)}); choose an output_dir on a local filesystem") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle
