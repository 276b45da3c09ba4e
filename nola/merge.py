"""Merging an adapter into its base checkpoint, one shard at a time: W' = W + (alpha/r)·B·A for every adapted module
(for an SVD-initialised LoRA, W − (alpha/r)·B0·A0 + (alpha/r)·B·A: the residual it trained on, plus its update).

A 70B base does not fit in memory in fp32, and need not: each input shard is read tensor by tensor, each adapted
weight is merged in fp32 and cast to the output dtype, and the output is written in shards planned up front from the
input headers, so about one input tensor and one output shard are resident at a time. A and B come from the adapter
file alone (nola/lora_form.py: coefficients + seeds regenerate them), never from a loaded model.

A base that was 4-bit during training is merged into exactly the weights training saw: every Linear that
bitsandbytes quantised (the adapter records which, and how) is quantised and dequantised the same way first. Only
safetensors checkpoints are read: a `.bin` checkpoint would mean unpickling a user file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nola.adapter_io import (
    MERGED_MARKER,
    AdapterFile,
    check_base_model,
    check_embedding_sample,
    residual_factors,
    write_directory_atomically,
)
from nola.errors import NolaError
from nola.inject import EMBEDDING_SAMPLE_COLUMNS, embedding_sample_rows
from nola.lora_form import adapter_delta, trained_factors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def local_checkpoint_dir(name_or_path: str, key: str = "--base") -> Path:
    """A local checkpoint directory for `key` (the scripts' `--base`, training's `model.name_or_path`): a path,
    `embedded:model`, or a hub name (from the local cache when offline), fetching only safetensors, JSON and
    tokenizer files."""
    from nola import embedded
    from nola.modeling import check_model_source

    source = check_model_source(embedded.resolve(name_or_path))
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as error:  # the hub client raises many types (offline, missing, gated)
        raise NolaError(f"{key}: cannot fetch {source!r} from the hub ({type(error).__name__})") from None


def checkpoint_shards(base_dir: Path) -> list[Path]:
    """The safetensors files of a transformers checkpoint directory, in index order."""
    index = base_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise NolaError(f"{index}: not a safetensors index (no weight_map)") from None
        shards = list(dict.fromkeys(weight_map.values()))
        escaping = [name for name in shards if not isinstance(name, str) or Path(name).name != name]
        if escaping:
            raise NolaError(f"{index}: shard name {escaping[0]!r} is not a file in {base_dir}")
        missing = [name for name in shards if not (base_dir / name).is_file()]
        if missing:
            raise NolaError(f"{index}: shard {missing[0]} is missing")
        return [base_dir / name for name in shards]
    if (base_dir / SINGLE_FILE).is_file():
        return [base_dir / SINGLE_FILE]
    if any(base_dir.glob("*.bin")):
        raise NolaError(f"{base_dir}: only PyTorch .bin weights (pickles, which nola never loads); convert the "
                        f"checkpoint to safetensors first")
    raise NolaError(f"{base_dir}: no model.safetensors or {INDEX_FILE}")


def read_headers(shards: list[Path]) -> dict[str, tuple[Path, list[int], str]]:
    """{tensor name: (shard, shape, dtype)} from the safetensors headers alone."""
    headers = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                for key in handle.keys():
                    view = handle.get_slice(key)
                    headers[key] = (shard, list(view.get_shape()), view.get_dtype())
        except NolaError:
            raise
        except Exception as error:  # safetensors raises several types for a damaged file
            raise NolaError(f"{shard}: unreadable safetensors file ({error})") from None
    return headers


def _embedding_sample(shard: Path, expected: dict, shape: list[int]) -> list[float]:
    """`embedding_sample` of a checkpoint's input embedding, reading only the sampled rows."""
    with safe_open(str(shard), framework="pt") as handle:
        view = handle.get_slice(expected["name"])
        rows = torch.cat([view[row : row + 1] for row in embedding_sample_rows(shape[0])])
    return rows[:, :EMBEDDING_SAMPLE_COLUMNS].to(getattr(torch, expected["dtype"])).float().flatten().tolist()


