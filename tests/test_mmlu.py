"""MMLU scoring: QLoRA-format files and hub-schema k-shot prompts, letter tokens, and padding-independent picks."""

from __future__ import annotations

import json
import threading
from collections import Counter
from fractions import Fraction

import pytest
import torch

import nola.mmlu
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
    right = mmlu_accuracy(model, tokenizer, relabelled, 4, 512)
    assert (right["mmlu_accuracy"], right["mmlu_micro_accuracy"], right["mmlu_examples"]) == (1.0, 1.0, 20)
    wrong = [{**e, "output": LETTERS[(LETTERS.index(p) + 1) % 4]} for e, p in zip(examples, predicted)]
    result = mmlu_accuracy(model, tokenizer, wrong, 4, 512)
    assert result["mmlu_accuracy"] == 0.0 and result["mmlu_micro_accuracy"] == 0.0


# --- macro (the paper's number) against micro, with a scorer whose picks are known ---------------------------------


def fake_scorer(monkeypatch, picks: dict[str, str], calls: list | None = None):
    """predict_letters replaced by a lookup: the prompt's letter in `picks` (each call's prompts go to `calls`)."""

    def predict(model, tokenizer, prompts, batch_size, max_length, interrupt=None):
        if calls is not None:
            calls.append(list(prompts))
        return [picks[prompt] for prompt in prompts]

    monkeypatch.setattr(nola.mmlu, "predict_letters", predict)


def unequal_subjects() -> tuple[list[dict], dict[str, str]]:
    """Three subjects of 6, 3 and 1 questions, interleaved, with a known pick for each prompt."""
    layout = {"law": [True, True, True, True, True, False],  # 5/6 right
              "virology": [False, False, True],  # 1/3 right
              "anatomy": [False]}  # 0/1 right
    examples, picks = [], {}
    for subject, right in layout.items():
        for i, correct in enumerate(right):
            answer = LETTERS[i % 4]
            prompt = f"{subject} question {i}\nAnswer:"
            examples.append({"subject": subject, "input": prompt, "output": answer})
            picks[prompt] = answer if correct else LETTERS[(i + 1) % 4]
    examples = examples[::2] + examples[1::2]  # subjects not contiguous: the rank split must not rely on order
    return examples, picks


def expected(examples: list[dict], picks: dict[str, str]) -> tuple[Fraction, Fraction, dict]:
    """Macro, micro and per-subject accuracies computed exactly from the data."""
    right, total = Counter(), Counter()
    for e in examples:
        subject = e.get("subject") or "all"
        total[subject] += 1
        right[subject] += picks[e["input"]] == e["output"]
    per_subject = {s: Fraction(right[s], total[s]) for s in total}
    macro = sum(per_subject.values()) / len(per_subject)
    micro = Fraction(sum(right.values()), sum(total.values()))
    return macro, micro, {s: {"accuracy": float(a), "n": total[s]} for s, a in per_subject.items()}


def test_macro_is_the_mean_of_subject_accuracies_and_micro_the_mean_over_questions(monkeypatch):
    examples, picks = unequal_subjects()
    fake_scorer(monkeypatch, picks)
    result = mmlu_accuracy(None, None, examples, 4, 512)
    macro, micro, per_subject = expected(examples, picks)
    assert macro != micro  # (5/6 + 1/3 + 0) / 3 = 7/18 against 6/10: the test can tell them apart
    assert result["mmlu_accuracy"] == pytest.approx(float(macro), rel=1e-12)
    assert result["mmlu_micro_accuracy"] == pytest.approx(float(micro), rel=1e-12)
    assert result["mmlu_examples"] == len(examples) == 10
    assert result["mmlu_subjects"] == per_subject
    assert list(result["mmlu_subjects"]) == sorted(per_subject)
    assert set(result) == {"mmlu_accuracy", "mmlu_micro_accuracy", "mmlu_examples", "mmlu_subjects"}
    json.dumps(result)  # plain floats and ints: ready for run.json and metrics.jsonl


def test_a_file_without_subjects_is_one_subject_all(monkeypatch, tmp_path):
    examples, picks = unequal_subjects()
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps({"input": e["input"], "output": e["output"]}) + "\n" for e in examples))
    loaded = load_mmlu(str(path), shots=5)
    assert {e["subject"] for e in loaded} == {"all"}
    fake_scorer(monkeypatch, picks)
    result = mmlu_accuracy(None, None, loaded, 4, 512)
    _, micro, _ = expected(examples, picks)
    assert result["mmlu_accuracy"] == result["mmlu_micro_accuracy"] == pytest.approx(float(micro), rel=1e-12)
    assert result["mmlu_subjects"] == {"all": {"accuracy": result["mmlu_micro_accuracy"], "n": len(examples)}}
    # Examples handed in directly without the key count under "all" too.
    bare = [{"input": e["input"], "output": e["output"]} for e in examples]
    assert mmlu_accuracy(None, None, bare, 4, 512) == result


