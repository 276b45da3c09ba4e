"""Generate responses with a base model and a NOLA adapter (or a merged export), prompted as the adapter learned.

    python scripts/generate.py --base PATH [--adapter DIR] --prompt "Name three colours." [--prompt ...]
    python scripts/generate.py --base PATH --adapter DIR --prompts-file prompts.jsonl > answers.jsonl
    echo "Name three colours." | python scripts/generate.py --base embedded:tiny-llama --adapter runs/tiny/adapter

Prompts come from --prompt (repeatable), --prompts-file (one instruction per line, or JSON Lines with
`instruction` and optional `input`), or standard input (one instruction per line). Each is wrapped in the prompt
template the adapter was trained with, which its adapter_config.json records (Alpaca, LLaMA-2-chat's [INST]
exchange or the tokenizer's chat template; Alpaca without an adapter; --raw: sent as it is). Greedy by default;
--temperature > 0 samples (with --top-p, --top-k, --seed). Prints one JSON object per prompt: {"instruction",
"input", "response"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nola.cli import run_command
from nola.errors import NolaError


def read_requests(args: argparse.Namespace) -> list[dict[str, str]]:
    """[{"instruction", "input"}] from --prompt, --prompts-file or stdin; a bad line is named by number."""
    if args.prompt:
        return [{"instruction": text, "input": ""} for text in args.prompt]
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise NolaError(f"--prompts-file: no such file: {path}")
        lines, where = path.read_text(encoding="utf-8").splitlines(), str(path)
    else:
        lines, where = sys.stdin.read().splitlines(), "stdin"
    requests = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise NolaError(f"{where}, line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
                raise NolaError(f"{where}, line {number}: a JSON line needs a string 'instruction'")
            requests.append({"instruction": record["instruction"], "input": str(record.get("input") or "")})
        else:
            requests.append({"instruction": line.strip(), "input": ""})
    if not requests:
        raise NolaError(f"{where}: no prompts")
    return requests


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise NolaError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise NolaError("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base checkpoint, merged export, or embedded:tiny-llama")
    parser.add_argument("--adapter", help="nola adapter directory (omit for a merged model)")
    parser.add_argument("--prompt", action="append", help="an instruction (repeatable)")
    parser.add_argument("--prompts-file", help="instructions, one per line, or JSON Lines")
    parser.add_argument("--raw", action="store_true", help="send prompts without the template the adapter learned")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args(argv)

    def run() -> None:
        check_arguments(args)
        requests = read_requests(args)
        from transformers.utils import logging

        from nola.adapter_io import read_adapter
        from nola.data.conversations import generation_prompt
        from nola.inference import generate, load_for_inference, trained_prompt_template

        logging.disable_progress_bar()
        model, tokenizer = load_for_inference(args.base, args.adapter)
        template = trained_prompt_template(read_adapter(args.adapter) if args.adapter else None)
        prompts = [r["instruction"] if args.raw else generation_prompt(tokenizer, template, r["instruction"],
                                                                       r["input"]) for r in requests]
        responses = generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, args.temperature,
                             args.top_p, args.top_k, args.seed)
        for request, response in zip(requests, responses):
            print(json.dumps({**request, "response": response}, ensure_ascii=False), flush=True)

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
