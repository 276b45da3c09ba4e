"""Checkpoints: complete or absent, verified by manifest, rotated, and restoring every piece of training state."""

from __future__ import annotations

import warnings

import pytest
import torch

import nola
import nola.adapter_io
from nola.training.checkpoint import (
    gather_training_state,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    remove_unfinished,
    rotate_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from tests.conftest import tiny_llama
from tests.test_adapter_io import Killed, _kill_at_second_rename

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


def save(directory, model, optimizer, scheduler, **trainer_state):
    save_checkpoint(directory, model, gather_training_state(model, optimizer), scheduler, {"step": 4, **trainer_state})


@pytest.mark.parametrize("start_up", ["auto-resume first", "clean-up first"])
def test_a_kill_while_replacing_a_checkpoint_leaves_one_that_the_next_start_recovers(tmp_path, monkeypatch,
                                                                                      start_up):
    """Without an atomic exchange, replacing step-4 moves it aside to .step-4.old-PID and renames the new copy in:
    a kill between the two leaves no step-4, and the next start must rename the old copy back, not delete it."""
    monkeypatch.setattr(nola.adapter_io, "_exchange", lambda first, second: False, raising=False)  # none here
    model, optimizer, scheduler = training_setup()
    step(model, optimizer, scheduler)
    save(tmp_path / "step-2", model, optimizer, scheduler, step=2)
    step(model, optimizer, scheduler)
    save(tmp_path / "step-4", model, optimizer, scheduler, copy="first")
    _kill_at_second_rename(monkeypatch)
    with pytest.raises(Killed):
        save(tmp_path / "step-4", model, optimizer, scheduler, copy="second")
    monkeypatch.undo()
    assert not (tmp_path / "step-4").exists() and list(tmp_path.glob(".step-4.old-*"))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if start_up == "auto-resume first":  # the trainer's order: resolve_resume, then the lock and clean-up
            assert latest_valid_checkpoint(tmp_path) == tmp_path / "step-4"
            remove_unfinished(tmp_path)
        else:
            remove_unfinished(tmp_path)
            assert latest_valid_checkpoint(tmp_path) == tmp_path / "step-4"
    assert any("recovered checkpoint" in str(w.message) for w in caught)
    verify_checkpoint(tmp_path / "step-4")
    assert read_trainer_state(tmp_path / "step-4")["copy"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-4"]
    fresh, fresh_optimizer, fresh_scheduler = training_setup()
    assert load_checkpoint(tmp_path / "step-4", fresh, fresh_optimizer, fresh_scheduler)["step"] == 4


def test_start_up_recovers_only_a_replaced_copy_that_verifies_and_whose_checkpoint_is_missing(tmp_path):
    model, optimizer, scheduler = training_setup()
    step(model, optimizer, scheduler)
    for name in ("step-2", ".step-2.old-7", ".step-4.old-123", ".step-5.old-9"):
        save(tmp_path / name, model, optimizer, scheduler, copy=name)
    broken = tmp_path / ".step-5.old-9" / "optimizer.safetensors"
    broken.write_bytes(broken.read_bytes()[:-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        remove_unfinished(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-4"]
    assert read_trainer_state(tmp_path / "step-2")["copy"] == "step-2"  # the existing one is kept
    assert read_trainer_state(tmp_path / "step-4")["copy"] == ".step-4.old-123"
    assert latest_valid_checkpoint(tmp_path) == tmp_path / "step-4"
