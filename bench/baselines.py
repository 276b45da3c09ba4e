"""The baselines of our field side by side: eval-loss curves of LoRA, LoRA-FA, SVD-initialised LoRA-FA and NOLA, each
on its own learning-rate grid, each run through train_llama.py itself (same data, steps, seed and held-out set).

    python bench/baselines.py                                  # real tiny LLaMA + Alpaca subset from ../shared/data
    python bench/baselines.py --steps 40 --lrs 3e-3 --methods lora-r8,nola-k256 --out runs/baselines-quick.json

Methods (all on every linear layer, the shipped recipes' precision: nf4 + double quant, bf16 autocast), each with
its learning-rate grid:
    lora-r8          recipes/7b_lora.yaml, rank 8, alpha 16                           lr 1e-4, 1e-3, 3e-3, 1e-2
    lora-fa-r8       the same with adapter.freeze_a: true (A frozen at its seeded     lr 1e-4, 1e-3, 3e-3, 1e-2
                     random init, B alone trains)
    svd-lora-fa-r8   the same with adapter.init: svd as well (A0, B0 from the top-8   lr 1e-4, 1e-3, 3e-3, 1e-2
                     SVD of W, base = residual)
    nola-k256        recipes/7b.yaml with 256 basis coefficients per matrix           lr 3e-3, 1e-2, 3e-2, 1e-1

Why a grid per method: the methods' best learning rates differ by an order of magnitude (NOLA trains a few
coefficients of random matrices: bench/fidelity.py's tuned rates are 1e-2 for NOLA and 1e-3 for LoRA, the paper
recipes' 1e-3 and 2e-4), so comparing them at one shared rate compares one method's tuning with another's
mistuning. Each grid is meant to bracket the method's best rate, so a winner at the edge of its grid is a sign to
widen it. `--lrs` puts every method on one grid instead.
Each run takes about 45-60 s on 2 uncontended cores, so the default 16 about 13 minutes (the committed sweep ran
on cores shared with other jobs: 88-181 s a run, 37 minutes).

Writes bench/results/baselines.json ({"command", "model", "data", "steps", ..., "best": {method: {"lr",
"final_eval_loss"}}, "runs": [{"method", "lr", "seed", "trainable_params", "eval_loss": [[step, loss], ...],
"seconds", and for an SVD start "svd_init_seconds", "svd_step0_max_logit_change", "svd_step0_loss_change"}]})
atomically after every run, so an interrupted sweep keeps what it measured; then bench/results/baselines.png (final
eval loss against learning rate, one line per method; eval loss against step for each method at its best rate) and
a table of final eval losses. Needs matplotlib for the plot: the `bench` extra (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import NamedTuple

from recipe_runs import ROOT, SHARED, command_line, portable_path, pyplot, run_recipe, save_figure, write_json


class Method(NamedTuple):
    recipe: str
    overrides: list[str]
    lrs: list[float]


LORA_LRS = [1e-4, 1e-3, 3e-3, 1e-2]
NOLA_LRS = [3e-3, 1e-2, 3e-2, 1e-1]
LORA_R8 = ["adapter.rank=8", "adapter.alpha=16"]
METHODS = {
    "lora-r8": Method("recipes/7b_lora.yaml", LORA_R8, LORA_LRS),
    "lora-fa-r8": Method("recipes/7b_lora.yaml", [*LORA_R8, "adapter.freeze_a=true"], LORA_LRS),
    "svd-lora-fa-r8": Method("recipes/7b_lora.yaml", [*LORA_R8, "adapter.freeze_a=true", "adapter.init=svd"],
                             LORA_LRS),
    "nola-k256": Method("recipes/7b.yaml", ["adapter.num_basis=256"], NOLA_LRS),
}
# What run.json reports about an SVD start (its time, how far it moves the model at step 0), kept in the results.
SVD_KEYS = ("svd_init_seconds", "svd_step0_max_logit_change", "svd_step0_loss_change")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "stories260K-hf"))
    parser.add_argument("--data", default=str(SHARED / "alpaca" / "alpaca_subset.json"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lrs", default=None, help="comma-separated learning rates for every method (default: each "
                        "method's own grid)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "baselines.json"))
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown[0]!r} (known: {', '.join(METHODS)})")
    try:
        args.lrs = [float(value) for value in args.lrs.split(",")] if args.lrs else None
    except ValueError as error:
        parser.error(f"--lrs: {error}")
    for path, flag in ((args.model, "--model"), (args.data, "--data")):
        if not Path(path).exists():
            parser.error(f"{flag}: no such file or directory: {path}")
    return args


def schedule(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(method, lr) of every run, in order: each method on its own grid, or all on --lrs."""
    return [(method, lr) for method in args.methods for lr in (args.lrs or METHODS[method].lrs)]


