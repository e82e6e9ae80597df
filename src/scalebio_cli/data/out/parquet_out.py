"""JSON lines -> Parquet, streaming (batches of rows, never the whole file in memory).

Parquet has one schema per file, while a file of original records from several sources mixes several. Pass one
infers each batch's schema and unifies them (a column missing from a record becomes null); pass two writes every
batch under that one schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BATCH_ROWS = 4096


def _batches(path: Path, rows: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                batch.append(json.loads(line))
                if len(batch) == rows:
                    yield batch
                    batch = []
    if batch:
        yield batch


def jsonl_to_parquet(src: Path, dst: Path, rows: int = BATCH_ROWS) -> int:
    """Write the JSON lines of `src` to the Parquet file `dst`; returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # pa.array infers a struct over the keys of every row (Table.from_pylist would take the first row's keys)
    schemas = [pa.schema(list(pa.array(batch).type)) for batch in _batches(src, rows)]
    if not schemas:
        pq.write_table(pa.table({}), dst)
        return 0
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    count = 0
    with pq.ParquetWriter(dst, schema) as writer:
        for batch in _batches(src, rows):
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count
