"""Putting adapters into a model and reading them back out: attach, materialize, parameter report.

Adapted modules keep the name the Linear had in the un-adapted model (`model.layers.0.self_attn.q_proj`); the
original Linear lives on as `.base_layer` below it. Each module's seed is derived from the run seed and that name,
so an adapter is reproducible from (seed, config) alone, and the seeds are written into the adapter config.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from nola.adapter_config import LLAMA_LINEAR_MODULES, AdapterConfig
from nola.errors import NolaError
from nola.layers import AdaptedLinear, base_layer_types
from nola.methods import method_for
from nola.quant import packed_bytes

_CONFIG_ATTRIBUTE = "nola_adapter_config"
_BASE_ATTRIBUTE = "nola_base_description"
EMBEDDING_SAMPLE_ROWS, EMBEDDING_SAMPLE_COLUMNS = 16, 8


def module_seed(run_seed: int, module_name: str) -> int:
    """A 32-bit seed for one module, a pure function of the run seed and the module's name."""
    digest = hashlib.sha256(f"nola:{run_seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection (lm_head), which "all-linear" leaves alone as LoRA practice does."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def find_target_modules(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the Linear layers an adapter with these `target_modules` would adapt, in model order."""
    linear_types = base_layer_types()
    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, linear_types) and not isinstance(module, AdaptedLinear)
    ]
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        llama_projections = [n for n in linears if n.rsplit(".", 1)[-1] in LLAMA_LINEAR_MODULES]
        chosen = llama_projections or [n for n in linears if n not in heads]
    else:
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in target_modules)]
    if not chosen:
        raise NolaError(f"adapter.target_modules: {target_modules!r} matches no Linear layer of the model")
    return chosen


def largest_shape(shapes: Iterable[Sequence[int]]) -> tuple[int, int]:
    """(out, in), each the largest over `shapes` ((out, in) pairs): the one shape VeRA sizes the projections all
    layers share for, as PEFT's VeRA does (`VeraModel._find_dim`)."""
    outs, ins = zip(*shapes)
    return max(outs), max(ins)


def attach(model: nn.Module, config: AdapterConfig,
           residuals: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> nn.Module:
    """Adapt `model` in place: wrap every target Linear, freeze everything but the adapter, return the model.

    Works on a model built on the meta device too (the coefficients are then meta tensors). A model can carry one
    adapter; seeds given in `config.module_seeds` are used as they are (that is how a saved adapter is rebuilt).
    A start that changes the base (`init: svd`: every target's base weight becomes its residual) takes its factors
    from `residuals` ({module name: (A0, B0)}, an adapter file's) when given, else computes them from the weights.
    """
    if getattr(model, _CONFIG_ATTRIBUTE, None) is not None:
        raise NolaError("attach: the model already carries a nola adapter")
    names = find_target_modules(model, config.target_modules)
    seeds = {name: config.module_seeds.get(name, module_seed(config.seed, name)) for name in names}
    method = method_for(config.method)
    method.check_targets(model, names, config)
    setattr(model, _BASE_ATTRIBUTE, describe_base(model))  # now: under ZeRO-3 the weights are partitioned later
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    targets = [model.get_submodule(name) for name in names]
    largest = largest_shape((target.out_features, target.in_features) for target in targets)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child_name)
        factors = method.initial_factors(name, base, config, seeds[name], residuals)
        setattr(parent, child_name, AdaptedLinear(base, config, seeds[name], factors, largest))
    setattr(model, _CONFIG_ATTRIBUTE, dataclasses.replace(config, module_seeds=seeds))
    return model


def embedding_sample(weight: torch.Tensor, dtype: torch.dtype | None = None) -> list[float]:
    """A few input-embedding values at fixed positions (cast to `dtype` first when given): enough to tell one base
    model's weights from another's."""
    if hasattr(weight, "full_tensor"):  # sharded (FSDP2 DTensor): a collective, every rank describes the base
        weight = weight.full_tensor()
    sample = weight.detach()[embedding_sample_rows(weight.shape[0]), :EMBEDDING_SAMPLE_COLUMNS]
    return sample.to(dtype or sample.dtype).float().flatten().tolist()


def embedding_sample_rows(num_rows: int) -> list[int]:
    """The embedding rows `embedding_sample` reads: spread over the vocabulary."""
    return torch.linspace(0, num_rows - 1, EMBEDDING_SAMPLE_ROWS).long().tolist()


def describe_base(model: nn.Module) -> dict:
    """What merge and export must know of the base the adapter trains on, beyond its shapes: an input-embedding
    sample (to refuse a different base with the same shapes) and, for a 4-bit base, the bitsandbytes settings and
    which Linear layers were quantised (to merge into exactly the weights training saw)."""
    description: dict = {}
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and embeddings.weight.device.type != "meta" and embeddings.weight.dim() == 2:
        name = next(n for n, m in model.named_modules() if m is embeddings)
        description["embedding"] = {"name": f"{name}.weight", "dtype": str(embeddings.weight.dtype).split(".")[-1],
                                    "sample": embedding_sample(embeddings.weight)}
    quantised = {name: module.weight.quant_state for name, module in model.named_modules()
                 if getattr(getattr(module, "weight", None), "quant_state", None) is not None}
    if quantised:
        state = next(iter(quantised.values()))
        description["quantization"] = {
            "method": "bitsandbytes-4bit", "quant_type": state.quant_type, "blocksize": state.blocksize,
            "double_quant": bool(state.nested), "dtype": str(state.dtype).split(".")[-1], "modules": list(quantised),
        }
    return description


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model's function inside the block, the adapter's after: how far an adapter moves the outputs,
    measured in the very model and arithmetic that carry it. Each adapted layer's update is scaled by 0, except an
    SVD start's, whose base holds the residual: its A and B go back to A0 and B0, which add the base's top part back
    (on a 4-bit base, up to the residual's re-quantisation)."""
    modules = [module for _, module in adapted_modules(model)]
    saved = [(module.scale, module.stored_tensors(), module.method.start_tensors(module)) for module in modules]
    with torch.no_grad():
        for module, (_, tensors, start) in zip(modules, saved):
            if start is None:
                module.scale = 0.0
            for name, value in (start or {}).items():
                setattr(module, name, nn.Parameter(value.to(tensors[name]), requires_grad=False))
    try:
        yield model
    finally:
        for module, (scale, tensors, start) in zip(modules, saved):
            module.scale = scale
            for name in start or {}:
                setattr(module, name, tensors[name])


def record_mixed_precision(model: nn.Module, mixed_precision: str) -> None:
    """Note in the base description the autocast the adapter trains under ("no" | "bf16" | "fp16"), so that
    inference, evaluation and the export checks rebuild the model as trained: bf16 autocast on an nf4 base is a
    different function from float32 arithmetic on it, by about as much as a short fine-tune moves the logits."""
    base_description_of(model)["mixed_precision"] = mixed_precision


def record_prompt_template(model: nn.Module, template: str) -> None:
    """Note the prompt template the adapter trains with (data.template, resolved), so that generation prompts it
    the way it learned: an adapter trained on LLaMA-2-chat exchanges answers an Alpaca prompt worse."""
    base_description_of(model)["prompt_template"] = template


def base_description_of(model: nn.Module) -> dict:
    """`describe_base` as recorded when the adapter was attached (empty for an adapter attached on meta)."""
    return getattr(model, _BASE_ATTRIBUTE, {})


def adapter_config_of(model: nn.Module) -> AdapterConfig:
    """The config of the adapter attached to `model`; a one-line error when there is none."""
    config = getattr(model, _CONFIG_ATTRIBUTE, None)
    if config is None:
        raise NolaError("the model carries no nola adapter (call nola.attach or nola.load_adapter first)")
    return config


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    """(name, module) for every adapted Linear, names as in the un-adapted model."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def _deferrable_layers(model: nn.Module) -> list[AdaptedLinear]:
    """The adapted layers whose method materialises A and B from a basis (NOLA): those with a projection to defer."""
    return [module for _, module in adapted_modules(model) if module.method.defers_projection]


def set_deferred_projection(model: nn.Module, enabled: bool) -> int:
    """Opt in (or out) of deferred backward projection for every NOLA layer; returns how many layers it covers.

    Deferred, `backward()` leaves the coefficient gradients in A and B, summed over micro-batches, and
    `project_deferred_gradients(model)` must run before the optimizer reads `.grad`: one basis pass per step
    instead of one per micro-batch. Only for a loop that calls it, so it is off unless asked for.
    """
    layers = _deferrable_layers(model)
    for layer in layers:
        layer.materialized.deferred = enabled
    return len(layers)


def project_deferred_gradients(model: nn.Module) -> None:
    """Add the gradients accumulated on A and B since the last call to the coefficients' `.grad` (deferred mode)."""
    pairs = [pair for layer in _deferrable_layers(model) for pair in layer.materialized.take_deferred()]
    if pairs:
        torch.autograd.backward([values for values, _ in pairs], [gradient for _, gradient in pairs])


def discard_deferred_gradients(model: nn.Module) -> None:
    """Forget gradients accumulated on A and B (a step that is skipped or abandoned)."""
    for layer in _deferrable_layers(model):
        layer.materialized.discard_deferred()


def base_fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """{adapted module name: [out_features, in_features]}: what an adapter needs of its base model."""
    return {name: [m.out_features, m.in_features] for name, m in adapted_modules(model)}


@torch.no_grad()
def materialize(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name: (A, B, scale)} with A r × in and B out × r, so the adapted output is base(x) + scale·B·A·x.

    Used by merge and export. Values are those of the forward pass (quantised coefficients included).
    """
    return {name: (*(t.detach().clone() for t in m.adapter_matrices()), m.scale) for name, m in adapted_modules(model)}


def _parameter_count(parameter: torch.Tensor) -> int:
    """Logical element count: bitsandbytes packs two 4-bit weights per uint8, its quant_state knows the shape."""
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return parameter.numel()


def parameter_report(model: nn.Module) -> dict[str, float | int]:
    """Trainable and total parameter counts, adapter bytes on disk, adapted module count."""
    total = sum(_parameter_count(p) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = getattr(model, _CONFIG_ATTRIBUTE, None)
    adapter_bytes = 0
    modules = list(adapted_modules(model))
    for _, module in modules:
        for tensor in module.stored_tensors().values():
            if config is not None and config.quant_bits:  # only a quantizable method's config has quant_bits
                adapter_bytes += packed_bytes(tensor.numel(), config.quant_bits)
            else:
                adapter_bytes += tensor.numel() * tensor.element_size()
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / max(total, 1),
        "adapter_bytes": adapter_bytes,
        "adapted_modules": len(modules),
    }
