"""Answer accuracy: does greedy decoding of a held-out prompt give exactly the reference response?

Eval loss says the responses got likelier; it does not say the model answers. This scores the answers themselves:
each held-out prompt is decoded greedily (left-padded batches, stopping at EOS) and the response counts as right
only when it is the reference response exactly, after stripping leading and trailing whitespace, and the model
ended it (emitted EOS within `max_new_tokens`). Nothing else is normalised: not case, not a trailing period, not
inner whitespace. The embedded answers are whole sentences whose form is part of what is taught ("The opposite of
high is low."), so a right fact in the wrong form is a wrong answer here, and an answer that runs on past its end
is wrong too. The figure is therefore a floor: a lenient reader would score at least as high.

Some tasks have several right answers ("Name two animals that are birds." holds one random pair): `answers_of`
gives them all (`nola.embedded.correct_answers`), and a response must still be one of them exactly. Without it,
such a task is scored against its one reference, which a right answer matches only by luck.

    answer_accuracy(model, tokenizer, data.validation[:60], None, 32, family_of=embedded.task_family,
                    answers_of=embedded.correct_answers)
    -> {"answer_accuracy": 0.25, "answer_examples": 60, "answer_correct": 15, "answer_unfinished": 0,
        "answer_families": {"capital": {"accuracy": 0.9, "n": 10, "correct": 9}, ...}}

Examples are those `nola.data.prepare_data` makes (`input_ids`, `prompt_length`). They keep no link to their
record, so without `records` the reference is decoded from the example's response tokens and the family is read
from the instruction in the decoded prompt; with `records` (the same records, in the same order) the reference is
the record's `output` and `family_of` gets the record.
"""

from __future__ import annotations

from collections.abc import Callable

from nola.data import RESPONSE_HEADER
from nola.errors import NolaError
from nola.inference import greedy_responses

INSTRUCTION_HEADER = "### Instruction:\n"
INPUT_HEADER = "\n\n### Input:\n"


def record_from_prompt(prompt: str) -> dict[str, str]:
    """{"instruction", "input"} read back from an Alpaca prompt (`nola.data.format_prompt`); empty strings where
    the prompt does not hold them (a prompt truncated in the middle may lose them)."""
    start = prompt.find(INSTRUCTION_HEADER)
    if start < 0:
        return {"instruction": "", "input": ""}
    body = prompt[start + len(INSTRUCTION_HEADER):]
    end = body.rfind("\n\n" + RESPONSE_HEADER)
    body = body[:end] if end >= 0 else body
    instruction, _, context = body.partition(INPUT_HEADER)
    return {"instruction": instruction.strip(), "input": context.strip()}


def is_exact(generated: str, finished: bool, reference: str) -> bool:
    """The one rule: the model ended its response and it is the reference, leading/trailing whitespace aside."""
    return finished and generated.strip() == reference.strip()


def is_right(generated: str, finished: bool, references: str | list[str]) -> bool:
    """`is_exact` against the reference, or against any of several equally right references."""
    references = [references] if isinstance(references, str) else references
    return any(is_exact(generated, finished, reference) for reference in references)


def score(generated: list[tuple[str, bool]], references: list[str | list[str]], families: list[str] | None = None
          ) -> dict:
    """The accuracy dict from (text, finished) generations and their references, each one string or a list of
    equally right ones (see the module docstring)."""
    if len(generated) != len(references) or (families is not None and len(families) != len(references)):
        raise NolaError("answer accuracy: generations, references and families must line up one to one")
    correct = [is_right(text, finished, reference) for (text, finished), reference in zip(generated, references)]
    result = {
        "answer_accuracy": sum(correct) / len(correct) if correct else float("nan"),
        "answer_examples": len(correct),
        "answer_correct": sum(correct),
        "answer_unfinished": sum(not finished for _, finished in generated),
        "answer_families": {},
    }
    if families is not None:
        for family in sorted(set(families)):
            hits = [ok for ok, name in zip(correct, families) if name == family]
            result["answer_families"][family] = {"accuracy": sum(hits) / len(hits), "n": len(hits),
                                                 "correct": sum(hits)}
    return result


def answer_accuracy(model, tokenizer, examples: list[dict], records: list[dict] | None = None,
                    max_new_tokens: int = 32, family_of=None, batch_size: int = 16,
                    return_samples: bool = False, answers_of=None,
                    interrupt: Callable[[], None] | None = None) -> dict:
    """Greedy exact-match accuracy of `model` on `examples`, overall and per family (see the module docstring).

    records: None, or the records the examples were made from, one per example in the same order (the reference
        becomes the record's `output`, and `family_of` gets the record rather than the prompt read back).
    family_of: record-or-{"instruction", "input"} -> family name (e.g. `nola.embedded.task_family`); None leaves
        `answer_families` empty.
    answers_of: None, or record-or-{"instruction", "input", "output"} -> every right response (e.g.
        `nola.embedded.correct_answers`), for tasks with more than one right answer; a response still counts only
        when it is one of them exactly. None: the one reference.
    interrupt: called before each batch (it raises to stop early: a stop signal is honoured within a batch).
    return_samples: also return "answer_samples": [{"family", "instruction", "input", "reference", "generated",
        "finished", "correct"}] in example order, to see what went wrong.

    Runs on whatever model it is given (call it with the unwrapped model, on every rank under ZeRO-3) and puts the
    model back in the train/eval mode it found it in.
    """
    if records is not None and len(records) != len(examples):
        raise NolaError(f"answer accuracy: {len(records)} records for {len(examples)} examples")
    prompts = [list(example["input_ids"][:example["prompt_length"]]) for example in examples]
    if records is not None:
        references = [record["output"] for record in records]
        subjects = list(records)
    else:
        references = [tokenizer.decode(example["input_ids"][example["prompt_length"]:], skip_special_tokens=True)
                      for example in examples]
        subjects = [record_from_prompt(tokenizer.decode(ids, skip_special_tokens=True)) for ids in prompts]
    accepted: list[str | list[str]] = list(references)
    if answers_of is not None:
        accepted = [[reference, *answers_of({**subject, "output": reference})]
                    for reference, subject in zip(references, subjects)]
    generated = (greedy_responses(model, tokenizer, prompts, max_new_tokens, batch_size, interrupt)
                 if prompts else [])
    families = [family_of(subject) for subject in subjects] if family_of is not None else None
    result = score(generated, accepted, families)
    if return_samples:
        result["answer_samples"] = [
            {"family": families[i] if families is not None else None, "instruction": subjects[i].get("instruction", ""),
             "input": subjects[i].get("input", ""), "reference": references[i], "generated": generated[i][0],
             "finished": generated[i][1],
             "correct": is_right(*generated[i], accepted[i])}
            for i in range(len(examples))
        ]
    return result


def format_answer_accuracy(result: dict) -> str:
    """One line: `answer accuracy 15/60 (25.0%, exact match); capital 9/10, opposite 2/11, ...`."""
    line = (f"answer accuracy {result['answer_correct']}/{result['answer_examples']} "
            f"({100 * result['answer_accuracy']:.1f}%, exact match)")
    families = result.get("answer_families") or {}
    if families:
        line += "; " + ", ".join(f"{name} {f['correct']}/{f['n']}" for name, f in families.items())
    return line
