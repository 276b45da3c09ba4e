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
