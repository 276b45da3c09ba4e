"""Reading records: local JSON (a list), JSON Lines or Parquet files, or a hub dataset's train split. Files are
read as UTF-8 and never unpickled; a damaged file is one line naming it and the place of the damage."""

from __future__ import annotations

import json
from pathlib import Path

from nola.data.formats import Record, RecordCheck, record_check
from nola.errors import NolaError


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (what JSON requires); a file saved in another encoding is named with the line and
    byte offset of its first undecodable byte, so it can be found and re-saved."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise NolaError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset "
                        f"{error.start}); save the file as UTF-8") from None


def _read_json(path: Path, check: RecordCheck) -> list[Record]:
    text = _read_text(path)
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise NolaError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(content, list):
        raise NolaError(f"{path}: expected a JSON list of records, got {type(content).__name__}")
    return [check(record, f"{path}: record {number}") for number, record in enumerate(content, 1)]


def _read_jsonl(path: Path, check: RecordCheck) -> list[Record]:
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise NolaError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
        records.append(check(record, f"{path}: line {number}"))
    return records


def _read_parquet(path: Path) -> list[dict]:
    """The file's rows; a damaged or truncated file (pyarrow raises ArrowInvalid, or OSError for a corrupt footer)
    is one line with pyarrow's reason, less the path it repeats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        reason = reason.removeprefix(f"Could not open Parquet input source '{path}': ")
        raise NolaError(f"{path}: not a readable Parquet file ({reason})") from None


def _read_rows(rows, where: str, check: RecordCheck) -> list[Record]:
    return [check(dict(row), f"{where}: row {number}") for number, row in enumerate(rows, 1)]


def load_records(source: str | Path, data_format: str = "alpaca") -> list[Record]:
    """Records of `data_format` (nola/data/formats.py) from a local .json (list), .jsonl or .parquet file, or a hub
    dataset's train split, each checked and normalised as it is read."""
    check = record_check(data_format)
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            records = _read_json(path, check)
        elif suffix == ".jsonl":
            records = _read_jsonl(path, check)
        elif suffix == ".parquet":
            records = _read_rows(_read_parquet(path), str(path), check)
        else:
            raise NolaError(f"{path}: unsupported data file type {suffix!r} (use .json, .jsonl or .parquet)")
    elif path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise NolaError(f"data.path: no such data file: {source}")
    else:
        records = _load_hub_dataset(str(source), check)
    if not records:
        raise NolaError(f"data.path: {source} holds no records")
    return records


def _load_hub_dataset(name: str, check: RecordCheck) -> list[Record]:
    import datasets

    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as error:  # offline, unknown name, no train split: all one user-facing problem
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NolaError(f"data.path: cannot load hub dataset {name!r} ({reason})") from None
    return _read_rows(rows, f"hub dataset {name}", check)
