"""Adapter files: a directory with `adapter_config.json` and `adapter_model.safetensors`.

The JSON says everything needed to rebuild the adapter but its trained values: the adapter settings with every
module's seed, the basis generator's version, the base model's fingerprint (adapted module names and shapes, an
input-embedding sample, and for a 4-bit base its quantisation settings) and the SHA-256 of the tensor file. The
safetensors file holds the trained tensors: coefficients for NOLA, A and B for LoRA (A also when frozen, LoRA-FA),
and for an SVD-initialised LoRA the A0 and B0 subtracted from the base (`residual_a`, `residual_b`), which rebuild
the residual from the original base; never seeds, bases or NOLA's A0, which are regenerated. 3/4-bit NOLA
coefficients are stored as two tensors for the whole adapter: `quantized.codes` (every vector's packed codes, in
module order, A before B) and `quantized.grids` (one [low, step] row per vector).

Loading checks each of those facts and fails with one line naming the first mismatch, before touching the model.
Saving writes a temporary directory and renames it into place, so a reader sees the old adapter or the new one,
never half of one.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from nola.adapter_config import AdapterConfig
from nola.basis import GENERATOR_VERSION
from nola.errors import NolaError
from nola.methods import method_for
from nola.inject import (
    adapted_modules,
    adapter_config_of,
    attach,
    base_description_of,
    base_fingerprint,
    embedding_sample,
    find_target_modules,
)
from nola.quant import code_bytes, pack_vectors, unpack_codes, unpack_vectors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "nola-adapter"
FORMAT_VERSION = 2  # 2: quantised coefficients in two tensors for the whole adapter; 1: two per vector (still read)
READABLE_VERSIONS = (1, 2)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file or directory entry to disk, so a rename after it cannot expose unwritten data."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>
# errno values that mean "this kernel, C library or filesystem cannot exchange" rather than "this exchange failed".
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


@functools.lru_cache(maxsize=None)
def _renameat2():
    """glibc's renameat2 (2.28 and later) on Linux, or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing directory entries in one atomic step (Linux renameat2 with RENAME_EXCHANGE): True when
    done, False where the kernel, C library or filesystem cannot (then nothing was changed); other errors raise."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in _NO_EXCHANGE:
        return False
    raise OSError(error, os.strerror(error), str(second))


def write_directory_atomically(path: Path, write_into) -> None:
    """Call `write_into(tmp_dir)`, fsync what it wrote, then move tmp_dir to `path` (replacing an old one).

    Readers see the old directory or the new one, never a mix; a write error (full disk, file-size limit, read-only
    directory) becomes one NolaError naming `path`, with `path` left as it was.

    Replacing a directory cannot be one rename (rename fails on a non-empty target), and the two-rename way (old
    `path` aside to `.NAME.old-PID`, tmp_dir into `path`) has a moment with no `path` at all: a process killed there
    leaves no `path`. So where Linux can (renameat2 RENAME_EXCHANGE: ext4, xfs, btrfs, tmpfs, ...) the two are
    swapped in one atomic step, after which the old copy sits at the temporary name and is deleted: at every instant
    `path` holds a complete copy, whenever the process dies. Elsewhere (other systems, NFS and other filesystems
    without exchange) the two renames remain, and the old copy a kill leaves at `.NAME.old-PID` is complete and
    fsynced: training checkpoints rename it back at start-up
    (`nola.training.checkpoint.recover_replaced`); for other directories it is there to be renamed back by hand. The
    exchange alone would leave that fallback unsafe, and recovery alone would serve checkpoints only."""
    path = Path(path)
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
    previous = path.parent / f".{path.name}.old-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        write_into(temporary)
        for child in sorted(temporary.rglob("*"), reverse=True):  # files before the directories holding them
            fsync_path(child)
        fsync_path(temporary)
        if not path.exists():
            os.rename(temporary, path)
        elif not _exchange(temporary, path):  # exchanged: the old copy is now `temporary`, deleted below
            os.rename(path, previous)
            try:
                os.rename(temporary, path)
            except OSError:
                if previous.exists():
                    os.rename(previous, path)
                raise
        fsync_path(path.parent)
        shutil.rmtree(previous, ignore_errors=True)
    except (OSError, SafetensorError) as error:  # safetensors reports write errors (EFBIG, ENOSPC) as its own type
        reason = getattr(error, "strerror", None) or str(error)
        reason = re.sub(r".*I/O error: (.*?) \(os error \d+\).*", r"\1", reason)  # safetensors wraps the OS's words
        raise NolaError(f"{path}: cannot be written ({reason}); left as it was") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


