"""MMLU accuracy the way QLoRA and the NOLA paper's LLaMA-2 table measure it: no generation, just which of the
tokens "A", "B", "C", "D" gets the highest next-token logit after the prompt's final "Answer:".

Examples come either from a local file in QLoRA's format (JSON list or JSON Lines of {"subject", "input",
"output"}, the prompt already holding its shots, e.g. qlora's data/mmlu/five_shot_mmlu_val.json), or from a hub
dataset in the cais/mmlu schema ({"subject", "question", "choices", "answer"}), whose k-shot prompts are built
here from the subject's dev split, as in Hendrycks et al.

The headline number is QLoRA's and the paper's: the mean of the per-subject accuracies (macro), every subject
present weighing the same however many questions it has. The mean over questions (micro) is reported beside it.
Every example carries its subject; a QLoRA-format record without one is counted under the single subject "all"
(so a file with no subjects at all scores macro == micro).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from nola.errors import NolaError

LETTERS = "ABCD"


NO_SUBJECT = "all"


def subject_of(example: dict) -> str:
    """The example's subject; one without a subject (missing, null or empty) counts under NO_SUBJECT ("all")."""
    subject = example.get("subject")
    return NO_SUBJECT if subject is None or str(subject) == "" else str(subject)


def _subject_title(subject: str) -> str:
    return " " + subject.replace("_", " ")


def format_question(question: str, choices: list[str], answer: str | None = None) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, choices))
    return f"{question.strip()}{options}\nAnswer:" + (f" {answer}\n\n" if answer is not None else "")


def few_shot_examples(dev_rows: list[dict], eval_rows: list[dict], shots: int) -> list[dict[str, str]]:
    """k-shot prompts: the header, the first `shots` dev questions of the same subject with answers, the question."""
    by_subject: dict[str, list[dict]] = {}
    for row in dev_rows:
        by_subject.setdefault(row["subject"], []).append(row)
    examples = []
    for row in eval_rows:
        subject = _subject_title(row["subject"])
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        demos = "".join(
            format_question(d["question"], d["choices"], LETTERS[d["answer"]])
            for d in by_subject.get(row["subject"], [])[:shots]
        )
        examples.append({"subject": row["subject"], "input": header + demos + format_question(row["question"],
                         row["choices"]), "output": LETTERS[row["answer"]]})
    return examples


def _check_example(record: object, where: str) -> dict[str, str]:
    if not isinstance(record, dict) or not {"input", "output"} <= set(record):
        raise NolaError(f"{where}: expected an object with 'input' and 'output'")
    if record["output"] not in tuple(LETTERS):
        raise NolaError(f"{where}: 'output' must be one of A, B, C, D, got {record['output']!r}")
    return {"subject": subject_of(record), "input": str(record["input"]), "output": record["output"]}


