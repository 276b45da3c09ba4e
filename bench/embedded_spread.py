"""How far the tiny run's figures move between machines: the README's main command on a fresh embedded build under
several settings, each standing for another machine of the same torch build: a thread count (OMP_NUM_THREADS,
which sets torch's intra-op threads) and the CPU kernels torch would pick there (ATEN_CPU_CAPABILITY: default,
avx2, avx512, those this CPU can run; "native" is torch's own pick).

    python bench/embedded_spread.py --fresh-builds 2      # threads 1 2 4 x every kernel set this CPU has
    python bench/embedded_spread.py --threads 1 2 --capabilities native default

Each setting builds the embedded default (fresh, or a copy of the first build), then trains recipes/tiny.yaml twice:
as `make train` runs it (on the pinned kernels, nola/embedded.py PINNED_KERNELS) and as a plain
`python train_llama.py recipes/tiny.yaml` runs it (on the setting's kernels). The build pins its kernels itself, so
its hashes should agree across settings.

Writes bench/results/embedded_default.json after each setting: per setting the build's hashes and seconds, and per
mode the first and final eval loss, the answers right out of 60, per family, and the seconds; then per mode the
min/max over all settings and within each kernel set, which is what the README quotes.

A fresh build takes about two minutes on 2 cores, so `--fresh-builds N` builds fresh for the first N settings and
copies the first build for the rest (each row says which): the hashes of the fresh ones show whether the build moves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_runs import OFFLINE, ROOT, command_line, fail, run_recipe, write_json  # noqa: E402

from nola.embedded import PINNED_KERNELS  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "embedded_default.json"
# The two ways a user runs the tiny recipe: `make train` (the Makefile pins the kernels: PINNED_KERNELS, which a test
# keeps equal to the Makefile's PINNED) and `python train_llama.py recipes/tiny.yaml` (the machine's own kernels).
MODES = {"make_train": PINNED_KERNELS, "unpinned": {}}
CAPABILITIES = ("avx512", "avx2", "default")
BUILD = ("import json, time; import torch; from nola import embedded; started = time.perf_counter(); "
         "root = embedded.ensure_built(); seconds = time.perf_counter() - started; "
         "print(json.dumps({'seconds': seconds, 'capability': torch.backends.cpu.get_cpu_capability(), "
         "'threads': torch.get_num_threads(), 'digests': embedded.build_digests(root)}))")


def environment(threads: int, capability: str, cache: Path) -> dict[str, str]:
    """The environment of one setting: `make train`'s offline variables, the thread count, the kernels ("native":
    torch's own pick for this CPU), and a private cache so the build is fresh."""
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": str(threads), "NOLA_CACHE_DIR": str(cache)}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability != "native":
        env["ATEN_CPU_CAPABILITY"] = capability
    return env


def available_capabilities() -> list[str]:
    """The ATEN_CPU_CAPABILITY values torch honours on this CPU (it silently falls back for the others), best
    first: asking for avx512 on an AVX2 CPU would only repeat the avx2 setting under another name."""
    honoured = []
    for capability in CAPABILITIES:
        reported = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
            env={**os.environ, "ATEN_CPU_CAPABILITY": capability}, capture_output=True, text=True, check=True,
        ).stdout.strip()
        if reported.lower() == capability:
            honoured.append(capability)
    return honoured


