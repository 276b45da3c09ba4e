"""TRL's SFTTrainer trains NOLA through `peft_config=NolaConfig(...)`: the real tiny LLaMA loaded as the 7b recipe
loads its base (nf4, double quant, bf16 compute), the Alpaca subset, bf16 autocast, gradient checkpointing and
gradient accumulation, as a TRL user would run it.

The guarded defect: TRL casts every trainable parameter of a quantised model to bf16 (peft #2889). bf16 coefficients
round a small update away; NOLA's layer must end with float32 coefficients whatever TRL did."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl", reason="nola[peft] extra not installed")

from nola.data import format_prompt, load_records  # noqa: E402
from nola.peft import NolaConfig, NolaLayer  # noqa: E402
from nola.training.config import load_recipe  # noqa: E402
from tests.conftest import REPO_ROOT, shared_data  # noqa: E402
from tests.test_peft import tiny_4bit_loader  # noqa: E402

STEPS = 36


def alpaca_dataset(count: int):
    from datasets import Dataset

    records = load_records(shared_data("alpaca/alpaca_subset.json"))[:count]
    return Dataset.from_list([{"prompt": format_prompt(r), "completion": r["output"]} for r in records])


@pytest.mark.slow
def test_sft_trainer_trains_nola_on_the_4bit_tiny_llama_with_float32_coefficients(tmp_path):
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    adapter = load_recipe(REPO_ROOT / "recipes" / "7b.yaml", ["adapter.num_basis=64"]).adapter_config()
    model = tiny_4bit_loader()()
    tokenizer = AutoTokenizer.from_pretrained(shared_data("stories260K-hf"))
    tokenizer.pad_token = tokenizer.unk_token
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=STEPS, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, gradient_checkpointing=True, learning_rate=2e-2,
                     lr_scheduler_type="constant", bf16=True, use_cpu=True, logging_steps=1, save_strategy="no",
                     report_to="none", max_length=128, seed=0, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, peft_config=NolaConfig.from_adapter(adapter),
                         train_dataset=alpaca_dataset(STEPS * 8), processing_class=tokenizer)
    layers = [m for m in trainer.model.modules() if isinstance(m, NolaLayer)]
    assert len(layers) == 5 * 7  # every projection of the tiny LLaMA's five layers
    # TRL has cast the trainable parameters of the quantised model to bf16 by now: the coefficients ignored it
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}

    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < first - 0.05, (first, last)
    trained = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    assert all(bool(p.detach().abs().sum() > 0) for p in trained.values())
    states = [value for state in trainer.optimizer.state.values() for value in state.values()
              if torch.is_tensor(value) and value.dim() > 0]
    assert states and all(value.dtype == torch.float32 for value in states)
    assert trainer.model.base_model.model.is_gradient_checkpointing
