"""Checkpoints: complete or absent, verified by manifest, rotated, and restoring every piece of training state."""

from __future__ import annotations

import warnings

import pytest
import torch

import nola
from nola.checkpoint import (
    gather_training_state,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from tests.conftest import tiny_llama

IDS = torch.tensor([[1, 4, 9, 16, 25, 36, 49, 64]])


def training_setup(quant_bits=None):
    model = nola.attach(tiny_llama(), nola.AdapterConfig(rank=2, num_basis=16, quant_bits=quant_bits))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def step(model, optimizer, scheduler):
    model(IDS, labels=IDS).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("quant_bits", [None, 4])
def test_restore_continues_exactly(tmp_path, quant_bits):
    model, optimizer, scheduler = training_setup(quant_bits)
    for _ in range(2):
        step(model, optimizer, scheduler)
    save_checkpoint(tmp_path / "step-2", model, gather_training_state(model, optimizer), scheduler, {"step": 2})
    for _ in range(2):
        step(model, optimizer, scheduler)
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh, fresh_optimizer, fresh_scheduler = training_setup(quant_bits)
    state = load_checkpoint(tmp_path / "step-2", fresh, fresh_optimizer, fresh_scheduler)
    assert state["step"] == 2 and fresh_scheduler.last_epoch == 2
    for _ in range(2):
        step(fresh, fresh_optimizer, fresh_scheduler)
    for name, parameter in fresh.named_parameters():
        if parameter.requires_grad:
            assert torch.equal(parameter, expected[name]), name


def test_corrupted_latest_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    model, optimizer, scheduler = training_setup()
    for number in (1, 2, 3):
        step(model, optimizer, scheduler)
        save_checkpoint(tmp_path / f"step-{number}", model, gather_training_state(model, optimizer), scheduler,
                        {"step": number})
    (tmp_path / ".step-4.tmp-123").mkdir()  # what a crash mid-write leaves: ignored
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1", "step-2", "step-3"]
    data = bytearray((tmp_path / "step-3" / "optimizer.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "step-3" / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(nola.NolaError, match="optimizer.safetensors is missing or corrupted"):
        verify_checkpoint(tmp_path / "step-3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert latest_valid_checkpoint(tmp_path) == tmp_path / "step-2"
    assert any("step-3" in str(w.message) for w in caught)
    rotate_checkpoints(tmp_path, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-3"]


def test_checkpoint_holds_no_pickles_and_no_bases(tmp_path):
    model, optimizer, scheduler = training_setup()
    step(model, optimizer, scheduler)
    save_checkpoint(tmp_path / "step-1", model, gather_training_state(model, optimizer), scheduler, {"step": 1})
    suffixes = {p.suffix for p in (tmp_path / "step-1").rglob("*") if p.is_file()}
    assert suffixes == {".json", ".safetensors"}
    total = sum(p.stat().st_size for p in (tmp_path / "step-1").rglob("*") if p.is_file())
    assert total < 64 * 1024  # coefficients and Adam moments only: no A0, no basis
