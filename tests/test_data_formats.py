"""The record formats (nola/data/formats.py): each normalised as read, each malformed record one line naming it."""

from __future__ import annotations

import json

import pytest

from nola.data import load_records
from nola.errors import NolaError

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def test_each_format_reads_its_records(tmp_path):
    assert load_records(write_jsonl(tmp_path / "m.jsonl", [{"messages": CONVERSATION, "id": 3}]),
                        "messages") == [{"messages": CONVERSATION}]
    assert load_records(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}]),
                        "prompt_completion") == [{"prompt": "2+2=", "completion": "4"}]
    assert load_records(write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time"}]), "text") == [
        {"text": "Once upon a time"}]
    assert load_records(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "output": "Hi"}])) == [
        {"instruction": "Say hi", "input": "", "output": "Hi"}]


@pytest.mark.parametrize("record, message", [
    ({"messages": []}, "line 2: 'messages' must be a non-empty list of {role, content} turns"),
    ({"conversation": CONVERSATION}, "line 2: missing key 'messages'"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "line 2: turn 1: unknown role 'tool' (known: system, user, "
                                                       "assistant)"),
    ({"messages": [{"role": "user"}]}, "line 2: turn 1: missing key 'content'"),
    ({"messages": [{"role": "user", "content": 3}]}, "line 2: turn 1: 'content' must be a string, got int"),
    ({"messages": CONVERSATION[:1] + CONVERSATION[:3]}, "line 2: turn 2: a second system message"),
    ({"messages": CONVERSATION[1:3] + CONVERSATION[:1]}, "line 2: turn 3: a system message after the first turn"),
    ({"messages": ["Hi"]}, "line 2: turn 1: expected an object with role/content, got str"),
])
def test_a_malformed_conversation_fails_in_one_line_naming_the_record(tmp_path, record, message):
    path = write_jsonl(tmp_path / "data.jsonl", [{"messages": CONVERSATION}, record])
    with pytest.raises(NolaError) as error:
        load_records(path, "messages")
    assert str(error.value) == f"{path}: {message}"


@pytest.mark.parametrize("data_format, record, message", [
    ("prompt_completion", {"prompt": "x"}, "record 1: missing key 'completion'"),
    ("text", {"text": ["a"]}, "record 1: 'text' must be a string, got list"),
    ("text", "just text", "record 1: expected an object with text, got str"),
])
def test_other_formats_fail_in_one_line_too(tmp_path, data_format, record, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(NolaError, match=f"^{path}: {message}$".replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        load_records(str(path), data_format)


def test_an_unknown_format_is_named():
    with pytest.raises(NolaError, match=r"^data.format: 'sharegpt' is not one of alpaca, messages, "
                                        r"prompt_completion, text$"):
        load_records("unused.json", "sharegpt")
