"""Soak benchmark: 2,000 steps of the tiny recipe with the trainer's resident memory sampled, to catch leaks that
short tests cannot (a tensor kept per step, a growing log buffer). Not part of the test run.

    .venv/bin/python bench/soak.py [--steps 2000] [--warmup-steps 200] [--out bench/soak.json]

Prints RSS at the end of warm-up, at the end and the peak, and the growth after warm-up (target: under 50 MB),
and writes the samples as JSON."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def last_step(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if '"loss"' in line]
    return max(steps, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "soak.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "run"
        command = [sys.executable, "train_llama.py", "recipes/tiny.yaml", f"train.max_steps={args.steps}",
                   "train.logging_steps=10", "train.eval_steps=250", "train.save_steps=250",
                   "train.sample_generations=0", "log.wandb_mode=offline", f"train.output_dir={output}"]
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        samples = []  # (seconds, step, rss MB)
        start = time.monotonic()
        while process.poll() is None:
            rss = rss_mb(process.pid)
            if rss is not None:
                samples.append((round(time.monotonic() - start, 1), last_step(output / "metrics.jsonl"), rss))
            time.sleep(1.0)
        if process.returncode != 0:
            print(f"training failed with exit code {process.returncode}", file=sys.stderr)
            return 1
    after_warmup = [rss for _, step, rss in samples if step >= args.warmup_steps]
    warm, end, peak = after_warmup[0], after_warmup[-1], max(after_warmup)
    result = {"steps": args.steps, "warmup_steps": args.warmup_steps, "rss_after_warmup_mb": warm,
              "rss_end_mb": end, "rss_peak_after_warmup_mb": peak, "growth_mb": peak - warm,
              "seconds": samples[-1][0], "samples": samples}
    print(f"{'steps':>8} {'RSS after warm-up':>18} {'RSS at end':>11} {'peak':>8} {'growth':>8}")
    print(f"{args.steps:>8} {warm:>15.1f} MB {end:>8.1f} MB {peak:>5.1f} MB {peak - warm:>5.1f} MB"
          f"   ({'under' if peak - warm < 50 else 'OVER'} the 50 MB target)")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
