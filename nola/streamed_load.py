"""Loading a base model one block at a time, with bounded memory: the lean load behind sharded training.

`from_pretrained` with bitsandbytes builds the whole 4-bit model in one process before any engine can shard it, so
under a sharding engine every rank would hold all of it (plus the dense transients of quantising it). Here the
model is a weightless skeleton first (transformers' own skeleton and its own choice of which linears become
`Linear4bit`), and the weights are read from the safetensors checkpoint block by block: each decoder layer is
materialised, quantised and handed to `on_block` (under FSDP2: `fully_shard`, which keeps this rank's shard and
frees the rest) before the next is read. What a rank holds at any moment is its shards so far, one block, and one
chunk of one weight being quantised.

The weights are bit-identical to `from_pretrained(..., quantization_config=...)`: a weight is read in row chunks,
cast to the compute dtype chunk by chunk (an elementwise cast) and quantised in chunks of whole 64-value blocks.
bitsandbytes' blockwise 4-bit codes and absmax depend only on their own block, and the double-quantisation of the
absmax uses their mean over the whole weight, which is taken after the chunks are joined (`quantize_4bit_in_chunks`,
tested against `bitsandbytes.functional.quantize_4bit`). The chunking bounds the transients of bitsandbytes' CPU
reference kernel (float32 copies of its input, ~10 bytes per weight) and never holds a dense copy of a whole 70B
projection.

Only the safetensors files of a checkpoint are read (`.bin` pickles never are), at most one file open at a time
(its memory map is released before the next opens), so file-backed memory stays within one checkpoint shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from nola.errors import NolaError
from nola.merge import INDEX_FILE, SINGLE_FILE, checkpoint_shards, read_headers
from nola.modeling import decoder_layers

# Weights quantised per call: a multiple of every bitsandbytes block size, and small enough that the CPU kernel's
# float32 temporaries (~10 bytes per weight, measured; nola.training.dry_run) stay near one dense bf16 layer of a 7B
# model.
QUANTIZE_CHUNK_ELEMENTS = 1 << 22


class CheckpointReader:
    """Tensors of a safetensors checkpoint by name, one file open at a time. The files and their tensors come from
    the same index and header reading (and its checks: shards inside the directory, present, readable) as the
    streaming merge's (`nola.merge.checkpoint_shards`, `read_headers`)."""

    def __init__(self, directory: Path) -> None:
        if not ((directory / INDEX_FILE).is_file() or (directory / SINGLE_FILE).is_file()):
            raise NolaError(f"model.name_or_path: {directory} has no {SINGLE_FILE} or {INDEX_FILE} (sharded loading "
                            f"reads safetensors checkpoints only)")
        self.directory = directory
        self.headers = read_headers(checkpoint_shards(directory))  # name -> (file, shape, dtype)
        self._open_path: Path | None = None
        self._handle = None

    def __contains__(self, name: str) -> bool:
        return name in self.headers

    def _file(self, name: str):
        from safetensors import safe_open

        if name not in self.headers:
            raise NolaError(f"model.name_or_path: {self.directory} has no tensor {name!r} for the model's config")
        path = self.headers[name][0]
        if path != self._open_path:
            self.close()
            self._handle = safe_open(path, framework="pt")
            self._open_path = path
        return self._handle

    def shape(self, name: str) -> tuple[int, ...]:
        self._file(name)  # the one-line refusal of a tensor the checkpoint lacks
        return tuple(self.headers[name][1])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (dim 0), read without materialising the rest."""
        return self._file(name).get_slice(name)[start:stop]

    def tensor(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def close(self) -> None:
        self._handle, self._open_path = None, None


def quantize_4bit_in_chunks(weight_rows: Callable[[int, int], torch.Tensor], shape: tuple[int, int],
                            dtype: torch.dtype, device: torch.device, quant_type: str, double_quant: bool,
                            quant_storage: torch.dtype, blocksize: int = 64,
                            chunk_elements: int = QUANTIZE_CHUNK_ELEMENTS):
    """bitsandbytes' 4-bit quantisation of a [out, in] weight, computed from row chunks: the same packed codes and
    `QuantState` as `bitsandbytes.functional.quantize_4bit(weight.to(dtype).to(device), ...)`, with at most one
    chunk in the compute dtype at a time. `weight_rows(start, stop)` returns those rows in any float dtype."""
    import bitsandbytes.functional as bnb_functional

    rows, columns = shape
    # Chunks must cover whole blocks: rows * columns a multiple of the block size.
    row_multiple = blocksize // math.gcd(columns, blocksize)
    rows_per_chunk = max(row_multiple, (chunk_elements // max(columns, 1)) // row_multiple * row_multiple)
    codes, absmaxes = [], []
    for start in range(0, rows, rows_per_chunk):
        chunk = weight_rows(start, min(start + rows_per_chunk, rows)).to(dtype).to(device)
        packed, state = bnb_functional.quantize_4bit(chunk, blocksize=blocksize, compress_statistics=False,
                                                     quant_type=quant_type, quant_storage=torch.uint8)
        codes.append(packed.reshape(-1))
        absmaxes.append(state.absmax)
        del chunk, packed, state
    packed = torch.cat(codes)
    if quant_storage != torch.uint8:
        packed = packed.view(quant_storage)
    packed = packed.unsqueeze(1)
    absmax = torch.cat(absmaxes)
    code = bnb_functional.get_4bit_type(quant_type, device=device)
    common = dict(shape=torch.Size(shape), dtype=dtype, blocksize=blocksize, code=code, quant_type=quant_type)
    if not double_quant:
        return packed, bnb_functional.QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    quantized_absmax, state2 = bnb_functional.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, bnb_functional.QuantState(absmax=quantized_absmax, offset=offset, state2=state2, **common)


def build_skeleton(config, quantization, dtype: torch.dtype, trust_remote_code: bool) -> tuple[nn.Module, object]:
    """The model with every parameter on the meta device (buffers real, on the CPU), its linears replaced by
    transformers' bitsandbytes quantizer exactly as `from_pretrained` would; returns (model, quantizer or None)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if quantization is None:
        return model, None
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=False)
    quantizer.preprocess_model(model, device_map=None)
    return model, quantizer


