"""Shared test helpers: tiny LLaMA models built in-process and the real data in ../shared/data; the two tiers
(`make test` runs the tests not marked `slow`, FAST_TIER; `make test-all` every test); and no silent skips: under
CI=true a skip for want of data, a package or privileges fails, and every run ends with one line counting skips by
reason."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
FAST_TIER = "not slow"  # the marker expression of `make test`


def package_modules() -> set[str]:
    """Every module of the nola package, by its import name."""
    package = REPO_ROOT / "nola"
    return {".".join(("nola", *path.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
            for path in package.rglob("*.py")}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The fast tier is only a tier if it still reaches every module: after a whole, green `make test` (all test
    paths, no -k), fail the session if a nola module was never imported by the tests it ran (in this process:
    what only a subprocess imports does not count)."""
    config = session.config
    whole_tier = (config.option.markexpr == FAST_TIER and not config.option.keyword
                  and config.args_source is pytest.Config.ArgsSource.TESTPATHS)
    if not whole_tier or exitstatus != 0:
        return
    missing = sorted(package_modules() - set(sys.modules))
    if missing:
        print(f"\nerror: the fast tier never imports {', '.join(missing)}: unmark a test of it or add one",
              file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
# The only reasons a skip keeps under CI=true: hardware no CI machine has. Anything else (../shared/data, a package,
# root for SLURM, a compiler) is a gap in the set-up, and a green run over it would claim checks that never ran.
SKIPS_ALLOWED_IN_CI = ("needs a CUDA device",)


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def fail_a_gap_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under CI=true, turn a skip that is not allowed there into a failure naming what was missing."""
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = skip_reason(report)
        if not reason.startswith(SKIPS_ALLOWED_IN_CI):
            report.outcome = "failed"
            report.longrepr = f"CI=true, and this would have skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    fail_a_gap_in_ci((yield).get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    fail_a_gap_in_ci((yield).get_result())  # a module-level importorskip


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
    """One line counting the run's skips by reason (the reason up to its first ': ', which names the detail), after
    pytest's own summaries and just before its closing line."""
    yield
    counts = Counter(skip_reason(report).split(": ")[0] for report in terminalreporter.stats.get("skipped", []))
    listed = "; ".join(f"{count} {reason}" for reason, count in counts.most_common())
    terminalreporter.write_line(f"skips by reason: {listed or 'none'}")


def tiny_llama_config(**overrides):
    """A 2-layer LLaMA small enough for float64 checks, with every projection shape distinct."""
    from transformers import LlamaConfig

    settings = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama(dtype: torch.dtype = torch.float32, init_seed: int = 0, **overrides):
    """A randomly initialised tiny LlamaForCausalLM; the init seed is set on a local generator state."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.to(dtype).eval()


def shared_data(relative: str) -> Path:
    """A file under ../shared/data, or a skip naming what is missing (a failure under CI=true)."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared test data not present: {path}")
    return path


@pytest.fixture
def fresh_accelerate_state():
    """A fresh accelerate state for an in-process run, and none left behind: it is a process-wide singleton that
    refuses a second mixed_precision (other in-process runs in this session use "no", the paper recipes "bf16")."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """The tests' NOLA_CACHE_DIR: a directory of this session whose embedded default is the one `make train` built
    ($NOLA_CACHE_DIR, default ~/.cache/nola), linked read-only, and built there first if absent, in this process,
    as a user's first run would (the build is deterministic: the bytes `make train` gets). Whatever else the tests
    cache stays in the session's directory."""
    from nola import embedded

    built = embedded.ensure_built()
    private = tmp_path_factory.mktemp("nola-cache")
    (private / embedded.VERSION).symlink_to(built, target_is_directory=True)
    return private


def script_environment(cache_dir, **extra: str) -> dict[str, str]:
    """The environment our subprocesses run in: offline, quiet, the session's embedded-default cache."""
    return {**os.environ, "NOLA_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
            "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false", **extra}


def run_script(cache_dir, script: str, *arguments, launcher=(), check=True, timeout=900, stdin=None,
               environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`SCRIPT ARGUMENTS` in a subprocess from the repository root (under `launcher`, e.g. accelerate launch
    options), offline, with the session's embedded-default cache."""
    command = [*(launcher or [sys.executable]), script, *map(str, arguments)]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=script_environment(cache_dir, **(environment or {})),
                               capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and completed.returncode != 0:
        raise AssertionError(f"{script} failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return completed


def run_train(cache_dir, *arguments, launcher=(), check=True, timeout=900, **environment: str
              ) -> subprocess.CompletedProcess:
    """`train_llama.py ARGUMENTS` (see `run_script`), with extra environment variables."""
    return run_script(cache_dir, "train_llama.py", *arguments, launcher=launcher, check=check, timeout=timeout,
                      environment=environment)


def entry_point(name: str):
    """The main() of train_llama.py or scripts/<name>.py, for running it in this process: the path users run,
    without a Python start-up (and its imports) per case."""
    import importlib.util

    path = REPO_ROOT / ("train_llama.py" if name == "train" else f"scripts/{name}.py")
    spec = importlib.util.spec_from_file_location(f"entry_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_main(capsys, name: str, *arguments, stdin: str | None = None) -> str:
    """scripts/NAME.py's main() in this process: its standard output, or the test fails with what it printed unless
    it exited 0 without a traceback."""
    import io
    from unittest import mock

    with mock.patch.object(sys, "stdin", io.StringIO(stdin or "")):
        code = entry_point(name)([str(a) for a in arguments])
    captured = capsys.readouterr()
    assert code == 0, f"{name} exited {code}:\n{captured.err[-3000:]}"
    return captured.out


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def embedded_adapter(cache_dir, tmp_path_factory) -> Path:
    """An adapter trained for a few steps on the embedded default, through the training CLI."""
    output = tmp_path_factory.mktemp("embedded-run")
    run_script(cache_dir, "train_llama.py", "recipes/tiny.yaml", "train.max_steps=10", "train.eval_steps=10",
               "train.sample_generations=0", "log.wandb_mode=disabled", "train.lr=0.05", f"train.output_dir={output}")
    return output / "adapter"
