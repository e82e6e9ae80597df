"""Which source each training or evaluation example came from, so its loss can be reported per source.

Two ways to know: the files a run mixes (finetune with a weights file: one label per data.sources name), or the
`source` field that `sample` and `select` write into every record (one file, many sources). Labels are indices
into `names`, one array per data file, aligned with the file's kept examples (TokenizedData's order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scalebio_cli.data.read import sources as data_sources
from scalebio_cli.data.read.sources import DataSource

FIELD = "source"
NO_SOURCE = "(no source)"  # records without the field, when others of the same file have it
MAX_LABELS = 64  # more distinct values than this: a free-text column, not a handful of sources; not reported


@dataclass
class SourceLabels:
    names: list[str]
    per_file: list[np.ndarray]  # int64, the label of each kept example of each data file

    def of(self, items: Sequence[tuple[int, int]]) -> list[int]:
        """The label of each `(file, example)` item."""
        return [int(self.per_file[k][i]) for k, i in items]


def by_file(names: list[str], sizes: list[int]) -> SourceLabels:
    """Every example of file k is labelled names[k] (the sources a weights file mixes)."""
    return SourceLabels(list(names), [np.full(n, k, dtype=np.int64) for k, n in enumerate(sizes)])


def field_values(source: DataSource) -> list[str | None]:
    """The `source` field of every chosen record of `source` (None where a record has none)."""
    out: list[str | None] = []
    for _, record in data_sources.iter_records(source):
        value = record.get(FIELD) if isinstance(record, dict) else None
        out.append(None if value is None or value == "" else str(value))
    return out


def from_field(source: DataSource, kept: np.ndarray) -> tuple[SourceLabels | None, str]:
    """Labels from the records' `source` field for the kept examples (`kept`: their record positions), and a note
    for the log. None when no record carries the field, or when it holds more than MAX_LABELS distinct values."""
    values = field_values(source)
    present = sorted({v for v in values if v is not None})
    if not present:
        return None, ""
    if len(present) > MAX_LABELS:
        return None, (f"{source.key}: the records' `{FIELD}` field holds {len(present):,} distinct values (more "
                      f"than {MAX_LABELS}); no loss per source")
    names = present + ([NO_SOURCE] if any(v is None for v in values) else [])
    index = {name: i for i, name in enumerate(names)}
    labels = np.asarray([index[v if v is not None else NO_SOURCE] for v in values], dtype=np.int64)
    return SourceLabels(names, [labels[np.asarray(kept, dtype=np.int64)]]), ""