def _materialize_linear4bit(module, name: str, reader: CheckpointReader, device: torch.device) -> None:
    import bitsandbytes as bnb

    old = module.weight
    shape = reader.shape(name)
    packed, state = quantize_4bit_in_chunks(lambda start, stop: reader.rows(name, start, stop), shape,
                                            module.compute_dtype or torch.float32, device, old.quant_type,
                                            old.compress_statistics, old.quant_storage, old.blocksize)
    module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=old.blocksize,
                                      compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                      quant_storage=old.quant_storage, module=module, bnb_quantized=True)
    module.quant_state = state


def materialize(module: nn.Module, prefix: str, reader: CheckpointReader, device: torch.device,
                dtype: torch.dtype, tied: set[str]) -> None:
    """Replace every meta parameter under `module` (named `prefix` in the checkpoint) by its checkpoint value on
    `device`: 4-bit linears quantised, every other tensor in `dtype`; buffers moved to `device`. A tied parameter
    the checkpoint does not hold (`tied`: a tied head) is left to `tie_weights`."""
    import bitsandbytes as bnb

    for module_name, child in module.named_modules():
        for name, parameter in list(child._parameters.items()):
            if parameter is None or parameter.device.type != "meta":
                continue
            full_name = ".".join(part for part in (prefix, module_name, name) if part)
            if full_name in tied and full_name not in reader:
                continue
            if isinstance(child, bnb.nn.Linear4bit) and name == "weight":
                _materialize_linear4bit(child, full_name, reader, device)
            else:
                child._parameters[name] = nn.Parameter(reader.tensor(full_name).to(device, dtype),
                                                       requires_grad=False)
        for name, buffer in list(child._buffers.items()):
            if buffer is not None and buffer.device != device:
                child._buffers[name] = buffer.to(device)


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that are tied to another (a head tied to the embeddings): transformers' own mapping
    (`all_tied_weights_keys`, target -> source), and any parameter the skeleton already shares."""
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    shared = {name for names in names_of.values() if len(names) > 1 for name in names}
    return shared | set(getattr(model, "all_tied_weights_keys", None) or {})


def _outside(model: nn.Module, layers: list[nn.Module]) -> list[nn.Module]:
    """The modules that own parameters outside the decoder layers (embeddings, final norm, head)."""
    inside = {id(module) for layer in layers for module in layer.modules()}
    return [module for module in model.modules()
            if id(module) not in inside and any(True for _ in module.parameters(recurse=False))]


def load_streamed(config, directory: Path, quantization, dtype: torch.dtype, device: torch.device,
                  prepare_block: Callable[[nn.Module], None], on_block: Callable[[nn.Module], None],
                  trust_remote_code: bool = False) -> nn.Module:
    """Build the model from `directory` block by block: each decoder layer is materialised, `prepare_block`-ed
    (dtype changes that must precede sharding) and handed to `on_block`; then the rest (embeddings, final norm,
    head; tied weights re-tied) is materialised and prepared module by module, and the whole model handed to
    `on_block` (its own shard group). The caller finishes the model."""
    model, quantizer = build_skeleton(config, quantization, dtype, trust_remote_code)
    reader = CheckpointReader(directory)
    names = {id(module): name for name, module in model.named_modules()}
    tied = tied_parameter_names(model)
    try:
        layers = decoder_layers(model)
        if not layers:
            raise NolaError(f"model.name_or_path: sharded loading needs a model with `{model.base_model_prefix}"
                            f".layers` (a {type(model).__name__} has none)")
        for layer in layers:
            materialize(layer, names[id(layer)], reader, device, dtype, tied)
            prepare_block(layer)
            on_block(layer)
        materialize(model, "", reader, device, dtype, tied)
    finally:
        reader.close()
    model.tie_weights()
    for module in _outside(model, layers):
        prepare_block(module)
    if quantizer is not None:
        quantizer.postprocess_model(model)
        model.hf_quantizer = quantizer
    on_block(model)
    return model
