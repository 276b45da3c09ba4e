"""The GPU half of our checks: `python bench/gpu_check.py [--out FILE.json] [--quick]` prints ONE JSON object.

Under 8 minutes on one CUDA GPU (--quick: fewer rounds, an 8-layer step-time model). Sections:
  basis_identity                  CPU and CUDA bases bit-identical (tests/test_basis.py's goldens included), and A0, A,
                                  B: what lets a GPU-trained adapter merge on a CPU.
  compiled_vs_eager_cuda          the torch.compile basis kernels against the eager path, on CUDA.
  cuda_nf4_adapter_merged_on_cpu  a NOLA adapter trained on CUDA over an nf4 base, merged on the CPU by nola.merge:
                                  |Δlogit| of the merged model against the CUDA adapter model.
  step_time, peak_memory_mb       NOLA r=16 k=1024 vs LoRA r=8 on a TinyLlama-1.1B-shaped nf4 model.
  fsdp_lean_load                  the FSDP2 lean load of that model on one rank: max_memory_allocated at load and
                                  over a step, against --dry-run's FSDP2 figures for one rank.
A failing section reports {"error": ...} and the others still run. Without CUDA: {"skipped": ...}, exit 0, nothing
imported but torch. NOLA_GPU_CHECK_DEVICE=cpu (a developer switch) runs every section on the CPU at tiny sizes, to
exercise the code where there is no GPU; its numbers mean nothing. Not a test: pytest collects tests/ only.

Not bench/perf.py's Variant: it loads and autocasts for the CPU and never synchronises a device; and its
write_small_llama saves float32, whereas these checkpoints are bf16 like real LLaMA ones, so the merge writes the very
non-quantised weights training saw. Its model shape and interleaved rounds are reused. A plain loop (attach + AdamW,
stepped as the trainer does: bf16 autocast, deferred projection, clipping), not train_llama.py in a subprocess: no
tokenizer or data set needed, and the CUDA model stays at hand for the logits. Merge and reference models go through
the functions scripts/merge_and_export.py uses.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import runpy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICE_SWITCH, CHUNK = "NOLA_GPU_CHECK_DEVICE", 8 << 20  # CHUNK: adapter.basis_chunk_bytes' default
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size")
TINYLLAMA = dict(zip(SHAPE_KEYS, (2048, 5632, 22, 32, 4, 32000)))
PERF_SMALL = dict(zip(SHAPE_KEYS, (512, 1376, 4, 8, 8, 32000)))  # bench/perf.py's model
TINY = dict(zip(SHAPE_KEYS, (128, 352, 2, 4, 2, 1000)))
# rounds: gradient accumulation -> (warm-up rounds, measured rounds); large: the big basis cases of sections 1-2
MODES = {
    "full": dict(merge_model=PERF_SMALL, merge_batch=(4, 128), bench_model=TINYLLAMA, micro_batch=(4, 512),
                 rounds={1: (2, 8), 16: (1, 4)}, large=True),
    "quick": dict(merge_model=PERF_SMALL, merge_batch=(4, 128), bench_model={**TINYLLAMA, "num_hidden_layers": 8},
                  micro_batch=(4, 512), rounds={1: (1, 4), 16: (1, 2)}, large=True),
    "smoke": dict(merge_model=TINY, merge_batch=(2, 32), bench_model=TINY, micro_batch=(1, 16),
                  rounds={1: (1, 2), 16: (0, 1)}, large=False),
}
NOLA, LORA = "nola-r16-k1024", "lora-r8"
VARIANTS = {NOLA: dict(method="nola", rank=16, alpha=4.0, num_basis=1024), LORA: dict(method="lora", rank=8, alpha=16.0)}
MERGE_STEPS, MERGE_LR = 8, 1e-2  # a large rate: a few steps must move the logits well above rounding


def release(device: torch.device) -> None:
    """Hand freed memory back between phases, so that one phase's tensors stay out of the next one's peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(device: torch.device, function: Callable[..., dict], *arguments) -> dict:
    """Run one section. An exception becomes {"error": ...}: a failing check is a finding, and the others still run."""
    start = time.perf_counter()
    try:
        result = function(*arguments)
    except Exception as error:  # any failure: CUDA OOM, an inductor error, a merge refusal, ...
        result = {"error": f"{type(error).__name__}: {error}"[:2000]}
    release(device)
    return {**result, "seconds": round(time.perf_counter() - start, 2)}


