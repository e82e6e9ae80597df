"""Data files and record formats: read `.json`/`.jsonl`/`.parquet`, detect the format, normalise to turns.

Every record becomes either a conversation (a list of `Turn`s, loss on assistant turns) or plain text (loss on all
tokens). Errors name the file and the record (`file.jsonl:17` is a line, `file.json[16]` a list index, `file.parquet
row 16` a row), because a user with 3,000 records needs to find the bad one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalebio_cli.errors import InputError, json_error
from scalebio_cli.files import did_you_mean

EXTENSIONS = (".json", ".jsonl", ".parquet")

_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant
    content: str


# A normalised record: a conversation, or a plain string trained on all tokens.
Example = list[Turn] | str


# What counts as a blank line: the whitespace `bytes.strip()` removes, so that counting records with a byte scan
# (count_records, sample) and parsing them agree on every line (str.strip() also strips e.g. U+00A0 and U+001C).
_BLANK = " \t\n\r\x0b\x0c"


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip(_BLANK):
                yield lineno, line


def parse_jsonl_line(path: str | Path, lineno: int, line: str) -> tuple[str, Any]:
    """`(location, record)` of line `lineno` of a .jsonl file."""
    try:
        return f"{path}:{lineno}", json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{lineno}: not valid JSON ({json_error(exc)})") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    for lineno, line in _jsonl_lines(path):
        yield parse_jsonl_line(path, lineno, line)


def _iter_json_array(path: Path, chunk_size: int = 1 << 20) -> Iterator[tuple[str, Any]]:
    """Stream the elements of a top-level JSON list without loading the whole file as Python objects."""
    decoder = json.JSONDecoder()
    with path.open("r", encoding="utf-8") as f:
        buf = f.read(chunk_size)
        pos, eof, index = 0, False, 0

        def fill() -> None:
            nonlocal buf, pos, eof
            more = f.read(chunk_size)
            buf, pos = buf[pos:] + more, 0
            eof = not more

        def skip_space() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof:
                    return
                fill()

        skip_space()
        if pos >= len(buf) or buf[pos] != "[":
            raise InputError(f"{path}: a .json data file must hold a list of records ([{{...}}, ...])")
        pos += 1
        skip_space()
        if pos < len(buf) and buf[pos] == "]":
            return
        while True:
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as exc:
                    if eof:
                        raise InputError(f"{path}[{index}]: not valid JSON ({exc.msg})") from None
                    fill()
            yield f"{path}[{index}]", obj
            index += 1
            pos = end
            skip_space()
            if pos >= len(buf):
                raise InputError(f"{path}: the JSON list is not closed (file ends after record {index - 1})")
            if buf[pos] == "]":
                return
            if buf[pos] != ",":
                raise InputError(f"{path}[{index}]: expected ',' or ']' between records, got {buf[pos]!r}")
            pos += 1
            skip_space()
            if len(buf) - pos < chunk_size // 2 and not eof:
                fill()


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise InputError(f"{path}: not a readable parquet file ({exc})") from None
    row = 0
    for batch in table.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield f"{path} row {row}", record
            row += 1


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield `(location, record)` for every record of a data file, streaming."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return _reading(path, _iter_jsonl(path))
    return _reading(path, _iter_json_array(path) if path.suffix == ".json" else _iter_parquet(path))


def iter_jsonl_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """`(line number, line)` for every record of a .jsonl file, unparsed (parse_jsonl_line parses one): parsing is
    most of the cost of reading, which a parallel pass leaves to its workers."""
    path = Path(path)
    return _reading(path, _jsonl_lines(path))


def _reading(path: Path, stream: Iterator[Any]) -> Iterator[Any]:
    """`stream` read from `path`, a missing file or one that cannot be read as text an InputError."""
    if path.suffix not in EXTENSIONS:
        raise InputError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(EXTENSIONS)})")
    if not path.is_file():
        raise InputError(f"{path}: data file not found{did_you_mean(path)}")
    try:
        yield from stream
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None


def detect_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record or "items" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    for fmt, (prompt, completion) in AUTO_COLUMNS.items():  # common schemas read as prompt/completion
        if prompt in record and completion in record:
            return fmt
    return None


# Schemas read without a column map, as prompt/completion: GSM8K-style, query/response, input/output (no instruction)
AUTO_COLUMNS = {"question_answer": ("question", "answer"), "query_response": ("query", "response"),
                "input_output": ("input", "output")}


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _turns(items: Any, where: str, key: str, role_key: str, text_key: str) -> list[Turn]:
    if not isinstance(items, list):
        raise InputError(f"{where}: '{key}' must be a list of turns")
    turns = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or role_key not in item or text_key not in item:
            raise InputError(f"{where}: {key}[{i}] must be an object with '{role_key}' and '{text_key}'")
        role = _ROLES.get(str(item[role_key]).lower())
        if role is None:
            raise InputError(
                f"{where}: {key}[{i}] has unknown {role_key} {item[role_key]!r} "
                f"(expected system, user/human or assistant/gpt)"
            )
        turns.append(Turn(role, _text(item[text_key], where, f"{key}[{i}].{text_key}")))
    return turns


def normalize(record: Any, fmt: str, where: str) -> Example:
    """Turn one record of format `fmt` (see detect_format) into a conversation or a text; errors name `where`."""
    if fmt == "messages":
        return _turns(record["messages"], where, "messages", "role", "content")
    if fmt == "sharegpt":
        key = "conversations" if "conversations" in record else "items"
        return _turns(record[key], where, key, "from", "value")
    if fmt == "alpaca":
        instruction = _text(record["instruction"], where, "instruction")
        extra = record.get("input") or ""
        extra = _text(extra, where, "input")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [Turn("user", prompt), Turn("assistant", _text(record["output"], where, "output"))]
    if fmt in ("prompt_completion", *AUTO_COLUMNS):
        prompt, completion = AUTO_COLUMNS.get(fmt, ("prompt", "completion"))
        return [
            Turn("user", _text(record[prompt], where, prompt)),
            Turn("assistant", _text(record[completion], where, completion)),
        ]
    return _text(record["text"], where, "text")


def to_example(record: Any, where: str) -> Example:
    """One raw record of any supported format as a conversation or a text; an unknown format names `where`."""
    fmt = detect_format(record)
    if fmt is None:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise InputError(
            f"{where}: unknown record format (keys: {keys}); expected one of: messages, "
            "conversations/items (sharegpt), instruction+output (alpaca), prompt+completion, text, "
            "question+answer, query+response, input+output; or map the columns (a source's `columns:`)"
        )
    return normalize(record, fmt, where)


def has_response(example: Example) -> bool:
    """Whether an example has anything to train on: a text, or a conversation with an assistant turn."""
    return isinstance(example, str) or any(turn.role == "assistant" for turn in example)


def count_records(path: str | Path) -> int:
    """Records in a data file (a byte scan for .jsonl, metadata for .parquet, a streaming parse for .json)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise InputError(f"{path}: not a readable parquet file ({exc})") from None
    return sum(1 for _ in iter_records(path))


def iter_examples(path: str | Path) -> Iterator[tuple[str, Example]]:
    """Yield `(location, example)` for every record, detecting each record's format.

    Detection is per record because files written by `scalebio sample` mix the formats of their sources.
    """
    for where, record in iter_records(path):
        yield where, to_example(record, where)