def build(env: dict[str, str], label: str) -> dict:
    """The embedded default built fresh into the setting's cache: seconds, the caller's kernels, file hashes."""
    completed = subprocess.run([sys.executable, "-c", BUILD], cwd=ROOT, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        fail(f"{label}: build failed ({completed.returncode}):\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.splitlines()[-1])


def train(env: dict[str, str], output_dir: Path, label: str) -> dict:
    """recipes/tiny.yaml as shipped (nothing overridden but where it writes and W&B off): the figures the README
    quotes from its run.json, and the seconds."""
    run = run_recipe("recipes/tiny.yaml", [], output_dir, f"{label}: train", env)
    summary = run["summary"]
    return {
        "first_eval_loss": summary["first_eval_loss"], "final_eval_loss": summary["final_eval_loss"],
        "answer_correct": summary["answer_correct"], "answer_examples": summary["answer_examples"],
        "answer_families": {family: [value["correct"], value["n"]]
                            for family, value in sorted(summary["answer_families"].items())},
        "seconds": run["seconds"],
    }


def measure(threads: int, capability: str, work: Path, reuse: Path | None) -> dict:
    """One setting: build (fresh, or a copy of `reuse`), then the tiny run twice: as `make train` runs it (the
    Makefile's PINNED, which is PINNED_KERNELS) and as `python train_llama.py recipes/tiny.yaml` runs it (the
    setting's own kernels)."""
    label = f"threads={threads} capability={capability}"
    cache = work / f"cache-{threads}-{capability}"
    env = environment(threads, capability, cache)
    if reuse is not None:
        shutil.copytree(reuse, cache)
    built = build(env, label)
    digests = built["digests"]
    return {
        "threads": threads, "capability": capability, "cpu_capability": built["capability"],
        "build": "fresh" if reuse is None else "copied",
        "build_model_sha256": digests["tiny-llama/model.safetensors"],
        "build_sha256": hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest(),
        "build_seconds": round(built["seconds"], 1) if reuse is None else None,
        **{mode: train({**env, **pins}, work / f"run-{threads}-{capability}-{mode}", f"{label} {mode}")
           for mode, pins in MODES.items()},
    }


def figures(run: dict) -> tuple:
    """What two runs must share to count as the same result."""
    return (run["first_eval_loss"], run["final_eval_loss"], run["answer_correct"], json.dumps(run["answer_families"]))


def spread(runs: list[dict]) -> dict:
    """Min/max over the settings of every figure of one mode, and how many distinct results there were."""
    def span(values):
        return [min(values), max(values)]

    return {
        "distinct_results": len({figures(run) for run in runs}),
        "first_eval_loss": span([run["first_eval_loss"] for run in runs]),
        "final_eval_loss": span([run["final_eval_loss"] for run in runs]),
        "answer_correct": span([run["answer_correct"] for run in runs]),
        "answer_families": {family: span([run["answer_families"][family][0] for run in runs])
                            for family in sorted(runs[0]["answer_families"])},
        "seconds": span([run["seconds"] for run in runs]),
    }


def summary(rows: list[dict]) -> dict:
    """The builds, and per mode the spread over every setting and within each kernel set (what the thread count
    alone moves)."""
    by_capability = {}
    for row in rows:
        by_capability.setdefault(row["capability"], []).append(row)
    return {
        "settings": len(rows),
        "distinct_builds": len({row["build_sha256"] for row in rows}),
        "distinct_fresh_builds": len({row["build_sha256"] for row in rows if row["build"] == "fresh"}),
        **{mode: {"all": spread([row[mode] for row in rows]),
                  "by_capability": {capability: spread([row[mode] for row in group])
                                    for capability, group in by_capability.items()}}
           for mode in MODES},
    }


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--capabilities", nargs="+", default=None,
                        help="native (torch's pick) and/or default, avx2, avx512; default: every one this CPU runs")
    parser.add_argument("--fresh-builds", type=int, default=None,
                        help="build fresh for the first N settings only and copy the first build for the rest")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(threads, capability) pairs: first a diagonal (the i-th kernel set with the i-th thread count), so that the
    first few settings, those `--fresh-builds` builds fresh, already differ in both; then the rest."""
    capabilities = args.capabilities or available_capabilities()
    unknown = sorted(set(capabilities) - {"native", *CAPABILITIES})
    if unknown or any(threads < 1 for threads in args.threads):
        fail(f"unknown capability {unknown} (known: native, {', '.join(CAPABILITIES)}) or a thread count below 1")
    threads = sorted(set(args.threads))
    diagonal = [(threads[i % len(threads)], capability) for i, capability in enumerate(capabilities)]
    rest = [(t, capability) for capability in capabilities for t in threads if (t, capability) not in diagonal]
    return diagonal + rest


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="embedded-spread-") as scratch:
        work, first_cache = Path(scratch), None
        planned = settings(args)
        for index, (threads, capability) in enumerate(planned):
            fresh = args.fresh_builds is None or index < args.fresh_builds
            row = measure(threads, capability, work, None if fresh else first_cache)
            first_cache = first_cache or work / f"cache-{threads}-{capability}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            # Written after each setting, so an interrupted sweep keeps what it measured and says so.
            write_json(args.output, {"command": command_line(), "complete": len(rows) == len(planned),
                                     "settings_planned": [list(setting) for setting in planned],
                                     "pinned_kernels": PINNED_KERNELS, "runs": rows, "summary": summary(rows),
                                     "seconds": round(time.perf_counter() - started)})
    print(json.dumps(summary(rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
