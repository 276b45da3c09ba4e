"""The LoRA form of an adapter file: its A and B, regenerated from the stored coefficients and seeds.

Every method nola trains updates a weight by (alpha/r)·B·A, so every adapter has an exact LoRA form; for NOLA and
VeRA, A and B are generated, never stored. Merging (nola/merge.py), exporting as a PEFT LoRA (nola/export.py) and
serving an adapter to an engine that only reads LoRA all need that form, and must agree on it to the bit: this
module is its one home. It needs the adapter file and the method core only (no model, no training machinery), so a
server process can call it.
"""

from __future__ import annotations

import torch

from nola.adapter_io import AdapterFile, residual_factors
from nola.inject import largest_shape
from nola.methods import method_for


def trained_factors(adapter: AdapterFile, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one adapted module in float32 (r × in, out × r), regenerated from the adapter file: exactly the
    matrices the layer computes with."""
    config = adapter.config
    out_features, in_features = adapter.modules[name]
    return method_for(config.method).matrices_from_values(config, adapter.module_values(name),
                                                          config.module_seeds.get(name), out_features, in_features,
                                                          largest_shape(adapter.modules.values()))


def adapter_factors(adapter: AdapterFile, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), float32, of the module's update relative to the original base weight: (alpha/r)·B·A is what the
    adapter adds to it. For an SVD start that is B·A − B0·A0 (training subtracted B0·A0 from the base), the rank-2r
    pair [B, −B0]·[A; A0], as PEFT converts PiSSA adapters."""
    a, b = trained_factors(adapter, name)
    residuals = residual_factors(adapter)
    if residuals is None:
        return a, b
    a0, b0 = (t.float() for t in residuals[name])
    return torch.cat([a, a0]), torch.cat([b, -b0], dim=1)


def lora_rank(adapter: AdapterFile) -> int:
    """The rank of the LoRA form, known from the adapter's settings alone: r, or 2r for a start that changed the
    base ([A; A0]). What a server checks against the largest rank it serves, before materialising anything."""
    return adapter.config.rank * (1 if residual_factors(adapter) is None else 2)


def adapter_delta(adapter: AdapterFile, name: str) -> torch.Tensor:
    """(alpha/r)·B·A of one adapted module relative to the original base weight, float32."""
    a, b = adapter_factors(adapter, name)
    return (b @ a) * adapter.config.scale
