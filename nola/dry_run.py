"""`--dry-run`: the recipe's adapter layout, parameter counts and a memory estimate, with no weights or data.

The model is built on the meta device from its config (a JSON shipped in recipes/models/ when the hub is out of
reach), so a 70B recipe is checked on a laptop in seconds.
"""

from __future__ import annotations

from nola.config import RecipeConfig
from nola.inject import attach, parameter_report
from nola.modeling import build_meta_model, estimate_memory


def dry_run(config: RecipeConfig) -> dict:
    """What the recipe would train, as a JSON-able dict."""
    model = attach(build_meta_model(config.model), config.adapter_config())
    report = parameter_report(model)
    sequence_length = config.data.source_max_len + config.data.target_max_len
    memory = estimate_memory(model, config.model, report["trainable_params"], config.train.micro_batch_size,
                             sequence_length)
    return {
        **report,
        "method": config.adapter.method,
        "model": config.model.name_or_path,
        "load_in_4bit": config.model.load_in_4bit,
        "micro_batch_size": config.train.micro_batch_size,
        "sequence_length": sequence_length,
        "memory_per_gpu": memory,
        "estimated_gpu_memory_gib": memory["total_gib"],
        # ZeRO-3 shards the (frozen) weights over the processes; activations and the rest stay per process.
        "zero3_gpu_memory_gib": {
            str(n): round(memory["total_gib"] - memory["weights_gib"] * (1 - 1 / n), 3) for n in (2, 4, 8)
        },
    }
