"""Loading the base LLaMA: local or hub checkpoint, optional 4-bit (bitsandbytes), k-bit preparation, checkpointing.

Also builds the same architecture on the meta device (no weights) for dry runs, and estimates per-GPU memory.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from nola.config import ModelSection
from nola.errors import NolaError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def check_model_source(name_or_path: str) -> str:
    """A local directory must hold a config.json; anything else is treated as a hub name (offline-aware)."""
    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise NolaError(f"model.name_or_path: {name_or_path} has no config.json (not a transformers checkpoint)")
    if not path.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise NolaError(f"model.name_or_path: no such directory: {name_or_path}")
    return name_or_path


def load_model_config(section: ModelSection):
    """The transformers config: from `model.config_json` when given, else from the checkpoint (or hub)."""
    from transformers import AutoConfig, LlamaConfig

    if section.config_json:
        path = Path(section.config_json)
        if not path.is_file():
            raise NolaError(f"model.config_json: no such file: {path}")
        try:
            return LlamaConfig(**json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise NolaError(f"{path}: not valid JSON ({error})") from None
    try:
        return AutoConfig.from_pretrained(
            check_model_source(section.name_or_path), trust_remote_code=section.trust_remote_code
        )
    except OSError as error:
        raise NolaError(f"model.name_or_path: cannot load a config from {section.name_or_path!r} ({error})") from None


@contextmanager
def _plain_construction():
    """Under ZeRO-3, transformers builds every model through deepspeed.zero.Init, which cannot initialise meta
    tensors; a weightless skeleton needs plain construction, so the ZeRO-3 switch is set aside meanwhile."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def build_meta_model(section: ModelSection) -> nn.Module:
    """The architecture with every weight on the meta device: parameter counts and adapter layout, no memory."""
    from transformers import AutoModelForCausalLM

    config = load_model_config(section)
    with _plain_construction(), torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=section.trust_remote_code)


def quantization_config(section: ModelSection):
    """bitsandbytes settings for a 4-bit base, or None for a float base."""
    if not section.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=section.quant_type,
        bnb_4bit_use_double_quant=section.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[section.compute_dtype],
        bnb_4bit_quant_storage=_DTYPES[section.quant_storage],
    )


def disable_bnb_cpu_repacking(model: nn.Module) -> None:
    """Work around bitsandbytes 0.50 on CPUs with AVX512-BF16: in eval under no_grad, Linear4bit repacks its
    weights and asserts out_features % 32 == 0, killing eval/generation for other widths (e.g. 172). Turning the
    AVX512-BF16 path off keeps the reference CPU kernel, which has no such limit (and computes in fp32)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def prepare_for_kbit_training(model: nn.Module) -> None:
    """What QLoRA needs of a 4-bit base: norms in float32 (bf16 norms lose precision), everything frozen, and
    inputs that require grad so that gradient checkpointing has a graph to recompute through."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            module.float()
    model.enable_input_require_grads()


def load_tokenizer(section: ModelSection, tokenizer_source: str | None):
    """The tokenizer from `data.tokenizer` when given, else from the model checkpoint; pad falls back to EOS."""
    from transformers import AutoTokenizer

    key, source = ("data.tokenizer", tokenizer_source) if tokenizer_source else ("model.name_or_path", None)
    source = source or check_model_source(section.name_or_path)
    if Path(source).exists() and not Path(source).is_dir():
        raise NolaError(f"{key}: {source} is not a tokenizer directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NolaError(f"{key}: cannot load a tokenizer from {source!r} ({reason})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def load_model(section: ModelSection, device: torch.device) -> nn.Module:
    """Load the base causal LM on `device` (4-bit when asked), prepared for adapter training."""
    from transformers import AutoModelForCausalLM

    source = check_model_source(section.name_or_path)
    quantization = quantization_config(section)
    kwargs = dict(trust_remote_code=section.trust_remote_code)
    if quantization is not None:
        kwargs.update(quantization_config=quantization, dtype=_DTYPES[section.compute_dtype])
        if not _zero3_enabled():  # ZeRO-3 places (and shards) the weights itself and refuses a device map
            kwargs.update(device_map={"": device})
    else:
        kwargs.update(dtype=_DTYPES[section.torch_dtype])
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        raise NolaError(f"model.name_or_path: cannot load {section.name_or_path!r} ({error})") from None
    if quantization is None:
        model.to(device)
    disable_bnb_cpu_repacking(model)
    if quantization is not None:
        prepare_for_kbit_training(model)
    else:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    if section.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def estimate_memory(
    model: nn.Module,
    section: ModelSection,
    trainable_params: int,
    micro_batch_size: int,
    sequence_length: int,
) -> dict[str, float]:
    """Rough per-GPU memory (GiB) of one training process: weights + adapter + optimizer + activations.

    Weights: 4-bit linears at ~4.13 bits/weight with double quantisation (4.5 without), the rest in the compute
    dtype. Activations: with checkpointing, one hidden state per layer plus one layer recomputed; without, every
    layer's ~(16·hidden + 3·intermediate) values per token. Logits in fp32 are counted twice (value and grad).
    A CUDA context and allocator slack of 1 GiB is added. This is an estimate for planning, not a guarantee.
    """
    config = model.config
    linear_weights = sum(
        m.weight.numel() for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not model.get_output_embeddings()
    )
    total = sum(p.numel() for p in model.parameters()) - trainable_params
    other_weights = total - linear_weights
    compute_bytes = 4 if section.compute_dtype == "float32" and section.load_in_4bit else 2
    if not section.load_in_4bit:
        compute_bytes = torch.tensor([], dtype=_DTYPES[section.torch_dtype]).element_size()
    bits_per_weight = (4.127 if section.double_quant else 4.5) if section.load_in_4bit else 8 * compute_bytes
    weights = linear_weights * bits_per_weight / 8 + other_weights * compute_bytes
    adapter_and_optimizer = trainable_params * 4 * 4  # fp32 values, grads, two AdamW moments
    tokens = micro_batch_size * sequence_length
    hidden, intermediate, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_layer = tokens * (16 * hidden + 3 * intermediate) * compute_bytes
    if section.gradient_checkpointing:
        activations = layers * tokens * hidden * compute_bytes + per_layer
    else:
        activations = layers * per_layer
    logits = 2 * tokens * config.vocab_size * 4
    overhead = 2**30
    gib = 2**30
    estimate = {
        "weights_gib": weights / gib,
        "adapter_and_optimizer_gib": adapter_and_optimizer / gib,
        "activations_gib": (activations + logits) / gib,
        "overhead_gib": overhead / gib,
    }
    estimate["total_gib"] = sum(estimate.values())
    return {key: round(value, 3) for key, value in estimate.items()}
