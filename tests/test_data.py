"""Alpaca data: loading with precise errors, the prompt template, response-only labels, the seeded split and the
rank-disjoint batch schedule."""

from __future__ import annotations

import json
import random

import pytest
import torch

from nola.data import (
    IGNORE_INDEX,
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    batch_schedule,
    collate,
    format_prompt,
    load_records,
    prepare_data,
    tokenize_records,
)
from nola.errors import NolaError
from tests.conftest import shared_data

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
]


@pytest.fixture(scope="module")
def llama_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_data("llama2-tokenizer"))


@pytest.fixture(scope="module")
def alpaca():
    return load_records(shared_data("alpaca/alpaca_subset.json"))


def test_prompt_template_depends_on_input():
    assert format_prompt(RECORDS[0]) == PROMPT_NO_INPUT.format(instruction="Name a colour.")
    assert format_prompt(RECORDS[1]) == PROMPT_WITH_INPUT.format(instruction="Translate to French.", input="cat")
    assert format_prompt({**RECORDS[1], "input": "  "}) == PROMPT_NO_INPUT.format(instruction="Translate to French.")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_every_file_format_loads_the_same_records(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(RECORDS))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(RECORDS), path)
    assert load_records(path) == RECORDS


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.json", '[{"instruction": "a", "output": "b"},\n  {"instruction": }]', "bad.json: line 2: not valid JSON"),
        ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', "bad.jsonl: line 2: missing key 'output'"),
        ("bad2.json", '[{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "b"}]',
         "bad2.json: record 2: 'instruction' must be a string"),
        ("dict.json", '{"instruction": "a"}', "expected a JSON list of records"),
        ("empty.json", "[]", "holds no records"),
        ("data.csv", "a,b\n", "unsupported data file type '.csv'"),
    ],
)
def test_bad_data_files_are_named_with_their_line_or_record(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(NolaError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_records(tmp_path / name)


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "empty"])
def test_a_damaged_parquet_file_is_one_line_naming_it(tmp_path, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS * 50), path)
    whole = path.read_bytes()
    path.write_bytes({"random bytes": random.Random(0).randbytes(500), "truncated": whole[: len(whole) // 2],
                      "empty": b""}[damage])
    with pytest.raises(NolaError) as error:
        load_records(path)
    message = str(error.value)
    assert message.startswith(f"{path}: not a readable Parquet file (") and "\n" not in message
    assert message.count(str(path)) == 1  # pyarrow's own mention of the path is not repeated


@pytest.mark.parametrize("suffix, line", [(".json", 3), (".jsonl", 2)])
def test_a_data_file_not_in_utf8_names_its_line_and_byte(tmp_path, suffix, line):
    path = tmp_path / f"latin1{suffix}"
    good, bad = {"instruction": "a", "output": "b"}, {"instruction": "café", "output": "b"}
    text = ("[" + ",\n ".join(json.dumps(r, ensure_ascii=False) for r in (good, good, bad)) + "]" if suffix == ".json"
            else "\n".join(json.dumps(r, ensure_ascii=False) for r in (good, bad)) + "\n")
    path.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(NolaError) as error:
        load_records(path)
    assert str(error.value) == (f"{path}: line {line}: not UTF-8 text (byte 0xe9 at offset {offset}); "
                                f"save the file as UTF-8")


def test_a_missing_local_file_is_not_mistaken_for_a_hub_name(tmp_path):
    with pytest.raises(NolaError, match="no such data file"):
        load_records(tmp_path / "missing.json")


def test_labels_cover_exactly_the_response_and_eos(llama_tokenizer, alpaca):
    records = alpaca[:200]
    examples = tokenize_records(records, llama_tokenizer, 4096, 4096, train_on_source=False)
    for record, example in zip(records, examples):
        ids, labels = example["input_ids"], example["labels"]
        assert ids[0] == llama_tokenizer.bos_token_id and ids[-1] == llama_tokenizer.eos_token_id
        boundary = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert all(label == IGNORE_INDEX for label in labels[:boundary])
        assert labels[boundary:] == ids[boundary:]
        # The prompt and response were tokenised as one text: decoding gives it back with no doubled space.
        assert llama_tokenizer.decode(ids, skip_special_tokens=True) == format_prompt(record) + record["output"]
        assert llama_tokenizer.decode(ids[boundary:], skip_special_tokens=True).strip() == record["output"].strip()


def test_long_prompts_keep_their_response_header_and_long_responses_lose_eos(llama_tokenizer, alpaca):
    record = max(alpaca, key=lambda r: len(format_prompt(r)))
    (example,) = tokenize_records([record], llama_tokenizer, 48, 5, train_on_source=False)
    prompt_length = example["labels"].count(IGNORE_INDEX)
    assert prompt_length == 48 and len(example["input_ids"]) == 48 + 5
    prompt = llama_tokenizer.decode(example["input_ids"][:prompt_length], skip_special_tokens=True)
    assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n")
    assert llama_tokenizer.eos_token_id not in example["input_ids"]


def test_train_on_source_labels_every_token(llama_tokenizer):
    (example,) = tokenize_records(RECORDS[:1], llama_tokenizer, 256, 256, train_on_source=True)
    assert example["labels"] == example["input_ids"]


def test_empty_responses_are_dropped_and_counted(llama_tokenizer):
    records = RECORDS + [{"instruction": "Say nothing.", "input": "", "output": ""}]
    data = prepare_data(records, llama_tokenizer, 256, 256, validation_size=0, seed=0)
    assert len(data.train) == 2 and data.dropped == 1


def test_split_is_seeded_disjoint_and_ignores_the_global_rng(llama_tokenizer, alpaca):
    records = alpaca[:300]
    torch.manual_seed(1)
    random.seed(1)
    first = prepare_data(records, llama_tokenizer, 128, 64, validation_size=0.1, seed=7)
    torch.manual_seed(2)
    random.seed(2)
    again = prepare_data(records, llama_tokenizer, 128, 64, validation_size=0.1, seed=7)
    other_seed = prepare_data(records, llama_tokenizer, 128, 64, validation_size=30, seed=8)
    assert len(first.validation) == 30 and len(first.train) == 270
    assert first.validation == again.validation and first.train == again.train
    assert first.validation != other_seed.validation
    as_keys = {tuple(e["input_ids"]) for e in first.validation}
    assert not as_keys & {tuple(e["input_ids"]) for e in first.train}


def test_validation_that_leaves_nothing_to_train_on_is_refused(llama_tokenizer):
    with pytest.raises(NolaError, match="data.validation_size"):
        prepare_data(RECORDS, llama_tokenizer, 64, 64, validation_size=2, seed=0)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_ranks_get_disjoint_equal_shares_of_each_step(group_by_length):
    lengths = [random.Random(i).randint(10, 300) for i in range(103)]
    per_rank = [batch_schedule(lengths, 2, 2, seed=3, epoch=0, group_by_length=group_by_length, num_replicas=3,
                               rank=r) for r in range(3)]
    assert [len(s) for s in per_rank] == [103 // 12] * 3
    assert all(len(step) == 2 and all(len(mb) == 2 for mb in step) for schedule in per_rank for step in schedule)
    seen = [i for schedule in per_rank for step in schedule for mb in step for i in mb]
    assert len(seen) == len(set(seen)) == 103 // 12 * 12
    assert batch_schedule(lengths, 2, 2, 3, 0, group_by_length, 3, 1) == per_rank[1]
    assert batch_schedule(lengths, 2, 2, 3, 1, group_by_length, 3, 1) != per_rank[1]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_a_step_holds_the_same_examples_however_the_global_batch_is_split(group_by_length):
    lengths = [random.Random(i).randint(10, 300) for i in range(500)]

    def steps(micro_batch_size, grad_accum_steps, num_replicas):
        ranks = [batch_schedule(lengths, micro_batch_size, grad_accum_steps, 0, 0, group_by_length, num_replicas, r)
                 for r in range(num_replicas)]
        return [sorted(i for schedule in ranks for mb in schedule[s] for i in mb) for s in range(len(ranks[0]))]

    reference = steps(8, 1, 1)
    assert steps(4, 2, 1) == reference and steps(4, 1, 2) == reference and steps(1, 2, 4) == reference
    assert steps(4, 1, 1) != reference[: len(steps(4, 1, 1))]


def test_grouping_by_length_cuts_padding():
    lengths = [random.Random(i).randint(10, 500) for i in range(2000)]

    def padded(group_by_length: bool) -> int:
        schedule = batch_schedule(lengths, 8, 1, seed=0, epoch=0, group_by_length=group_by_length)
        return sum(max(lengths[i] for i in mb) * len(mb) for step in schedule for mb in step)

    assert padded(True) < 0.7 * padded(False)


def test_collate_pads_right_without_attention_or_labels():
    batch = collate([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}],
                    pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