def train(args: argparse.Namespace, method: str, lr: float, output_dir: Path) -> dict:
    """One run of train_llama.py: its eval-loss curve, parameter count and, for an SVD start, its step-0 report."""
    recipe, keys, _ = METHODS[method]
    overrides = [*keys, f"model.name_or_path={args.model}", f"data.path={args.data}", "mmlu.path=null",
                 f"train.lr={lr}", f"train.seed={args.seed}", f"train.max_steps={args.steps}",
                 f"train.eval_steps={args.eval_every}", f"train.save_steps={args.steps}", "train.micro_batch_size=8",
                 "train.grad_accum_steps=1", "train.logging_steps=10", "data.validation_size=200",
                 "data.source_max_len=128", "data.target_max_len=128", "train.eval_max_batches=null"]
    run = run_recipe(recipe, overrides, output_dir, f"{method} at lr {lr}")
    svd = {key: run["summary"][key] for key in SVD_KEYS if key in run["summary"]}
    return {"method": method, "lr": lr, "seed": args.seed, "trainable_params": run["trainable_params"],
            "eval_loss": run["eval_loss"], "seconds": run["seconds"], **svd}


def best_runs(runs: list[dict]) -> dict[str, dict]:
    """Each method's run with the lowest final eval loss: the method at its own best learning rate."""
    best: dict[str, dict] = {}
    for run in runs:
        if run["method"] not in best or run["eval_loss"][-1][1] < best[run["method"]]["eval_loss"][-1][1]:
            best[run["method"]] = run
    return best


def results(args: argparse.Namespace, runs: list[dict]) -> dict:
    """The JSON of the runs so far, with the command that makes it and no path of this machine."""
    best = {method: {"lr": run["lr"], "final_eval_loss": run["eval_loss"][-1][1]}
            for method, run in best_runs(runs).items()}
    return {"command": command_line(), "model": portable_path(args.model), "data": portable_path(args.data),
            "steps": args.steps, "eval_every": args.eval_every, "seed": args.seed,
            "lrs": {method: args.lrs or METHODS[method].lrs for method in args.methods}, "best": best, "runs": runs}


def print_table(runs: list[dict]) -> None:
    """Final eval loss of every run, one row per method, its best learning rate starred."""
    lrs = sorted({run["lr"] for run in runs})
    best = best_runs(runs)
    print(f"{'method':>15} {'params':>9} " + " ".join(f"{f'lr {lr:g}':>9}" for lr in lrs))
    for method, winner in best.items():
        finals = {run["lr"]: run["eval_loss"][-1][1] for run in runs if run["method"] == method}
        cells = [f"{finals[lr]:.4f}{'*' if lr == winner['lr'] else ' '}" if lr in finals else "-" for lr in lrs]
        print(f"{method:>15} {winner['trainable_params']:>9,} " + " ".join(f"{cell:>9}" for cell in cells))
    print("(final eval loss; * the method's best learning rate)")


def plot(runs: list[dict], path: Path) -> None:
    """Left: final eval loss against learning rate, a line per method (how sensitive each is, where its best lies).
    Right: the eval-loss curves of each method at its own best rate (the fair comparison)."""
    plt = pyplot()
    figure, (by_lr, by_step) = plt.subplots(1, 2, figsize=(12, 4.5))
    best = best_runs(runs)
    for method, winner in best.items():
        chosen = sorted((run for run in runs if run["method"] == method), key=lambda run: run["lr"])
        line, = by_lr.plot([run["lr"] for run in chosen], [run["eval_loss"][-1][1] for run in chosen], marker="o",
                           markersize=3, label=f"{method} ({winner['trainable_params']:,} params)")
        steps, losses = zip(*winner["eval_loss"])
        by_step.plot(steps, losses, marker="o", markersize=3, color=line.get_color(),
                     label=f"{method} at lr {winner['lr']:g}")
    by_lr.set_xscale("log")
    by_lr.set_xlabel("learning rate")
    by_lr.set_ylabel(f"final eval loss (step {runs[0]['eval_loss'][-1][0]})")
    by_lr.set_title("final eval loss against learning rate")
    by_step.set_xlabel("optimizer step")
    by_step.set_ylabel("eval loss (200 held-out Alpaca records)")
    by_step.set_title("each method at its best learning rate")
    for axis in (by_lr, by_step):
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    save_figure(figure, path)


def main() -> None:
    args = arguments()
    out = Path(args.out)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="nola-baselines-") as scratch:
        for method, lr in schedule(args):
            runs.append(train(args, method, lr, Path(scratch) / f"{method}-{lr:g}"))
            run = runs[-1]
            print(f"{method:>15} lr {lr:<7g} {run['trainable_params']:>9,} params  eval loss "
                  f"{run['eval_loss'][0][1]:.4f} -> {run['eval_loss'][-1][1]:.4f}  ({run['seconds']:.0f} s)",
                  flush=True)
            write_json(out, results(args, runs))
    print_table(runs)
    plot(runs, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