class TwoRankAccelerator:
    """A stand-in for accelerate's Accelerator on one of `world` ranks run as threads: reduce(sum) is a collective
    that waits for every rank's tensor and hands each the sum."""

    def __init__(self, rank: int, world: int, board: dict, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")
        self.board, self.barrier = board, barrier

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        self.board[self.process_index] = tensor.clone()
        self.barrier.wait(timeout=30)
        total = sum(self.board[r] for r in range(self.num_processes))
        self.barrier.wait(timeout=30)
        return total


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_sum_per_subject_counts(monkeypatch, world):
    examples, picks = unequal_subjects()
    calls = []
    fake_scorer(monkeypatch, picks, calls)
    single = mmlu_accuracy(None, None, examples, 4, 512)
    calls.clear()
    board, barrier, results = {}, threading.Barrier(world), [None] * world

    def rank(r: int) -> None:
        results[r] = mmlu_accuracy(None, None, examples, 4, 512, TwoRankAccelerator(r, world, board, barrier))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(result == single for result in results)  # every rank: the single-process figures, exactly
    # Each rank scored its share (padded to the same length, the repeats uncounted), together every question once.
    assert len({len(prompts) for prompts in calls}) == 1 and len(calls) == world
    scored = [p for r, prompts in enumerate(calls) for p in prompts[: len(examples[r::world])]]
    assert sorted(scored) == sorted(e["input"] for e in examples)


def test_on_the_zero_shot_file_macro_weighs_subjects_equally(monkeypatch):
    """A model right on the 10 largest subjects (44% of the questions, 10 of 57 subjects) and on every 4th question
    elsewhere (about chance): micro about 0.59, macro about 0.39 (0.58 and 0.38 at exactly chance)."""
    examples = load_mmlu(str(shared_data("mmlu/zero_shot_mmlu_val.json")), shots=5)
    sizes = Counter(e["subject"] for e in examples)
    largest = {subject for subject, _ in sizes.most_common(10)}
    seen, picks = Counter(), {}
    for e in examples:
        seen[e["subject"]] += 1
        good = e["subject"] in largest or seen[e["subject"]] % 4 == 1
        picks[e["input"]] = e["output"] if good else LETTERS[(LETTERS.index(e["output"]) + 1) % 4]
    assert len(picks) == len(examples)  # prompts are unique, so the lookup is a faithful scorer
    fake_scorer(monkeypatch, picks)
    result = mmlu_accuracy(None, None, examples, 64, 512)
    macro, micro, per_subject = expected(examples, picks)
    assert result["mmlu_accuracy"] == pytest.approx(float(macro), rel=1e-12)
    assert result["mmlu_micro_accuracy"] == pytest.approx(float(micro), rel=1e-12)
    assert result["mmlu_subjects"] == per_subject and len(per_subject) == 57
    assert result["mmlu_micro_accuracy"] - result["mmlu_accuracy"] > 0.15  # the big subjects no longer dominate


@pytest.mark.slow
def test_the_stories_model_on_the_zero_shot_file_macro_and_micro(stories, monkeypatch):
    """A real model on every 5th question of the zero-shot file (all 57 subjects, at least one question each):
    the metrics agree with its own picks, counted exactly."""
    model, tokenizer = stories
    examples = load_mmlu(str(shared_data("mmlu/zero_shot_mmlu_val.json")), shots=5)[::5]
    picks = {}

    def spy(model, tokenizer, prompts, batch_size, max_length, interrupt=None):
        predicted = predict_letters(model, tokenizer, prompts, batch_size, max_length, interrupt)
        picks.update(zip(prompts, predicted))
        return predicted

    monkeypatch.setattr(nola.mmlu, "predict_letters", spy)
    result = mmlu_accuracy(model, tokenizer, examples, 16, 512)
    macro, micro, per_subject = expected(examples, picks)
    print(f"\nstories260K, zero-shot MMLU, {result['mmlu_examples']} questions: "
          f"macro {result['mmlu_accuracy']:.4f}, micro {result['mmlu_micro_accuracy']:.4f}")
    assert result["mmlu_examples"] == len(examples) == 307 and len(result["mmlu_subjects"]) == 57
    assert result["mmlu_accuracy"] == pytest.approx(float(macro), rel=1e-12)
    assert result["mmlu_micro_accuracy"] == pytest.approx(float(micro), rel=1e-12)
    assert result["mmlu_subjects"] == per_subject
