"""What `make train` teaches: exact-match accuracy of the embedded tiny LLaMA's greedy answers on held-out records,
before and after the tiny recipe's 150 steps, per task family, each run through train_llama.py itself.

    python bench/answer_accuracy.py               # make train as shipped, and the same run scored on all 200 records
    python bench/answer_accuracy.py --runs all    # also the two schedules the README reports as not better

Why a bench: the README quotes these figures; they must come from a committed artefact with the command that made
it, not from a terminal someone once read. Training is the same in every run but the schedule ones (greedy
decoding draws no random numbers), so `make-train` and `all-200` differ only in how many held-out records are scored.

Every run is on the kernels `make train` pins (nola/embedded.py PINNED_KERNELS), so the figures are the same on any
x86-64 machine with this torch build (bench/embedded_spread.py measures what they are without the pins).

Runs, on recipes/tiny.yaml (embedded default model and data, built and cached on first use), each with overrides:
    make-train         none: what `make train` prints (train.answer_accuracy: 60 records)
    all-200            train.answer_accuracy=200: every held-out record
    lr0.03-cosine-200  all-200 at train.lr=0.03 with train.lr_scheduler=cosine
    cosine-200         all-200 with train.lr_scheduler=cosine
Each takes about a minute on 2 uncontended cores: the default two about 2-3 minutes, all four about 5.

Writes bench/results/answer_accuracy.json ({"command", "recipe", "runs": [{"name", "overrides",
"answer_accuracy_before", "answer_accuracy", "answer_correct", "answer_examples", "answer_unfinished",
"answer_families": {family: {"accuracy", "n", "correct"}}, "first_eval_loss", "final_eval_loss", "seconds"}]})
atomically after every run, and prints one line per run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from recipe_runs import ROOT, command_line, run_recipe, write_json

from nola.embedded import PINNED_KERNELS

RECIPE = "recipes/tiny.yaml"
ALL_RECORDS = ["train.answer_accuracy=200"]
RUNS = {
    "make-train": [],
    "all-200": ALL_RECORDS,
    "lr0.03-cosine-200": [*ALL_RECORDS, "train.lr=0.03", "train.lr_scheduler=cosine"],
    "cosine-200": [*ALL_RECORDS, "train.lr_scheduler=cosine"],
}
DEFAULT_RUNS = "make-train,all-200"
# What run.json reports about the answers and the eval loss, kept in the results.
KEPT = ("answer_accuracy_before", "answer_accuracy", "answer_correct", "answer_examples", "answer_unfinished",
        "answer_families", "first_eval_loss", "final_eval_loss", "trainable_params")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma list of {', '.join(RUNS)}, or all")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "answer_accuracy.json"))
    args = parser.parse_args()
    args.runs = list(RUNS) if args.runs == "all" else args.runs.split(",")
    unknown = sorted(set(args.runs) - set(RUNS))
    if unknown:
        parser.error(f"--runs: unknown {unknown[0]!r} (known: {', '.join(RUNS)}, or all)")
    return args


def train(name: str, output_dir: Path) -> dict:
    """One run of the tiny recipe with `name`'s overrides: its answer accuracy before and after, and eval loss."""
    run = run_recipe(RECIPE, RUNS[name], output_dir, name, {**os.environ, **PINNED_KERNELS})
    return {"name": name, "overrides": RUNS[name], **{key: run["summary"].get(key) for key in KEPT},
            "seconds": run["seconds"]}


def describe(run: dict) -> str:
    """One line: `make-train: 0/60 -> 14/60 (23.3%); capital 5/5, ...; eval loss 4.38 -> 1.51 (57 s)`."""
    families = ", ".join(f"{name} {family['correct']}/{family['n']}"
                         for name, family in (run["answer_families"] or {}).items())
    before = round(run["answer_accuracy_before"] * run["answer_examples"])
    return (f"{run['name']}: {before}/{run['answer_examples']} -> {run['answer_correct']}/{run['answer_examples']} "
            f"({100 * run['answer_accuracy']:.1f}%, {run['answer_unfinished']} unfinished); {families}; eval loss "
            f"{run['first_eval_loss']:.2f} -> {run['final_eval_loss']:.2f} ({run['seconds']:.0f} s)")


def main() -> None:
    args = arguments()
    out = Path(args.out)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="nola-answers-") as scratch:
        for name in args.runs:
            runs.append(train(name, Path(scratch) / name))
            print(describe(runs[-1]), flush=True)
            write_json(out, {"command": command_line(), "recipe": RECIPE, "runs": runs})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
