"""What the benches share: one training run through the project's own `train_llama.py` (never a second training
loop), read back from what the run writes (metrics.jsonl: the eval-loss curve; run.json: the parameter report and
the run's other figures), and the way a bench writes its committed artefacts.

Artefacts are written atomically (a temporary file in the same directory, then `os.replace`), so a bench killed
mid-write (a long sweep is often interrupted) leaves the previous results whole, never a truncated JSON or PNG. They
record the command that wrote them, and no path of the machine that ran them (`portable_path`): a committed JSON
must say how to reproduce it anywhere, not where someone's checkout was.

Shared by the benches that compare adapters (baselines.py, fidelity.py), so they measure exactly what users run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# What the Makefile's commands set: no hub, no W&B upload, no tokenizer threads fighting torch's.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false"}


def fail(message: str) -> NoReturn:
    """A bench's refusal: one line on stderr and exit code 2, the project's convention for a bad invocation."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_recipe(recipe: str, overrides: list[str], output_dir: Path, label: str,
               base_environment: dict[str, str] | None = None) -> dict:
    """Train `recipe` with `overrides` into `output_dir` (in `base_environment`, default this process's, made
    offline); exit with the run's last stderr when it fails.

    Returns {"eval_loss": [[step, loss], ...], "trainable_params", "seconds", "summary": run.json}."""
    command = [sys.executable, "train_llama.py", recipe, *overrides, f"train.output_dir={output_dir}",
               "log.wandb_mode=disabled"]
    environment = {**(os.environ if base_environment is None else base_environment), **OFFLINE}
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.exit(f"error: {label} failed:\n{completed.stderr[-2000:]}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((output_dir / "run.json").read_text())
    return {"eval_loss": [[row["step"], row["eval_loss"]] for row in rows if "eval_loss" in row],
            "trainable_params": summary["trainable_params"], "seconds": round(time.perf_counter() - started, 1),
            "summary": summary}


def portable_path(value: str) -> str:
    """`value` (a path, or a `key=path` / `--flag=path` argument) without this machine's directories: relative to the
    repository, `../` for what lies beside it (../shared/data), `~/` under the home directory, else the bare name.
    Anything that is not an absolute path is returned unchanged."""
    key, separator, path = value.partition("=") if "=" in value and not value.startswith("/") else ("", "", value)
    if not path.startswith("/"):
        return value
    # As written first (../shared may be a symbolic link to anywhere), then with links resolved
    for resolve in (lambda p: Path(os.path.normpath(p)), lambda p: Path(p).resolve()):
        absolute = resolve(path)
        bases = ((resolve(ROOT), ""), (resolve(ROOT).parent, "../"), (resolve(Path.home()), "~/"))
        for base, prefix in bases:
            if base != Path(base.anchor) and absolute.is_relative_to(base):  # never relative to / itself
                return f"{key}{separator}{prefix}{absolute.relative_to(base).as_posix() or '.'}"
    return f"{key}{separator}{absolute.name}"


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root (`python bench/X.py ...`), with
    portable paths: what a committed artefact records about how it was made."""
    return shlex.join(["python", portable_path(str(Path(sys.argv[0]).resolve())),
                       *map(portable_path, sys.argv[1:])])


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block succeeds, removed when it
    fails, so readers only ever see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(descriptor)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would make a committed file unreadable to others
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: dict) -> None:
    """Write a bench's results atomically (see `atomic_target`)."""
    text = json.dumps(value, indent=1) + "\n"
    with atomic_target(path) as temporary:
        temporary.write_text(text)


def read_results(path: Path) -> dict:
    """A results JSON written by a bench ({"runs": [...], ...}), or a one-line refusal naming the file when it is
    not one (a hand edit or a copy gone wrong must not end a sweep in a traceback)."""
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        fail(f"{path} is not a readable results file ({error}): fix it, or pass --overwrite to replace it")
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        fail(f"{path} is not a results file (no list of \"runs\"): fix it, or pass --overwrite to replace it")
    return results


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
    """Lay out and write a bench's figure as a PNG beside its JSON, atomically (see `atomic_target`)."""
    figure.tight_layout()
    with atomic_target(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
