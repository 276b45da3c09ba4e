"""The LoRA forms of a store's adapters, made on demand into a cache directory bounded in bytes, for an engine that
loads PEFT LoRA directories (vLLM).

Keeping a LoRA form beside every adapter would cost ~350 times the adapter's bytes (a 7B NOLA adapter is ~230 KB,
its rank-16 LoRA form ~80 MB in bf16), so a form is made when its adapter is first asked for (exact:
nola/lora_form.py, through the `--format peft-lora` export) and kept while it is among the most recently used that
fit the bound. An entry is named after everything its bytes depend on (the adapter's verified config and weights
hash, the served base, the dtype), so an adapter replaced in the store gets a new entry, never a stale one.
Entries appear whole (written aside, then renamed in), and one lock file per entry makes many requests for one
cold adapter, from threads or processes, materialise it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nola.adapter_io import CONFIG_FILE, read_adapter
from nola.errors import NolaError
from nola.export import PEFT_CONFIG_FILE, export_peft_lora
from nola.lora_form import lora_rank
from nola.merge import check_base_checkpoint, checkpoint_shards, linear_weight_modules, read_headers
from nola.serving.store import BadAdapter

RECENT_SECONDS = 60.0  # an entry used this recently is never evicted: its engine may not have read it yet


@dataclass(frozen=True)
class ServedBase:
    """The base checkpoint a server runs: what every adapter is checked against and its LoRA form names."""

    name: str  # what the engine serves it as (PEFT's base_model_name_or_path)
    directory: Path
    headers: dict  # safetensors headers of its shards (nola.merge.read_headers)

    @classmethod
    def from_directory(cls, name: str, directory: str | Path) -> ServedBase:
        directory = Path(directory)
        return cls(name, directory, read_headers(checkpoint_shards(directory)))


class LoraCache:
    """LoRA forms of adapters for one served base, in one dtype, up to `max_rank`, within `max_bytes` on disk."""

    def __init__(self, directory: str | Path, base: ServedBase, max_bytes: int, max_rank: int,
                 dtype: torch.dtype = torch.float32, recent_seconds: float = RECENT_SECONDS) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.base, self.max_bytes, self.max_rank, self.dtype = base, max_bytes, max_rank, dtype
        self.recent_seconds = recent_seconds

    def lora_directory(self, name: str, adapter_dir: Path) -> Path:
        """The PEFT LoRA directory of the adapter in `adapter_dir` (served as `name`), made if absent. BadAdapter,
        naming the adapter, for a damaged or tampered file, another base, or a rank above `max_rank`."""
        try:
            adapter = read_adapter(adapter_dir)
        except NolaError as error:
            raise BadAdapter(f"adapter {name!r}: {error}") from None
        rank = lora_rank(adapter)
        if rank > self.max_rank:
            raise BadAdapter(f"adapter {name!r}: its LoRA rank {rank} is above the server's max_lora_rank "
                             f"{self.max_rank}")
        entry = self.directory / self._entry_name(name, adapter_dir)
        with self._entry_lock(entry.name):
            made = not (entry / PEFT_CONFIG_FILE).is_file()
            if made:
                try:
                    check_base_checkpoint(self.base.directory, adapter, self.base.headers)
                except NolaError as error:
                    raise BadAdapter(f"adapter {name!r}: {error}") from None
                export_peft_lora(adapter, entry, self.dtype, self.base.name,
                                 linear_weight_modules(self.base.headers))
            now = time.time_ns()  # explicit: the file system's own clock ticks too coarsely to order two uses
            os.utime(entry, ns=(now, now))  # its last use, which eviction orders by
        if made:  # only a new entry grows the cache: a hit needs no scan of it
            self.evict(keep=entry)
        return entry

    def evict(self, keep: Path | None = None) -> None:
        """Remove the least recently used entries until the cache fits `max_bytes`, sparing `keep`, entries used in
        the last `recent_seconds` and entries another request is making."""
        for leftover in self.directory.glob(".evicted-*"):  # a process killed while it removed an entry
            shutil.rmtree(leftover, ignore_errors=True)
        entries = [entry for path in self.directory.iterdir() if not path.name.startswith(".")
                   for entry in _described(path)]
        total = sum(size for _, size, _ in entries)
        now = time.time()
        for used, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                return
            if path == keep or now - used < self.recent_seconds:
                continue
            with self._entry_lock(path.name, wait=False) as locked:
                if locked and path.is_dir():  # not evicted by another process meanwhile
                    doomed = self.directory / f".evicted-{path.name}-{os.getpid()}"
                    os.rename(path, doomed)  # gone from its name at once, whole until then
                    shutil.rmtree(doomed, ignore_errors=True)
                    total -= size

    def _entry_name(self, name: str, adapter_dir: Path) -> str:
        """`name-DIGEST`: the digest of everything the entry's bytes depend on. The config file holds the hash of
        the weights, which read_adapter verified."""
        identity = hashlib.sha256()
        for part in ((adapter_dir / CONFIG_FILE).read_bytes(), self.base.name.encode(),
                     str(self.base.directory.resolve()).encode(), str(self.dtype).encode()):
            identity.update(hashlib.sha256(part).digest())
        return f"{name}-{identity.hexdigest()[:24]}"

    @contextlib.contextmanager
    def _entry_lock(self, entry_name: str, wait: bool = True) -> Iterator[bool]:
        """An exclusive lock on one entry across threads and processes (flock on a file of its own, kept: a lock
        file removed while another process waits on it would let a third one in)."""
        with open(self.directory / f".{entry_name}.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _described(entry: Path) -> list[tuple[float, int, Path]]:
    """[(last use, bytes, entry)] of one cache entry, or [] if another process evicted it while we looked."""
    try:
        return [(entry.stat().st_mtime, sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()), entry)]
    except FileNotFoundError:
        return []
