"""Writing chosen records of sources to one output file, as `sample` (and `select`) write them.

Each chosen record is written unchanged plus `"source": NAME` (or normalised to `{"messages": [...]}`), at the
output position its caller gives it. Records are streamed: each source file is read once and only the chosen
records are parsed; chosen records are appended to a scratch file and the output is assembled from their byte
offsets, so memory holds two integer arrays of the output's length, never whole files. An output ending in
`.parquet` is written as JSON lines first and converted in batches (data/out/parquet_out.py). The output replaces its
path atomically: a failure leaves no partial file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scalebio_cli.data.out.normalize import to_messages
from scalebio_cli.data.out.parquet_out import jsonl_to_parquet
from scalebio_cli.data.read import sources as data_sources
from scalebio_cli.data.read.sources import DataSource
from scalebio_cli.errors import InputError
from scalebio_cli.files import atomic_path

FORMATS = ("original", "messages")


def output_problems(output: Path, fmt: str, force: bool) -> list[str]:
    """The usage problems of a records output (`--output`, `--format`, `--force`) that `select` and `group` share:
    a known format, a .jsonl or .parquet name, and no existing file unless --force."""
    problems = []
    if fmt not in FORMATS:
        problems.append(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if output.suffix not in (".jsonl", ".parquet"):
        problems.append(f"--output {output}: must end in .jsonl or .parquet (the output type follows the extension)")
    if output.exists() and not output.is_dir() and not force:
        problems.append(f"--output {output}: already exists; pass --force to replace it (and its manifest)")
    return problems


def output_record(record: Any, name: str, fmt: str, where: str, columns: dict[str, str] | None = None) -> dict[str,
                                                                                                            Any]:
    """What one drawn record becomes in the output: unchanged plus `source`, or normalised to messages (through
    the source's column map, if it has one)."""
    if fmt == "messages":
        return {"messages": to_messages(data_sources.to_example(record, columns or {}, where)), "source": name}
    return {**record, "source": name} if isinstance(record, dict) else {"record": record, "source": name}


# Characters that JSON leaves raw (ensure_ascii=False) but that line-based readers take for line breaks
# (Python's str.splitlines, JavaScript): escaped, so one record stays one line for every reader.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def json_line(record: Any) -> str:
    """One JSON record as one line (UTF-8 kept readable, line separators escaped)."""
    text = json.dumps(record, ensure_ascii=False)
    for raw, escaped in _LINE_BREAKS.items():
        text = text.replace(raw, escaped)
    return text


def iter_chosen(source: DataSource, chosen: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (index, record) for the records at the sorted indices `chosen`, parsing only those for a plain
    .jsonl (any other source: through data/read/sources.py, which applies its split_by and max_samples choice)."""
    if not len(chosen):
        return
    if not source.is_plain:
        yield from data_sources.records_at(source, np.unique(chosen).tolist())
        return
    path = Path(source.path)
    wanted = iter(np.unique(chosen).tolist())
    target = next(wanted, None)
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            index = -1
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                index += 1
                if index != target:
                    continue
                try:
                    yield index, json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise InputError(f"{path}:{lineno}: not valid JSON ({exc})") from None
                target = next(wanted, None)
                if target is None:
                    return
    else:
        for index, (_, record) in enumerate(data_sources.iter_records(source)):
            if index == target:
                yield index, record
                target = next(wanted, None)
                if target is None:
                    return


@dataclass
class Chosen:
    """The records of one source to write: record indices (sorted; repeats allowed) and, for each, its output
    position."""

    name: str
    source: DataSource
    picks: np.ndarray
    slots: np.ndarray


def write_records(chosen: list[Chosen], total: int, output: Path, fmt: str = "original") -> None:
    """Write the `total` chosen records, each at its slot, to `output` (.jsonl, or .parquet), atomically."""
    offsets = np.zeros(total, dtype=np.int64)
    lengths = np.zeros(total, dtype=np.int64)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=output.parent) as scratch:
        for part in chosen:
            order = np.argsort(part.picks, kind="stable")
            picks, slots, n = part.picks[order], part.slots[order], len(part.picks)
            j = 0
            for index, record in iter_chosen(part.source, picks):
                record = output_record(record, part.name, fmt, f"{part.source.path} record {index}",
                                       part.source.spec.columns)
                line = (json_line(record) + "\n").encode()
                while j < n and picks[j] == index:  # a record drawn several times (replacement)
                    offsets[slots[j]] = scratch.tell()
                    lengths[slots[j]] = len(line)
                    scratch.write(line)
                    j += 1
            if j != n:
                raise InputError(f"{part.source.path}: has fewer records than expected; was it modified while "
                                 "being read?")
        scratch.flush()
        with atomic_path(output) as tmp:
            lines = tmp.with_name(tmp.name + ".jsonl") if output.suffix == ".parquet" else tmp
            try:
                with open(lines, "wb") as out:
                    fd = scratch.fileno()
                    for off, length in zip(offsets.tolist(), lengths.tolist()):  # positioned reads: no file in memory
                        out.write(os.pread(fd, length, off))
                if lines != tmp:
                    jsonl_to_parquet(lines, tmp)
            finally:
                if lines != tmp:
                    lines.unlink(missing_ok=True)
