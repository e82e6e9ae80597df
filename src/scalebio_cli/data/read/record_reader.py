"""Records of a source by position, without reading the whole source: what lazy tokenization draws from.

A plain `.jsonl` file is read through an index of the byte offset and line number of each record (one scan of the
file, ~1 s per GB, cached by the file's content hash as a raw `.npy` file, memory-mapped); a `datasets` table
(`HFTable`) is random-access already. Other files (a `.json` list, a plain `.parquet`) are read once into memory:
their records cannot be found by position without parsing everything before them.
"""

from __future__ import annotations

import functools
import json
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from scalebio_cli.data.read import sources as data_sources
from scalebio_cli.data.read.sources import DataSource
from scalebio_cli.data.read.tables import HFTable, plain_file
from scalebio_cli.errors import InputError, json_error
from scalebio_cli.files import atomic_path

INDEX_VERSION = "1"
# Sources with at least this many records, when read by position, are read lazily: reweight tokenizes only the
# records it draws (lazy_tokens) and preflight checks a seeded sample up front (a full parse runs at ~50,000
# records/s: 20 s for a million records before the first step); the others are checked as they are read.
LAZY_MIN_RECORDS = 50_000


def _scan_jsonl(path: Path) -> np.ndarray:
    """[byte offset, line number] of every non-blank line (blank as records.count_records counts it), scanned once
    per process for a file that did not change (preflight's sampled check and the run read the same index)."""
    stat = path.stat()
    return _scan_jsonl_once(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _scan_jsonl_once(path_str: str, size: int, mtime_ns: int) -> np.ndarray:
    path = Path(path_str)
    # typed arrays, 8 bytes a value: lists of Python ints peaked at ~110 bytes a record (~110 MB for a million)
    starts, linenos = array("q"), array("q")
    pos = 0
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                starts.append(pos)
                linenos.append(lineno)
            pos += len(line)
    if not starts:
        return np.zeros((0, 2), dtype=np.int64)
    return np.stack([np.frombuffer(starts, dtype=np.int64), np.frombuffer(linenos, dtype=np.int64)], axis=1)


def jsonl_index(path: Path, sha256: str, cache_dir: Path | None) -> np.ndarray:
    """The line index of a `.jsonl` file, from the cache when it holds one for this content."""
    cached = cache_dir / "records" / f"{sha256[:32]}-v{INDEX_VERSION}.npy" if cache_dir else None
    if cached is not None and cached.is_file():
        try:
            index = np.load(cached, mmap_mode="r", allow_pickle=False)
            if index.ndim == 2 and index.shape[1] == 2:
                return index
        except (OSError, ValueError):
            pass  # damaged: rebuilt below
    index = _scan_jsonl(path)
    if cached is not None:
        try:
            with atomic_path(cached) as tmp, open(tmp, "wb") as f:
                np.save(f, index, allow_pickle=False)
        except OSError:
            pass  # an unwritable cache only costs time
    return index


class RecordReader:
    """`read(positions)`: `(location, raw record)` of the source's chosen records at those positions."""

    def __init__(self, source: DataSource, sha256: str, cache_dir: Path | None):
        self.source = source
        table = data_sources.open_table(source)
        rows = data_sources.selected_rows(source, table)
        self._rows = rows  # position -> row of the table (None: the same)
        self._path: Path | None = None
        self._table: HFTable | None = None
        self._all: list[tuple[str, Any]] | None = None
        if isinstance(table, HFTable):
            self._table = table
            total = len(table)
        elif table.path.suffix == ".jsonl":
            self._path = table.path
            self._index = jsonl_index(table.path, sha256, cache_dir)
            total = len(self._index)
        else:
            self._all = list(table.rows())
            total = len(self._all)
        self.num_records = total if rows is None else len(rows)

    def read(self, positions: list[int]) -> list[tuple[str, Any]]:
        rows = positions if self._rows is None else self._rows[positions].tolist()
        if self._table is not None:
            return list(self._table.rows(rows))
        if self._all is not None:
            return [self._all[r] for r in rows]
        return self._read_lines(rows)

    def _read_lines(self, rows: list[int]) -> list[tuple[str, Any]]:
        assert self._path is not None
        out: list[tuple[str, Any] | None] = [None] * len(rows)
        with self._path.open("rb") as f:
            for slot in sorted(range(len(rows)), key=lambda j: rows[j]):  # in file order: forward seeks
                offset, lineno = (int(v) for v in self._index[rows[slot]])
                f.seek(offset)
                where = f"{self._path}:{lineno}"
                try:
                    out[slot] = (where, json.loads(f.readline()))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{where}: not valid JSON ({json_error(exc)})") from None
                except UnicodeDecodeError as exc:
                    raise InputError(f"{self._path}: not UTF-8 text ({exc.reason} at byte {offset + exc.start})") \
                        from None
        return out  # type: ignore[return-value]


def is_indexed(source: DataSource) -> bool:
    """Whether records are found by position without reading the whole source (see the module docstring)."""
    plain = plain_file(source.spec)
    return (plain.suffix == ".jsonl") if plain is not None else True


def large_source(source: DataSource, records: int, bytes_per_record: int = 100) -> bool:
    """Whether a source may hold `records` records or more, found without parsing it: a plain file by its size
    (at `bytes_per_record`; callers that need the exact count read it next), anything else by its row count."""
    plain = plain_file(source.spec)
    if plain is not None:
        return plain.stat().st_size >= records * bytes_per_record
    return data_sources.count(source) >= records


def long_pass(source: DataSource) -> bool:
    """Whether a full pass over the source (tokenizing it whole, the data checks) is worth a pool of workers and a
    progress bar: it may hold fork_map.PARALLEL_MIN_RECORDS records (~850 bytes a record of instruct-math: sized
    at 800)."""
    from scalebio_cli.data.fork_map import PARALLEL_MIN_RECORDS

    return large_source(source, PARALLEL_MIN_RECORDS, bytes_per_record=800)


def full_pass_workers(source: DataSource) -> int:
    """Processes for a full pass over the source: one per core for a long pass, else 1."""
    from scalebio_cli.data.fork_map import default_workers

    return default_workers() if long_pass(source) else 1


def may_read_lazily(source: DataSource, records: int = LAZY_MIN_RECORDS) -> bool:
    """Whether a source is read by position and may hold `records` records or more (the exact count is the
    caller's next read)."""
    return is_indexed(source) and large_source(source, records)
