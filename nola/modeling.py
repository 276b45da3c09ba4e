"""Loading the base LLaMA: local or hub checkpoint, optional 4-bit (bitsandbytes), k-bit preparation, checkpointing.

Also builds the same architecture on the meta device (no weights) for dry runs, and estimates per-GPU memory.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from nola.errors import NolaError


@dataclass
class ModelSection:
    """Which base model to load and how (the recipe's `model:` section): inference and export load a base with the
    same settings, so the schema lives with the loader."""

    name_or_path: str = "embedded:tiny-llama"
    config_json: str | None = None  # a config.json used by --dry-run when the weights/hub are out of reach
    load_in_4bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8,
           "auto": "auto"}  # auto: the dtype the checkpoint was saved in (a merged export)


def check_model_source(name_or_path: str) -> str:
    """A local directory must hold a config.json; anything else is treated as a hub name (offline-aware)."""
    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise NolaError(f"model.name_or_path: {name_or_path} has no config.json (not a transformers checkpoint)")
    if not path.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise NolaError(f"model.name_or_path: no such directory: {name_or_path}")
    return name_or_path


def load_model_config(section: ModelSection):
    """The transformers config of the checkpoint, or `model.config_json` when the checkpoint is out of reach.

    The checkpoint's own config always wins: `config_json` exists so that `--dry-run` of a 70B recipe works offline,
    and a recipe that names a real local checkpoint (its shapes differ from the JSON's) must see that checkpoint's
    shapes, or a resume check compares the adapter with the wrong architecture."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            check_model_source(section.name_or_path), trust_remote_code=section.trust_remote_code
        )
    except OSError as error:
        if not section.config_json:
            raise NolaError(f"model.name_or_path: cannot load a config from {section.name_or_path!r} "
                            f"({str(error).splitlines()[0]})") from None
    return _config_from_json(Path(section.config_json))


def _config_from_json(path: Path):
    from transformers import LlamaConfig

    if not path.is_file():
        raise NolaError(f"model.config_json: no such file: {path}")
    try:
        return LlamaConfig(**json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise NolaError(f"{path}: not valid JSON ({error})") from None


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


def prepare_kbit_block(block: nn.Module, autocast: bool) -> None:
    """What QLoRA needs of a 4-bit base, on one block (a decoder layer, or the whole model): everything frozen and
    norms in float32 (bf16 norms lose precision). A sharded load applies it layer by layer, before the engine
    shards (and fixes the dtypes of) the layer; `finish_loaded_model` adds inputs that require grad.

    Without autocast, every other float weight (embeddings, lm_head) goes to float32 too, as peft's
    `prepare_model_for_kbit_training` does: the float32 norms hand float32 activations to the head, and a bf16 head
    cannot multiply them. Under autocast they stay in the compute dtype (half the memory; autocast casts)."""
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    for module in block.modules():
        if "norm" in type(module).__name__.lower():
            module.float()
    if not autocast:
        for parameter in block.parameters():
            if parameter.dtype in (torch.float16, torch.bfloat16) and not hasattr(parameter, "quant_state"):
                parameter.data = parameter.data.float()


def autocast_forward(model: nn.Module, mixed_precision: str, device_type: str | None = None) -> nn.Module:
    """Run every forward of `model` under torch.autocast in the run's mixed precision ("bf16", "fp16"; "no" leaves it
    alone), the way accelerate does for plain and DDP runs. Used where accelerate does not: under DeepSpeed (whose
    own bf16 mode would cast the fp32 NOLA coefficients and the packed 4-bit storage to bf16) and at inference, so a
    trained adapter is evaluated and exported against the very arithmetic it was trained in."""
    if mixed_precision == "no":
        return model
    device_type = device_type or next(model.parameters()).device.type
    model.forward = autocast(mixed_precision, device_type)(model.forward)
    return model


def autocast(mixed_precision: str, device_type: str) -> torch.autocast:
    """torch.autocast in the run's mixed precision ("bf16", "fp16"; "no": a disabled one)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


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


def load_model(section: ModelSection, device: torch.device, mixed_precision: str = "no") -> nn.Module:
    """Load the base causal LM on `device` (4-bit when asked), prepared for adapter training under
    `mixed_precision` ("no" | "bf16" | "fp16": whether forwards will run under autocast).

    Weights are read from safetensors only (`use_safetensors=True`): a `.bin` checkpoint would be unpickled, which
    can run code, so it is refused."""
    from transformers import AutoModelForCausalLM

    source = check_model_source(section.name_or_path)
    quantization = quantization_config(section)
    kwargs = dict(trust_remote_code=section.trust_remote_code, use_safetensors=True)
    if quantization is not None:
        kwargs.update(quantization_config=quantization, dtype=_DTYPES[section.compute_dtype])
        if not _zero3_enabled():  # ZeRO-3 places (and shards) the weights itself and refuses a device map
            kwargs.update(device_map={"": device})
    else:
        kwargs.update(dtype=_DTYPES[section.torch_dtype])
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        reason = str(error).splitlines()[0]
        raise NolaError(f"model.name_or_path: cannot load {section.name_or_path!r} ({reason}; nola reads "
                        f"safetensors weights only, never .bin pickles)") from None
    if quantization is None:
        model.to(device)
        model.requires_grad_(False)
    else:
        prepare_kbit_block(model, autocast=mixed_precision != "no")
    return finish_loaded_model(model, section, quantized=quantization is not None)


def finish_loaded_model(model: nn.Module, section: ModelSection, quantized: bool) -> nn.Module:
    """What every loaded base needs once its weights are in place, whoever placed them (`load_model`, or the
    sharded load of `nola.training.fsdp`): the bitsandbytes CPU work-around, inputs that require grad (QLoRA's
    checkpointing needs a graph), gradient checkpointing, no KV cache in training."""
    disable_bnb_cpu_repacking(model)
    if quantized:
        model.enable_input_require_grads()
    if section.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a causal LM (`model.layers` for LLaMA and its kin); none for another layout."""
    return list(getattr(getattr(model, model.base_model_prefix, model), "layers", None) or [])


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

    `total_gib` is the sum of those four parts. Two more figures, not in the total, serve the ZeRO-3 and load-time
    estimates of `nola.training.dry_run`: `zero3_unpartitioned_gib`, the part of the weights ZeRO-3 cannot shard
    (the 4-bit quantisation constants, absmax: 8 bits per 64 weights + an fp32 scale per 256 blocks with double
    quantisation, 32 bits per 64 without; they hang off the packed parameters as plain tensors, so every rank keeps
    them whole); `load_transient_gib`, the largest weight the loader holds densely on the device at once (a
    4-bit linear is read in the compute dtype and quantised there, one at a time; a float base, its largest tensor);
    and, for the FSDP2 estimates, `largest_layer_gib` (one decoder layer's weights as loaded),
    `outside_layers_gib` (embeddings, final norm and head: FSDP2's root group) and `largest_linear_weights` (the
    weight count of the largest quantised linear, which a 4-bit matmul dequantises whole).
    """
    config = model.config
    head = model.get_output_embeddings()
    compute_bytes = 4 if section.compute_dtype == "float32" and section.load_in_4bit else 2
    if not section.load_in_4bit:
        compute_bytes = torch.tensor([], dtype=_DTYPES[section.torch_dtype]).element_size()
    bits_per_weight = (4.127 if section.double_quant else 4.5) if section.load_in_4bit else 8 * compute_bytes

    def linear_sizes(block: nn.Module) -> list[int]:
        """Weight counts of the linears of `block` that a 4-bit load quantises (all but the head)."""
        return [m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear) and m is not head]

    def weight_bytes(block: nn.Module) -> float:
        """The frozen weights of `block` as loaded: its (4-bit) linears and its other tensors."""
        linear = sum(linear_sizes(block))
        frozen = sum(p.numel() for p in block.parameters() if not p.requires_grad)
        return linear * bits_per_weight / 8 + (frozen - linear) * compute_bytes

    linear_weights, largest_linear = sum(linear_sizes(model)), max(linear_sizes(model), default=0)
    weights = weight_bytes(model)
    blocks = [weight_bytes(layer) for layer in decoder_layers(model)]
    if section.load_in_4bit:
        quant_state_bits = 8 / 64 + 32 / (64 * 256) if section.double_quant else 32 / 64
        unpartitioned = linear_weights * quant_state_bits / 8
        load_transient = compute_bytes * largest_linear
    else:
        unpartitioned, load_transient = 0, compute_bytes * max((p.numel() for p in model.parameters()), default=0)
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
    estimate["zero3_unpartitioned_gib"] = unpartitioned / gib
    estimate["load_transient_gib"] = load_transient / gib
    estimate["largest_layer_gib"] = max(blocks, default=0.0) / gib
    estimate["outside_layers_gib"] = (weights - sum(blocks)) / gib
    estimate = {key: round(value, 3) for key, value in estimate.items()}
    estimate["largest_linear_weights"] = largest_linear  # a count: what a 4-bit matmul dequantises at once
    return estimate
