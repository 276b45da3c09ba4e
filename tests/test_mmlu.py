"""MMLU scoring: QLoRA-format files and hub-schema k-shot prompts, letter tokens, and padding-independent picks."""

from __future__ import annotations


import pytest
import torch

from nola.errors import NolaError
from nola.mmlu import LETTERS, few_shot_examples, letter_token_ids, load_mmlu, mmlu_accuracy, predict_letters
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = shared_data("stories260K-hf")
    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def test_the_qlora_zero_shot_file_loads_whole():
    examples = load_mmlu(str(shared_data("mmlu/zero_shot_mmlu_val.json")), shots=5)
    assert len(examples) == 1531 and len({e["subject"] for e in examples}) == 57
    assert all(e["input"].endswith("Answer:") and e["output"] in LETTERS for e in examples)


def test_few_shot_prompts_use_the_subjects_dev_questions_with_answers():
    dev = [{"subject": s, "question": f"{s} dev {i}?", "choices": ["w", "x", "y", "z"], "answer": i % 4}
           for s in ("anatomy", "virology") for i in range(5)]
    rows = [{"subject": "virology", "question": "Which?", "choices": ["1", "2", "3", "4"], "answer": 2}]
    (example,) = few_shot_examples(dev, rows, shots=3)
    assert example["output"] == "C"
    assert example["input"].startswith("The following are multiple choice questions (with answers) about  virology.")
    assert example["input"].count("Answer:") == 4 and "anatomy" not in example["input"]
    assert "virology dev 2?\nA. w\nB. x\nC. y\nD. z\nAnswer: C\n\n" in example["input"]
    assert example["input"].endswith("Which?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")


@pytest.mark.parametrize(
    "content, message",
    [('{"input": "q", "output": "E"}\n', "line 1: 'output' must be one of A, B, C, D"),
     ('[{"input": "q", "output": "A"}, {"output": "B"}]', "record 2: expected an object with 'input' and 'output'"),
     ("{oops\n", "line 1: not valid JSON")],
)
def test_bad_mmlu_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "mmlu.json"
    path.write_text(content)
    with pytest.raises(NolaError, match=message):
        load_mmlu(str(path), shots=5)


def test_letter_tokens_are_what_follows_answer(stories):
    _, tokenizer = stories
    ids = letter_token_ids(tokenizer)
    assert len(set(ids)) == 4
    for letter, token in zip(LETTERS, ids):
        assert tokenizer(f"Answer: {letter}", add_special_tokens=False)["input_ids"][-1] == token


def test_batched_predictions_equal_one_prompt_at_a_time(stories):
    model, tokenizer = stories
    examples = load_mmlu(str(shared_data("mmlu/zero_shot_mmlu_val.json")), shots=5)[::97]
    prompts = [e["input"] for e in examples]
    single = predict_letters(model, tokenizer, prompts, batch_size=1, max_length=512)
    batched = predict_letters(model, tokenizer, prompts, batch_size=7, max_length=512)
    assert single == batched
    # The pick is the argmax over the four letters' logits at the prompt's last token.
    ids = tokenizer(prompts[0], return_tensors="pt").input_ids[:, -512:]
    with torch.no_grad():
        logits = model(ids).logits[0, -1, letter_token_ids(tokenizer)]
    assert single[0] == LETTERS[int(logits.argmax())]


def test_accuracy_counts_agreement_with_the_answers(stories):
    model, tokenizer = stories
    examples = load_mmlu(str(shared_data("mmlu/zero_shot_mmlu_val.json")), shots=5)[:20]
    predicted = predict_letters(model, tokenizer, [e["input"] for e in examples], 4, 512)
    relabelled = [{**e, "output": p} for e, p in zip(examples, predicted)]
    assert mmlu_accuracy(model, tokenizer, relabelled, 4, 512) == {"mmlu_accuracy": 1.0, "mmlu_examples": 20}
    wrong = [{**e, "output": LETTERS[(LETTERS.index(p) + 1) % 4]} for e, p in zip(examples, predicted)]
    assert mmlu_accuracy(model, tokenizer, wrong, 4, 512)["mmlu_accuracy"] == 0.0
