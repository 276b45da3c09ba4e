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

ZERO3_PROCESSES = (2, 4, 8)


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

    def rounded(figures: dict[str, float]) -> dict[str, float]:
        return {n: round(value, 3) for n, value in figures.items()}

    return {"zero3_gpu_memory_gib": rounded(after_prepare), "zero3_load_peak_gib": rounded(load_peak),
            "zero3_fit_gib": rounded(fit)}


def dry_run(config: RecipeConfig) -> dict:
    """What the recipe would train, as a JSON-able dict.

    Memory, per GPU in GiB (estimates, see `estimate_memory` and `zero3_estimates`): `estimated_gpu_memory_gib` is
    one process training; `load_peak_gib` one process (or one ZeRO-3 rank with a 4-bit base) loading the model;
    `fit_gib` the larger of the two. The `zero3_*` dicts give, per process count, the same after prepare
    (`zero3_gpu_memory_gib`), while loading (`zero3_load_peak_gib`) and the larger (`zero3_fit_gib`)."""
    section = dataclasses.replace(config.model, name_or_path=embedded.resolve(config.model.name_or_path))
    model = attach(build_meta_model(section), config.adapter_config())
    report = parameter_report(model)
    sequence_length = config.data.source_max_len + config.data.target_max_len
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
    }
