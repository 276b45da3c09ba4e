"""How far `make train`'s figures move between machines: the README's main command (a fresh embedded build, then
`train_llama.py recipes/tiny.yaml`) under several settings, each standing for another machine of the same torch
build: a thread count (OMP_NUM_THREADS, which sets torch's intra-op threads) and the CPU kernels torch would pick
there (ATEN_CPU_CAPABILITY: default, avx2, avx512, those this CPU can run).

    python bench/embedded_spread.py                       # threads 1 2 4 x every capability this CPU has
    python bench/embedded_spread.py --threads 1 2 --capabilities native default --fresh-builds 2

Writes bench/results/embedded_default.json: per setting the build's hashes, the first and final eval loss, the
answers right out of 60, per family, and the seconds; then the min/max over the settings, which is what the README
quotes (one figure where every setting agreed). The embedded build pins its own kernels (nola/embedded.py
`PINNED_KERNELS`), so its hash should be one across settings; the run uses the caller's kernels.

A fresh build costs minutes (pinned to one thread), so `--fresh-builds N` builds fresh for the first N settings and
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
from recipe_runs import ROOT, command_line, fail, write_json  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "embedded_default.json"
CAPABILITIES = ("avx512", "avx2", "default")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
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


def run(command: list[str], env: dict[str, str], label: str) -> subprocess.CompletedProcess:
    """`command` from the repository root; a failure ends the bench with its last stderr."""
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        fail(f"{label} failed ({completed.returncode}):\n{completed.stderr[-2000:]}")
    return completed


def build(env: dict[str, str], label: str) -> dict:
    """The embedded default built fresh into the setting's cache: seconds, the caller's kernels, file hashes."""
    return json.loads(run([sys.executable, "-c", BUILD], env, f"{label}: build").stdout.splitlines()[-1])


def train(env: dict[str, str], output_dir: Path, label: str) -> dict:
    """`make train` itself (recipes/tiny.yaml, nothing overridden but where it writes and W&B off): its run.json
    and seconds."""
    started = time.perf_counter()
    run([sys.executable, "train_llama.py", "recipes/tiny.yaml", f"train.output_dir={output_dir}",
         "log.wandb_mode=disabled"], env, f"{label}: train")
    return {**json.loads((output_dir / "run.json").read_text()), "seconds": time.perf_counter() - started}


def measure(threads: int, capability: str, work: Path, reuse: Path | None) -> dict:
    """One setting: build (fresh, or a copy of `reuse`), train, and the figures the README quotes."""
    label = f"threads={threads} capability={capability}"
    cache = work / f"cache-{threads}-{capability}"
    env = environment(threads, capability, cache)
    if reuse is not None:
        shutil.copytree(reuse, cache)
    built = build(env, label)
    summary = train(env, work / f"run-{threads}-{capability}", label)
    digests = built["digests"]
    return {
        "threads": threads, "capability": capability, "cpu_capability": built["capability"],
        "build": "fresh" if reuse is None else "copied",
        "build_model_sha256": digests["tiny-llama/model.safetensors"],
        "build_sha256": hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest(),
        "build_seconds": round(built["seconds"], 1) if reuse is None else None,
        "first_eval_loss": summary["first_eval_loss"], "final_eval_loss": summary["final_eval_loss"],
        "answer_correct": summary["answer_correct"], "answer_examples": summary["answer_examples"],
        "answer_families": {family: [value["correct"], value["n"]]
                            for family, value in sorted(summary["answer_families"].items())},
        "run_seconds": round(summary["seconds"], 1),
    }


def spread(rows: list[dict]) -> dict:
    """Min/max over the settings of every figure, and how many distinct builds and results there were."""
    def span(values):
        return [min(values), max(values)]

    families = sorted(rows[0]["answer_families"])
    return {
        "settings": len(rows),
        "distinct_builds": len({row["build_sha256"] for row in rows}),
        "distinct_fresh_builds": len({row["build_sha256"] for row in rows if row["build"] == "fresh"}),
        "distinct_results": len({(row["first_eval_loss"], row["final_eval_loss"], row["answer_correct"],
                                  json.dumps(row["answer_families"])) for row in rows}),
        "first_eval_loss": span([row["first_eval_loss"] for row in rows]),
        "final_eval_loss": span([row["final_eval_loss"] for row in rows]),
        "answer_correct": span([row["answer_correct"] for row in rows]),
        "answer_families": {family: span([row["answer_families"][family][0] for row in rows]) for family in families},
    }


def by_capability(rows: list[dict]) -> dict:
    """The same spread within each kernel set: what varies with the thread count alone."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["capability"], []).append(row)
    return {capability: {"distinct_results": spread(group)["distinct_results"],
                         "final_eval_loss": spread(group)["final_eval_loss"],
                         "answer_correct": spread(group)["answer_correct"]} for capability, group in groups.items()}


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
    """(threads, capability) pairs, kernel set by kernel set, fewest threads first (the cheap runs first)."""
    capabilities = args.capabilities or available_capabilities()
    unknown = sorted(set(capabilities) - {"native", *CAPABILITIES})
    if unknown or any(threads < 1 for threads in args.threads):
        fail(f"unknown capability {unknown} (known: native, {', '.join(CAPABILITIES)}) or a thread count below 1")
    return [(threads, capability) for capability in capabilities for threads in sorted(args.threads)]


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="embedded-spread-") as scratch:
        work, first_cache = Path(scratch), None
        for index, (threads, capability) in enumerate(settings(args)):
            fresh = args.fresh_builds is None or index < args.fresh_builds
            row = measure(threads, capability, work, None if fresh else first_cache)
            first_cache = first_cache or work / f"cache-{threads}-{capability}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_json(args.output, {"command": command_line(), "runs": rows, "spread": spread(rows),
                                     "by_capability": by_capability(rows),
                                     "seconds": round(time.perf_counter() - started)})  # kept after each setting
    print(json.dumps(spread(rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
