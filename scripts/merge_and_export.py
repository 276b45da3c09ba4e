"""Export a trained NOLA (or LoRA) adapter: a merged model, a PEFT LoRA adapter, or a compact NOLA adapter.

    python scripts/merge_and_export.py --base PATH --adapter DIR --out DIR --format hf|peft-lora|nola
                                       [--bits 4|3] [--dtype bf16|fp16|fp32] [--max-shard-size 5GB]
                                       [--check-prompts 3] [--eval-data alpaca.json] [--overwrite]

  hf         W + (alpha/r)·B·A for every adapted module, merged in fp32 (a 4-bit base dequantised first, exactly as
             training saw it) and saved in --dtype as sharded safetensors + config + tokenizer: plain transformers
             loads it, no nola needed. Streams one shard at a time (a 70B merge needs ~2 shards of memory).
  peft-lora  adapter_config.json + adapter_model.safetensors with PEFT's key names: peft, vLLM and TGI load it.
  nola       the compact adapter (coefficients + seeds), with --bits 4 or 3 to quantise the coefficients.

Then checks the export: the largest |logit difference| between the adapter model as trained and the export, loaded
as its users load it, on a few prompts (--check-prompts 0 skips it: it loads the model twice, one after the other),
against a tolerance (`check_tolerance`), and with --eval-data prints the eval loss of both. An export over its
tolerance fails the command: exit code 2, one line on stderr with the difference, the tolerance and the export.

The export is written beside --out (a hidden `.NAME.unchecked-PID`), checked there, and only then moved into --out
in one atomic step; a failed check deletes it. So --out only ever holds a checked export (or, with --overwrite, the
one it held before): a wrong merge is never left looking like a finished one, which a marker file or a "done"
state beside the files could not promise, since transformers, peft and vLLM load a directory without reading one.
Rerun with --check-prompts 0 to keep an export that failed, for inspection. A base whose modules, shapes or weights
differ from the adapter's is refused before anything is written; so is a non-empty --out without --overwrite.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from nola.cli import check_input_source, run_command
from nola.errors import NolaError

if TYPE_CHECKING:
    import torch

    from nola.adapter_io import AdapterFile

FORMATS = ("hf", "peft-lora", "nola")
# The rounding budget of the logit check, in check ulps (`check_ulp`) of the logits' span, per format. hf: the merged
# weights rounded to --dtype and run by plain transformers without the nf4 kernels, another rounding of the same
# function (on the shipped recipes about 3 bf16 ulps, whatever the adapter). peft-lora and nola: the same layers and
# arithmetic as training, only the rounding of the LoRA product (or none) differs.
CHECK_ULPS = {"hf": 4, "peft-lora": 2, "nola": 2}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if upper.endswith(unit):
            number = upper[: -len(unit)]
            break
    else:
        number, factor = upper, 1
    try:
        size = int(float(number) * factor)
    except (ValueError, OverflowError):
        raise NolaError(f"--max-shard-size: {text!r} is not a size such as 5GB") from None
    if size <= 0:
        raise NolaError(f"--max-shard-size: must be positive, got {text!r}")
    return size


def publish(unchecked: Path, out: Path) -> None:
    """Move the checked export into `out` in one atomic step (replacing what --overwrite allows to replace)."""
    from nola.adapter_io import write_directory_atomically

    def move_into(directory: Path) -> None:
        for child in unchecked.iterdir():
            child.rename(directory / child.name)

    write_directory_atomically(out, move_into)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_arguments(args: argparse.Namespace) -> None:
    if args.bits is not None and args.format != "nola":
        raise NolaError(f"--bits: quantised coefficients are a nola-format option, not {args.format}")
    out = Path(args.out).resolve()
    for flag in ("--base", "--adapter"):
        source = Path(getattr(args, flag[2:])).resolve()
        if getattr(args, flag[2:]).startswith("embedded:") or not source.exists():
            continue
        if out == source or out in source.parents or source in out.parents:
            raise NolaError(f"--out: {args.out} overlaps {flag} {getattr(args, flag[2:])}; write the export elsewhere")
    if out.exists() and not out.is_dir():
        raise NolaError(f"--out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise NolaError(f"--out: {out} is not empty (pass --overwrite to replace it)")
    if args.check_prompts < 0:
        raise NolaError(f"--check-prompts: must be >= 0, got {args.check_prompts}")
    if args.eval_data is not None:
        check_input_source("--eval-data", args.eval_data)


def export(args: argparse.Namespace, out: Path) -> str:
    """Write the artefact asked for into `out`; returns what was written, in words, for --out once it is there."""
    from nola.adapter_io import read_adapter
    from nola.export import PEFT_CONFIG_FILE, export_nola, export_peft_lora
    from nola.merge import (
        DTYPES,
        check_base_checkpoint,
        checkpoint_shards,
        linear_weight_modules,
        local_checkpoint_dir,
        merge_checkpoint,
        read_headers,
    )
    from nola.methods import method_for

    adapter = read_adapter(args.adapter)
    if args.bits is not None and not method_for(adapter.config.method).quantizable:
        raise NolaError(f"--bits: {args.adapter} is a {adapter.config.method} adapter; only NOLA coefficients quantise")
    if args.bits is not None and adapter.config.quant_bits not in (None, args.bits):
        raise NolaError(f"--bits: {args.adapter} was trained with {adapter.config.quant_bits}-bit coefficients; "
                        f"re-quantising them to {args.bits} bits would change the model")
    if not adapter.base.get("embedding"):
        print(f"warning: {args.adapter} records no base weights (an adapter from before nola recorded them, or from "
              f"ZeRO-3): only module shapes are checked, and a 4-bit base is not dequantised first", file=sys.stderr)
    dtype = DTYPES[args.dtype]
    base_dir = local_checkpoint_dir(args.base)
    headers = read_headers(checkpoint_shards(base_dir))
    check_base_checkpoint(base_dir, adapter, headers)  # every format; headers and a few embedding rows only
    if args.format == "hf":
        files = merge_checkpoint(base_dir, adapter, out, dtype, parse_size(args.max_shard_size))
        return f"merged model: {args.out} ({len(files)} weight file(s), {directory_bytes(out) / 1e6:.2f} MB in all)"
    if args.format == "peft-lora":
        from nola import embedded

        # What peft's AutoPeftModel loads: the hub name as given, or the local directory as an absolute path.
        local = Path(embedded.resolve(args.base)).is_dir()
        base_name = str(base_dir.resolve()) if local else args.base
        export_peft_lora(adapter, out, dtype, base_name, linear_weight_modules(headers))
        rank = json.loads((out / PEFT_CONFIG_FILE).read_text())["r"]  # what peft reads: 2r for an SVD start
        report = f"PEFT LoRA adapter: {args.out} ({directory_bytes(out) / 1e6:.3f} MB, r={rank})"
        if adapter.base.get("quantization"):
            report += ("\nnote: the adapter was trained on a 4-bit base; serve the LoRA on that same quantised base "
                       "for the trained behaviour (on the float base it is close, not equal)")
        return report
    export_nola(adapter, out, args.bits)
    weights = "adapter_model.safetensors"
    size, original = (out / weights).stat().st_size, (Path(args.adapter) / weights).stat().st_size
    bits = f"{args.bits}-bit" if args.bits else "full-precision"
    return (f"NOLA adapter ({bits} coefficients): {args.out} ({weights}: {size:,} bytes, "
            f"{original / size:.1f}x smaller than the input adapter's {original:,}; "
            f"{directory_bytes(out):,} bytes with its config)")


def load_export(args: argparse.Namespace, out: Path):
    """The export at `out` as a model, loaded the way a user of that format would: the merged model as plain
    transformers loads it (its saved dtype), the NOLA and PEFT adapters on the base as it was trained on."""
    from nola.inference import load_for_inference

    if args.format == "hf":
        return load_for_inference(str(out))[0]
    if args.format == "nola":
        return load_for_inference(args.base, out)[0]
    from peft import PeftModel

    from nola.adapter_io import read_adapter
    from nola.inference import base_section, default_device, trained_mixed_precision
    from nola.modeling import autocast_forward, load_model

    adapter = read_adapter(args.adapter)
    mixed_precision = trained_mixed_precision(adapter)
    base = load_model(base_section(args.base, adapter), default_device(), mixed_precision)
    return autocast_forward(PeftModel.from_pretrained(base, out).eval(), mixed_precision)


def compare(args: argparse.Namespace, out: Path) -> None:
    """Largest |Δlogit| between adapter model and the export at `out` on fixed prompts, against the check's
    tolerance (over it: a NolaError, after everything is printed), and eval losses when asked."""
    from nola.inference import CHECK_RECORDS, alpaca_prompt, load_for_inference, max_logit_difference, prompt_logits
    from nola.adapter_io import read_adapter
    from nola.inject import adapters_disabled

    adapter = read_adapter(args.adapter)
    needed, available = reference_model_bytes(args.base, adapter), free_memory_bytes()
    if needed > 0.8 * available:
        print(f"logit check skipped: the model needs ~{needed / 1e9:.0f} GB as trained, {available / 1e9:.0f} GB are "
              f"free (--check-prompts 0 says so up front)")
        return
    reference, tokenizer = load_for_inference(args.base, args.adapter)
    prompts = [alpaca_prompt(r["instruction"], r["input"]) for r in CHECK_RECORDS[: args.check_prompts]]
    examples = eval_examples(args.eval_data, tokenizer) if args.eval_data else []
    expected = prompt_logits(reference, tokenizer, prompts)
    with adapters_disabled(reference):  # the scale a difference is read against: what the adapter itself changes
        started = prompt_logits(reference, tokenizer, prompts)
    losses = [eval_loss(reference, tokenizer, examples)] if examples else []
    del reference
    gc.collect()
    candidate = load_export(args, out)
    failure = None
    if prompts:
        effect = max_logit_difference(expected, started)
        difference = max_logit_difference(expected, prompt_logits(candidate, tokenizer, prompts))
        span = max((logits.max() - logits.min()).item() for logits in expected)
        bases = (max_logit_difference(started, export_base_logits(candidate, tokenizer, prompts))
                 if args.format == "peft-lora" else 0.0)
        tolerance, why = check_tolerance(args, adapter, span, effect, bases)
        print(f"max |logit(adapter) - logit({args.format} export)| over {len(prompts)} prompts: {difference:.3g} "
              f"(the adapter itself moves them by up to {effect:.3g}; logits span {span:.3g}; the reference is the "
              f"adapter model as trained, {describe_precision(adapter)}); tolerance {tolerance:.3g}: {why}")
        if not difference <= tolerance:  # a NaN fails too
            failure = (f"logit check of the {args.format} export to {args.out} failed: max |logit difference| "
                       f"{difference:.3g} > tolerance {tolerance:.3g} ({why}); the export was deleted and "
                       f"{args.out} left as it was (--check-prompts 0 keeps an unchecked export)")
    if examples:
        losses.append(eval_loss(candidate, tokenizer, examples))
        print(f"eval loss on {args.eval_data} ({len(examples)} records): adapter {losses[0]:.5f}, "
              f"{args.format} export {losses[1]:.5f}")
    if failure:
        raise NolaError(failure)


def export_base_logits(candidate, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """The logits of the base a PEFT export is served on (its adapter disabled): the original base, where an SVD
    start trained on the residual W − s·B0·A0 (on a 4-bit base re-quantised, which the export cannot undo)."""
    from nola.inference import prompt_logits

    with candidate.disable_adapter():
        return prompt_logits(candidate, tokenizer, prompts)


def check_tolerance(args: argparse.Namespace, adapter: AdapterFile, span: float, effect: float, bases: float
                    ) -> tuple[float, str]:
    """(tolerance, why in words) of the logit check: the rounding budget, `CHECK_ULPS` check ulps of the logits'
    span, plus what the export differs by on purpose, so that a correct export passes on every shipped recipe and
    a lost, mis-scaled or misplaced update does not. On purpose: re-quantised NOLA coefficients (--bits on a float
    adapter) are a real change, allowed up to the adapter's own effect (beyond it the export would be no nearer the
    trained model than the base is); a PEFT LoRA is served on the original base, which differs from the base under
    the trained adapter by `bases` (0 but for an SVD start on a 4-bit base: the residual's re-quantisation)."""
    precision, reduction = check_precision(args, adapter), max(shape[1] for shape in adapter.modules.values())
    ulps = CHECK_ULPS[args.format]
    tolerance = ulps * check_ulp(precision, reduction) * span
    why = f"{ulps} x ({str(precision).split('.')[-1]} eps + {reduction}^0.5 float32 eps) x the logits' span"
    if args.format == "nola" and args.bits is not None and adapter.config.quant_bits is None:
        return tolerance + effect, why + f" + the adapter's own effect {effect:.3g} (re-quantised coefficients)"
    if bases > 0:
        return tolerance + bases, why + f" + {bases:.3g}, how far the base it is served on is from the trained one"
    return tolerance, why


def check_precision(args: argparse.Namespace, adapter: AdapterFile) -> torch.dtype:
    """The coarsest float format that the reference (base weights, 4-bit compute dtype, autocast) or the export
    (hf: the merged weights; peft-lora: the LoRA matrices) rounds to: the logits cannot agree better than it."""
    import torch

    from nola.inference import trained_mixed_precision
    from nola.merge import DTYPES

    recorded = adapter.base
    formats = [getattr(torch, recorded.get("embedding", {}).get("dtype", "float32")),
               DTYPES.get(trained_mixed_precision(adapter), torch.float32)]
    if recorded.get("quantization"):
        formats.append(getattr(torch, recorded["quantization"]["dtype"]))
    if args.format != "nola":
        formats.append(DTYPES[args.dtype])
    return max(formats, key=lambda dtype: torch.finfo(dtype).eps)


def check_ulp(precision: torch.dtype, reduction: int) -> float:
    """One ulp of the check, relative to the logits' span: the machine epsilon of `precision`, plus the √K float32
    roundings a matmul of reduction length K (the widest adapted input) accumulates in its float32 sums (a random-
    walk bound). The second term only matters when both sides compute in float32: there two equivalent computations
    differ by many float32 ulps (9e-6, 5 ulps of the span, for an exact merge of the 5-layer embedded LLaMA)."""
    import torch

    return torch.finfo(precision).eps + math.sqrt(reduction) * torch.finfo(torch.float32).eps


def describe_precision(adapter) -> str:
    """How the reference computes (an `AdapterFile`'s record), in words: '4-bit nf4, bf16 autocast'."""
    from nola.inference import trained_mixed_precision

    quantization = adapter.base.get("quantization")
    weights = f"4-bit {quantization['quant_type']}" if quantization else adapter.base.get("embedding", {}).get(
        "dtype", "float32")
    mixed_precision = trained_mixed_precision(adapter)
    return f"{weights}, {'no autocast' if mixed_precision == 'no' else mixed_precision + ' autocast'}"


def reference_model_bytes(base: str, adapter) -> int:
    """The size of the base as the check loads it (as trained, from the `AdapterFile`'s record: ~0.52 bytes a weight
    in 4-bit, else its recorded dtype's), from the checkpoint headers."""
    import math

    from nola.merge import checkpoint_shards, local_checkpoint_dir, read_headers

    recorded = adapter.base
    dtype = recorded.get("embedding", {}).get("dtype", "float32")
    per_weight = 0.52 if recorded.get("quantization") else (4 if dtype == "float32" else 2)
    headers = read_headers(checkpoint_shards(local_checkpoint_dir(base)))
    return int(per_weight * sum(math.prod(shape) for _, shape, _ in headers.values()))


def free_memory_bytes() -> int:
    """Free memory of the device the check runs on: the GPU's, else the host's."""
    import os

    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def eval_examples(path: str, tokenizer) -> list[dict]:
    from nola import embedded
    from nola.data import load_records, tokenize_records

    examples = tokenize_records(load_records(embedded.resolve(path)), tokenizer, 512, 256, train_on_source=False)
    return [example for example in examples if example is not None]


def eval_loss(model, tokenizer, examples: list[dict]) -> float:
    from nola.evaluation import evaluate

    return evaluate(model, examples, 8, tokenizer.pad_token_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base checkpoint: directory, hub name or embedded:tiny-llama")
    parser.add_argument("--adapter", required=True, help="adapter directory written by training")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--bits", type=int, choices=(3, 4), help="nola format: quantise the coefficients")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="dtype of merged weights (hf) or LoRA matrices (peft-lora); default bf16")
    parser.add_argument("--max-shard-size", default="5GB", help="hf format: largest weight file (default 5GB)")
    parser.add_argument("--check-prompts", type=int, default=3, help="prompts for the logit check (0: skip)")
    parser.add_argument("--eval-data", help="Alpaca-format file: report the eval loss of adapter and export")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)

    def run() -> None:
        check_arguments(args)
        from transformers.utils import logging

        logging.disable_progress_bar()
        out = Path(args.out)
        unchecked = out.parent / f".{out.name}.unchecked-{os.getpid()}"
        try:
            report = export(args, unchecked)
            if args.check_prompts or args.eval_data:
                compare(args, unchecked)
            publish(unchecked, out)
        finally:
            shutil.rmtree(unchecked, ignore_errors=True)
        print(report)

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
