"""Performance suite: what a NOLA training step costs next to LoRA, VeRA and the official NOLA algorithm.

    .venv/bin/python bench/perf.py                         # the whole grid (long: see --help for subsets)
    .venv/bin/python bench/perf.py --dtypes nf4 --accum 1,8 --checkpointing off --steps 10

A small LLaMA (hidden 512, 4 layers, 8 heads, MLP 1376, vocab 32000; random weights), loaded through nola's own
`load_model` (nf4 with bf16 compute, or fp32), trains on micro-batches of 4 x 128 random tokens with every one of the
7 projections adapted and AdamW, for each setting of dtype x gradient accumulation x gradient checkpointing.

Time: every variant is built in this one process and the variants take turns, one optimizer step each, round after
round, so machine noise hits all alike; the table reports each variant's median step time, tokens/s and its ratio to
our LoRA r=8 from the same rounds. Memory: each variant's peak RSS comes from a fresh child process running a few
steps of it alone (a shared process would report the largest variant for all). Also measured: basis throughput of
the fused (torch.compile) and eager paths against torch.rand on the model's shapes.

Prints a table per setting and writes all numbers as JSON (--out). Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from nola import AdapterConfig, attach, project_deferred_gradients, set_deferred_projection  # noqa: E402
from nola.adapter_config import LLAMA_LINEAR_MODULES  # noqa: E402
from nola.basis import STREAM_A  # noqa: E402
from nola.modeling import ModelSection, load_model  # noqa: E402

MICRO_BATCH, SEQUENCE, VOCAB = 4, 128, 32000
REFERENCE = "lora-r8"

# name -> (how to adapt the model, environment for its steps). "deferred" is how our trainer runs NOLA.
VARIANTS = {
    "nola-k1024": dict(kind="nola", num_basis=1024, deferred=True),
    "nola-k128": dict(kind="nola", num_basis=128, deferred=True),
    "nola-k1024-per-micro-batch": dict(kind="nola", num_basis=1024, deferred=False),
    "nola-k1024-eager": dict(kind="nola", num_basis=1024, deferred=True, backend="eager"),
    "lora-r8": dict(kind="lora", rank=8),
    "lora-r1": dict(kind="lora", rank=1),
    "peft-lora-r8": dict(kind="peft-lora", rank=8),
    "peft-vera-r256": dict(kind="peft-vera", rank=256),
    "official-k1024": dict(kind="official", num_basis=1024),
    "official-k128": dict(kind="official", num_basis=128),
}
SLOW = ("official-k1024", "official-k128")  # one warm-up round, --slow-steps measured: a step is ~10x LoRA's


def write_small_llama(directory: Path) -> None:
    """The benchmark model, saved once so that every variant loads it through the real loading path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=VOCAB, max_position_embeddings=SEQUENCE)
    LlamaForCausalLM(config).save_pretrained(directory)


class Variant:
    """One adapted model, its optimizer, and one optimizer step of `accum` micro-batches."""

    def __init__(self, name: str, model_dir: Path, dtype: str, checkpointing: bool) -> None:
        spec = VARIANTS[name]
        self.name, self.backend = name, spec.get("backend", "auto")
        self.autocast = dtype == "nf4"  # bf16 compute, as the 4-bit recipes run (train.mixed_precision: bf16)
        section = ModelSection(name_or_path=str(model_dir), load_in_4bit=dtype == "nf4", compute_dtype="bfloat16",
                               torch_dtype="float32", gradient_checkpointing=checkpointing)
        model = load_model(section, torch.device("cpu"), "bf16" if self.autocast else "no")
        self.deferred = False
        if spec["kind"] in ("nola", "lora"):
            rank = spec.get("rank", 8)
            attach(model, AdapterConfig(method=spec["kind"], rank=rank, alpha=2.0 * rank,
                                        num_basis=spec.get("num_basis", 256)))
            self.deferred = spec.get("deferred", False) and set_deferred_projection(model, True) > 0
        elif spec["kind"] == "official":
            from official_nola import attach_official

            attach_official(model, 8, 16.0, spec["num_basis"], LLAMA_LINEAR_MODULES)
        else:
            import peft

            if spec["kind"] == "peft-lora":
                config = peft.LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0,
                                         target_modules=list(LLAMA_LINEAR_MODULES))
            else:
                config = peft.VeraConfig(r=spec["rank"], target_modules=list(LLAMA_LINEAR_MODULES),
                                         vera_dropout=0.0)
            model = peft.get_peft_model(model, config)
        model.train()
        self.model = model
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.parameters)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=1e-4)
        self.times: list[float] = []

    def step(self, batches: list[torch.Tensor]) -> float:
        """One optimizer step as our trainer takes it; returns its wall time in seconds."""
        previous = os.environ.get("NOLA_BASIS_BACKEND")
        os.environ["NOLA_BASIS_BACKEND"] = self.backend
        try:
            start = time.perf_counter()
            for tokens in batches:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                    loss = self.model(input_ids=tokens, labels=tokens).loss / len(batches)
                loss.backward()
            if self.deferred:
                project_deferred_gradients(self.model)
            torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start
        finally:
            if previous is None:
                os.environ.pop("NOLA_BASIS_BACKEND")
            else:
                os.environ["NOLA_BASIS_BACKEND"] = previous


def random_batches(generator: torch.Generator, accum: int) -> list[torch.Tensor]:
    return [torch.randint(0, VOCAB, (MICRO_BATCH, SEQUENCE), generator=generator) for _ in range(accum)]


