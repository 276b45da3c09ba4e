"""The adapter store and the cache of LoRA forms a server resolves adapter names through (nola/serving): names
that leave the store, adapters that cannot be served, one materialisation for many requests, a cache bounded in
bytes, and forms that are exactly the `--format peft-lora` export."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import nola
import nola.serving.lora_cache as lora_cache
from nola.adapter_io import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from nola.export import PEFT_WEIGHTS_FILE, export_peft_lora
from nola.merge import checkpoint_shards, linear_weight_modules, read_headers
from nola.serving.lora_cache import LoraCache, ServedBase
from nola.serving.store import AdapterNotFound, AdapterStore, BadAdapter
from tests.conftest import tiny_llama
from tests.test_export import METHOD_CONFIGS, adapter_on


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """{method: adapter directory} on the base, one per method a store may hold."""
    return {method: adapter_on(base_dir, config, tmp_path_factory.mktemp(method))[1]
            for method, config in METHOD_CONFIGS.items()}


@pytest.fixture
def store(trained, tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    for method, directory in trained.items():
        shutil.copytree(directory, root / method)
    return AdapterStore(root)


def cache_for(base_dir, directory, **settings) -> LoraCache:
    options = {"max_bytes": 10**9, "max_rank": 16, **settings}
    return LoraCache(directory, ServedBase.from_directory("tiny-base", base_dir), **options)


def entries(cache: LoraCache) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[0] for p in cache.directory.iterdir() if not p.name.startswith("."))


def test_the_store_lists_its_adapter_directories_by_name_and_nothing_else(store, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(store.root / "nola", outside)
    (store.root / "away").symlink_to(outside)
    (store.root / "also-nola").symlink_to(store.root / "nola")  # a link within the store is a name like any other
    (store.root / "notes.txt").write_text("not an adapter")
    (store.root / "empty").mkdir()
    shutil.copytree(store.root / "vera", store.root / ".hidden")
    assert store.names() == ["also-nola", "lora", "nola", "vera"]
    assert store.directory("also-nola") == store.directory("nola") == store.root / "nola"


@pytest.mark.parametrize("name", ["../nola", "/etc", "nola/..", "..", ".hidden", "", "a" * 129, "nola\n", "x y"])
def test_a_name_that_is_not_one_plain_component_is_refused_naming_it(store, name):
    with pytest.raises(BadAdapter, match=r"^adapter .*: not an adapter name \(one path component"):
        store.directory(name)


def test_a_link_out_of_the_store_is_refused_before_anything_outside_is_read(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / CONFIG_FILE).write_text("{ read me and fail to parse")
    (store.root / "away").symlink_to(outside)
    smuggled = store.root / "smuggled"
    shutil.copytree(store.root / "nola", smuggled)
    (smuggled / WEIGHTS_FILE).unlink()
    (smuggled / WEIGHTS_FILE).symlink_to(outside / "weights.safetensors")
    for name in ("away", "smuggled"):
        with pytest.raises(BadAdapter, match=rf"^adapter '{name}': leads outside the adapter store$"):
            store.directory(name)


def test_a_name_the_store_lacks_is_not_found(store):
    (store.root / "empty").mkdir()
    for name in ("missing", "empty"):
        with pytest.raises(AdapterNotFound, match=rf"^adapter '{name}': not in the adapter store$"):
            store.directory(name)


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_the_lora_form_is_the_peft_lora_export_of_the_adapter(base_dir, store, method, tmp_path):
    cache = cache_for(base_dir, tmp_path / "cache")
    served = cache.lora_directory(method, store.directory(method))
    adapter = read_adapter(store.directory(method))
    exported = export_peft_lora(adapter, tmp_path / "export", torch.float32, "tiny-base",
                                linear_weight_modules(read_headers(checkpoint_shards(base_dir))))
    ours, theirs = (load_file(d / PEFT_WEIGHTS_FILE) for d in (served, exported))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((served / CONFIG_FILE).read_text()) == json.loads((exported / CONFIG_FILE).read_text())
    assert any(t.abs().max() > 0 for t in ours.values())


def test_many_requests_for_a_cold_adapter_make_its_lora_form_once(base_dir, store, tmp_path, monkeypatch):
    made = []
    export = lora_cache.export_peft_lora

    def slow_export(*arguments):
        made.append(arguments[1])
        time.sleep(0.2)  # long enough that every thread asks while the first one writes
        return export(*arguments)

    monkeypatch.setattr(lora_cache, "export_peft_lora", slow_export)
    cache = cache_for(base_dir, tmp_path / "cache")
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.lora_directory("nola", store.directory("nola"))))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1 and len(results) == 8 and len(set(results)) == 1
    assert (results[0] / PEFT_WEIGHTS_FILE).is_file()


def test_the_cache_keeps_the_most_recently_used_forms_that_fit_its_bytes(base_dir, store, tmp_path):
    cache = cache_for(base_dir, tmp_path / "cache", recent_seconds=0)
    first = cache.lora_directory("nola", store.directory("nola"))
    size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    cache.max_bytes = 2 * size  # the three methods' forms are the same size at the same rank: two fit
    shutil.copytree(store.root / "nola", store.root / "nola-2")
    shutil.copytree(store.root / "nola", store.root / "nola-3")
    for name in ("nola-2", "nola", "nola-3"):  # nola used again before nola-3 arrives: nola-2 is the oldest
        cache.lora_directory(name, store.directory(name))
    assert entries(cache) == ["nola", "nola-3"]


def test_an_entry_in_use_is_never_evicted_even_over_the_bound(base_dir, store, tmp_path):
    cache = cache_for(base_dir, tmp_path / "cache", max_bytes=1)
    for name in ("nola", "lora"):
        assert (cache.lora_directory(name, store.directory(name)) / PEFT_WEIGHTS_FILE).is_file()
    assert entries(cache) == ["lora", "nola"]  # both used within recent_seconds: an engine may still be reading


def test_an_adapter_replaced_in_the_store_gets_a_new_form(base_dir, store, trained, tmp_path):
    cache = cache_for(base_dir, tmp_path / "cache")
    before = cache.lora_directory("nola", store.directory("nola"))
    shutil.rmtree(store.root / "nola")
    shutil.copytree(trained["lora"], store.root / "nola")
    after = cache.lora_directory("nola", store.directory("nola"))
    assert after != before
    assert "lora_A" in next(iter(load_file(after / PEFT_WEIGHTS_FILE)))


def damage(directory, how: str, other_base_adapter):
    weights = directory / WEIGHTS_FILE
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "tampered":
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0x40
        weights.write_bytes(bytes(data))
    elif how == "another base":
        shutil.rmtree(directory)
        shutil.copytree(other_base_adapter, directory)


@pytest.mark.parametrize("how, reason", [
    ("truncated", r"adapter_model\.safetensors"),
    ("tampered", r"adapter_model\.safetensors"),
    ("another base", r"adapter is for another base model"),
    ("rank", r"its LoRA rank 8 is above the server's max_lora_rank 4"),
])
def test_an_adapter_that_cannot_be_served_is_refused_naming_it_and_nothing_is_cached(
        base_dir, store, tmp_path, tmp_path_factory, how, reason):
    other = tmp_path_factory.mktemp("other-base")
    tiny_llama(init_seed=1).save_pretrained(other)  # the same shapes, other weights
    _, other_adapter = adapter_on(other, METHOD_CONFIGS["nola"], tmp_path / "other")
    if how == "rank":
        _, high = adapter_on(base_dir, nola.AdapterConfig(rank=8, num_basis=16, seed=2), tmp_path / "high")
        shutil.rmtree(store.root / "nola")
        shutil.copytree(high, store.root / "nola")
    else:
        damage(store.root / "nola", how, other_adapter)
    cache = cache_for(base_dir, tmp_path / "cache", max_rank=4)
    with pytest.raises(BadAdapter, match=rf"^adapter 'nola': .*{reason}"):
        cache.lora_directory("nola", store.directory("nola"))
    assert entries(cache) == []
    assert cache.lora_directory("lora", store.directory("lora")).is_dir()  # the others are still served
