"""Evaluate a base model with a NOLA adapter (or a merged export): eval loss, MMLU, lm-evaluation-harness tasks.

    python scripts/evaluate.py --base PATH [--adapter DIR] --data alpaca_eval.json
    python scripts/evaluate.py --base PATH --adapter DIR --mmlu five_shot_mmlu_val.json
    python scripts/evaluate.py --base PATH --adapter DIR --mmlu cais/mmlu --mmlu-shots 5 --mmlu-max-examples 1000
    python scripts/evaluate.py --base PATH --adapter DIR --lm-eval-tasks arc_easy,hellaswag

--data: mean loss per response token on an Alpaca-format file (.json, .jsonl, .parquet), prompts masked as in
training. --mmlu: accuracy the QLoRA way (highest next-token logit among A-D) on a local QLoRA-format JSON file
(zero- or five-shot prompts included) or `cais/mmlu` (k-shot prompts built from its dev split), as the NOLA paper
reports MMLU for LLaMA-2: "mmlu_accuracy" is the mean of the per-subject accuracies (macro, QLoRA's and the paper's
number), "mmlu_micro_accuracy" the mean over questions, "mmlu_examples" the questions scored and "mmlu_subjects"
{subject: {"accuracy", "n"}} (a file without subjects is one subject, "all"). --mmlu-max-examples keeps the first
N questions, and the files are sorted by subject, so a cut covers the first subjects only. --lm-eval-tasks hands the
same in-memory model to lm-evaluation-harness when it is installed. Prints one JSON object (also written to --out
when given).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nola.cli import check_input_source, run_command
from nola.errors import NolaError


def check_arguments(args: argparse.Namespace) -> None:
    if not (args.data or args.mmlu or args.lm_eval_tasks):
        raise NolaError("nothing to evaluate: give --data, --mmlu and/or --lm-eval-tasks")
    for name in ("batch_size", "source_max_len", "target_max_len", "mmlu_max_length"):
        if getattr(args, name) < 1:
            raise NolaError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.mmlu_max_examples is not None and args.mmlu_max_examples < 1:
        raise NolaError(f"--mmlu-max-examples: must be >= 1, got {args.mmlu_max_examples}")
    if args.out is not None and not Path(args.out).resolve().parent.is_dir():
        raise NolaError(f"--out: the directory of {args.out} does not exist")
    for flag, value in (("--data", args.data), ("--mmlu", args.mmlu)):
        if value:
            check_input_source(flag, value)
    if args.lm_eval_tasks:
        try:
            import lm_eval  # noqa: F401  (only checking that it is there)
        except ImportError:
            raise NolaError("--lm-eval-tasks: lm-evaluation-harness is not installed (pip install lm-eval)") from None


def eval_loss(model, tokenizer, records: list[dict], args: argparse.Namespace) -> dict:
    from nola.adapter_io import read_adapter
    from nola.data import tokenize_records
    from nola.evaluation import evaluate
    from nola.inference import trained_prompt_template

    # the template the adapter learned with (without an adapter: the format's own)
    template = trained_prompt_template(read_adapter(args.adapter)) if args.adapter else None
    examples = [e for e in tokenize_records(records, tokenizer, args.source_max_len, args.target_max_len, False,
                                            args.format, template, args.max_seq_len, f"--data {args.data}") if e]
    if not examples:
        raise NolaError(f"--data: {args.data} has no record with a response to score")
    return {"eval_loss": evaluate(model, examples, args.batch_size, tokenizer.pad_token_id),
            "eval_records": len(examples)}


def lm_eval_tasks(model, tokenizer, args: argparse.Namespace) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = [task.strip() for task in args.lm_eval_tasks.split(",") if task.strip()]
    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size),
                                      tasks=tasks)
    return {"lm_eval": results["results"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base checkpoint, merged export, or embedded:tiny-llama")
    parser.add_argument("--adapter", help="nola adapter directory (omit for a merged model or the bare base)")
    parser.add_argument("--data", help="records for the eval loss (Alpaca unless --format says otherwise)")
    parser.add_argument("--format", default="alpaca", choices=("alpaca", "messages", "prompt_completion", "text"),
                        help="what a --data record is; rendered with the template the adapter was trained with")
    parser.add_argument("--max-seq-len", type=int, help="chat templates: tokens per example (default: the sum of "
                                                         "the two lengths)")
    parser.add_argument("--source-max-len", type=int, default=512)
    parser.add_argument("--target-max-len", type=int, default=256)
    parser.add_argument("--mmlu", help="QLoRA-format MMLU JSON file, or cais/mmlu")
    parser.add_argument("--mmlu-shots", type=int, default=5, help="shots for cais/mmlu (files carry their own)")
    parser.add_argument("--mmlu-max-examples", type=int, help="score only the first N questions")
    parser.add_argument("--mmlu-max-length", type=int, default=2048, help="prompt tokens kept (from the end)")
    parser.add_argument("--lm-eval-tasks", help="comma-separated lm-evaluation-harness tasks")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", help="also write the results JSON here")
    args = parser.parse_args(argv)

    def run() -> None:
        check_arguments(args)
        from transformers.utils import logging

        from nola.inference import load_for_inference

        from nola import embedded
        from nola.data import load_records
        from nola.mmlu import load_mmlu, mmlu_accuracy

        logging.disable_progress_bar()
        # The data first: a bad file is reported before minutes of model loading.
        records = load_records(embedded.resolve(args.data), args.format) if args.data else []
        questions = load_mmlu(args.mmlu, args.mmlu_shots)[: args.mmlu_max_examples] if args.mmlu else []
        model, tokenizer = load_for_inference(args.base, args.adapter)
        results = {"base": args.base, "adapter": args.adapter}
        if args.data:
            results.update(eval_loss(model, tokenizer, records, args))
        if args.mmlu:  # mmlu_accuracy (macro), mmlu_micro_accuracy, mmlu_examples, mmlu_subjects
            results.update(mmlu_accuracy(model, tokenizer, questions, args.batch_size, args.mmlu_max_length))
        if args.lm_eval_tasks:
            results.update(lm_eval_tasks(model, tokenizer, args))
        text = json.dumps(results, indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n")
        print(text)

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