def check_base_checkpoint(base_dir: Path, adapter: AdapterFile, headers: dict) -> None:
    """Refuse, before anything is written, a base whose modules, shapes or embedding values differ from the
    adapter's (the same checks as loading the adapter onto a model, on a weightless copy of the architecture)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(base_dir))
    except (OSError, ValueError) as error:
        raise NolaError(f"--base: cannot read {base_dir / 'config.json'} ({error})") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    if any(key.endswith((".absmax", ".quant_map")) or "quant_state" in key for key in headers):
        raise NolaError(f"--base: {base_dir} is a quantised checkpoint; merge needs the original float weights")
    check_base_model(skeleton, adapter)
    for name, shape in adapter.modules.items():
        found = headers.get(f"{name}.weight")
        if found is None or found[1] != shape:
            raise NolaError(f"--base: {base_dir} is not the checkpoint the adapter was trained on "
                            f"({name}.weight is {found[1] if found else 'missing'}, adapter expects {shape})")
    embedding = adapter.base.get("embedding")
    if embedding and embedding["name"] in headers:
        shard, shape, _ = headers[embedding["name"]]
        check_embedding_sample(embedding, _embedding_sample(shard, embedding, shape), adapter.directory)


def as_trained(weight: torch.Tensor, quantization: dict) -> torch.Tensor:
    """The weight a 4-bit base computed with: quantised and dequantised as bitsandbytes did at load time."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    packed, state = quantize_4bit(weight.to(getattr(torch, quantization["dtype"])), blocksize=quantization["blocksize"],
                                  compress_statistics=quantization["double_quant"],
                                  quant_type=quantization["quant_type"])
    return dequantize_4bit(packed, state)


def merged_tensor(key: str, headers: dict, adapter: AdapterFile, dtype: torch.dtype) -> torch.Tensor:
    """One tensor of the output checkpoint: read from its shard, dequantised as training saw it if bitsandbytes
    quantised it, merged with the adapter's update if adapted (in fp32), cast to `dtype` if floating."""
    quantization = adapter.base.get("quantization")
    module = key.removesuffix(".weight")
    with safe_open(str(headers[key][0]), framework="pt") as handle:
        tensor = handle.get_tensor(key)
    if not key.endswith(".weight"):
        return tensor.to(dtype) if tensor.is_floating_point() else tensor
    quantised = quantization is not None and module in quantization["modules"]
    if quantised:
        tensor = as_trained(tensor, quantization)
    if module in adapter.modules:
        residuals = residual_factors(adapter)
        if quantised and residuals is not None:  # the residual was re-quantised: merge exactly that
            a0, b0 = (t.float() for t in residuals[module])
            tensor = as_trained(tensor.float() - adapter.config.scale * (b0 @ a0), quantization)
            a, b = trained_factors(adapter, module)
            tensor = tensor.float() + adapter.config.scale * (b @ a)
        else:
            tensor = tensor.float() + adapter_delta(adapter, module)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def linear_weight_modules(headers: dict) -> set[str]:
    """Names of the modules holding a 2-D `.weight` in a checkpoint: the Linear layers (and embeddings)."""
    return {key.removesuffix(".weight") for key, (_, shape, _) in headers.items()
            if key.endswith(".weight") and len(shape) == 2}


def plan_shards(headers: dict, dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names, in checkpoint order, into output shards of at most `max_shard_bytes` (a larger tensor
    gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, (_, shape, stored) in headers.items():
        element = dtype.itemsize if stored in ("F32", "F16", "BF16", "F64") else _itemsize(stored)
        nbytes = element * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _itemsize(safetensors_dtype: str) -> int:
    return {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(safetensors_dtype, 8)


def _copy_side_files(base_dir: Path, out_dir: Path, dtype: torch.dtype, adapter: AdapterFile) -> None:
    """config.json (dtype updated, any quantisation entry dropped, the merged adapter named so it is not applied
    twice) and every other non-weight file: tokenizer, generation config, licence."""
    for path in base_dir.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != INDEX_FILE:
            shutil.copy2(path, out_dir / path.name)
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = str(dtype).split(".")[-1]
    config[MERGED_MARKER] = adapter.description["weights_sha256"]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def merge_checkpoint(base_dir: str | Path, adapter: AdapterFile, out_dir: str | Path, dtype: torch.dtype,
                     max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write base + adapter as a transformers checkpoint (sharded safetensors + config + tokenizer) into `out_dir`,
    atomically; returns the weight files written."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    shards = checkpoint_shards(base_dir)
    headers = read_headers(shards)
    check_base_checkpoint(base_dir, adapter, headers)
    plan = plan_shards(headers, dtype, max_shard_bytes)
    names = [SINGLE_FILE] if len(plan) == 1 else [
        f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))
    ]
    destination = {key: names[i] for i, keys in enumerate(plan) for key in keys}

    def write_into(directory: Path) -> None:
        total = 0
        for name, keys in zip(names, plan):  # one output shard resident at a time
            tensors = {key: merged_tensor(key, headers, adapter, dtype).contiguous() for key in keys}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, str(directory / name), metadata={"format": "pt"})
            del tensors
        if len(names) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": destination}
            (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        _copy_side_files(base_dir, directory, dtype, adapter)

    write_directory_atomically(out_dir, write_into)
    return [out_dir / name for name in names]
