"""What every command-line entry point shares: a user mistake (NolaError) is one line on stderr and exit code 2,
never a traceback (anything else is a bug and keeps its traceback); inputs are checked before any weight loads."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from nola.errors import NolaError

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
QUIET_AT_IMPORT = ("bitsandbytes.backends.cpu.ops", "kernels")


def check_input_source(flag: str, value: str) -> None:
    """A data argument must be an existing file, `embedded:NAME`, or a hub name (no file suffix, not a path)."""
    if value.startswith("embedded:") or Path(value).exists():
        return
    if value.endswith(DATA_SUFFIXES) or value.startswith((".", "/", "~")) or value.count("/") > 1:
        raise NolaError(f"{flag}: no such file: {value}")


def run_command(main: Callable[[], int | None]) -> int:
    """Run `main`, turning a NolaError into `error: <message>` on stderr and exit code 2."""
    # bitsandbytes, on CPUs with AVX512-BF16, fetches an optional CPU kernel at import through the `kernels` package
    # (a dependency of transformers since 5.25) and either one warns when it cannot (missing package, offline hub):
    # noise that would stand beside (and obscure) our one-line errors.
    for noisy in QUIET_AT_IMPORT:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return main() or 0
    except NolaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
