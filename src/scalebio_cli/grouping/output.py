"""What `scalebio group` writes: every record of the sources, unchanged, plus `"group": "SOURCE/gNN"` (or
normalised to messages), in source order and file order; and the example records a manifest shows per group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scalebio_cli.data.out.normalize import to_messages
from scalebio_cli.data.out.parquet_out import jsonl_to_parquet
from scalebio_cli.data.out.record_writer import json_line
from scalebio_cli.data.read import sources as data_sources
from scalebio_cli.data.read.sources import DataSource
from scalebio_cli.errors import InputError
from scalebio_cli.files import atomic_path

FIELD = "group"
EXAMPLE_CHARS = 400  # text of an example record shown in the manifest, per field


def record_labels(kept_labels: np.ndarray, record_index: np.ndarray, num_records: int) -> tuple[np.ndarray, int]:
    """A cluster for every record of a source from its kept examples' clusters: a record kept no example (no
    response token within max_length; reweight skips it too) joins the source's largest group. Returns the labels
    and how many records were placed that way."""
    labels = np.full(num_records, -1, dtype=np.int64)
    labels[record_index] = kept_labels
    skipped = int((labels < 0).sum())
    if skipped:
        values, counts = np.unique(kept_labels, return_counts=True)
        labels[labels < 0] = values[np.argmax(counts)]
    return labels, skipped


def group_name(source: str, cluster: int) -> str:
    return f"{source}/g{cluster:02d}"


def _grouped(record: Any, group: str, fmt: str, source: DataSource, where: str) -> dict[str, Any]:
    if fmt == "messages":
        return {"messages": to_messages(data_sources.to_example(record, source.spec.columns, where)), FIELD: group}
    if not isinstance(record, dict):
        raise InputError(f"{where}: a record that is not a mapping cannot carry a '{FIELD}' field")
    if FIELD in record:
        raise InputError(f"{where}: the record already has a '{FIELD}' column ({record[FIELD]!r}), which the output "
                         f"would overwrite; rename that column, or write --format messages")
    return {**record, FIELD: group}


def write_grouped(sources: dict[str, DataSource], labels: dict[str, np.ndarray], output: Path, fmt: str) -> None:
    """Write every record of every source with its group to `output` (.jsonl or .parquet), atomically."""
    with atomic_path(output) as tmp:
        lines = tmp.with_name(tmp.name + ".jsonl") if output.suffix == ".parquet" else tmp
        try:
            with open(lines, "w", encoding="utf-8") as out:
                for name, source in sources.items():
                    mine = labels[name]
                    count = 0
                    for where, record in data_sources.iter_records(source):
                        if count >= len(mine):
                            raise InputError(f"{source.path}: has more records than when it was read; was it "
                                             "modified while `group` ran?")
                        out.write(json_line(_grouped(record, group_name(name, int(mine[count])), fmt, source,
                                                     where)) + "\n")
                        count += 1
                    if count != len(mine):
                        raise InputError(f"{source.path}: has fewer records than when it was read; was it modified "
                                         "while `group` ran?")
            if lines != tmp:
                jsonl_to_parquet(lines, tmp)
        finally:
            if lines != tmp:
                lines.unlink(missing_ok=True)


def _shortened(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= EXAMPLE_CHARS else value[:EXAMPLE_CHARS] + "…"
    if isinstance(value, dict):
        return {k: _shortened(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shortened(v) for v in value]
    return value if isinstance(value, (int, float, bool)) or value is None else str(value)


def example_records(source: DataSource, positions: list[int]) -> dict[int, Any]:
    """The records at `positions` of a source (texts cut at EXAMPLE_CHARS characters), by position."""
    wanted = sorted(set(positions))
    return {p: _shortened(r) for p, r in data_sources.records_at(source, wanted)}
