"""Policies of the training loop, in-process on toy models: what a skipped step does to an fp16 loss scaler, the
float32 guard on the adapter after the engine's set-up, and which model config the preflight trusts."""

from __future__ import annotations

import json

import pytest
import torch

from nola.errors import NolaError
from nola.modeling import ModelSection, load_model_config
from nola.training.distributed import check_trainable_dtypes
from nola.training.optim import skip_update
from tests.conftest import tiny_llama


def overflowing_step(model, optimizer, scaler) -> None:
    """A backward whose scaled gradients are infinite, then clipping's unscale_, as the trainer runs them."""
    loss = model(torch.ones(1, 4)).sum() * float("inf")
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)


def test_a_skipped_fp16_step_ends_the_scalers_step_and_backs_the_scale_off():
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = [p.detach().clone() for p in model.parameters()]
    overflowing_step(model, optimizer, scaler)
    skip_update(optimizer, scaler, unscaled=True)
    assert scaler.get_scale() == 2.0**15  # backed off: the next step can be finite
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    overflowing_step(model, optimizer, scaler)  # before the fix: "unscale_() has already been called"
    skip_update(optimizer, scaler, unscaled=True)
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(json.loads(json.dumps(scaler.state_dict())))  # as a checkpoint's JSON carries it
    assert restored.get_scale() == 2.0**14


def test_a_step_skipped_before_backward_leaves_the_scaler_alone():
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    skip_update(optimizer, scaler, unscaled=False)  # update() without an unscale_ would raise
    assert scaler.get_scale() == 8.0


def test_an_adapter_cast_by_the_engine_is_refused_in_one_line():
    import nola

    model = nola.attach(tiny_llama(), nola.AdapterConfig(method="nola", rank=2, num_basis=8))
    check_trainable_dtypes(model)
    model.bfloat16()  # what DeepSpeed's bf16 mode does to every float parameter
    with pytest.raises(NolaError, match=r"coefficients_a is bfloat16 after the engine's set-up"):
        check_trainable_dtypes(model)


def test_the_checkpoints_own_config_wins_over_config_json(tmp_path):
    """config_json is the offline fallback for --dry-run; with the checkpoint at hand its shapes are the truth."""
    tiny_llama(hidden_size=48).save_pretrained(tmp_path / "base")
    elsewhere = tmp_path / "other.json"
    elsewhere.write_text(json.dumps({"hidden_size": 4096, "num_hidden_layers": 2}))
    config = load_model_config(ModelSection(name_or_path=str(tmp_path / "base"), config_json=str(elsewhere)))
    assert config.hidden_size == 48
    offline = load_model_config(ModelSection(name_or_path="meta-llama/Llama-2-7b-hf", config_json=str(elsewhere)))
    assert offline.hidden_size == 4096


def test_a_run_held_by_its_failpoint_waits_for_a_stop_request_and_only_at_its_step(monkeypatch):
    """The hold-after failpoint (SLURM and signal tests preempt a run there, whatever the machine's speed)."""
    from nola.training.failpoints import hold_if_armed

    monkeypatch.setenv("NOLA_FAILPOINT", "hold-after@3")
    asked = []

    def stop_requested() -> bool:
        asked.append(True)
        return len(asked) >= 3

    hold_if_armed("hold-after", 2, stop_requested)
    assert not asked  # another step: no wait
    hold_if_armed("hold-after", 3, stop_requested)
    assert len(asked) == 3  # waited until the third look found the stop request
