"""`NolaModel`: the PEFT tuner that puts NOLA layers into a model (PEFT's BaseTuner: injection, set / disable /
delete adapters, merge_and_unload and unload come from it).

What it adds to PEFT's generic injection: every module's seed is nola's `module_seed(seed, name)` (so a PEFT
adapter and nola's own, trained on one base with one seed, have the same bases), and the adapter's config (a copy:
the caller's config stays reusable on other models) records those seeds and the base's fingerprint when the
adapter is first injected. An adapter read back from disk is checked against the model before anything is
injected: another base (other module shapes, other adapted modules, other embedding weights) fails in one line
naming the first difference.
"""

from __future__ import annotations

import copy
import re

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from torch import nn

from nola.adapter_config import LLAMA_LINEAR_MODULES
from nola.adapter_io import check_embedding_sample
from nola.errors import NolaError
from nola.inject import describe_base, embedding_sample, module_seed
from nola.layers import base_layer_types
from nola.peft.config import NolaConfig
from nola.peft.layer import Linear, NolaLayer

PREFIX = "nola_"
WRAPPED_BASE = re.compile(r"\.base_layer(?=\.|$)")  # the Linear an adapter layer wraps, inside its name


class NolaModel(BaseTuner):
    """NOLA adapters on a transformers model: `get_peft_model(model, NolaConfig(...))` builds one."""

    prefix: str = PREFIX
    tuner_layer_cls = NolaLayer
    target_module_mapping = {"llama": list(LLAMA_LINEAR_MODULES)}

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """PEFT's injection, after checking a recorded fingerprint against `model` (nothing is changed on a
        mismatch) and before recording one for a new adapter."""
        config = self.peft_config[adapter_name] = copy.deepcopy(self.peft_config[adapter_name])
        if config.base_model_fingerprint:
            check_fingerprint(model, config)
        base = base_description(model)  # before injection: its names are the base's own
        super().inject_adapter(model, adapter_name, **kwargs)
        if not config.base_model_fingerprint:
            shapes = {name: [module.out_features, module.in_features] for name, module in model.named_modules()
                      if isinstance(module, NolaLayer) and adapter_name in module.nola_coefficients_a}
            config.base_model_fingerprint = {"modules": shapes, **base}

    def _create_and_replace(self, config: NolaConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        seed = config.module_seeds.setdefault(current_key, module_seed(config.seed, current_key))
        if isinstance(target, NolaLayer):
            target.update_layer(adapter_name, config, seed)
            return
        new_module = self._create_new_module(config, adapter_name, target, current_key, seed)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: NolaConfig, adapter_name: str, target: nn.Module, key: str, seed: int
                           ) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, base_layer_types()):
            raise NolaError(f"NolaConfig.target_modules: {key} is a {type(base).__name__}; NOLA adapts "
                            f"torch.nn.Linear and bitsandbytes Linear4bit only (narrow target_modules)")
        return Linear(target, adapter_name, config, seed)


def base_description(model: nn.Module) -> dict:
    """nola's `describe_base` with module names as in the un-adapted model, also when another adapter already
    wraps the layers: merge reads its list of 4-bit modules to dequantise exactly those, by checkpoint name."""
    description = describe_base(model)
    quantization = description.get("quantization")
    if quantization:
        quantization["modules"] = [WRAPPED_BASE.sub("", name) for name in quantization["modules"]]
    return description


def targeted_modules(model: nn.Module, config: NolaConfig) -> list[str]:
    """Names of the modules `config` would adapt in `model` (PEFT's own matching, "all-linear" expanded), before
    any is wrapped: what a recorded fingerprint is compared with."""
    expanded = _maybe_include_all_linear_layers(copy.deepcopy(config), model)
    return [name for name, module in model.named_modules()
            if name and not WRAPPED_BASE.search(name) and BaseTuner._check_target_module_exists(expanded, name)
            and isinstance(module.get_base_layer() if isinstance(module, BaseTunerLayer) else module,
                           base_layer_types())]


def check_fingerprint(model: nn.Module, config: NolaConfig) -> None:
    """Refuse a base whose adapted modules, shapes or input embeddings differ from the ones the adapter was
    trained on: one line, naming the first difference. (The 4-bit settings are recorded for merging, not
    compared: an adapter trained on an nf4 base may be served on the float one.)"""
    recorded = config.base_model_fingerprint
    extra = sorted(set(targeted_modules(model, config)) - set(recorded.get("modules", {})))
    if extra:
        raise NolaError(f"NolaConfig: adapter is for another base model (module {extra[0]} is not in the adapter)")
    modules = dict(model.named_modules())
    for name, (out_features, in_features) in recorded.get("modules", {}).items():
        module = modules.get(name)
        if module is None:
            raise NolaError(f"NolaConfig: adapter is for another base model (module {name} not found in it)")
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        found = [getattr(base, "out_features", None), getattr(base, "in_features", None)]
        if found != [out_features, in_features]:
            raise NolaError(f"NolaConfig: adapter is for another base model ({name} is {found[0]}x{found[1]}, the "
                            f"adapter expects {out_features}x{in_features})")
    expected = recorded.get("embedding")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if expected and embeddings is not None and embeddings.weight.device.type != "meta":
        found = embedding_sample(embeddings.weight, getattr(torch, expected["dtype"]))
        check_embedding_sample(expected, found, "NolaConfig")
