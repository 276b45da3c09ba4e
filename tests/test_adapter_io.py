"""Adapter files: what they hold, bit-exact reload in a fresh process, and one-line errors for every bad file."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nola
import nola.adapter_io
from nola.adapter_io import CONFIG_FILE, WEIGHTS_FILE, write_directory_atomically
from tests.conftest import REPO_ROOT, tiny_llama

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 101, 7, 64, 3]])


def trained_model(config: nola.AdapterConfig, steps: int = 4):
    """A tiny LLaMA with `config` attached and a few AdamW steps of next-token training."""
    model = nola.attach(tiny_llama(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapter")
    model = trained_model(nola.AdapterConfig(rank=4, alpha=8, num_basis=32, seed=11))
    nola.save_adapter(model, directory / "adapter")
    return model, directory / "adapter"


def test_files_hold_coefficients_only_and_seeds_in_json(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    description = json.loads((path / CONFIG_FILE).read_text())
    assert description["generator_version"] == nola.GENERATOR_VERSION
    seeds = description["adapter"]["module_seeds"]
    assert seeds == {name: module.seed for name, module in nola.adapted_modules(model)}
    assert description["base_model"]["modules"]["model.layers.0.mlp.down_proj"] == [32, 48]
    tensors = load_file(path / WEIGHTS_FILE)
    assert set(tensors) == {f"{name}.coefficients_{s}" for name in seeds for s in "ab"}
    assert all(t.dtype == torch.float32 and t.shape == (32,) for t in tensors.values())
    assert (path / WEIGHTS_FILE).stat().st_size < 8 * 1024
    assert not list(path.parent.glob(".adapter*")), "temporary directories left behind"


def test_reload_in_a_fresh_process_reproduces_logits_bit_for_bit(saved, tmp_path):
    model, path = saved
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    with torch.no_grad():
        expected = model(IDS).logits
    script = f"""
        import torch, nola
        from safetensors.torch import save_file
        from transformers import LlamaForCausalLM
        model = nola.load_adapter(LlamaForCausalLM.from_pretrained({str(base_dir)!r}).eval(), {str(path)!r})
        with torch.no_grad():
            logits = model(torch.tensor({IDS.tolist()})).logits
        save_file({{"logits": logits.contiguous()}}, {str(tmp_path / "logits.safetensors")!r})
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, cwd=REPO_ROOT)
    reloaded = load_file(tmp_path / "logits.safetensors")["logits"]
    assert not torch.equal(expected, tiny_llama()(IDS).logits), "training changed nothing: the test would be vacuous"
    assert torch.equal(reloaded, expected)


def test_lora_vera_and_quantised_adapters_round_trip(tmp_path):
    for name, config in {
        "lora": nola.AdapterConfig(method="lora", rank=2, alpha=4, seed=3),
        "vera": nola.AdapterConfig(method="vera", rank=8, alpha=8, seed=3),
        "q4": nola.AdapterConfig(rank=4, num_basis=64, quant_bits=4, seed=3),
        "q3": nola.AdapterConfig(rank=4, num_basis=64, quant_bits=3, seed=3),
    }.items():
        model = trained_model(config)
        nola.save_adapter(model, tmp_path / name)
        reloaded = nola.load_adapter(tiny_llama(), tmp_path / name)
        with torch.no_grad():
            difference = (reloaded(IDS).logits - model(IDS).logits).abs().max().item()
        assert difference <= (0.0 if name in ("lora", "vera") else 1e-6), name
    fp32 = nola.save_adapter(trained_model(nola.AdapterConfig(rank=4, num_basis=64, seed=3)), tmp_path / "fp32")
    full = (fp32 / WEIGHTS_FILE).stat().st_size  # whole files, safetensors headers included
    assert (tmp_path / "q4" / WEIGHTS_FILE).stat().st_size <= full / 7
    assert (tmp_path / "q3" / WEIGHTS_FILE).stat().st_size <= full / 9