def time_setting(names, model_dir, dtype, accum, checkpointing, steps, slow_steps, warmup) -> dict[str, dict]:
    """Interleaved rounds: each variant takes one step per round; medians over the measured rounds."""
    variants = [Variant(name, model_dir, dtype, checkpointing) for name in names]
    generator = torch.Generator().manual_seed(1)
    for round_index in range(warmup + steps):
        batches = random_batches(generator, accum)
        for variant in variants:
            variant_warmup = min(warmup, 1) if variant.name in SLOW else warmup
            if variant.name in SLOW and round_index >= variant_warmup + slow_steps:
                continue
            elapsed = variant.step(batches)
            if round_index >= variant_warmup:
                variant.times.append(elapsed)
    results = {}
    for variant in variants:
        median = statistics.median(variant.times)
        results[variant.name] = {"trainable_params": variant.trainable, "step_s": median,
                                 "tokens_per_s": accum * MICRO_BATCH * SEQUENCE / median,
                                 "steps_measured": len(variant.times), "step_s_all": variant.times}
    if REFERENCE in results:
        for result in results.values():
            result["vs_lora_r8"] = result["step_s"] / results[REFERENCE]["step_s"]
    return results


def peak_rss_of(name, model_dir, dtype, accum, checkpointing, steps: int = 3) -> float:
    """Peak RSS (MB) of a fresh process that builds this one variant and trains `steps` steps."""
    command = [sys.executable, __file__, "--child", name, "--model-dir", str(model_dir), "--dtypes", dtype,
               "--accum", str(accum), "--checkpointing", "on" if checkpointing else "off", "--steps", str(steps)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def child(name, model_dir, dtype, accum, checkpointing, steps) -> None:
    variant = Variant(name, model_dir, dtype, checkpointing)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        variant.step(random_batches(generator, accum))
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's high-water RSS since exec (VmHWM). Not ru_maxrss: that survives exec, so a child forked from
    this benchmark, with every variant resident, would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best available


def basis_throughput(repeats: int = 20) -> dict[str, dict[str, float]]:
    """M basis elements/s of fused and eager combine/project for k=1024 on the model's matrix sizes, and torch.rand
    (what the official algorithm draws from) for the same element count."""
    from nola import fused

    def median_time(function, *arguments) -> float:
        function(*arguments)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function(*arguments)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    results = {}
    num_basis = 1024
    for label, numel in (("r8 x 512", 8 * 512), ("1376 x r8", 1376 * 8)):
        coefficients, gradient = torch.randn(num_basis), torch.randn(numel)
        row = {"torch.rand": num_basis * numel / median_time(torch.rand, num_basis, numel) / 1e6}
        for backend in ("compiled", "eager"):
            os.environ["NOLA_BASIS_BACKEND"] = backend
            for operation, function, arguments in (
                ("combine", fused.combine, (coefficients, 3, STREAM_A, numel, 8 << 20)),
                ("project", fused.project, (gradient, 3, STREAM_A, num_basis, 8 << 20)),
            ):
                row[f"{backend} {operation}"] = num_basis * numel / median_time(function, *arguments) / 1e6
        os.environ.pop("NOLA_BASIS_BACKEND")
        results[label] = row
    return results


def print_setting(title: str, results: dict[str, dict]) -> None:
    print(f"\n## {title}")
    print(f"| {'variant':<27} | {'trainable':>9} | {'step s':>7} | {'tokens/s':>8} | {'vs LoRA r=8':>11} | "
          f"{'peak RSS MB':>11} |")
    print(f"|{'-' * 29}|{'-' * 10}:|{'-' * 8}:|{'-' * 9}:|{'-' * 12}:|{'-' * 12}:|")
    for name, result in results.items():
        rss = result.get("peak_rss_mb")
        print(f"| {name:<27} | {result['trainable_params']:>9,} | {result['step_s']:>7.3f} | "
              f"{result['tokens_per_s']:>8.0f} | {result.get('vs_lora_r8', float('nan')):>11.2f} | "
              f"{(f'{rss:,.0f}' if rss else '-'):>11} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--dtypes", default="nf4,fp32")
    parser.add_argument("--accum", default="1,8", help="gradient accumulation steps to measure")
    parser.add_argument("--checkpointing", default="off,on")
    parser.add_argument("--steps", type=int, default=10, help="measured rounds (after --warmup)")
    parser.add_argument("--slow-steps", type=int, default=3, help="measured rounds for " + ", ".join(SLOW))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant peak RSS child processes")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "perf.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}")
    if args.child:
        child(args.child, Path(args.model_dir), args.dtypes, int(args.accum), args.checkpointing == "on", args.steps)
        return 0

    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "basis_throughput_m_elements_per_s": basis_throughput(), "settings": []}
    print("basis throughput, M elements/s (k=1024):")
    for label, row in report["basis_throughput_m_elements_per_s"].items():
        print(f"  {label}: " + ", ".join(f"{key} {value:,.0f}" for key, value in row.items()))
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "small-llama"
        write_small_llama(model_dir)
        for dtype in args.dtypes.split(","):
            for checkpointing in (value == "on" for value in args.checkpointing.split(",")):
                for accum in (int(value) for value in args.accum.split(",")):
                    results = time_setting(names, model_dir, dtype, accum, checkpointing, args.steps, args.slow_steps,
                                           args.warmup)
                    if not args.no_memory:
                        for name in names:
                            results[name]["peak_rss_mb"] = peak_rss_of(name, model_dir, dtype, accum, checkpointing)
                    title = (f"{dtype}, micro-batch {MICRO_BATCH} x {SEQUENCE}, grad accumulation {accum}, "
                             f"gradient checkpointing {'on' if checkpointing else 'off'}")
                    print_setting(title, results)
                    report["settings"].append({"dtype": dtype, "accum": accum, "checkpointing": checkpointing,
                                               "results": results})
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")  # after each setting: partial runs
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
