"""`--dry-run`: the recipe's adapter layout, parameter counts and a memory estimate, with no weights or data.

The model is built on the meta device from its config (a JSON shipped in recipes/models/ when the hub is out of
reach), so a 70B recipe is checked on a laptop in seconds.
"""

from __future__ import annotations

import dataclasses

from nola import embedded
from nola.training.config import RecipeConfig
from nola.inject import attach, parameter_report
from nola.modeling import build_meta_model, estimate_memory
from nola.streamed_load import QUANTIZE_CHUNK_ELEMENTS

ZERO3_PROCESSES = (2, 4, 8)  # process counts of the ZeRO-3 and FSDP2 estimates


def rounded(figures: dict[str, float]) -> dict[str, float]:
    """Per-process-count figures to 3 decimals, as every memory figure of the dry run."""
    return {n: round(value, 3) for n, value in figures.items()}


def zero3_estimates(memory: dict[str, float], load_in_4bit: bool) -> dict[str, dict[str, float]]:
    """Per-GPU GiB of one ZeRO-3 rank over 2 / 4 / 8 processes, at two moments, and the larger of the two.

    `zero3_gpu_memory_gib` (after `accelerator.prepare`): the one-process total with the weights sharded over the
    N ranks, except the 4-bit quantisation constants, which are not parameters and stay whole on every rank.

    `zero3_load_peak_gib` (while `from_pretrained` runs, before prepare): transformers builds a quantised model
    without `deepspeed.zero.Init` (modeling_utils: `needs_zero3_init = is_deepspeed_zero3_enabled() and not
    _is_quantized`), and bitsandbytes puts it whole on the rank's own GPU, so with a 4-bit base every rank holds the
    *entire* 4-bit model until prepare partitions it: all the weights + the largest linear, read densely in the
    compute dtype before it is quantised + the CUDA context. That does not shrink with N (measured on CPU with
    bench/load_memory.py: each of 2 ZeRO-3 ranks peaks at the full 4-bit model). A float base is loaded under
    zero.Init, partitioned as it is read: its share of the weights + the largest tensor, gathered whole once.
    Adapter, optimizer and activations do not exist yet at load time.

    `zero3_fit_gib`: the larger of the two, the memory a GPU needs for the run to get through loading and training.
    """
    weights, unpartitioned = memory["weights_gib"], memory["zero3_unpartitioned_gib"]
    sharded = weights - unpartitioned
    after_prepare, load_peak, fit = {}, {}, {}
    for n in ZERO3_PROCESSES:
        after_prepare[str(n)] = memory["total_gib"] - sharded * (1 - 1 / n)
        resident = weights if load_in_4bit else weights / n
        load_peak[str(n)] = resident + memory["load_transient_gib"] + memory["overhead_gib"]
        fit[str(n)] = max(after_prepare[str(n)], load_peak[str(n)])

    return {"zero3_gpu_memory_gib": rounded(after_prepare), "zero3_load_peak_gib": rounded(load_peak),
            "zero3_fit_gib": rounded(fit)}


# Bytes per weight of the transients of bitsandbytes' kernels: quantising a chunk at load (CUDA: the bf16 chunk and
# its packed codes; the CPU reference kernel's float32 copy, scaled values and int32 bucket indices, partly freed in
# between: 10 measured by bench/load_memory.py, 12 at most), and dequantising the largest linear for a training
# matmul (CUDA: its compute-dtype copy; CPU: float32 values and their product at once).
KERNEL_BYTES_PER_WEIGHT = {"cuda": {"quantize": 3, "dequantize": 2}, "cpu": {"quantize": 10, "dequantize": 8}}