QUANTIZED_CODES, QUANTIZED_GRIDS = "quantized.codes", "quantized.grids"
MERGED_MARKER = "nola_merged_adapter_sha256"  # in a merged model's config.json: which adapter it holds
EMBEDDING_TOLERANCE = 1 / 64  # relative: a bf16 copy of the same weights agrees to 2^-8, another model does not


@dataclass
class AdapterFile:
    """A verified adapter directory, read without a model: enough to attach, merge or export it."""

    directory: Path
    description: dict  # the parsed adapter_config.json
    config: AdapterConfig
    values: dict[str, torch.Tensor]  # "<module>.<tensor>" -> trained values (quantised ones unpacked, float32)

    @property
    def modules(self) -> dict[str, list[int]]:
        """{adapted module name: [out_features, in_features]} in model order."""
        return self.description["base_model"]["modules"]

    @property
    def base(self) -> dict:
        return self.description["base_model"]

    def module_values(self, name: str) -> dict[str, torch.Tensor]:
        """One module's stored values by short name (`coefficients_a`, `lora_b`, ...)."""
        return self._values_by_module.get(name, {})

    @functools.cached_property
    def _values_by_module(self) -> dict[str, dict[str, torch.Tensor]]:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in self.values.items():  # short names hold no dot, module names do
            module, _, short = key.rpartition(".")
            grouped.setdefault(module, {})[short] = value
        return grouped


