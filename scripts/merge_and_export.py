"""Export a trained NOLA (or LoRA) adapter: a merged model, a PEFT LoRA adapter, or a compact NOLA adapter.

    python scripts/merge_and_export.py --base PATH --adapter DIR --out DIR --format hf|peft-lora|nola
                                       [--bits 4|3] [--dtype bf16|fp16|fp32] [--max-shard-size 5GB]
                                       [--check-prompts 3] [--eval-data alpaca.json] [--overwrite]

  hf         W + (alpha/r)·B·A for every adapted module, merged in fp32 (a 4-bit base dequantised first, exactly as
             training saw it) and saved in --dtype as sharded safetensors + config + tokenizer: plain transformers
             loads it, no nola needed. Streams one shard at a time (a 70B merge needs ~2 shards of memory).
  peft-lora  adapter_config.json + adapter_model.safetensors with PEFT's key names: peft, vLLM and TGI load it.
  nola       the compact adapter (coefficients + seeds), with --bits 4 or 3 to quantise the coefficients.

Then prints each output's size and the largest |logit difference| between the adapter model and the export on a
few prompts (--check-prompts 0 skips it: it loads the model twice, one after the other), and with --eval-data the
eval loss of both. A base whose modules, shapes or weights differ from the adapter's is refused before anything
is written; so is a non-empty --out without --overwrite.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

from nola.cli import check_input_source, run_command
from nola.errors import NolaError

FORMATS = ("hf", "peft-lora", "nola")


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


def export(args: argparse.Namespace) -> None:
    """Write the artefact asked for and print what was written."""
    from nola.adapter_io import read_adapter
    from nola.export import export_nola, export_peft_lora
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
    out = Path(args.out)
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
        print(f"merged model: {out} ({len(files)} weight file(s), {directory_bytes(out) / 1e6:.2f} MB in all)")
    elif args.format == "peft-lora":
        from nola import embedded

        # What peft's AutoPeftModel loads: the hub name as given, or the local directory as an absolute path.
        local = Path(embedded.resolve(args.base)).is_dir()
        base_name = str(base_dir.resolve()) if local else args.base
        export_peft_lora(adapter, out, dtype, base_name, linear_weight_modules(headers))
        print(f"PEFT LoRA adapter: {out} ({directory_bytes(out) / 1e6:.3f} MB, r={adapter.config.rank})")
    else:
        export_nola(adapter, out, args.bits)
        weights = "adapter_model.safetensors"
        size, original = (out / weights).stat().st_size, (Path(args.adapter) / weights).stat().st_size
        bits = f"{args.bits}-bit" if args.bits else "full-precision"
        print(f"NOLA adapter ({bits} coefficients): {out} ({weights}: {size:,} bytes, "
              f"{original / size:.1f}x smaller than the input adapter's {original:,}; "
              f"{directory_bytes(out):,} bytes with its config)")
    if adapter.base.get("quantization") and args.format == "peft-lora":
        print("note: the adapter was trained on a 4-bit base; serve the LoRA on that same quantised base for the "
              "trained behaviour (on the float base it is close, not equal)")


def load_export(args: argparse.Namespace):
    """The exported artefact as a model, loaded the way a user of that format would: the merged model as plain
    transformers loads it (its saved dtype), the NOLA and PEFT adapters on the base as it was trained on."""
    from nola.inference import load_for_inference

    if args.format == "hf":
        return load_for_inference(args.out)[0]
    if args.format == "nola":
        return load_for_inference(args.base, args.out)[0]
    from peft import PeftModel

    from nola.adapter_io import read_adapter
    from nola.inference import base_section, default_device, trained_mixed_precision
    from nola.modeling import autocast_forward, load_model

    adapter = read_adapter(args.adapter)
    mixed_precision = trained_mixed_precision(adapter)
    base = load_model(base_section(args.base, adapter), default_device(), mixed_precision)
    return autocast_forward(PeftModel.from_pretrained(base, args.out).eval(), mixed_precision)


def compare(args: argparse.Namespace) -> None:
    """Largest |Δlogit| between adapter model and export on fixed prompts, and eval losses when asked."""
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
        effect = max_logit_difference(expected, prompt_logits(reference, tokenizer, prompts)) if prompts else 0.0
    losses = [eval_loss(reference, tokenizer, examples)] if examples else []
    del reference
    gc.collect()
    candidate = load_export(args)
    if prompts:
        difference = max_logit_difference(expected, prompt_logits(candidate, tokenizer, prompts))
        span = max((logits.max() - logits.min()).item() for logits in expected)
        print(f"max |logit(adapter) - logit({args.format} export)| over {len(prompts)} prompts: {difference:.3g} "
              f"(the adapter itself moves them by up to {effect:.3g}; logits span {span:.3g}; the reference is the "
              f"adapter model as trained, {describe_precision(adapter)})")
    if examples:
        losses.append(eval_loss(candidate, tokenizer, examples))
        print(f"eval loss on {args.eval_data} ({len(examples)} records): adapter {losses[0]:.5f}, "
              f"{args.format} export {losses[1]:.5f}")


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
        export(args)
        if args.check_prompts or args.eval_data:
            compare(args)

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
