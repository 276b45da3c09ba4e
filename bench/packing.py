"""Packing benchmark: padding and trained tokens per second, unpacked against packed, on the same examples, side by
side in one run. Not part of the test run.

    .venv/bin/python bench/packing.py [--steps 6] [--out bench/results/packing.json]

Two data sets, both real text from the Alpaca subset in ../shared/data:
- alpaca: the records as they are, under the 7b recipe's lengths (prompt 384, response 512; rows of 896 tokens);
- multi-turn: the same records chained into conversations of 1 to 4 exchanges (a seeded draw), in LLaMA-2-chat's
  format, cut at 2,048 tokens (the 7b_chat recipe's rows).
Tokenised with the LLaMA-2 tokenizer. For each, the unpacked schedule batches 16 examples per micro-batch (grouped
by length, as the recipes do) and the packed one 16 / (examples per row) rows, so both steps hold about the same
examples; the bench reports rows per epoch, the padding fraction of the batches, and trained (labelled) tokens per
second of forward + backward through the real tiny LLaMA with a NOLA adapter (fp32, CPU), timed over the same
number of steps for both. The tiny model is 64 wide: a step's cost is dominated by sequence length as on a large
model, but the absolute rates are the CPU's.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared" / "data"
sys.path.insert(0, str(REPO_ROOT))

import nola  # noqa: E402
from nola.data import StepBatches, load_records, prepare_data  # noqa: E402
from nola.data.conversations import as_conversation  # noqa: E402
from nola.evaluation import token_loss_sum  # noqa: E402

EXAMPLES_PER_STEP = 16


def conversations(records: list[dict], seed: int = 0) -> list[dict]:
    """The records chained into conversations of 1 to 4 exchanges, in order (a seeded draw of the lengths)."""
    rng, chained, index = random.Random(seed), [], 0
    while index < len(records):
        turns = []
        for record in records[index:index + rng.randint(1, 4)]:
            turns += as_conversation(record)
            index += 1
        chained.append({"messages": turns})
    return chained


def padding_fraction(batches: list[dict]) -> float:
    """The share of batch positions that hold no example token (packed or not, `attention_mask` marks them)."""
    cells = sum(batch["input_ids"].numel() for batch in batches)
    return 1 - sum(int(batch["attention_mask"].sum()) for batch in batches) / cells


def measure(model, examples: list[dict], packed_length: int | None, grouped: bool, steps: int, pad_id: int) -> dict:
    """One schedule's rows, padding and trained tokens per second over `steps` forward + backward passes."""
    rows_per_step = EXAMPLES_PER_STEP
    if packed_length is not None:
        per_row = len(examples) / len(StepBatches(examples, 1, 1, 0, grouped, 1, 0, pad_id, packed_length).rows)
        rows_per_step = max(1, round(EXAMPLES_PER_STEP / per_row))
    stream = StepBatches(examples, rows_per_step, 1, 0, grouped, 1, 0, pad_id, packed_length)
    rows = len(stream.rows) if packed_length is not None else len(examples)
    batches = [stream.next()[0] for _ in range(steps)]
    trained = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
    started = time.perf_counter()
    for batch in batches:
        model.zero_grad()
        loss, tokens = token_loss_sum(model, batch)
        (loss / max(tokens, 1)).backward()
    seconds = time.perf_counter() - started
    return {"rows_per_epoch": rows, "rows_per_step": rows_per_step,
            "padding_fraction": round(padding_fraction(batches), 4), "trained_tokens": trained,
            "seconds": round(seconds, 3), "trained_tokens_per_second": round(trained / seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per schedule")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "packing.json"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "llama2-tokenizer")
    tokenizer.pad_token = tokenizer.unk_token
    model = AutoModelForCausalLM.from_pretrained(SHARED / "stories260K-hf", attn_implementation="sdpa")
    model.resize_token_embeddings(len(tokenizer))  # the LLaMA-2 vocabulary: lengths as a LLaMA-2 run sees them
    nola.attach(model, nola.AdapterConfig(rank=8, alpha=16.0, num_basis=64, seed=0))
    records = load_records(SHARED / "alpaca" / "alpaca_subset.json")
    sets = {
        "alpaca": (prepare_data(records, tokenizer, 384, 512, 0, 0).train, 896),
        "multi-turn": (prepare_data(conversations(records), tokenizer, 384, 512, 0, 0, data_format="messages",
                                    template="llama2", max_seq_len=2048).train, 2048),
    }
    results = {}
    for name, (examples, row_length) in sets.items():
        runs = {"unpacked_grouped": measure(model, examples, None, True, args.steps, tokenizer.pad_token_id),
                "unpacked_ungrouped": measure(model, examples, None, False, args.steps, tokenizer.pad_token_id),
                "packed": measure(model, examples, row_length, True, args.steps, tokenizer.pad_token_id)}
        packed = runs["packed"]
        results[name] = {"examples": len(examples), "row_length": row_length, **runs,
                         "fewer_rows": round(runs["unpacked_grouped"]["rows_per_epoch"] / packed["rows_per_epoch"], 2)}
        for kind in ("unpacked_grouped", "unpacked_ungrouped"):
            results[name][f"throughput_ratio_vs_{kind}"] = round(
                packed["trained_tokens_per_second"] / runs[kind]["trained_tokens_per_second"], 2)
        print(f"{name}: {len(examples)} examples, {results[name]['fewer_rows']}x fewer rows packed; padding "
              + ", ".join(f"{kind} {run['padding_fraction']:.1%} ({run['trained_tokens_per_second']:.0f} trained "
                          f"tokens/s)" for kind, run in runs.items()))
    report = {"command": f"python bench/packing.py --steps {args.steps}", "torch_threads": torch.get_num_threads(),
              "sets": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
