"""Table backends: the rows under a source, before split_by and max_samples.

A plain local `.json`/`.jsonl`/`.parquet` file is a `PlainTable`, streamed by records.py with its line-numbered
messages (`file.jsonl:17`); everything else is one split of a `datasets.Dataset`, an `HFTable` (data/read/hub.py
loads it). Both give rows, column names, one column, and a fingerprint of the data under them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scalebio_cli.data.read import records
from scalebio_cli.files import file_sha256
from scalebio_cli.recipe.schema import SourceSpec

COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
SUPPORTED = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")


def suffix(path: str) -> str:
    """`.jsonl`, or `.jsonl.gz` for a compressed file."""
    p = Path(path)
    if p.suffix in COMPRESSIONS:
        return Path(p.stem).suffix + p.suffix
    return p.suffix


def plain_file(spec: SourceSpec) -> Path | None:
    """The file, when records.py reads it directly: a local .json/.jsonl/.parquet, no configuration, split train."""
    p = Path(spec.path)
    if p.suffix in records.EXTENSIONS and spec.name is None and spec.split in (None, "train") and p.is_file():
        return p
    return None


class PlainTable:
    """A local .json/.jsonl/.parquet file, streamed by records.py."""

    def __init__(self, path: Path):
        self.path = path

    def __len__(self) -> int:
        return records.count_records(self.path)

    def rows(self) -> Iterator[tuple[str, Any]]:
        return records.iter_records(self.path)

    def column_names(self) -> list[str]:
        if self.path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(self.path).schema_arrow.names)
        first = next(iter(self.rows()), (None, None))[1]
        return sorted(first) if isinstance(first, dict) else []

    def column(self, name: str) -> list[Any]:
        return [r.get(name) if isinstance(r, dict) else None for _, r in self.rows()]

    def fingerprint(self) -> str:
        return file_sha256(self.path)


class HFTable:
    """One split of a `datasets.Dataset` (loaded once per process: see `_load`)."""

    def __init__(self, label: str, dataset: Any, files: tuple[str, ...]):
        self.label, self.dataset, self.files = label, dataset, files

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, indices: list[int] | None = None) -> Iterator[tuple[str, Any]]:
        ds = self.dataset if indices is None else self.dataset.select(indices)
        for i, row in enumerate(ds):
            yield f"{self.label} row {i if indices is None else indices[i]}", row

    def column_names(self) -> list[str]:
        return list(self.dataset.column_names)

    def column(self, name: str) -> list[Any]:
        return list(self.dataset[name])

    def fingerprint(self) -> str:
        """The underlying files (name and content); datasets' own fingerprint for a dataset with no local files."""
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f"{Path(f).name}\0{file_sha256(f)}\0".encode())
        if not self.files:
            digest.update(str(self.dataset._fingerprint).encode())
        return digest.hexdigest()
