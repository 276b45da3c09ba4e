"""scripts/generate.py and scripts/evaluate.py: an adapter and its merged export answer and score the same, and
mistakes are one line. The scripts' main() runs in this process (the path users run, without a Python start-up per
call), but for one generate.py process fed on its standard input."""

from __future__ import annotations

import importlib.util
import json

import pytest

from pathlib import Path

from tests.conftest import entry_point, run_main, run_script, shared_data

PROMPTS = ["What is the capital of Norland?", "Name an animal that is a bird.", "What is the opposite of hot?"]


@pytest.fixture(scope="module")
def merged(cache_dir, embedded_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "model"
    run_script(cache_dir, "scripts/merge_and_export.py", "--base", "embedded:tiny-llama", "--adapter",
               embedded_adapter, "--out", out, "--format", "hf", "--dtype", "fp32", "--check-prompts", "0")
    return out


def responses(printed) -> list[dict]:
    """The JSON lines a generate.py run printed (its captured output, or a completed process)."""
    text = printed if isinstance(printed, str) else printed.stdout
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def in_process(cache_dir, monkeypatch):
    monkeypatch.setenv("NOLA_CACHE_DIR", str(cache_dir))


@pytest.mark.slow
def test_adapter_and_merged_model_generate_the_same_greedy_answers(cache_dir, embedded_adapter, merged, tmp_path,
                                                                   in_process, capsys):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("\n".join(json.dumps({"instruction": p}) for p in PROMPTS) + "\n")
    with_adapter = run_main(capsys, "generate", "--base", "embedded:tiny-llama", "--adapter", embedded_adapter,
                            "--prompts-file", prompts_file, "--max-new-tokens", "12")
    from_stdin = run_script(cache_dir, "scripts/generate.py", "--base", merged, "--max-new-tokens", "12",
                            "--batch-size", "2", stdin="\n".join(PROMPTS) + "\n")
    answers = responses(with_adapter)
    assert [a["instruction"] for a in answers] == PROMPTS
    assert answers == responses(from_stdin)  # left-padded batches of 2 answer as batches of 8 do
    base_answers = responses(run_main(capsys, "generate", "--base", "embedded:tiny-llama", "--prompts-file",
                                      prompts_file, "--max-new-tokens", "12"))
    assert base_answers != answers, "the adapter changed no answer: vacuous comparison"


@pytest.mark.slow
def test_sampling_is_repeatable_with_its_seed(embedded_adapter, in_process, capsys):
    arguments = ["generate", "--base", "embedded:tiny-llama", "--adapter", embedded_adapter,
                 "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--temperature", "1.5", "--max-new-tokens", "16"]
    first, again = (responses(run_main(capsys, *arguments, "--seed", "3")) for _ in range(2))
    other = responses(run_main(capsys, *arguments, "--seed", "4"))
    assert first == again and first != other


@pytest.mark.slow
def test_adapter_and_merged_model_score_the_same(embedded_adapter, merged, tmp_path, in_process, capsys):
    from nola.embedded import instruction_records

    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in instruction_records(count=64, seed=9)) + "\n")
    scores = [
        json.loads(run_main(capsys, "evaluate", *arguments, "--data", data, "--out", tmp_path / f"{index}.json"))
        for index, arguments in enumerate([["--base", "embedded:tiny-llama", "--adapter", embedded_adapter],
                                           ["--base", merged]])
    ]
    assert scores[0]["eval_records"] == scores[1]["eval_records"] == 64
    assert abs(scores[0]["eval_loss"] - scores[1]["eval_loss"]) < 1e-4
    assert json.loads((tmp_path / "0.json").read_text()) == scores[0]


@pytest.mark.slow
def test_mmlu_from_a_local_qlora_format_file(embedded_adapter, in_process, capsys):
    path = shared_data("mmlu/zero_shot_mmlu_val.json")
    result = json.loads(run_main(capsys, "evaluate", "--base", "embedded:tiny-llama", "--adapter", embedded_adapter,
                                 "--mmlu", path, "--mmlu-max-examples", "24"))
    assert result["mmlu_examples"] == 24 and 0 <= result["mmlu_accuracy"] <= 1
    # The first 24 questions: 11 of abstract_algebra, 13 of anatomy. Macro is their mean, micro weighs by size.
    subjects = result["mmlu_subjects"]
    assert {s: v["n"] for s, v in subjects.items()} == {"abstract_algebra": 11, "anatomy": 13}
    accuracies = [v["accuracy"] for v in subjects.values()]
    assert result["mmlu_accuracy"] == pytest.approx(sum(accuracies) / 2, rel=1e-12)
    right = sum(round(v["accuracy"] * v["n"]) for v in subjects.values())
    assert result["mmlu_micro_accuracy"] == pytest.approx(right / 24, rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, arguments, message",
    [
        ("scripts/evaluate.py", [], "nothing to evaluate: give --data, --mmlu and/or --lm-eval-tasks"),
        ("scripts/evaluate.py", ["--data", "{tmp}/missing.json"], "missing.json"),
        ("scripts/evaluate.py", ["--mmlu", "{tmp}/bad.jsonl"], "bad.jsonl"),
        ("scripts/generate.py", ["--prompts-file", "{tmp}/bad.jsonl"], "bad.jsonl, line 2: not valid JSON"),
        ("scripts/generate.py", ["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
        ("scripts/generate.py", ["--prompt", "hi", "--adapter", "{tmp}"], "not a nola adapter directory"),
    ],
)
def test_script_mistakes_are_one_line(tmp_path, in_process, capsys, script, arguments, message):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "fine"}\n{"instruction": \n')
    given = [a.format(tmp=tmp_path) for a in arguments]
    code = entry_point(Path(script).stem)(["--base", "embedded:tiny-llama", *given])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="checks the message shown without it")
def test_lm_eval_hand_off_without_the_harness_is_one_line(in_process, capsys):
    code = entry_point("evaluate")(["--base", "embedded:tiny-llama", "--lm-eval-tasks", "arc_easy"])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("error: --lm-eval-tasks: lm-evaluation-harness is not installed "
                                        "(pip install lm-eval)")
