"""Answer accuracy: strict exact match of greedy responses, overall and per task family, with numbers that follow
from the data; and a task-family classifier that covers every family the embedded set produces."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from torch import nn

from nola import embedded
from nola.answer_accuracy import answer_accuracy, format_answer_accuracy, record_from_prompt, score
from nola.data import format_prompt
from nola.errors import NolaError
from nola.inference import greedy_responses, sample_generations

from tests.conftest import tiny_llama

EOS, PAD = 2, 0


class WordTokenizer:
    """One id per whitespace-separated word (ids from 3 on); 1 is BOS, 2 EOS, 0 padding."""

    eos_token_id, pad_token_id, bos_token_id = EOS, PAD, 1

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id] + [self.ids.setdefault(word, len(self.ids) + 3) for word in text.split(" ")]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        words = {i: w for w, i in self.ids.items()}
        special = {PAD: "<pad>", 1: "<s>", EOS: "</s>"}
        return " ".join(words[i] if i in words else ("" if skip_special_tokens else special[i]) for i in ids
                        if not (skip_special_tokens and i in special))


class ScriptedModel(nn.Module):
    """A stand-in whose greedy continuation of each prompt is scripted (ids after the prompt, EOS included where
    the model "ends"); it checks it was left-padded and pads finished rows, as `generate` does."""

    def __init__(self, script: dict[tuple[int, ...], list[int]]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.script = script
        self.calls: list[int] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, eos_token_id, pad_token_id, **_):
        assert not do_sample and eos_token_id == EOS and pad_token_id == PAD
        self.calls.append(len(input_ids))
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            assert mask == sorted(mask), "prompts must be left-padded"
            prompt = tuple(i for i, m in zip(ids, mask) if m)
            rows.append(ids + self.script[prompt][:max_new_tokens])
        width = max(map(len, rows))
        return torch.tensor([row + [PAD] * (width - len(row)) for row in rows])


def make_case(tokenizer, records, answers, finish=None):
    """Examples as prepare_data makes them, and a model whose responses are `answers` (EOS-ended unless
    finish[i] is False); the scripted model knows a prompt by its ids, so the records' prompts must differ."""
    examples, script = [], {}
    for index, (record, answer) in enumerate(zip(records, answers)):
        prompt = tokenizer.encode(format_prompt(record))
        response = tokenizer.encode(record["output"])[1:] + [EOS]
        examples.append({"input_ids": prompt + response, "labels": [], "prompt_length": len(prompt)})
        ended = finish is None or finish[index]
        assert tuple(prompt) not in script, "two records with one prompt"
        script[tuple(prompt)] = tokenizer.encode(answer)[1:] + ([EOS] if ended else [])
    return examples, ScriptedModel(script)


RECORDS = [
    {"instruction": "What is the capital of Peru?", "input": "", "output": "The capital of Peru is Lima."},
    {"instruction": "What is the capital of Cuba?", "input": "", "output": "The capital of Cuba is Havana."},
    {"instruction": "Give the opposite of the word below.", "input": "high", "output": "The opposite of high is low."},
    {"instruction": "Give the opposite of the word below.", "input": "wet", "output": "The opposite of wet is dry."},
    {"instruction": "Give the opposite of the word below.", "input": "old", "output": "The opposite of old is new."},
    {"instruction": "Write these words in reverse order.", "input": "moon ship road", "output": "road ship moon"},
]
ANSWERS = [
    "The capital of Peru is Lima.",      # right
    "The capital of Cuba is Havana",     # no period: wrong (strict)
    "The opposite of big is small.",     # the wrong fact in the right form
    "The opposite of wet is dry.",       # right
    "the opposite of old is new.",       # case differs: wrong (strict)
    "road ship moon",                    # right
]


