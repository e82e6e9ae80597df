"""Sources where users keep them: a recipe's source spec (recipe/schema.SourceSpec) as records.

A source's rows come from a table (data/read/tables.py: a plain local file, or a split loaded by data/read/hub.py
through `datasets`). On top of either: the column map (`columns`), one value of a `split_by` column
(data/read/expand.py makes one source per value), and a seeded choice of at most `max_samples` records. A source's
records are then the chosen rows, in file order.

A `DataSource` is recorded in weights.json (`to_record`) so that `sample` and `finetune` read it back the same way
(`from_record`; results/weights_file.py `doc_sources`); its `fingerprint` hashes the underlying files, as the sha256
of a plain file always did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalebio_cli.data.read import hub, records
from scalebio_cli.data.read.records import Example, Turn
from scalebio_cli.data.read.tables import HFTable, PlainTable, plain_file
from scalebio_cli.errors import InputError
from scalebio_cli.recipe.schema import SourceSpec

_CHOICE_STREAM = 0x3A5  # max_samples's seeded choice


@dataclass(frozen=True)
class DataSource:
    """One source as a stage reads it: the spec, plus which value of `split_by` it keeps and the seed of its
    `max_samples` choice (the recipe's seed; the choice also depends on `name`)."""

    key: str  # how messages name it: data.sources.NAME, data.validation, --data NAME, ...
    spec: SourceSpec
    name: str = ""
    value: str | None = None  # the value of spec.split_by this source keeps
    seed: int = 0

    @property
    def path(self) -> str:
        return self.spec.path

    def __str__(self) -> str:  # messages name a source by its path
        return self.spec.path

    @property
    def is_plain(self) -> bool:
        """A plain local file read as in v1 (weights.json records nothing more than its path)."""
        return self.spec.is_plain and self.value is None and plain_file(self.spec) is not None


def from_path(key: str, path: str | os.PathLike[str]) -> DataSource:
    return DataSource(key, SourceSpec(str(path)))


def open_table(source: DataSource) -> PlainTable | HFTable:
    plain = plain_file(source.spec)
    if plain is not None:
        return PlainTable(plain)
    p = Path(source.path)
    if p.suffix in records.EXTENSIONS and p.is_file() and source.spec.split not in (None, "train"):
        raise InputError(f"{source.key}: split '{source.spec.split}' not found in {p}; a single file has one split: "
                         "train")
    return hub.load_split(source.spec.path, source.spec.name, source.spec.split, source.key)


# ---------------------------------------------------------------------------------------------------------------
# The chosen rows, their records and examples.


def _choice_seed(seed: int, name: str) -> list[int]:
    return [seed, _CHOICE_STREAM, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)]


def value_name(value: Any) -> str:
    return str(value)


def selected_rows(source: DataSource, table: PlainTable | HFTable | None = None) -> np.ndarray | None:
    """Row indices of the table this source keeps (sorted), or None for all of them."""
    spec = source.spec
    if source.value is None and spec.max_samples is None:
        return None
    table = table or open_table(source)
    if source.value is not None:
        values = table.column(spec.split_by or "")
        rows = np.asarray([i for i, v in enumerate(values) if value_name(v) == source.value], dtype=np.int64)
    else:
        rows = np.arange(len(table), dtype=np.int64)
    if spec.max_samples is not None and len(rows) > spec.max_samples:
        rng = np.random.default_rng(_choice_seed(source.seed, source.name or source.key))
        rows = np.sort(rng.choice(rows, spec.max_samples, replace=False))
    return rows


def count(source: DataSource) -> int:
    table = open_table(source)
    rows = selected_rows(source, table)
    return len(table) if rows is None else len(rows)


def iter_records(source: DataSource) -> Iterator[tuple[str, Any]]:
    """`(location, raw record)` of every chosen row, in file order."""
    table = open_table(source)
    yield from _chosen(table, selected_rows(source, table))


def _chosen(table: PlainTable | HFTable, rows: np.ndarray | None) -> Iterator[tuple[str, Any]]:
    if rows is None:
        return table.rows()
    if isinstance(table, HFTable):
        return table.rows(rows.tolist())
    return _pick(table.rows(), rows.tolist())


def _pick(stream: Iterator[tuple[str, Any]], wanted: list[int]) -> Iterator[tuple[str, Any]]:
    targets = iter(wanted)
    target = next(targets, None)
    for index, item in enumerate(stream):
        if target is None:
            return
        if index == target:
            yield item
            target = next(targets, None)


def records_at(source: DataSource, positions: list[int]) -> Iterator[tuple[int, Any]]:
    """`(position, raw record)` for sorted unique positions among the source's chosen records (what sample draws)."""
    table = open_table(source)
    rows = selected_rows(source, table)
    underlying = positions if rows is None else rows[positions].tolist()
    stream = table.rows(underlying) if isinstance(table, HFTable) else _pick(table.rows(), underlying)
    for position, (_, record) in zip(positions, stream):
        yield position, record


