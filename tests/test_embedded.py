"""The embedded default: built once per cache under a lock, never half-written, and a base that knows its world
but not the instruction format (so the adapter has something real to learn)."""

from __future__ import annotations

import random
import threading
import time

import pytest

from nola import embedded
from nola.data import load_records
from nola.errors import NolaError


def test_other_values_pass_through_and_unknown_assets_are_named():
    assert embedded.resolve("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    with pytest.raises(NolaError, match="unknown embedded asset 'embedded:tiny-gpt'"):
        embedded.resolve("embedded:tiny-gpt")


def test_concurrent_first_uses_build_once(tmp_path, monkeypatch):
    monkeypatch.setenv("NOLA_CACHE_DIR", str(tmp_path))
    builds = []

    def slow_build(target):
        builds.append(target)
        time.sleep(0.3)
        target.mkdir()
        (target / "tiny-instructions.json").write_text("[]")

    monkeypatch.setattr(embedded, "_build", slow_build)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(embedded.resolve("embedded:tiny-instructions")))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(set(paths)) == 1 and len(paths) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [embedded.VERSION, f"{embedded.VERSION}.lock"]


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("NOLA_CACHE_DIR", str(tmp_path))

    def failing_build(target):
        target.mkdir()
        (target / "half-written").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_build", failing_build)
    with pytest.raises(KeyboardInterrupt):
        embedded.resolve("embedded:tiny-llama")
    assert [p.name for p in tmp_path.iterdir()] == [f"{embedded.VERSION}.lock"]


def test_the_built_default_is_a_llama_that_knows_its_world(cache_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("NOLA_CACHE_DIR", str(cache_dir))
    records = load_records(embedded.resolve("embedded:tiny-instructions"))
    assert len(records) == 3000 and len({(r["instruction"], r["input"]) for r in records}) > 100
    model_dir = embedded.resolve("embedded:tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 2
    assert tokenizer("Paris").input_ids[0] == tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert tokenizer.decode(tokenizer("naïve ☃").input_ids, skip_special_tokens=True) == "naïve ☃"  # byte fallback
    # Asked in plain prose, the base answers most questions about its world (measured: 31 of 40).
    rng = random.Random(5)
    correct = 0
    for _ in range(40):
        record = embedded._instruction(rng)
        question = f"Q: {record['instruction']} {record['input']}".strip() + " A:"
        prompt = tokenizer(question, return_tensors="pt").input_ids
        output = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        correct += tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=True).strip().startswith(
            record["output"])
    assert correct >= 20, correct


# SHA-256 of the embedded-v1 data, computed from the code before `_instruction` was split into
# `_family_instruction` (which also names the family): the cached build is versioned, so the records, their order
# and every RNG draw (the prose corpus draws instructions too) must stay exactly what they were.
RECORDS_SHA256 = "49917f7b911da006e79520c00ac08077564cf908e72d3feff12d6d160849e1a0"  # json.dumps(indent=1)
OTHER_SEED_SHA256 = "ba033879319864a2f53964be7f9cacc969d2898f0f3fe5c7e46c9321f9871cfd"  # 500 records, seed 3
PROSE_SHA256 = "f6f048bdf4379b99e563783c340ffd2e3ec4e2cb7a209b6b31b02f4e9b7b8223"  # json.dumps, 3,169 paragraphs


def test_the_embedded_data_is_unchanged():
    import hashlib
    import json

    def digest(value, **options):
        return hashlib.sha256(json.dumps(value, **options).encode()).hexdigest()

    assert digest(embedded.instruction_records(), indent=1) == RECORDS_SHA256
    assert digest(embedded.instruction_records(500, seed=3)) == OTHER_SEED_SHA256
    prose = embedded.prose_corpus()
    assert len(prose) == 3169 and digest(prose) == PROSE_SHA256


def test_every_record_is_of_a_known_family():
    rng = random.Random(3)
    pairs = [embedded._family_instruction(rng) for _ in range(300)]
    assert {family for family, _ in pairs} == set(embedded.FAMILIES)
    assert all(embedded.task_family(record) == family for family, record in pairs)
    assert embedded.task_family("Translate the sentence into French.") == "other"