def test_exact_match_overall_and_per_family_from_the_records():
    tokenizer = WordTokenizer()
    examples, model = make_case(tokenizer, RECORDS, ANSWERS)
    model.train()
    result = answer_accuracy(model, tokenizer, examples, RECORDS, 16, family_of=embedded.task_family, batch_size=4)
    assert result["answer_accuracy"] == pytest.approx(3 / 6)
    assert (result["answer_examples"], result["answer_correct"], result["answer_unfinished"]) == (6, 3, 0)
    assert result["answer_families"] == {
        "capital": {"accuracy": 0.5, "n": 2, "correct": 1},
        "opposite": {"accuracy": pytest.approx(1 / 3), "n": 3, "correct": 1},
        "reverse": {"accuracy": 1.0, "n": 1, "correct": 1},
    }
    assert model.training  # the mode it found is given back
    assert sorted(model.calls) == [2, 4]  # batches of at most batch_size
    assert format_answer_accuracy(result) == ("answer accuracy 3/6 (50.0%, exact match); "
                                              "capital 1/2, opposite 1/3, reverse 1/1")


def test_without_records_references_and_families_are_read_back_from_the_examples():
    tokenizer = WordTokenizer()
    examples, model = make_case(tokenizer, RECORDS, ANSWERS)
    with_records = answer_accuracy(model, tokenizer, examples, RECORDS, 16, family_of=embedded.task_family)
    without = answer_accuracy(model, tokenizer, examples, None, 16, family_of=embedded.task_family,
                              return_samples=True)
    assert {k: v for k, v in without.items() if k != "answer_samples"} == with_records
    assert [s["correct"] for s in without["answer_samples"]] == [True, False, False, True, False, True]
    assert without["answer_samples"][2]["generated"] == "The opposite of big is small."
    assert without["answer_samples"][2]["input"] == "high"
    assert answer_accuracy(model, tokenizer, examples, RECORDS, 16)["answer_families"] == {}


def test_an_answer_that_never_ends_is_wrong_even_when_its_text_matches():
    tokenizer = WordTokenizer()
    records = RECORDS[:2]
    examples, model = make_case(tokenizer, records, [r["output"] for r in records], finish=[True, False])
    result = answer_accuracy(model, tokenizer, examples, records, 16)
    assert (result["answer_correct"], result["answer_unfinished"]) == (1, 1)
    # Cut by max_new_tokens before its EOS: unfinished, so wrong.
    result = answer_accuracy(model, tokenizer, examples[:1], records[:1], 3)
    assert (result["answer_correct"], result["answer_unfinished"]) == (0, 1)


def test_score_arithmetic_and_edges():
    generated = [("a", True), (" b ", True), ("c", True), ("d", False)]
    result = score(generated, ["a", "b", "x", "d"], ["f", "g", "g", "f"])
    assert result["answer_accuracy"] == 0.5 and result["answer_unfinished"] == 1
    assert result["answer_families"] == {"f": {"accuracy": 0.5, "n": 2, "correct": 1},
                                         "g": {"accuracy": 0.5, "n": 2, "correct": 1}}
    assert math.isnan(score([], [])["answer_accuracy"])
    with pytest.raises(NolaError, match="line up"):
        score(generated, ["a"])
    with pytest.raises(NolaError, match="2 records for 6 examples"):
        tokenizer = WordTokenizer()
        examples, model = make_case(tokenizer, RECORDS, ANSWERS)
        answer_accuracy(model, tokenizer, examples, RECORDS[:2], 16)


def test_record_from_prompt_reads_both_templates():
    for record in (RECORDS[0], RECORDS[2]):
        assert record_from_prompt(format_prompt(record)) == {"instruction": record["instruction"],
                                                             "input": record["input"]}
    assert record_from_prompt("no template here") == {"instruction": "", "input": ""}


def test_batched_left_padded_greedy_matches_one_prompt_at_a_time():
    model = tiny_llama(vocab_size=64)
    model.generation_config.eos_token_id = None  # only ours

    class Ids:
        eos_token_id, pad_token_id = 5, 0

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(6, 64) for _ in range(rng.randint(2, 9))] for _ in range(7)]
    batched = greedy_responses(model, Ids(), prompts, 6, batch_size=4)
    single = [greedy_responses(model, Ids(), [prompt], 6, batch_size=1)[0] for prompt in prompts]
    assert batched == single
    assert all("5" not in text.split() for text, _ in batched)  # cut at EOS
    assert any(finished for _, finished in batched) and not all(finished for _, finished in batched)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("training", [True, False])
