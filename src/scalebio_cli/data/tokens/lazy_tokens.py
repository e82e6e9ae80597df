"""A source tokenized as its records are drawn: preparation proportional to what a run uses.

A 300-step reweight of 5 sources at batch 32 draws ~2,000 records per source; tokenizing a 1,000,000-record source
whole first would take minutes. `LazyTokens` reads and tokenizes only the records a sampler draws (batching's
RecordSampler), once each, and answers the same questions as TokenizedData about them. What it caches on disk is
only the source's record index (record_reader): the tokens of a few thousand drawn records take well under a
second to make again, and a run that draws other records (another seed) would not reuse them.

Tokenizing is deterministic, so every process of a distributed run, drawing the same records, finds the same
records kept or skipped without communicating.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scalebio_cli.data.read import sources as data_sources
from scalebio_cli.data.read.record_reader import RecordReader
from scalebio_cli.data.read.sources import DataSource
from scalebio_cli.data.tokens.encode_chunks import encode_chunk
from scalebio_cli.data.tokens.render import Renderer

SAMPLE_SIZE = 1_000  # records tokenized up front (seeded) to check the source and estimate truncation
_SAMPLE_STREAM = 0x5A11


class LazyTokens:
    """The records of one source, tokenized on first use. Slots number the kept records in the order they were
    tokenized; `resolve` maps record positions to slots."""

    lazy = True

    def __init__(self, source: DataSource, sha256: str, renderer: Renderer, cache_dir: Path | None):
        self.path, self.sha256, self.max_length = Path(source.path), sha256, renderer.max_length
        self.source, self.renderer = source, renderer
        self.reader = RecordReader(source, sha256, cache_dir)
        self.num_records = self.reader.num_records
        self._slot: dict[int, int] = {}  # record position -> slot, or -1 for a skipped record
        self._ids: list[np.ndarray] = []
        self._trainable: list[np.ndarray] = []
        self._full: dict[int, int] = {}  # record position -> tokens before truncation

    def resolve(self, positions: list[int]) -> list[int | None]:
        """The slot of each record position (None: the record keeps no response token within max_length)."""
        new = sorted({p for p in positions if p not in self._slot})
        if new:
            items = [(where, data_sources.to_example(record, self.source.spec.columns, where))
                     for where, record in self.reader.read(new)]
            chunk = encode_chunk(self.renderer, items)
            bounds = np.concatenate([[0], np.cumsum(chunk.lengths)])
            k = 0
            for position, kept, full in zip(new, chunk.kept, chunk.full_lengths):
                self._full[position] = int(full)
                if kept:
                    self._slot[position] = len(self._ids)
                    self._ids.append(chunk.ids[bounds[k]:bounds[k + 1]])
                    self._trainable.append(chunk.trainable[bounds[k]:bounds[k + 1]])
                    k += 1
                else:
                    self._slot[position] = -1
        return [None if self._slot[p] < 0 else self._slot[p] for p in positions]

    def example(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        return self._ids[slot], self._trainable[slot]

    def length(self, slot: int) -> int:
        return len(self._ids[slot])

    def check_sample(self, seed: int) -> None:
        """Tokenize a seeded sample of the records, so that the statistics below mean something from the start."""
        n = min(SAMPLE_SIZE, self.num_records)
        rng = np.random.default_rng([seed, _SAMPLE_STREAM])
        self.resolve(np.sort(rng.choice(self.num_records, n, replace=False)).tolist() if n else [])

    # Statistics over the records tokenized so far (the sample, then every record drawn).

    @property
    def num_tokenized(self) -> int:
        return len(self._full)

    @property
    def num_kept(self) -> int:
        return len(self._ids)

    @property
    def num_truncated(self) -> int:
        return sum(1 for full in self._full.values() if full > self.max_length)

    def length_covering(self, fraction: float) -> int:
        full = np.fromiter(self._full.values(), dtype=np.int64, count=len(self._full))
        return int(np.quantile(full, fraction, method="higher")) if len(full) else 0
