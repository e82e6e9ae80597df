"""Encoding chunks of examples into flat token arrays, in this process or on every core.

A chunk of examples becomes one `EncodedChunk` (numpy arrays, cheap to send between processes). The serial and
the parallel pass call the same `encode_chunk`, so they give the same tokens by construction. The parallel pass
is for full passes over large sources (finetune's epochs, eval, a reweight source small enough to tokenize whole):
rendering and tokenizing are pure CPU work per record, so they scale with the cores while this process parses.
Workers are forked (Linux): they inherit the loaded tokenizer instead of importing transformers and loading it
again, which costs seconds per worker.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from scalebio_cli.data.records import Example
from scalebio_cli.data.render import Renderer

CHUNK = 512  # examples per batched tokenizer call (and per message to a worker)
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
    encoded = renderer.encode_many([(ex, where) for where, ex in items])
    kept = np.fromiter((e.num_trainable > 0 for e in encoded), dtype=bool, count=len(encoded))
    keep = [e for e, k in zip(encoded, kept) if k]
    lengths = np.fromiter((len(e.input_ids) for e in keep), dtype=np.int64, count=len(keep))
    total = int(lengths.sum())
    ids = np.fromiter((t for e in keep for t in e.input_ids), dtype=np.int32, count=total)
    trainable = np.fromiter((m for e in keep for m in e.trainable), dtype=bool, count=total)
    full = np.fromiter((e.full_length for e in encoded), dtype=np.int32, count=len(encoded))
    return EncodedChunk(ids, trainable, lengths, full, kept)


_worker_renderer: Renderer | None = None  # set in the parent just before forking; each worker inherits it


def _encode_in_worker(items: list[tuple[str, Example]]) -> EncodedChunk:
    assert _worker_renderer is not None
    return encode_chunk(_worker_renderer, items)


def chunked(examples: Iterable[tuple[str, Example]], size: int = CHUNK) -> Iterator[list[tuple[str, Example]]]:
    chunk: list[tuple[str, Example]] = []
    for item in examples:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def default_workers() -> int:
    """One worker per core this process may use (the parent only parses), at most MAX_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def encode_all(renderer: Renderer, examples: Iterable[tuple[str, Example]], workers: int = 1) -> Iterator[EncodedChunk]:
    """EncodedChunks of `examples` in order; `workers` > 1 forks that many processes (where fork exists)."""
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for chunk in chunked(examples):
            yield encode_chunk(renderer, chunk)
        return
    global _worker_renderer
    _worker_renderer = renderer
    # Workers must not start their own thread pools in the tokenizer: that is what the cores are for.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            # In order, with a bounded window: a few chunks in flight per worker keep every worker busy while the
            # parent parses, without queueing a whole large source in memory (Pool.imap would).
            pending: deque[Any] = deque()
            for chunk in chunked(examples):
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