def test_saving_over_an_existing_adapter_replaces_it_whole(saved, tmp_path):
    model, _ = saved
    target = tmp_path / "adapter"
    nola.save_adapter(trained_model(nola.AdapterConfig(rank=2, num_basis=8)), target)
    nola.save_adapter(model, target)
    assert json.loads((target / CONFIG_FILE).read_text())["adapter"]["num_basis"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


class Killed(BaseException):
    """Stands for SIGKILL: no `except OSError` clean-up runs."""


def _kill_at_second_rename(monkeypatch):
    """os.rename that kills the process at its second call: between the two renames of a two-rename replacement."""
    calls, real_rename = [], os.rename

    def rename(source, destination):
        calls.append((source, destination))
        if len(calls) == 2:
            raise Killed
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", rename)
    return calls


def _exchange_supported(directory) -> bool:
    """Whether this filesystem swaps two directories in one step (Linux renameat2 RENAME_EXCHANGE)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    first, second = directory / "probe-a", directory / "probe-b"
    first.mkdir()
    second.mkdir()
    try:
        return renameat2(-100, bytes(first), -100, bytes(second), 2) == 0  # AT_FDCWD, RENAME_EXCHANGE
    finally:
        first.rmdir()
        second.rmdir()


def _write(text):
    return lambda directory: (directory / "file.txt").write_text(text)


def test_replacing_a_directory_leaves_a_complete_copy_at_its_path_at_every_instant(tmp_path, monkeypatch):
    """Where the filesystem can exchange two directories, the old copy and the new one swap in one step: a kill
    at any point of the replacement leaves `path` holding one of them whole."""
    if not _exchange_supported(tmp_path):
        pytest.skip("this filesystem has no renameat2 RENAME_EXCHANGE")
    target = tmp_path / "out"
    write_directory_atomically(target, _write("old"))
    renames = _kill_at_second_rename(monkeypatch)
    write_directory_atomically(target, _write("new"))
    assert renames == []  # swapped in one step: never a moment without `target` for a kill to land in
    assert (target / "file.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_without_exchange_a_kill_between_the_renames_leaves_the_old_copy_aside(tmp_path, monkeypatch):
    monkeypatch.setattr(nola.adapter_io, "_exchange", lambda first, second: False, raising=False)
    target = tmp_path / "out"
    write_directory_atomically(target, _write("old"))
    write_directory_atomically(target, _write("newer"))  # the fallback replaces, too
    assert (target / "file.txt").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    calls = _kill_at_second_rename(monkeypatch)
    with pytest.raises(Killed):
        write_directory_atomically(target, _write("new"))
    assert calls[0] == (target, tmp_path / f".out.old-{os.getpid()}")
    assert not target.exists()
    assert (tmp_path / f".out.old-{os.getpid()}" / "file.txt").read_text() == "newer"


def _copy_adapter(source, destination):
    destination.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (destination / name).write_bytes((source / name).read_bytes())
    return destination


def _edit_json(path, edit):
    description = json.loads((path / CONFIG_FILE).read_text())
    edit(description)
    (path / CONFIG_FILE).write_text(json.dumps(description))


def _flip_a_byte(path):
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0x40
    (path / WEIGHTS_FILE).write_bytes(bytes(data))


def _truncate(path):
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _rewrite_weights(path, edit):
    tensors = load_file(path / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS_FILE))
    from nola.adapter_io import file_sha256

    _edit_json(path, lambda d: d.update(weights_sha256=file_sha256(path / WEIGHTS_FILE)))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _edit_json(p, lambda d: d.update(generator_version="philox-v0")), "basis generator 'philox-v0' differs"),
        (_flip_a_byte, "corrupted or truncated"),
        (_truncate, "corrupted or truncated"),
        (lambda p: (p / WEIGHTS_FILE).unlink(), "adapter_model.safetensors is missing"),
        (lambda p: (p / CONFIG_FILE).write_text("{ not json"), "not valid JSON"),
        (lambda p: _edit_json(p, lambda d: d["adapter"].update(ranks=4)), "unknown adapter key 'ranks'"),
        (lambda p: _edit_json(p, lambda d: d["adapter"].update(rank=0)), "adapter.rank"),
        (lambda p: _rewrite_weights(p, lambda t: t.pop("model.layers.1.mlp.up_proj.coefficients_b")), "up_proj.coefficients_b is missing"),
        (lambda p: _rewrite_weights(p, lambda t: t.update({"model.layers.0.mlp.up_proj.coefficients_a": torch.zeros(3)})), "has shape (3,)"),
    ],
)
def test_damaged_adapters_fail_with_one_line_naming_the_problem(saved, tmp_path, damage, message):
    _, path = saved
    broken = _copy_adapter(path, tmp_path / "broken")
    damage(broken)
    model = tiny_llama()
    with pytest.raises(nola.NolaError) as error:
        nola.load_adapter(model, broken)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not list(nola.adapted_modules(model)), "a failed load must leave the model untouched"


def test_adapter_for_another_base_model_is_refused(saved):
    _, path = saved
    with pytest.raises(nola.NolaError, match=r"another base model \(model.layers.0.self_attn.q_proj is 40x40"):
        nola.load_adapter(tiny_llama(hidden_size=40), path)
    with pytest.raises(nola.NolaError, match="another base model .module model.layers.2"):
        nola.load_adapter(tiny_llama(num_hidden_layers=3), path)
    with pytest.raises(nola.NolaError, match=r"another base model \(its model.embed_tokens.weight values differ"):
        nola.load_adapter(tiny_llama(init_seed=1), path)  # same shapes, other weights
    nola.load_adapter(tiny_llama(dtype=torch.bfloat16), path)  # the same weights in lower precision pass
    with pytest.raises(nola.NolaError, match="not a nola adapter directory"):
        nola.load_adapter(tiny_llama(), path.parent / "nowhere")
