"""The baselines of our field side by side: eval-loss curves of LoRA, LoRA-FA, SVD-initialised LoRA-FA and NOLA at a
small and a large learning rate, each run through train_llama.py itself (same data, steps, seed and held-out set).

    python bench/baselines.py                                  # real tiny LLaMA + Alpaca subset from ../shared/data
    python bench/baselines.py --steps 40 --lrs 3e-3 --methods lora-r8,nola-k256

Methods (all on every linear layer, the shipped recipes' precision: nf4 + double quant, bf16 autocast):
    lora-r8          recipes/7b_lora.yaml, rank 8, alpha 16
    lora-fa-r8       the same with adapter.freeze_a: true (A frozen at its seeded random init, B alone trains)
    svd-lora-fa-r8   the same with adapter.init: svd as well (A0, B0 from the top-8 SVD of W, base = residual)
    nola-k256        recipes/7b.yaml with 256 basis coefficients per matrix

Writes bench/results/baselines.json ({"runs": [{"method", "lr", "seed", "trainable_params", "eval_loss":
[[step, loss], ...], "seconds"}]}) and bench/results/baselines.png (eval loss against step, one line per method, one
panel per learning rate), and prints a table of final eval losses. Needs matplotlib for the plot: the `bench` extra
(pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from recipe_runs import ROOT, SHARED, pyplot, run_recipe, save_figure

METHODS = {
    "lora-r8": ("recipes/7b_lora.yaml", ["adapter.rank=8", "adapter.alpha=16"]),
    "lora-fa-r8": ("recipes/7b_lora.yaml", ["adapter.rank=8", "adapter.alpha=16", "adapter.freeze_a=true"]),
    "svd-lora-fa-r8": ("recipes/7b_lora.yaml", ["adapter.rank=8", "adapter.alpha=16", "adapter.freeze_a=true",
                                                "adapter.init=svd"]),
    "nola-k256": ("recipes/7b.yaml", ["adapter.num_basis=256"]),
}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "stories260K-hf"))
    parser.add_argument("--data", default=str(SHARED / "alpaca" / "alpaca_subset.json"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lrs", default="1e-4,3e-3", help="comma-separated learning rates")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "baselines.json"))
    args = parser.parse_args()
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown[0]!r} (known: {', '.join(METHODS)})")
    for path, flag in ((args.model, "--model"), (args.data, "--data")):
        if not Path(path).exists():
            parser.error(f"{flag}: no such file or directory: {path}")
    return args


def train(args: argparse.Namespace, method: str, lr: float, output_dir: Path) -> dict:
    """One run of train_llama.py: its eval-loss curve and parameter count."""
    recipe, keys = METHODS[method]
    overrides = [*keys, f"model.name_or_path={args.model}", f"data.path={args.data}", "mmlu.path=null",
                 f"train.lr={lr}", f"train.seed={args.seed}", f"train.max_steps={args.steps}",
                 f"train.eval_steps={args.eval_every}", f"train.save_steps={args.steps}", "train.micro_batch_size=8",
                 "train.grad_accum_steps=1", "train.logging_steps=10", "data.validation_size=200",
                 "data.source_max_len=128", "data.target_max_len=128", "train.eval_max_batches=null"]
    run = run_recipe(recipe, overrides, output_dir, f"{method} at lr {lr}")
    return {"method": method, "lr": lr, "seed": args.seed, "trainable_params": run["trainable_params"],
            "eval_loss": run["eval_loss"], "seconds": run["seconds"]}


def plot(runs: list[dict], path: Path) -> None:
    plt = pyplot()
    lrs = sorted({run["lr"] for run in runs})
    figure, axes = plt.subplots(1, len(lrs), figsize=(6 * len(lrs), 4.5), squeeze=False, sharey=True)
    for axis, lr in zip(axes[0], lrs):
        for run in (r for r in runs if r["lr"] == lr):
            steps, losses = zip(*run["eval_loss"])
            axis.plot(steps, losses, marker="o", markersize=3,
                      label=f"{run['method']} ({run['trainable_params']:,} params)")
        axis.set_title(f"learning rate {lr:g}")
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("eval loss (200 held-out Alpaca records)")
    save_figure(figure, path)


def main() -> None:
    args = arguments()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="nola-baselines-") as scratch:
        for lr in (float(value) for value in args.lrs.split(",")):
            for method in args.methods.split(","):
                runs.append(train(args, method, lr, Path(scratch) / f"{method}-{lr:g}"))
                run = runs[-1]
                print(f"{method:>15} lr {lr:<7g} {run['trainable_params']:>9,} params  eval loss "
                      f"{run['eval_loss'][0][1]:.4f} -> {run['eval_loss'][-1][1]:.4f}  ({run['seconds']:.0f} s)",
                      flush=True)
    out.write_text(json.dumps({"model": args.model, "data": args.data, "steps": args.steps, "runs": runs}, indent=1)
                   + "\n")
    plot(runs, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