def fsdp_estimates(memory: dict[str, float], kernels: str = "cuda",
                   processes: tuple[int, ...] = ZERO3_PROCESSES) -> dict[str, dict[str, float]]:
    """Per-GPU GiB of one FSDP2 rank (recipes/accelerate/fsdp.yaml: the lean load of nola.training.fsdp) over
    2 / 4 / 8 processes, at its two peaks, and the larger.

    Every weight is sharded 1/N except the 4-bit quantisation constants, which stay whole on every rank (they are
    module state, not parameters).

    `fsdp_load_peak_gib`: the shards + the constants + the larger of one decoder layer (read and quantised whole
    before it is sharded) and the embeddings/head group (materialised whole last) + one quantisation chunk
    (`QUANTIZE_CHUNK_ELEMENTS` weights) + the CUDA context.

    `fsdp_step_peak_gib`: the shards + the constants + what FSDP2 holds gathered during a step: the embeddings/head
    group (the root: gathered for the whole forward and backward) and two decoder layers (the one computing and the
    one prefetched; each is resharded after use) + the largest linear dequantised for its matmul + adapter and
    optimizer + activations + the CUDA context.

    `fsdp_fit_gib`: the larger of the two, the memory a GPU needs for the run. The node's host memory is not in
    these: every rank reads the checkpoint through a memory map, one safetensors file at a time, so the page cache
    holds about one checkpoint shard, and no rank stages the model in host RAM.

    `kernels="cpu"` counts the transients of bitsandbytes' CPU reference kernels and no CUDA context: the figures
    `bench/load_memory.py` measures as each CPU process's RSS above its start."""
    constants, layer, outside = (memory[key] for key in
                                 ("zero3_unpartitioned_gib", "largest_layer_gib", "outside_layers_gib"))
    sharded = memory["weights_gib"] - constants
    per_weight = KERNEL_BYTES_PER_WEIGHT[kernels]
    quantize = QUANTIZE_CHUNK_ELEMENTS * per_weight["quantize"] / 2**30
    dequantize = memory["largest_linear_weights"] * per_weight["dequantize"] / 2**30
    overhead = memory["overhead_gib"] if kernels == "cuda" else 0.0
    load_peak, step_peak, fit = {}, {}, {}
    for n in processes:
        resident = sharded / n + constants
        load_peak[str(n)] = resident + max(layer, outside) + quantize + overhead
        step_peak[str(n)] = (resident + outside + 2 * layer + dequantize + memory["adapter_and_optimizer_gib"]
                             + memory["activations_gib"] + overhead)
        fit[str(n)] = max(load_peak[str(n)], step_peak[str(n)])

    prefix = "fsdp" if kernels == "cuda" else f"fsdp_{kernels}_kernels"
    return {f"{prefix}_load_peak_gib": rounded(load_peak), f"{prefix}_step_peak_gib": rounded(step_peak),
            f"{prefix}_fit_gib": rounded(fit)}


def dry_run(config: RecipeConfig) -> dict:
    """What the recipe would train, as a JSON-able dict.

    Memory, per GPU in GiB (estimates, see `estimate_memory` and `zero3_estimates`): `estimated_gpu_memory_gib` is
    one process training; `load_peak_gib` one process (or one ZeRO-3 rank with a 4-bit base) loading the model;
    `fit_gib` the larger of the two. The `zero3_*` dicts give, per process count, the same after prepare
    (`zero3_gpu_memory_gib`), while loading (`zero3_load_peak_gib`) and the larger (`zero3_fit_gib`); the `fsdp_*`
    dicts the same for FSDP2 with nola's lean load (`fsdp_estimates`)."""
    section = dataclasses.replace(config.model, name_or_path=embedded.resolve(config.model.name_or_path))
    model = attach(build_meta_model(section), config.adapter_config())
    report = parameter_report(model)
    sequence_length = config.data.sequence_length()
    memory = estimate_memory(model, config.model, report["trainable_params"], config.train.micro_batch_size,
                             sequence_length)
    load_peak = memory["weights_gib"] + memory["load_transient_gib"] + memory["overhead_gib"]
    return {
        **report,
        "method": config.adapter.method,
        "model": config.model.name_or_path,
        "load_in_4bit": config.model.load_in_4bit,
        "micro_batch_size": config.train.micro_batch_size,
        "sequence_length": sequence_length,
        "memory_per_gpu": memory,
        "estimated_gpu_memory_gib": memory["total_gib"],
        "load_peak_gib": round(load_peak, 3),
        "fit_gib": round(max(memory["total_gib"], load_peak), 3),
        **zero3_estimates(memory, config.model.load_in_4bit),
        **fsdp_estimates(memory),
        **fsdp_estimates(memory, kernels="cpu"),
    }
