"""Encoding chunks of records into flat token arrays, in this process or on every core.

A chunk of records becomes one `EncodedChunk` (numpy arrays, cheap to send between processes). The serial and
the parallel pass call the same `encode_records`, so they give the same tokens by construction. The parallel pass
is for full passes over large sources (finetune's epochs, eval, a reweight source small enough to tokenize whole):
parsing, rendering and tokenizing are pure CPU work per record, so they scale with the cores. This process only
reads the records (a plain `.jsonl` file: its lines, unparsed) and hands them out: on a small machine it shares
the cores with the workers. Workers are forked (Linux): they inherit the loaded tokenizer instead of importing
transformers and loading it again, which costs seconds per worker.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from scalebio_cli.data.read.records import Example
from scalebio_cli.data.read.sources import RecordChunk
from scalebio_cli.data.tokens.render import Renderer, TokenBatch

CHUNK = 512  # records per batched tokenizer call (and per message to a worker)
PARALLEL_MIN_RECORDS = 20_000  # below this a pool's start-up (~0.1 s per forked worker) is not worth it
MAX_WORKERS = 8


@dataclass
class EncodedChunk:
    """The records of one chunk: tokens of the kept ones, and per record its untruncated length and kept flag."""

    ids: np.ndarray  # int32, kept records' tokens concatenated
    trainable: np.ndarray  # bool, same length
    lengths: np.ndarray  # int64, per kept record
    full_lengths: np.ndarray  # int32, per record
    kept: np.ndarray  # bool, per record: does it keep a response token within max_length?


def encode_chunk(renderer: Renderer, items: list[tuple[str, Example]]) -> EncodedChunk:
    """`(where, example)` pairs, truncated on the right to max_length."""
    return truncate(renderer.encode_batch([(ex, where) for where, ex in items]), renderer.max_length)


def encode_records(renderer: Renderer, chunk: RecordChunk) -> EncodedChunk:
    return encode_chunk(renderer, chunk.examples())


def truncate(batch: TokenBatch, max_length: int) -> EncodedChunk:
    """Each record's first max_length tokens; a record is kept when one of them after the first is trainable
    (position 0 is never predicted)."""
    n = len(batch.lengths)
    record = np.repeat(np.arange(n), batch.lengths)
    position = np.arange(len(batch.ids)) - np.repeat(np.cumsum(batch.lengths) - batch.lengths, batch.lengths)
    within = position < max_length
    kept = np.bincount(record[batch.trainable & within & (position > 0)], minlength=n) > 0
    take = within & kept[record]
    return EncodedChunk(batch.ids[take], batch.trainable[take], np.minimum(batch.lengths, max_length)[kept],
                        batch.lengths.astype(np.int32), kept)


_worker_renderer: Renderer | None = None  # set in the parent just before forking; each worker inherits it


def _encode_in_worker(chunk: RecordChunk) -> EncodedChunk:
    assert _worker_renderer is not None
    return encode_records(_worker_renderer, chunk)


def default_workers() -> int:
    """One worker per core this process may use (the parent only reads), at most MAX_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def encode_all(renderer: Renderer, chunks: Iterable[RecordChunk], workers: int = 1) -> Iterator[EncodedChunk]:
    """EncodedChunks of `chunks` in order; `workers` > 1 forks that many processes (where fork exists). An error
    reading the records is raised after the chunks read before it, as in a serial pass: the error reported is the
    first bad record's."""
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for chunk in chunks:
            yield encode_records(renderer, chunk)
        return
    global _worker_renderer
    _worker_renderer = renderer
    # Workers must not start their own thread pools in the tokenizer: that is what the cores are for.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            # In order, with a bounded window: a few chunks in flight per worker keep every worker busy while the
            # parent reads, without queueing a whole large source in memory (Pool.imap would).
            pending: deque[Any] = deque()
            reading = iter(chunks)
            while True:
                try:
                    chunk = next(reading, None)
                except Exception:
                    while pending:
                        yield pending.popleft().get()
                    raise
                if chunk is None:
                    break
                pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
                if len(pending) >= 3 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        _worker_renderer = None
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
