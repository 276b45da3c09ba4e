"""Fine-tune a LLaMA with NOLA (or LoRA) adapters from a YAML recipe.

    python train_llama.py RECIPE.yaml [dotted.key=value ...] [--dry-run]   (flags may stand anywhere)
    accelerate launch train_llama.py recipes/70b.yaml train.max_steps=20

Same command under `python`, `accelerate launch` and `torchrun`. A mistake in the recipe, overrides, data or
checkpoint is reported as one line on stderr with exit code 2. SIGTERM or SIGUSR1 (preemption, a time limit) makes
the run checkpoint its last completed step and exit with code 75: run it again with train.resume_from=auto.
"""

from __future__ import annotations

import argparse
import json
import sys

from nola.cli import run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny.yaml")
    # default=[]: without one, intermixed parsing reports a missing recipe as "required: recipe, overrides".
    parser.add_argument("overrides", nargs="*", default=[],
                        help="dotted.key=value overrides, e.g. train.max_steps=20")
    parser.add_argument("--dry-run", action="store_true",
                        help="build on the meta device, print parameter counts and a memory estimate as JSON")
    # Intermixed: `--dry-run` may stand before, between or after the overrides (plain parse_args stops the
    # overrides at the first flag and rejects the rest as unrecognized).
    args = parser.parse_intermixed_args(argv)

    def train() -> None:
        from nola.training.config import load_recipe

        config = load_recipe(args.recipe, args.overrides)
        if args.dry_run:
            from nola.training.dry_run import dry_run

            print(json.dumps(dry_run(config)))
            return
        from nola.training.recipe import FineTuneRecipe

        FineTuneRecipe(config).run()

    from nola.training.stop_signals import EXIT_PREEMPTED, Preempted

    try:
        return run_command(train)
    except Preempted as stopped:  # SIGTERM / SIGUSR1: checkpointed; the exit code asks the scheduler to requeue
        print(f"nola: {stopped}", file=sys.stderr)
        return EXIT_PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