def from_tests(file: str, name: str):
    """A constant of tests/<file>, where alone it is defined: taken from there, never copied, so this check pins what
    the tests pin. Run by path, because an installed site-packages `tests` package could shadow ours."""
    return runpy.run_path(str(REPO_ROOT / "tests" / file))[name]


def basis_identity(device: torch.device, mode: dict) -> dict:
    """Bases generated on `device` and moved to the CPU, against the CPU's own: torch.equal and SHA-256 per case."""
    from nola.basis import STREAM_A, STREAM_A0, STREAM_B, generate_basis
    from nola.matrices import initial_a, nola_matrices

    golden, cpu = from_tests("test_basis.py", "GOLDEN"), torch.device("cpu")
    cases = [*golden, (7, STREAM_A, 3, 5, 4099), (2**31 + 5, STREAM_A0, 0, 1, 16 * 4096)]
    if mode["large"]:  # element indices past 2^24, and a whole k=1024 basis of a 2048-wide A
        cases += [(987654321, STREAM_B, 5, 1, 2**25 + 17), (11, STREAM_A, 0, 1024, 16 * 2048)]
    rows = []
    for case in cases:
        values = generate_basis(*case, device).cpu()
        checksum, expected = hashlib.sha256(values.numpy().tobytes()).hexdigest(), golden.get(case)
        rows.append({**dict(zip(("seed", "stream", "start", "count", "numel"), case)), "stream": hex(case[1]),
                     "bit_identical": torch.equal(values, generate_basis(*case)), "sha256": checksum,
                     "golden_match": None if expected is None else checksum == expected})
    alphas, betas = (torch.randn(256, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    shape = (7, 16, 4096, 11008) if mode["large"] else (7, 16, 256, 688)  # seed, r, in, out
    on_cpu = nola_matrices(alphas, betas, *shape, CHUNK)
    on_device = [m.cpu() for m in nola_matrices(alphas.to(device), betas.to(device), *shape, CHUNK)]
    goldens = [row["golden_match"] for row in rows if row["golden_match"] is not None]
    return {"all_bit_identical": all(row["bit_identical"] for row in rows),
            "all_goldens_match": len(goldens) == len(golden) and all(goldens), "cases": rows,
            "nola_matrices": {"seed_r_in_out": shape, "a0_bit_identical": torch.equal(
                initial_a(7, 16, shape[2], torch.float32, device).cpu(), initial_a(7, 16, shape[2], torch.float32, cpu)),
                **{f"max_abs_diff_{n}": (d - c).abs().max().item() for n, d, c in zip("ab", on_device, on_cpu)}}}


def compiled_vs_eager(device: torch.device, mode: dict) -> dict:
    """The compiled kernels run strictly (NOLA_BASIS_BACKEND=compiled): a compile failure is reported, not hidden by
    the eager fallback. Shapes: tests/test_fused.py's odd ones, plus, on a GPU, the 1B model's A and B sizes."""
    shapes = list(from_tests("test_fused.py", "SHAPES")) + ([(1024, 16 * 2048), (1024, 5632 * 16)] if mode["large"] else [])
    with mock.patch.dict(os.environ, NOLA_BASIS_BACKEND="compiled"):
        cases = [compare_kernels(device, num_basis, numel) for num_basis, numel in shapes]
    return {"all_one_hot_bit_identical": all(case["one_hot_bit_identical"] for case in cases),
            "max_rel_diff": max(case[op]["max_rel_diff"] for case in cases for op in ("combine", "project")),
            "cases": cases}


def compare_kernels(device: torch.device, num_basis: int, numel: int) -> dict:
    """Differences relative to the largest exact value (the eager path in float64). One-hot inputs make combine
    return one basis row and project one basis column: both must equal the generator's values bit for bit."""
    from nola import fused
    from nola.basis import STREAM_A, STREAM_B, combine_basis, generate_basis, project_onto_basis

    generator = torch.Generator().manual_seed(num_basis + numel)
    alphas, gradient = (torch.randn(n, generator=generator).to(device) for n in (num_basis, numel))
    report: dict = {"k": num_basis, "numel": numel}
    for operation, compiled, eager, exact in (
        ("combine", fused.combine(alphas, 5, STREAM_A, numel, CHUNK), combine_basis(alphas, 5, STREAM_A, numel),
         combine_basis(alphas.double(), 5, STREAM_A, numel)),
        ("project", fused.project(gradient, 5, STREAM_A, num_basis, CHUNK),
         project_onto_basis(gradient, 5, STREAM_A, num_basis), project_onto_basis(gradient.double(), 5, STREAM_A, num_basis)),
    ):
        scale, difference = exact.abs().max().item(), (compiled - eager).abs().max().item()
        report[operation] = {"max_abs_diff": difference, "max_rel_diff": difference / scale,
                             "compiled_rel_err_vs_fp64": (compiled.double() - exact).abs().max().item() / scale,
                             "eager_rel_err_vs_fp64": (eager.double() - exact).abs().max().item() / scale}
    basis = generate_basis(11, STREAM_B, 0, num_basis, numel, device)
    one_hot = lambda size, index: torch.nn.functional.one_hot(torch.tensor(index), size).float().to(device)  # noqa: E731
    identical = all(torch.equal(fused.combine(one_hot(num_basis, row), 11, STREAM_B, numel, CHUNK), basis[row])
                    for row in (0, num_basis // 2, num_basis - 1))
    identical &= all(torch.equal(fused.project(one_hot(numel, col), 11, STREAM_B, num_basis, CHUNK), basis[:, col])
                     for col in (0, numel // 3, numel - 1))
    return {**report, "one_hot_bit_identical": identical}


def write_llama(directory: Path, device: torch.device, shape: dict) -> None:
    """A random LLaMA, saved as a bf16 safetensors checkpoint. It is built on `device`, because initialising 1.1B
    weights on the CPU takes minutes. Models then load through nola's load_model, quantised to nf4 as they load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=1024))
    model.to(torch.bfloat16).save_pretrained(directory)


def token_batches(generator: torch.Generator, count: int, shape: tuple[int, int], vocab: int,
                  device: torch.device) -> list[torch.Tensor]:
    return [torch.randint(0, vocab, shape, generator=generator).to(device) for _ in range(count)]


class Trainee:
    """An adapted nf4 model (bf16 compute) and its AdamW. Steps go as in nola's trainer with train.mixed_precision
    bf16: autocast, NOLA's deferred projection once per step, clipping at 1.0. Each step is timed between two device
    synchronisations."""

    def __init__(self, model_dir: Path, device: torch.device, adapter: dict, checkpointing: bool,
                 lr: float = 1e-4) -> None:
        from nola import AdapterConfig, attach, set_deferred_projection
        from nola.inject import record_mixed_precision
        from nola.modeling import ModelSection, load_model

        section = ModelSection(name_or_path=str(model_dir), load_in_4bit=True, compute_dtype="bfloat16",
                               gradient_checkpointing=checkpointing)
        self.device, self.model = device, attach(load_model(section, device, "bf16"), AdapterConfig(**adapter))
        record_mixed_precision(self.model, "bf16")
        self.deferred = set_deferred_projection(self.model.train(), True) > 0
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr)

    def step(self, batches: list[torch.Tensor]) -> tuple[float, float]:
        """(seconds, loss) of one optimizer step over the micro-batches `batches`."""
        from nola import project_deferred_gradients

        synchronize = torch.cuda.synchronize if self.device.type == "cuda" else lambda: None
        synchronize()
        start, total = time.perf_counter(), torch.zeros((), device=self.device)
        for tokens in batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self.model(input_ids=tokens, labels=tokens).loss / len(batches)
            loss.backward()
            total += loss.detach()
        if self.deferred:
            project_deferred_gradients(self.model)
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize()
        return time.perf_counter() - start, total.item()


@torch.no_grad()
def logits_of(model: torch.nn.Module, probes: list[torch.Tensor], autocast: bool = False) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return [model(input_ids=probe.unsqueeze(0).to(device)).logits[0].float().cpu() for probe in probes]


def merged_on_cpu(device: torch.device, mode: dict) -> dict:
    """Train on `device`, save the adapter, merge it (fp32) on the CPU, then compare logits. The reference is the
    adapter on the base as the adapter file records it, nf4 on `device` under the trained bf16 autocast: the model
    merge_and_export's check compares against. A float32-compute copy of it tells bf16 arithmetic from merge error.
    The base alone (B = 0) gives the adapter's own effect for scale."""
    from nola import adapted_modules, save_adapter
    from nola.adapter_io import apply_adapter, read_adapter
    from nola.inference import base_section, max_logit_difference, trained_mixed_precision
    from nola.merge import merge_checkpoint
    from nola.modeling import autocast_forward, load_model

    shape, generator = mode["merge_model"], torch.Generator().manual_seed(2)
    with tempfile.TemporaryDirectory() as scratch:
        base, adapter_dir, merged = (Path(scratch) / name for name in ("base", "adapter", "merged"))
        write_llama(base, device, shape)
        trainee = Trainee(base, device, dict(method="nola", seed=1), checkpointing=False, lr=MERGE_LR)  # r=8, k=256
        batch = token_batches(generator, 1, mode["merge_batch"], shape["vocab_size"], device)
        losses = [trainee.step(batch)[1] for _ in range(MERGE_STEPS)]  # one batch, memorised: the loss must fall
        save_adapter(trainee.model, adapter_dir)
        probes = [torch.randint(0, shape["vocab_size"], (n,), generator=generator) for n in (16, 40, 64)]
        training = logits_of(trainee.model.eval(), probes, autocast=True)
        del trainee
        adapter = read_adapter(adapter_dir)
        merge_checkpoint(base, adapter, merged, torch.float32)  # reads and writes on the CPU only
        logits = {}
        for precision in (trained_mixed_precision(adapter), "no"):
            model = apply_adapter(load_model(base_section(str(base), adapter), device, precision), adapter)
            if precision == "no":  # float32 arithmetic throughout: bitsandbytes' Linear4bit computes in it too
                for module in model.modules():
                    if hasattr(module, "compute_dtype"):
                        module.compute_dtype = torch.float32
            logits[precision] = logits_of(autocast_forward(model.eval(), precision), probes)
        for _, module in adapted_modules(model):
            module.coefficients_b.data.zero_()  # B = 0: the base alone
        base_only = logits_of(model, probes)
        del model
        release(device)
        found = logits_of(load_model(base_section(str(merged), None), torch.device("cpu")).eval(), probes)
    expected = logits[trained_mixed_precision(adapter)]
    error, effect = max_logit_difference(expected, found), max_logit_difference(logits["no"], base_only)
    error_fp32 = max_logit_difference(logits["no"], found)
    return {"model": shape, "adapter": "nola r=8 k=256", "trained_mixed_precision": trained_mixed_precision(adapter),
            "steps": MERGE_STEPS, "loss_first": losses[0], "loss_last": losses[-1], "max_abs_dlogit": error,
            "logit_range": [min(t.min().item() for t in expected), max(t.max().item() for t in expected)],
            "max_abs_dlogit_fp32_compute": error_fp32, "adapter_effect_max_abs_dlogit": effect,
            "error_over_effect": {"as_trained": error / effect, "fp32_compute": error_fp32 / effect} if effect else None,
            "reloaded_vs_training_model_max_abs_dlogit": max_logit_difference(training, expected)}


def step_time(device: torch.device, mode: dict, model_dir: Path) -> dict:
    """Median optimizer-step seconds of NOLA and LoRA. Both models stay resident and take turns, one step each,
    round after round, so that machine noise hits both alike. Each round reverses the previous round's order."""
    from nola import fused

    trainees = {name: Trainee(model_dir, device, adapter, checkpointing=True) for name, adapter in VARIANTS.items()}
    generator, vocab = torch.Generator().manual_seed(1), mode["bench_model"]["vocab_size"]
    report: dict = {"model": mode["bench_model"], "micro_batch": mode["micro_batch"], "gradient_checkpointing": True,
                    "trainable_params": {name: sum(p.numel() for p in t.parameters) for name, t in trainees.items()}}
    for accum, (warmup, measured) in mode["rounds"].items():
        times: dict[str, list[float]] = {name: [] for name in trainees}
        for round_index in range(warmup + measured):
            batches = token_batches(generator, accum, mode["micro_batch"], vocab, device)
            for name in list(trainees)[:: 1 if round_index % 2 == 0 else -1]:
                seconds = trainees[name].step(batches)[0]
                if round_index >= warmup:
                    times[name].append(seconds)
        medians = {name: statistics.median(values) for name, values in times.items()}
        report[f"accum_{accum}"] = {**{name: {"median_s": medians[name], "all_s": [round(t, 4) for t in times[name]]}
                                       for name in trainees}, "nola_over_lora": medians[NOLA] / medians[LORA]}
    report["nola_basis_backend"] = {"requested": fused.requested_backend(),
                                    "fell_back_to_eager": device.type in fused._failed_devices}
    return report


def peak_memory(device: torch.device, mode: dict, model_dir: Path) -> dict:
    """torch.cuda.max_memory_allocated (MiB) over one step per accumulation setting. Each variant is built and
    stepped alone: in step_time both models are resident, which would inflate every peak."""
    generator, vocab, cuda = torch.Generator().manual_seed(3), mode["bench_model"]["vocab_size"], device.type == "cuda"
    report: dict = {} if cuda else {"note": "cpu smoke run: no CUDA allocator, peaks are null"}
    for name, adapter in VARIANTS.items():
        release(device)
        trainee, report[name] = Trainee(model_dir, device, adapter, checkpointing=True), {}
        for accum in mode["rounds"]:
            batches = token_batches(generator, accum, mode["micro_batch"], vocab, device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            trainee.step(batches)
            report[name][f"accum_{accum}"] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
        del trainee
    return report


def fsdp_lean_load(device: torch.device, mode: dict, model_dir: Path) -> dict:
    """The FSDP2 lean load of recipes/accelerate/fsdp.yaml on this GPU, one rank (world size 1: one GPU cannot
    host two NCCL ranks): torch.cuda.max_memory_allocated (MiB) when the sharded load returns and over one training
    step (NOLA attached, bf16 autocast, gradient checkpointing), beside `--dry-run`'s FSDP2 formulas for one rank
    with CUDA kernels, less the 1 GiB context they add (the allocator does not see it). What more ranks change is
    only 1/N of the shards, which the CPU measurement (bench/load_memory.py) covers."""
    import torch.distributed as dist
    from types import SimpleNamespace

    from nola import AdapterConfig, attach
    from nola.modeling import ModelSection, build_meta_model, estimate_memory
    from nola.training.dry_run import fsdp_estimates
    from nola.training.fsdp import load_sharded_model

    cuda = device.type == "cuda"
    os.environ.update(FSDP_VERSION="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    section = ModelSection(name_or_path=str(model_dir), load_in_4bit=True, quant_storage="bfloat16",
                           gradient_checkpointing=True)
    adapter = AdapterConfig(**VARIANTS[NOLA])
    release(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = load_sharded_model(section, SimpleNamespace(device=device, num_processes=1), "bf16")
    load_peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    attach(model, adapter)
    batch = token_batches(torch.Generator().manual_seed(4), 1, mode["micro_batch"], mode["bench_model"]["vocab_size"],
                          device)[0]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    step_peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    meta = attach(build_meta_model(section), adapter)
    trainable = sum(p.numel() for p in meta.parameters() if p.requires_grad)
    memory = estimate_memory(meta, section, trainable, *mode["micro_batch"])
    estimate = fsdp_estimates(memory, "cuda", processes=(1,))
    context = memory["overhead_gib"] * 1024
    report = {"load_peak_mib": load_peak, "step_peak_mib": step_peak,
              "dry_run_load_mib": estimate["fsdp_load_peak_gib"]["1"] * 1024 - context,
              "dry_run_step_mib": estimate["fsdp_step_peak_gib"]["1"] * 1024 - context}
    if cuda:
        report.update(dry_run_load_over_measured=report["dry_run_load_mib"] / load_peak,
                      dry_run_step_over_measured=report["dry_run_step_mib"] / step_peak)
    del model
    dist.destroy_process_group()
    return report


def device_info(device: torch.device) -> dict:
    import bitsandbytes
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu smoke run ({DEVICE_SWITCH}=cpu)"
    return {"name": name, "torch": torch.__version__, "cuda": torch.version.cuda, "bitsandbytes": bitsandbytes.__version__,
            "transformers": transformers.__version__, "cpus": os.cpu_count()}


def no_cuda_reason() -> str | None:
    if torch.cuda.is_available():
        return None
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, but sees no GPU"
    return f"torch {torch.__version__} is {build} (torch.cuda.is_available() is False)"


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Libraries print to stdout, some of them from native code. File descriptor 1 itself points at stderr
    meanwhile, which keeps stdout for the one JSON object."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the JSON object to this file")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and an 8-layer step-time model")
    args = parser.parse_args(argv)
    forced, reason, start = os.environ.get(DEVICE_SWITCH), no_cuda_reason(), time.perf_counter()
    if forced is None and reason is not None:
        report: dict = {"skipped": f"no CUDA device: {reason}"}
    else:
        device = torch.device(forced or "cuda")
        name = "smoke" if device.type == "cpu" else "quick" if args.quick else "full"
        mode, report = MODES[name], {"mode": name}
        for key, value in (("HF_HUB_OFFLINE", "1"), ("WANDB_MODE", "offline")):
            os.environ.setdefault(key, value)
        sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "bench")]
        with stdout_to_stderr():
            report["device"] = guarded(device, device_info, device)
            report["basis_identity"] = guarded(device, basis_identity, device, mode)
            report["compiled_vs_eager_cuda"] = guarded(device, compiled_vs_eager, device, mode)
            report["cuda_nf4_adapter_merged_on_cpu"] = guarded(device, merged_on_cpu, device, mode)
            with tempfile.TemporaryDirectory() as scratch:
                model_dir = Path(scratch) / "llama"
                built = guarded(device, lambda: write_llama(model_dir, device, mode["bench_model"]) or {})
                for key, section in (("step_time", step_time), ("peak_memory_mb", peak_memory),
                                     ("fsdp_lean_load", fsdp_lean_load)):
                    report[key] = ({"error": f"building the step-time model: {built['error']}"} if "error" in built
                                   else guarded(device, section, device, mode, model_dir))
        with contextlib.suppress(Exception):  # an extra: perf.py's VmHWM reader, whole process
            from perf import peak_rss_mb

            report["device"]["host_peak_rss_mb"] = round(peak_rss_mb())
        report["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
