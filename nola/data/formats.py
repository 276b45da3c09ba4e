"""What a data record is, per format (`data.format`), checked as it is read: a record that is not one fails in one
line naming where it is (file and line, record or row number).

    alpaca             {"instruction", "input" (optional), "output"}: strings (a null input or output reads as "")
    messages           {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}: a
                       conversation, at most one system message and only first (TRL's conversational format)
    prompt_completion  {"prompt": str, "completion": str} (TRL's prompt-completion format)
    text               {"text": str}: plain language modelling, every token trained
"""

from __future__ import annotations

from collections.abc import Callable

from nola.errors import NolaError

Record = dict
RecordCheck = Callable[[object, str], Record]  # (raw record, where it is) -> the normalised record
ROLES = ("system", "user", "assistant")


def _require_object(record: object, keys: str, where: str) -> dict:
    if not isinstance(record, dict):
        raise NolaError(f"{where}: expected an object with {keys}, got {type(record).__name__}")
    return record


def _require_strings(record: dict, required: tuple[str, ...], optional: tuple[str, ...], where: str) -> None:
    for key in required:
        if key not in record:
            raise NolaError(f"{where}: missing key {key!r}")
    for key in required + optional:
        if key in record and record[key] is not None and not isinstance(record[key], str):
            raise NolaError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")


def check_alpaca_record(record: object, where: str) -> Record:
    record = _require_object(record, "instruction/input/output", where)
    _require_strings(record, ("instruction", "output"), ("input",), where)
    return {key: record.get(key) or "" for key in ("instruction", "input", "output")}


def check_messages_record(record: object, where: str) -> Record:
    """A conversation as TRL reads one; refused in one line: unknown roles, an empty conversation, a turn without
    role or content, two system messages, a system message after the first turn."""
    messages = _require_object(record, "messages", where).get("messages")
    if messages is None:
        raise NolaError(f"{where}: missing key 'messages'")
    if not isinstance(messages, list) or not messages:
        raise NolaError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns")
    turns = []
    for number, turn in enumerate(messages, 1):
        place = f"{where}: turn {number}"
        turn = _require_object(turn, "role/content", place)
        _require_strings(turn, ("role", "content"), (), place)
        if turn["role"] not in ROLES:
            raise NolaError(f"{place}: unknown role {turn['role']!r} (known: {', '.join(ROLES)})")
        if turn["role"] == "system" and number > 1:
            second = any(t["role"] == "system" for t in turns)
            problem = "a second system message" if second else "a system message after the first turn"
            raise NolaError(f"{place}: {problem}")
        turns.append({"role": turn["role"], "content": turn["content"] or ""})
    return {"messages": turns}


def check_prompt_completion_record(record: object, where: str) -> Record:
    record = _require_object(record, "prompt/completion", where)
    _require_strings(record, ("prompt", "completion"), (), where)
    return {key: record[key] or "" for key in ("prompt", "completion")}


def check_text_record(record: object, where: str) -> Record:
    record = _require_object(record, "text", where)
    _require_strings(record, ("text",), (), where)
    return {"text": record["text"] or ""}


CHECKS: dict[str, RecordCheck] = {
    "alpaca": check_alpaca_record,
    "messages": check_messages_record,
    "prompt_completion": check_prompt_completion_record,
    "text": check_text_record,
}
FORMATS = tuple(CHECKS)


def record_check(data_format: str) -> RecordCheck:
    """The check (and normalisation) of one record of `data_format`."""
    if data_format not in CHECKS:
        raise NolaError(f"data.format: {data_format!r} is not one of {', '.join(FORMATS)}")
    return CHECKS[data_format]
