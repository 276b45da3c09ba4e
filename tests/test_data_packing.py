"""Sequence packing (nola/data/packing.py): on the real tiny LLaMA every example in a packed row computes what it
computes alone, and a packed step trains what the unpacked step over the same examples trains."""

from __future__ import annotations

import pytest
import torch

import nola
from nola.data import StepBatches, collate, load_records, prepare_data
from nola.data.packing import attention_inputs, collate_packed, epoch_rows, model_inputs, pack_rows
from nola.evaluation import token_loss_sum
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_data("stories260K-hf")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer, lambda implementation: AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=implementation).eval()


@pytest.fixture(scope="module")
def examples(tiny):
    records = load_records(shared_data("alpaca/alpaca_subset.json"))[:40]
    return prepare_data(records, tiny[0], 48, 32, 0, 0).train


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_every_example_in_a_packed_row_has_its_logits_alone(tiny, examples, implementation):
    model = tiny[1](implementation)
    rows = [examples[0:3], examples[3:5]]
    batch = collate_packed(rows, tiny[0].pad_token_id)
    with torch.no_grad():
        packed = model(**attention_inputs(batch, implementation)).logits
        for r, row in enumerate(rows):
            start = 0
            for example in row:
                alone = model(torch.tensor([example["input_ids"]])).logits[0]
                # within 1e-5 (absolute plus relative): eager attention agrees exactly, SDPA's kernel sums a longer
                # row in another order (1.3e-5 on logits of magnitude 15)
                torch.testing.assert_close(packed[r, start:start + len(alone)], alone, rtol=1e-5, atol=1e-5)
                start += len(alone)


def test_changing_one_example_leaves_the_others_logits_where_they_were(tiny, examples):
    model = tiny[1]("sdpa")
    row = examples[0:3]
    changed = [row[0], {**row[1], "input_ids": [t + 1 for t in row[1]["input_ids"]]}, row[2]]
    with torch.no_grad():
        before, after = (model(**attention_inputs(collate_packed([r], 0), "sdpa")).logits[0] for r in (row, changed))
    first, second = len(row[0]["input_ids"]), len(row[0]["input_ids"]) + len(row[1]["input_ids"])
    assert torch.equal(before[:first], after[:first]) and torch.equal(before[second:], after[second:])
    assert not torch.equal(before[first:second], after[first:second])


def test_without_the_mask_packed_examples_would_see_each_other(tiny, examples):
    """The defect the mask guards against: position ids alone do not isolate examples under SDPA."""
    model = tiny[1]("sdpa")
    batch = collate_packed([examples[0:2]], 0)
    first = len(examples[0]["input_ids"])
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, first:]
        alone = model(torch.tensor([examples[1]["input_ids"]])).logits[0]
    assert (leaky[:len(alone)] - alone).abs().max() > 1e-2


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_unpacked_ones(tiny, examples, implementation):
    model = nola.attach(tiny[1](implementation), nola.AdapterConfig(rank=4, alpha=8.0, num_basis=32, seed=0))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.1)
    chosen = examples[:6]

    def loss_and_gradients(batches):
        model.zero_grad()
        sums, tokens = zip(*(token_loss_sum(model, batch) for batch in batches))
        (sum(sums) / sum(tokens)).backward()
        return (sum(sums) / sum(tokens)).item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    unpacked_loss, unpacked_grads = loss_and_gradients([collate(chosen[:3], 0), collate(chosen[3:], 0)])
    packed_loss, packed_grads = loss_and_gradients([collate_packed([chosen[:4], chosen[4:]], 0)])
    assert abs(packed_loss - unpacked_loss) <= 1e-5
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(packed_grads, unpacked_grads))


def test_best_fit_packs_every_example_once_within_the_row_length():
    lengths = [5, 9, 3, 7, 2, 8, 4, 6, 1]
    rows = pack_rows(lengths, list(range(len(lengths))), 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 5  # 45 tokens: the fewest rows of 10 they fit
    assert epoch_rows(lengths, 10, 0, 1) == epoch_rows(lengths, 10, 0, 1) != epoch_rows(lengths, 10, 0, 2)


def test_packing_the_alpaca_subset_needs_far_fewer_rows():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_data("llama2-tokenizer"))
    data = prepare_data(load_records(shared_data("alpaca/alpaca_subset.json")), tokenizer, 384, 512, 0, 0)
    lengths = [len(e["input_ids"]) for e in data.train]
    assert len(lengths) / len(epoch_rows(lengths, 896, 0, 0)) >= 2


def unpadded(row: torch.Tensor) -> tuple[int, ...]:
    tokens = row.tolist()
    while tokens and tokens[-1] == 0:  # the pad id the streams below use
        tokens.pop()
    return tuple(tokens)


def test_the_packed_schedule_is_the_same_on_any_split_and_on_resume(examples):
    def global_steps(processes: int, micro: int, steps: int):
        streams = [StepBatches(examples, micro, 4 // (micro * processes), 0, False, processes, rank, 0,
                               packed_length=128) for rank in range(processes)]
        taken = []
        for _ in range(steps):
            rows = [unpadded(row) for stream in streams for batch in stream.next() for row in batch["input_ids"]]
            taken.append(sorted(rows))
        return taken

    one = global_steps(1, 4, 6)
    assert one == global_steps(2, 2, 6) == global_steps(4, 1, 6)
    stream = StepBatches(examples, 2, 2, 0, False, 1, 0, 0, packed_length=128)
    positions, steps = [], []
    for _ in range(12):  # across an epoch boundary
        positions.append((stream.epoch, stream.index))
        steps.append(stream.next())
    assert stream.epoch >= 1
    for position, step in zip(positions, steps):
        resumed = StepBatches(examples, 2, 2, 0, False, 1, 0, 0, packed_length=128)
        resumed.seek(*position)
        assert all(torch.equal(a[key], b[key]) for a, b in zip(step, resumed.next()) for key in a)


def test_model_inputs_read_the_attention_implementation_through_wrappers(tiny, examples):
    batch = collate_packed([examples[:2]], 0)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    eager = model_inputs(Wrapper(tiny[1]("eager")), batch)
    assert eager["attention_mask"].dtype == torch.float32 and "position_ids" in eager
    assert model_inputs(tiny[1]("sdpa"), batch)["attention_mask"].dtype == torch.bool
    assert "attention_mask" not in attention_inputs(batch, "flash_attention_2")


def test_flash_attention_takes_the_rows_end_to_end(examples):
    batch = collate_packed([examples[:2], examples[2:3]], 0)
    inputs = attention_inputs(batch, "flash_attention_2")
    width = batch["input_ids"].shape[1]
    assert set(inputs) == {"input_ids", "position_ids"} and inputs["input_ids"].shape == (1, 2 * width)
    # every row starts an example (position 0), whose first label is ignored: no loss crosses rows
    assert inputs["position_ids"][0, width] == 0 and batch["labels"][1, 0] == -100


def test_text_examples_without_a_prompt_are_passed_over_by_sample_generations(tiny, examples):
    from nola.inference import sample_generations

    text = {"input_ids": examples[0]["input_ids"], "labels": examples[0]["input_ids"], "prompt_length": 0}
    samples = sample_generations(tiny[1]("sdpa"), tiny[0], [text, examples[1]], 2, 2)
    assert len(samples) == 1 and samples[0]["reference"]
