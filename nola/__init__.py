"""nola: NOLA adapters (LoRA with A, B as linear combinations of seeded random bases) for LLaMA fine-tuning.

The public API, re-exported here; see README.md for the training pipeline built on it.
"""

from nola.adapter_config import AdapterConfig
from nola.adapter_io import load_adapter, save_adapter
from nola.basis import GENERATOR_VERSION
from nola.errors import NolaError
from nola.inject import (
    adapted_modules,
    attach,
    discard_deferred_gradients,
    materialize,
    parameter_report,
    project_deferred_gradients,
    set_deferred_projection,
)
from nola.layers import AdaptedLinear

__all__ = [
    "GENERATOR_VERSION",
    "AdaptedLinear",
    "AdapterConfig",
    "NolaError",
    "adapted_modules",
    "attach",
    "discard_deferred_gradients",
    "load_adapter",
    "materialize",
    "parameter_report",
    "project_deferred_gradients",
    "save_adapter",
    "set_deferred_projection",
]
__version__ = "0.1.0"