def _mapped(record: Any, columns: dict[str, str], where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a record with columns, got {type(record).__name__}")
    missing = [f"'{c}' (columns.{f})" for f, c in columns.items() if c not in record]
    if missing:
        raise InputError(f"{where}: column {', '.join(missing)} missing; its columns: {', '.join(sorted(record))}")
    return {f: record[c] for f, c in columns.items()}


def to_example(record: Any, columns: dict[str, str], where: str) -> Example:
    """One raw record as an example: through the column map when there is one (a mapped `system` column becomes
    the conversation's system turn), else by the record's own format."""
    if not columns:
        return records.to_example(record, where)
    mapped = _mapped(record, columns, where)
    system = mapped.pop("system", None)
    example = records.to_example(mapped, where)
    if system is not None and not isinstance(example, str):
        if not isinstance(system, str):
            raise InputError(f"{where}: the system column '{columns['system']}' must hold text")
        if system.strip():
            example = [Turn("system", system), *example]
    return example


def iter_examples(source: DataSource) -> Iterator[tuple[str, Example]]:
    for where, record in iter_records(source):
        yield where, to_example(record, source.spec.columns, where)


@dataclass
class RecordChunk:
    """Consecutive records of a source as read, and its column map: `examples()` makes examples of them. The records
    of a plain `.jsonl` file come as their lines, unparsed: parsing the JSON is most of the cost of reading, so a
    parallel pass leaves it to the worker process that makes the examples."""

    columns: dict[str, str]
    parsed: list[tuple[str, Any]] = field(default_factory=list)  # (location, record)
    path: Path | None = None  # the file of `lines`
    lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, line), as records.iter_jsonl_lines

    def __len__(self) -> int:
        return len(self.parsed) + len(self.lines)

    def records(self) -> Iterator[tuple[str, Any]]:
        yield from self.parsed
        for lineno, line in self.lines:
            yield records.parse_jsonl_line(self.path or "", lineno, line)

    def examples(self) -> list[tuple[str, Example]]:
        return [(where, to_example(record, self.columns, where)) for where, record in self.records()]


def iter_record_chunks(source: DataSource, size: int) -> Iterator[RecordChunk]:
    """The records of `iter_records(source)`, `size` at a time (a plain `.jsonl` file read whole: as lines)."""
    table = open_table(source)
    rows = selected_rows(source, table)
    columns = source.spec.columns
    if rows is None and isinstance(table, PlainTable) and table.path.suffix == ".jsonl":
        for lines in _parts(records.iter_jsonl_lines(table.path), size):
            yield RecordChunk(columns, path=table.path, lines=lines)
    else:
        for parsed in _parts(_chosen(table, rows), size):
            yield RecordChunk(columns, parsed=parsed)


def _parts(stream: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """`stream` in lists of `size`. An error reading it comes after a list of what was read before it, so that a
    pass over the lists reports the first bad record, as a pass over iter_examples does."""
    part: list[Any] = []
    try:
        for item in stream:
            part.append(item)
            if len(part) >= size:
                yield part
                part = []
    except Exception:
        if part:
            yield part
        raise
    if part:
        yield part


def fingerprint(source: DataSource) -> str:
    """The sha256 of the data under the source (a plain file: its sha256, as in v1)."""
    return open_table(source).fingerprint()


def content_key(source: DataSource, data_sha256: str) -> str:
    """What the tokens depend on beyond the tokenizer: the data and, for a spec, how it is read and chosen."""
    if source.is_plain:
        return data_sha256
    how = json.dumps(to_record(source), sort_keys=True)
    return hashlib.sha256(f"{data_sha256}|{how}".encode()).hexdigest()


def column_problems(source: DataSource) -> list[str]:
    """Mapped columns that the data does not have (named with the source, the column and the columns present)."""
    columns = source.spec.columns
    if not columns:
        return []
    present = open_table(source).column_names()
    return [f"{source.key}.columns.{f}: column '{c}' is not in {source.path}; its columns: {', '.join(present)}"
            for f, c in columns.items() if c not in present]


def to_record(source: DataSource) -> dict[str, Any]:
    """How to read the source again (weights.json `sources.NAME.source`)."""
    spec = {k: v for k, v in dataclasses.asdict(source.spec).items() if v not in (None, {}) and k != "weight"}
    return {"spec": spec, "value": source.value, "seed": source.seed, "name": source.name}


def from_record(key: str, path: str, info: Any) -> DataSource:
    """The inverse of to_record (a plain path when weights.json recorded nothing more)."""
    if not isinstance(info, dict) or not isinstance(info.get("spec"), dict):
        return from_path(key, path)
    try:
        spec = SourceSpec(**{k: v for k, v in info["spec"].items() if k in {f.name for f in
                                                                           dataclasses.fields(SourceSpec)}})
    except TypeError as exc:
        raise InputError(f"{key}: the recorded source cannot be read back ({exc})") from None
    value = info.get("value")
    return DataSource(key, spec, str(info.get("name") or ""), None if value is None else str(value),
                      int(info.get("seed") or 0))
