"""Chat data through the pipeline: train_llama.py on conversations (messages, LLaMA-2-chat's template, packed rows)
in the shipped recipe's configuration scaled down, the template recorded with the adapter, and generation
prompting the adapter the way it learned."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nola.adapter_io import read_adapter
from nola.data import IGNORE_INDEX, load_records, prepare_data
from nola.data.conversations import generation_prompt
from nola.inference import trained_prompt_template
from tests.conftest import REPO_ROOT, entry_point, metrics, run_train, shared_data

CHAT = ["recipes/7b_chat.yaml", "model.name_or_path=embedded:tiny-llama", "model.config_json=null",
        "train.max_steps=6", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.eval_steps=6",
        "train.save_steps=6", "train.logging_steps=1", "data.max_seq_len=256", "data.validation_size=8",
        "log.wandb_mode=disabled", "train.lr=0.05", "train.eval_max_batches=2"]


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    """Alpaca records chained into conversations of two exchanges, with a system prompt: short records, so that
    both exchanges fit the rows of 256 tokens (what is cut or dropped of longer ones is test_data_conversations')."""
    records = [r for r in load_records(shared_data("alpaca/alpaca_subset.json"))
               if len(r["instruction"]) + len(r["output"]) < 200][:120]
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
    assert len(losses) == 6 and all(loss == loss and loss > 0 for loss in losses)  # finite
    summary = json.loads((output / "run.json").read_text())
    assert summary["final_eval_loss"] < summary["first_eval_loss"], summary  # it learned the held-out answers
    assert trained_prompt_template(read_adapter(output / "adapter")) == "llama2"


def labelled_spans(example) -> list[list[int]]:
    """The runs of consecutive trained tokens (label != IGNORE_INDEX) of a tokenised example."""
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans, current = spans + [current], []
    return spans + [current] if current else spans


def test_the_chat_recipe_trains_on_every_assistant_turn_and_nothing_else(conversations, cache_dir, monkeypatch):
    """The recipe's data stage, as the run sets it up: each trained span is one assistant answer and its end of
    turn (or, at the end of a conversation cut at max_seq_len, the start of one), both answers of a conversation are
    trained, and no system or user token is."""
    from nola import embedded
    from nola.modeling import load_tokenizer
    from nola.training.config import load_recipe

    monkeypatch.setenv("NOLA_CACHE_DIR", str(cache_dir))
    config = load_recipe(REPO_ROOT / CHAT[0], [*CHAT[1:], f"data.path={conversations}"])
    section = dataclasses.replace(config.model, name_or_path=embedded.resolve(config.model.name_or_path))
    tokenizer = load_tokenizer(section, config.data.tokenizer)
    records = load_records(conversations, config.data.format)
    data = prepare_data(records, tokenizer, config.data.source_max_len, config.data.target_max_len,
                        config.data.validation_size, config.split_seed(), config.data.train_on_source,
                        config.data.format, config.data.template, config.data.sequence_length(), str(conversations))
    assert data.dropped == 0 and len(data.train) + len(data.validation) == len(records)
    answers = {turn["content"] for record in records for turn in record["messages"] if turn["role"] == "assistant"}
    cut = 0
    for example in data.train + data.validation:
        spans = labelled_spans(example)
        complete = [span for span in spans if span[-1] == tokenizer.eos_token_id]  # answer + end of turn trained
        assert all(tokenizer.decode(span[:-1]).strip() in answers for span in complete)  # nothing of a prompt
        if len(complete) < len(spans):  # only the last answer of a conversation cut at max_seq_len is partial
            assert complete == spans[:-1] and len(example["input_ids"]) == config.data.max_seq_len
            assert any(answer.startswith(tokenizer.decode(spans[-1]).strip()) for answer in answers)
            cut += 1
        else:
            assert len(spans) == 2, spans  # both answers of the conversation
    assert cut <= len(records) // 10  # the exact checks above are what most conversations went through


@pytest.mark.slow
def test_generation_prompts_an_adapter_as_it_was_trained(cache_dir, chat_run, capsys, monkeypatch):
    from transformers import AutoTokenizer

    output, _ = chat_run
    tokenizer = AutoTokenizer.from_pretrained(shared_data("llama2-tokenizer"))
    assert tokenizer.decode(generation_prompt(tokenizer, "llama2", "Name a colour.")) == (
        "<s> [INST] Name a colour. [/INST]")
    assert generation_prompt(tokenizer, "alpaca", "Name a colour.").endswith("### Response:\n")

    import nola.inference

    sent = []
    generate = nola.inference.generate
    monkeypatch.setattr(nola.inference, "generate", lambda model, tokenizer, prompts, *rest: sent.extend(
        [tokenizer, *prompts]) or generate(model, tokenizer, prompts, *rest))
    monkeypatch.setenv("NOLA_CACHE_DIR", str(cache_dir))
    code = entry_point("generate")(["--base", "embedded:tiny-llama", "--adapter", str(output / "adapter"),
                                    "--prompt", "Name a colour.", "--max-new-tokens", "4"])
    assert code == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["response"] is not None
    embedded_tokenizer, prompt = sent
    assert prompt == generation_prompt(embedded_tokenizer, "llama2", "Name a colour.")  # what it was trained on
    assert prompt != generation_prompt(embedded_tokenizer, "alpaca", "Name a colour.")  # not the default


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
