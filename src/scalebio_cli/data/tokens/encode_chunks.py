"""Encoding chunks of records into flat token arrays, in this process or on every core.

A chunk of records becomes one `EncodedChunk` (numpy arrays, cheap to send between processes). The serial and
the parallel pass call the same `encode_records`, so they give the same tokens by construction. The parallel pass
(data/fork_map.py) is for full passes over large sources (finetune's epochs, eval, a reweight source small enough
to tokenize whole). Forked workers inherit the loaded tokenizer instead of importing transformers and loading it
again, which costs seconds per worker.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from scalebio_cli.data.fork_map import ordered_map
from scalebio_cli.data.read.records import Example
from scalebio_cli.data.read.sources import RecordChunk
from scalebio_cli.data.tokens.render import Renderer, TokenBatch

CHUNK = 512  # records per batched tokenizer call (and per message to a worker)


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


def encode_all(renderer: Renderer, chunks: Iterable[RecordChunk], workers: int = 1) -> Iterator[EncodedChunk]:
    """EncodedChunks of `chunks` in order, on `workers` forked processes (data/fork_map.py)."""
    # Workers must not start their own thread pools in the tokenizer: that is what the cores are for.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    if workers > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield from ordered_map(functools.partial(encode_records, renderer), chunks, workers)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