def test_an_interrupted_greedy_pass_stops_between_batches_and_leaves_the_model_in_its_mode(training):
    """The one greedy decoder (answers and samples) calls `interrupt` before each batch; when it raises, no later
    batch is decoded and the model is back in the train/eval mode it was in."""
    model = tiny_llama(vocab_size=64).train(training)
    model.generation_config.eos_token_id = None

    class Ids:
        eos_token_id, pad_token_id = 5, 0

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        greedy_responses(model, Ids(), [[1, 7, 8], [1, 9], [1, 10, 11, 12]], 3, batch_size=2, interrupt=interrupt)
    assert len(calls) == 2 and model.training is training
    calls.clear()
    examples = [{"input_ids": [1, 7, 8, 20, 21], "prompt_length": 3}, {"input_ids": [1, 9, 30], "prompt_length": 2}]
    with pytest.raises(Interrupted):
        sample_generations(model, Ids(), examples, 2, 3, interrupt)
    assert len(calls) == 2 and model.training is training
    samples = sample_generations(model, Ids(), examples, 2, 3)
    assert [s["reference"] for s in samples] == ["20 21", "30"] and model.training is training
    assert [len(s["generated"].split()) for s in samples] == [3, 3]


def test_task_family_covers_every_family_the_embedded_set_produces():
    rng = random.Random(11)
    seen = Counter()
    for _ in range(400):
        family, record = embedded._family_instruction(rng)
        assert embedded.task_family(record) == family == embedded.task_family(record["instruction"])
        seen[family] += 1
    assert set(seen) == set(embedded.FAMILIES) and len(seen) == 6
    assert Counter(map(embedded.task_family, embedded.instruction_records())).keys() == seen.keys()
    assert embedded.task_family("Give three tips for staying healthy.") == "other"


def test_a_task_with_several_right_answers_accepts_any_of_them_exactly():
    records = [
        {"instruction": "Name two animals that are birds.", "input": "", "output": "A owl and a crow are both birds."},
        {"instruction": "Name two animals that are fish.", "input": "", "output": "A cod and a tuna are both fish."},
        {"instruction": "Name two animals that are mammals.", "input": "",
         "output": "A dog and a cat are both mammals."},
        {"instruction": "Name two animals that are reptiles.", "input": "",
         "output": "A snake and a gecko are both reptiles."},
        RECORDS[2],
    ]
    answers = ["A crow and a owl are both birds.",      # the other order: right
               "A carp and a salmon are both fish.",    # another pair: right
               "A cat and a cat are both mammals.",     # not two animals: wrong
               "A shark and a gecko are both reptiles.",  # a shark is no reptile: wrong
               "The opposite of high is low."]          # one right answer, given
    tokenizer = WordTokenizer()
    examples, model = make_case(tokenizer, records, answers)
    strict = answer_accuracy(model, tokenizer, examples, None, 16, family_of=embedded.task_family)
    assert strict["answer_correct"] == 1 and strict["answer_families"]["name_two"]["correct"] == 0
    lenient = answer_accuracy(model, tokenizer, examples, None, 16, family_of=embedded.task_family,
                              answers_of=embedded.correct_answers, return_samples=True)
    assert lenient["answer_families"]["name_two"] == {"accuracy": 0.5, "n": 4, "correct": 2}
    assert lenient["answer_correct"] == 3
    assert [s["correct"] for s in lenient["answer_samples"]] == [True, True, False, False, True]
    assert lenient["answer_samples"][0]["reference"] == records[0]["output"]


def test_correct_answers_are_one_but_for_name_two():
    rng = random.Random(2)
    for _ in range(300):
        family, record = embedded._family_instruction(rng)
        answers = embedded.correct_answers(record)
        assert answers[0] == record["output"]
        if family == "name_two":
            group = {"birds": "bird", "fish": "fish", "mammals": "mammal", "reptiles": "reptile"}[
                record["instruction"].split()[-1].rstrip(".")]
            members = sum(kind == group for kind in embedded.ANIMALS.values())
            assert len(answers) == len(set(answers)) == members * (members - 1)
        else:
            assert answers == [record["output"]]
