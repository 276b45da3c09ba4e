"""Chat data through the pipeline: train_llama.py on conversations (messages, LLaMA-2-chat's template, packed rows)
in the shipped recipe's configuration scaled down, the template recorded with the adapter, and generation
prompting the adapter the way it learned."""

from __future__ import annotations

import json

import pytest

from nola.adapter_io import read_adapter
from nola.data import load_records
from nola.data.conversations import generation_prompt
from nola.inference import trained_prompt_template
from tests.conftest import REPO_ROOT, metrics, run_script, run_train, shared_data

CHAT = ["recipes/7b_chat.yaml", "model.name_or_path=embedded:tiny-llama", "model.config_json=null",
        "train.max_steps=6", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.eval_steps=6",
        "train.save_steps=6", "train.logging_steps=1", "data.max_seq_len=256", "data.validation_size=8",
        "log.wandb_mode=disabled", "train.lr=0.05", "train.eval_max_batches=2"]


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    """Alpaca records chained into conversations of two exchanges, with a system prompt."""
    records = load_records(shared_data("alpaca/alpaca_subset.json"))[:120]
    path = tmp_path_factory.mktemp("chat") / "conversations.jsonl"
    with open(path, "w") as handle:
        for first, second in zip(records[::2], records[1::2]):
            turns = [{"role": "system", "content": "Answer briefly."}]
            for record in (first, second):
                turns += [{"role": "user", "content": record["instruction"]},
                          {"role": "assistant", "content": record["output"]}]
            handle.write(json.dumps({"messages": turns}) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_run(cache_dir, conversations, tmp_path_factory):
    output = tmp_path_factory.mktemp("chat-run")
    completed = run_train(cache_dir, *CHAT, f"data.path={conversations}", f"train.output_dir={output}")
    return output, completed


@pytest.mark.slow
def test_the_chat_recipe_trains_packed_conversations(chat_run):
    output, completed = chat_run
    facts = json.loads(next(line for line in completed.stdout.splitlines() if line.startswith('{"parameters"')))
    assert facts["data_format"] == "messages" and facts["template"] == "llama2" and facts["packed_length"] == 256
    assert facts["mixed_precision"] == "bf16" and facts["dropped_records"] == 0
    losses = [m["loss"] for m in metrics(output) if "loss" in m]
    assert len(losses) == 6 and all(loss == loss and loss > 0 for loss in losses)  # finite, trained
    assert trained_prompt_template(read_adapter(output / "adapter")) == "llama2"


@pytest.mark.slow
def test_generation_prompts_an_adapter_as_it_was_trained(cache_dir, chat_run):
    from transformers import AutoTokenizer

    output, _ = chat_run
    tokenizer = AutoTokenizer.from_pretrained(shared_data("llama2-tokenizer"))
    assert tokenizer.decode(generation_prompt(tokenizer, "llama2", "Name a colour.")) == (
        "<s> [INST] Name a colour. [/INST]")
    assert generation_prompt(tokenizer, "alpaca", "Name a colour.").endswith("### Response:\n")
    completed = run_script(cache_dir, "scripts/generate.py", "--base", "embedded:tiny-llama", "--adapter",
                           str(output / "adapter"), "--prompt", "Name a colour.", "--max-new-tokens", "4")
    assert json.loads(completed.stdout.strip().splitlines()[-1])["instruction"] == "Name a colour."


@pytest.mark.slow
def test_a_record_the_template_cannot_render_stops_the_run_in_one_line(cache_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in [good] * 20 + [bad]))
    completed = run_train(cache_dir, *CHAT, f"data.path={path}", f"train.output_dir={tmp_path / 'out'}", check=False)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1].startswith(
        f"error: {path}: record 21: data.template llama2 needs turns alternating user, assistant")
    assert not (tmp_path / "out").exists()


def test_the_chat_recipe_dry_runs_with_the_papers_count():
    from nola.training.config import load_recipe
    from nola.training.dry_run import dry_run

    report = dry_run(load_recipe(REPO_ROOT / "recipes" / "7b_chat.yaml"))
    assert report["trainable_params"] == 57_344 and report["sequence_length"] == 2048


@pytest.mark.parametrize("overrides, message", [
    (["data.format=text", "data.template=llama2"], "data.template: llama2 does not render text records (use none)"),
    (["data.format=messages", "data.template=alpaca"], "data.template: alpaca does not render messages records"),
    (["data.format=alpaca", "data.template=null", "data.max_seq_len=512"],
     "data.max_seq_len: packed rows of 512 tokens cannot hold Alpaca examples of up to source_max_len + "
     "target_max_len = 896"),
    (["train.answer_accuracy=5"], "train.answer_accuracy scores Alpaca answers"),
])
def test_data_settings_that_do_not_go_together_are_one_line(overrides, message):
    from nola.errors import NolaError
    from nola.training.config import load_recipe

    with pytest.raises(NolaError) as error:
        load_recipe(REPO_ROOT / "recipes" / "7b_chat.yaml", overrides)
    assert message in str(error.value) and "\n" not in str(error.value)
