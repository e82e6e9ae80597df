"""The line index of a large `.jsonl` source costs memory of the index's size, not of Python objects a line
(scripts/bench_pool.py: a pool of millions of records must not grow memory beyond an index)."""

from __future__ import annotations

import tracemalloc

import numpy as np

from scalebio_cli.data.read import record_reader


def test_index_scan_peak_memory_is_near_the_index_size(tmp_path):
    lines = 200_000
    path = tmp_path / "big.jsonl"
    # blank lines between records: they are skipped, and line numbers still count them
    path.write_text("".join(f'{{"text": "record {i}"}}\n' + ("\n" if i % 1000 == 0 else "") for i in range(lines)))
    record_reader._scan_jsonl_once.cache_clear()
    tracemalloc.start()
    try:
        index = record_reader._scan_jsonl(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        record_reader._scan_jsonl_once.cache_clear()
    assert index.shape == (lines, 2) and index.dtype == np.int64
    # the index itself is 16 bytes a record; a Python int in a list costs ~36 (the scan peaked at ~110 a record)
    assert peak / lines < 48, f"{peak / lines:.0f} bytes a record at the peak of the index scan"
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    line_starts = np.concatenate([[0], np.flatnonzero(data == ord("\n"))[:-1] + 1])  # the file ends in a newline
    records = np.flatnonzero(data[line_starts] != ord("\n"))
    assert index[:, 0].tolist() == line_starts[records].tolist()
    assert index[:, 1].tolist() == (records + 1).tolist()
    assert index[1001, 1] == 1004  # record 1001 follows the blank lines after records 0 and 1000