def _read_local(path: Path) -> list[dict[str, str]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # a JSON list ...
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise NolaError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
        return [_check_example(r, f"{path}: record {n}") for n, r in enumerate(records, 1)]
    examples = []  # ... or JSON Lines (qlora's .json files are JSON Lines)
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                examples.append(_check_example(json.loads(line), f"{path}: line {number}"))
            except json.JSONDecodeError as error:
                raise NolaError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
    return examples


def load_mmlu(source: str, shots: int) -> list[dict[str, str]]:
    """Scored examples from a local QLoRA-format file or a cais/mmlu-schema hub dataset (validation split)."""
    path = Path(source)
    if path.is_file():
        examples = _read_local(path)
    elif path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise NolaError(f"mmlu.path: no such file: {source}")
    else:
        import datasets

        try:
            dev = datasets.load_dataset(source, "all", split="dev")
            validation = datasets.load_dataset(source, "all", split="validation")
        except Exception as error:  # offline, unknown name: one user-facing problem
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise NolaError(f"mmlu.path: cannot load hub dataset {source!r} ({reason})") from None
        examples = few_shot_examples(list(dev), list(validation), shots)
    if not examples:
        raise NolaError(f"mmlu.path: {source} holds no questions")
    return examples


def letter_token_ids(tokenizer) -> list[int]:
    """The token a model emits for " A" ... " D" after "Answer:" (the last piece, so a leading-space piece wins)."""
    ids = [tokenizer(f"Answer: {letter}", add_special_tokens=False)["input_ids"][-1] for letter in LETTERS]
    if len(set(ids)) != len(LETTERS):
        raise NolaError("mmlu: the tokenizer does not give the letters A-D distinct tokens")
    return ids


@torch.no_grad()
def predict_letters(model, tokenizer, prompts: list[str], batch_size: int, max_length: int,
                    interrupt: Callable[[], None] | None = None) -> list[str]:
    """The letter with the highest next-token logit after each prompt (right-padded batches; prompts longer than
    max_length keep their end, where the question is). `interrupt` runs before each batch and may raise to stop."""
    letter_ids = torch.tensor(letter_token_ids(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    predictions = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        if interrupt is not None:
            interrupt()
        rows = [ids[-max_length:] for ids in tokenizer(prompts[start : start + batch_size])["input_ids"]]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        last = logits[torch.arange(len(rows)), attention_mask.sum(1).to(device) - 1]
        predictions += [LETTERS[i] for i in last[:, letter_ids.to(device)].argmax(-1).tolist()]
    model.train(was_training)
    return predictions


def summarize(subjects: list[str], counts) -> dict:
    """The returned metrics from per-subject [correct, scored] rows (row i belongs to subjects[i]); a subject with
    no scored question is left out of the macro mean and of mmlu_subjects."""
    rows = [(subject, int(correct), int(scored)) for subject, (correct, scored) in zip(subjects, counts.tolist())]
    per_subject = {subject: {"accuracy": correct / scored, "n": scored} for subject, correct, scored in rows if scored}
    total = sum(scored for _, _, scored in rows)
    macro = sum(s["accuracy"] for s in per_subject.values()) / len(per_subject) if per_subject else float("nan")
    micro = sum(correct for _, correct, _ in rows) / total if total else float("nan")
    return {"mmlu_accuracy": macro, "mmlu_micro_accuracy": micro, "mmlu_examples": total,
            "mmlu_subjects": per_subject}


def mmlu_accuracy(model, tokenizer, examples, batch_size: int, max_length: int, accelerator=None,
                  interrupt: Callable[[], None] | None = None) -> dict:
    """MMLU over `examples`, as QLoRA and the NOLA paper report it:

    - "mmlu_accuracy": the mean of the per-subject accuracies (macro; each subject present weighs the same),
    - "mmlu_micro_accuracy": the mean over questions,
    - "mmlu_examples": the number of questions scored,
    - "mmlu_subjects": {subject: {"accuracy": float, "n": int}}, subjects in sorted order.

    An example without a "subject" counts under "all". With an accelerator each rank scores its share (every
    world-th example) and the per-subject [correct, scored] counts are summed across ranks; every rank holds the
    same `examples`, so all derive the same subject rows. Every rank gets the same result.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    subjects = sorted({subject_of(e) for e in examples})
    row = {subject: i for i, subject in enumerate(subjects)}
    mine = examples[rank::world]
    # Every rank scores the same number of prompts (repeats of the first, uncounted), so forward passes pair up
    # across ranks as ZeRO-3 and DDP need.
    padded = mine + examples[:1] * (-(-len(examples) // world) - len(mine))
    predicted = predict_letters(model, tokenizer, [e["input"] for e in padded], batch_size, max_length, interrupt)
    counts = torch.zeros((len(subjects), 2), dtype=torch.float64)  # [correct, scored] per subject
    for guess, example in zip(predicted, mine):  # zip stops at `mine`: the padding repeats are not counted
        counts[row[subject_of(example)]] += torch.tensor([guess == example["output"], 1], dtype=torch.float64)
    if accelerator is not None:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    return summarize(subjects, counts)