def _stored_shapes(config: AdapterConfig, modules: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    """{"<module>.<tensor>": shape} of every tensor the adapter stores, in stored order (the method's, per module)."""
    method = method_for(config.method)
    return {f"{name}.{short}": shape for name, (out_features, in_features) in modules.items()
            for short, shape in method.stored_shapes(config, out_features, in_features).items()}


def _vector_layout(config: AdapterConfig, modules: dict[str, list[int]]) -> list[tuple[str, int]]:
    """(key, length) of every vector of a quantised adapter (NOLA's coefficients, A before B), in stored order."""
    return [(key, shape[0]) for key, shape in _stored_shapes(config, modules).items()]


def pack_state(config: AdapterConfig, modules: dict[str, list[int]], values: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """The tensors of the weights file for full-precision `values` keyed `<module>.<tensor>`."""
    if config.quant_bits:  # only a quantizable method's config has quant_bits
        layout = _vector_layout(config, modules)
        packed = pack_vectors([values[key] for key, _ in layout], config.quant_bits)
        return {QUANTIZED_CODES: packed["codes"], QUANTIZED_GRIDS: packed["grids"]}
    return {key: value.detach().cpu().contiguous() for key, value in values.items()}


def adapter_state(model: nn.Module, values: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors an adapter file stores for `model`'s adapter.

    `values` (parameter name -> full tensor) stands in for the model's own tensors when those are partitioned
    across processes (DeepSpeed ZeRO-3) and were gathered by the caller."""
    tensors = {f"{name}.{short}": tensor for name, module in adapted_modules(model)
               for short, tensor in module.stored_tensors().items()}
    if values is not None:  # the trained tensors; frozen ones (a LoRA-FA's A, SVD factors) are whole on every rank
        tensors = {key: values.get(key, tensor) for key, tensor in tensors.items()}
    return pack_state(adapter_config_of(model), base_fingerprint(model), tensors)


def write_adapter(path: str | os.PathLike, config: AdapterConfig, state: dict[str, torch.Tensor],
                  base: dict, atomic: bool = True) -> Path:
    """Write an adapter directory from its config, packed tensors and base description: atomically, or straight
    into a new directory when it lies inside one being written atomically already (a checkpoint)."""

    def write_into(directory: Path) -> None:
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        description = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "generator_version": GENERATOR_VERSION,
            **({"frozen_draw": frozen_draw} if (frozen_draw := method_for(config.method).frozen_draw) else {}),
            "adapter": config.to_dict(),
            "base_model": base,
            "weights_sha256": file_sha256(directory / WEIGHTS_FILE),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(description, indent=2) + "\n")

    if atomic:
        write_directory_atomically(Path(path), write_into)
    else:
        Path(path).mkdir()
        write_into(Path(path))
    return Path(path)


def save_adapter(model: nn.Module, path: str | os.PathLike, values: dict[str, torch.Tensor] | None = None,
                 atomic: bool = True) -> Path:
    """Write the model's adapter to directory `path` (atomically unless told); returns the path. See
    `adapter_state` for values."""
    base = {"modules": base_fingerprint(model), **base_description_of(model)}
    return write_adapter(path, adapter_config_of(model), adapter_state(model, values), base, atomic)


def read_adapter_description(path: str | os.PathLike) -> dict:
    """Parse and check `adapter_config.json` of an adapter directory (format, generator version, file hash)."""
    directory = Path(path)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise NolaError(f"{directory}: not a nola adapter directory ({required.name} is missing)")
    try:
        description = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NolaError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise NolaError(f"{config_path}: not a nola adapter config (format is not {FORMAT!r})")
    if description.get("format_version") not in READABLE_VERSIONS:
        raise NolaError(f"{config_path}: format_version {description.get('format_version')!r} is not one this nola "
                        f"reads ({', '.join(map(str, READABLE_VERSIONS))})")
    if description.get("generator_version") != GENERATOR_VERSION:
        raise NolaError(
            f"{config_path}: basis generator {description.get('generator_version')!r} differs from this nola's "
            f"{GENERATOR_VERSION!r}; its bases cannot be regenerated"
        )
    if description.get("weights_sha256") != file_sha256(weights_path):
        raise NolaError(f"{weights_path}: corrupted or truncated (SHA-256 differs from {CONFIG_FILE})")
    base = description.get("base_model")
    if not isinstance(description.get("adapter"), dict) or not isinstance(base, dict):
        raise NolaError(f"{config_path}: missing 'adapter' or 'base_model' section")
    modules = base.get("modules")
    if not isinstance(modules, dict) or not all(
        isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)
        for shape in modules.values()
    ):
        raise NolaError(f"{config_path}: base_model.modules must map module names to [out_features, in_features]")
    return description


def check_frozen_draw(description: dict, config: AdapterConfig, config_path: Path) -> None:
    """Refuse a file whose method's frozen random tensors were drawn another way than this nola draws them (VeRA's
    projections before they matched PEFT's): its trained vectors only mean something beside those tensors."""
    wanted, recorded = method_for(config.method).frozen_draw, description.get("frozen_draw")
    if wanted != recorded:
        raise NolaError(f"{config_path}: its frozen {config.method} tensors were drawn as "
                        f"{recorded or 'an earlier nola drew them'}, this nola draws them as {wanted}; they cannot "
                        f"be rebuilt: train the adapter again")


def read_weights(weights_path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises several types for a damaged header
        raise NolaError(f"{weights_path}: unreadable safetensors file ({error})") from None


def _expected_shapes(config: AdapterConfig, modules: dict[str, list[int]], version: int = FORMAT_VERSION
                     ) -> dict[str, tuple[int, ...]]:
    """The tensor keys and shapes a file for this config and base must hold, known before anything is attached."""
    if config.quant_bits:
        layout = _vector_layout(config, modules)
        if version == 1:
            return {name: shape for key, count in layout
                    for name, shape in ((f"{key}.codes", (code_bytes(count, config.quant_bits),)), (f"{key}.grid", (2,)))}
        return {QUANTIZED_CODES: (sum(code_bytes(count, config.quant_bits) for _, count in layout),),
                QUANTIZED_GRIDS: (len(layout), 2)}
    return _stored_shapes(config, modules)


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read and verify an adapter directory (format, generator, hash, tensor names and shapes), no model needed."""
    directory = Path(path)
    weights_path = directory / WEIGHTS_FILE
    description = read_adapter_description(directory)
    config = AdapterConfig.from_dict(description["adapter"], where=str(directory / CONFIG_FILE))
    check_frozen_draw(description, config, directory / CONFIG_FILE)
    modules = description["base_model"]["modules"]
    state = read_weights(weights_path)
    version = description["format_version"]
    shapes = _expected_shapes(config, modules, version)
    for key in sorted(set(shapes) | set(state)):
        if key not in state:
            raise NolaError(f"{weights_path}: tensor {key} is missing")
        if key not in shapes:
            raise NolaError(f"{weights_path}: unexpected tensor {key}")
        if tuple(state[key].shape) != shapes[key]:
            raise NolaError(f"{weights_path}: {key} has shape {tuple(state[key].shape)}, expected {shapes[key]}")
    if config.quant_bits:
        layout = _vector_layout(config, modules)
        if version == 1:
            state = {key: unpack_codes(state[f"{key}.codes"], state[f"{key}.grid"], count, config.quant_bits)
                     for key, count in layout}
        else:
            vectors = unpack_vectors(state[QUANTIZED_CODES], state[QUANTIZED_GRIDS], [n for _, n in layout],
                                     config.quant_bits)
            state = {key: vector for (key, _), vector in zip(layout, vectors)}
    return AdapterFile(directory, description, config, state)


def check_embedding_sample(expected: dict | None, found: list[float], where: Path) -> None:
    """Refuse a base whose input embeddings differ from the ones the adapter was trained with (same shapes, other
    weights: e.g. a chat model for a base model's adapter). `found` is `embedding_sample` in the dtype training
    held the embeddings in; the relative tolerance lets a lower-precision copy of the same weights pass."""
    if not expected:
        return
    wanted, found = torch.tensor(expected["sample"]), torch.tensor(found)
    if wanted.shape != found.shape or ((found - wanted).abs() > EMBEDDING_TOLERANCE * wanted.abs() + 1e-6).any():
        raise NolaError(f"{where}: adapter is for another base model (its {expected['name']} values differ from "
                        f"the ones the adapter was trained with)")


def check_base_model(model: nn.Module, adapter: AdapterFile) -> None:
    """Fail naming the first module whose presence or shape differs between the adapter and `model`, or the
    embedding sample when the shapes agree but the weights do not."""
    config_path = adapter.directory / CONFIG_FILE
    if getattr(getattr(model, "config", None), MERGED_MARKER, None) == adapter.description["weights_sha256"]:
        raise NolaError(f"{config_path}: the base model already has this adapter merged in (applying it again "
                        f"would double its update)")
    found = {}
    for name in find_target_modules(model, adapter.config.target_modules):
        module = model.get_submodule(name)
        found[name] = [module.out_features, module.in_features]
    for name, shape in adapter.modules.items():
        if name not in found:
            raise NolaError(f"{config_path}: adapter is for another base model (module {name} not found in it)")
        if list(shape) != found[name]:
            raise NolaError(
                f"{config_path}: adapter is for another base model ({name} is {found[name][0]}x{found[name][1]}, "
                f"adapter expects {shape[0]}x{shape[1]})"
            )
    extra = sorted(set(found) - set(adapter.modules))
    if extra:
        raise NolaError(f"{config_path}: adapter is for another base model (module {extra[0]} is not in the adapter)")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    expected = adapter.base.get("embedding")
    if expected and embeddings is not None and embeddings.weight.device.type != "meta":
        found = embedding_sample(embeddings.weight, getattr(torch, expected["dtype"]))
        check_embedding_sample(expected, found, config_path)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Attach the adapter saved at `path` to `model` (which must carry none yet) and load its tensors.

    Every check (format, generator, file hash, base fingerprint, tensor names and shapes) runs before the model
    is touched, so a failed load leaves the model as it was.
    """
    return apply_adapter(model, read_adapter(path))


def residual_factors(adapter: AdapterFile) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """{module name: (A0, B0)} of a start that changed the base (an SVD-initialised LoRA): what training subtracted
    from the original base; None for other adapters."""
    method = method_for(adapter.config.method)
    factors = {name: method.residual_factors(adapter.config, adapter.module_values(name)) for name in adapter.modules}
    return None if any(pair is None for pair in factors.values()) else factors


def apply_adapter(model: nn.Module, adapter: AdapterFile) -> nn.Module:
    """`load_adapter` for an adapter already read: check the base, attach (an SVD start's residual rebuilt from the
    file's factors), copy the trained values in."""
    check_base_model(model, adapter)
    attach(model, adapter.config, residuals=residual_factors(adapter))
    with torch.no_grad():
        for name, module in adapted_modules(model):
            for short_name, parameter in module.stored_tensors().items():
                parameter.copy_(adapter.values[f"{name}.{short_name}"].to(parameter.dtype))
    return model
