"""Data checks before any training: what in the sources would fool the method, said before it runs.

A bilevel method that lowers validation loss up-weights any source that holds the validation (or test) records:
its weight then measures the leak, not the source's quality. So every stage that trains on `data.sources`
(reweight; select, compare and group call `check_sources` the same way) first reads every record once and reports,
per source (weights.json `sources.NAME.checks`, CONTRACT v4):

- `duplicates`: records whose text repeats an earlier record of the same source;
- `overlap_validation`: records whose text is a validation (or test) record's;
- `near_overlap_validation`: records that are not such a copy but nearly one (below);
- `shared_with`: {OTHER: records of this source whose text is also in OTHER};
- `dropped`: the records of the two overlaps, left out of training when `data.decontaminate: true`.

A record's text is its turns, `role: content`, lower-cased with runs of whitespace made one space: what a model
is trained and scored on, whatever the file format. Exact matches compare 64-bit hashes of it; a source costs
8 bytes a record, so pools of millions of records fit, read as a stream.

Text, hashes and near copies: data/near_copies.py; the log's lines: data/checks_report.py; what a stage
calls (before_training, for_reweight): data/stage_checks.py.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalebio_cli.data.checks_report import Draws, Report, findings, print_report
from scalebio_cli.data.fork_map import ordered_map
from scalebio_cli.data.near_copies import CHUNK, NEAR_JACCARD, References, chunk_texts, distinct, exact_hash
from scalebio_cli.data.read import sources as data_sources
from scalebio_cli.data.read.record_reader import full_pass_workers
from scalebio_cli.data.read.sources import DataSource, RecordChunk
from scalebio_cli.errors import InputError

CHECKS_VERSION = "1"  # bump when what a scan computes changes (cache entries of another version are not read)


# ---------------------------------------------------------------------------------------------------------------
# One pass over a source.


@dataclass
class Scan:
    """What one pass over a source found: every record's exact hash (8 bytes a record), and the positions of the
    records that copy (`exact_pos`, `exact_set`) or nearly copy (`near_pos`, `near_set`) a reference set's."""

    hashes: np.ndarray
    exact_pos: np.ndarray
    exact_set: np.ndarray
    near_pos: np.ndarray
    near_set: np.ndarray

    ARRAYS = ("hashes", "exact_pos", "exact_set", "near_pos", "near_set")


ChunkScan = tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]  # hashes, exact match per record, near copies


def _scan_chunk(refs: References, chunk: RecordChunk) -> ChunkScan:
    """One chunk's hashes, the reference set each record copies (-1: none) and its near copies `(i, set)`."""
    texts = chunk_texts(chunk)
    h = np.fromiter((exact_hash(t) for t in texts), dtype=np.uint64, count=len(texts))
    found = refs.exact_match(h)
    return h, found, refs.near_matches(texts, found < 0)


def scan(source: DataSource, refs: References, workers: int | None = None) -> Scan:
    """Stream over the source's records: hashes, exact copies of reference records, then near copies among the
    records whose 3-grams lie mostly (>= NEAR_JACCARD) in the references' (the only ones that can be near).
    `workers`: processes (data/fork_map.py; default: record_reader.full_pass_workers); chunks are independent, so
    any number gives the same scan."""
    if workers is None:
        workers = full_pass_workers(source)
    hashes: list[np.ndarray] = []
    exact_pos, exact_set, near_pos, near_set = [], [], [], []
    start = 0
    chunks = data_sources.iter_record_chunks(source, CHUNK)
    for h, found, near in ordered_map(functools.partial(_scan_chunk, refs), chunks, workers):
        hashes.append(h)
        exact_pos += (np.flatnonzero(found >= 0) + start).tolist()
        exact_set += found[found >= 0].tolist()
        for i, j in near:
            near_pos.append(start + i)
            near_set.append(j)
        start += len(h)
    as_int = [np.asarray(x, dtype=np.int64) for x in (exact_pos, exact_set, near_pos, near_set)]
    return Scan(np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64), *as_int)


def cached_scan(source: DataSource, refs: References, cache_dir: Path | None,
                fingerprint: str | None) -> Scan:
    """`scan`, or its result from the cache when the source's content and the reference sets are the same."""
    from scalebio_cli.data.tokens import token_cache
    from scalebio_cli.data.tokens.tokenized import default_cache_dir

    content = data_sources.content_key(source, fingerprint or data_sources.fingerprint(source))
    key = hashlib.sha256(f"{content}|{refs.fingerprint()}|{NEAR_JACCARD}|{CHECKS_VERSION}".encode()).hexdigest()
    folder = Path(cache_dir or default_cache_dir()) / "checks" / key[:24]
    cached = token_cache.read(folder, Scan.ARRAYS)
    if cached is not None:
        return Scan(*(np.asarray(cached[0][name]) for name in Scan.ARRAYS))
    result = scan(source, refs)
    with contextlib.suppress(OSError):  # an unwritable cache only costs time
        token_cache.write(folder, {name: getattr(result, name) for name in Scan.ARRAYS}, {"source": source.path})
    return result


# ---------------------------------------------------------------------------------------------------------------
# Across sources: the report.


@dataclass
class SourceChecks:
    """weights.json `sources.NAME.checks`, and which records `data.decontaminate` leaves out."""

    records: int
    duplicates: int
    overlap_validation: int
    near_overlap_validation: int
    shared_with: dict[str, int]
    overlap_by_set: dict[str, tuple[int, int]]  # reference set -> (exact, near): for the log
    flagged: np.ndarray  # positions of the records of both overlaps (sorted)
    dropped: int = 0

    def record(self) -> dict[str, Any]:
        return {"duplicates": self.duplicates, "overlap_validation": self.overlap_validation,
                "near_overlap_validation": self.near_overlap_validation, "shared_with": self.shared_with,
                "dropped": self.dropped}


def _shared(scans: dict[str, Scan]) -> dict[str, dict[str, int]]:
    """For each source, how many of its records have their text in each other source (hashes only: the texts in
    more than one source are found by sorting all distinct (hash, source) pairs once)."""
    names = list(scans)
    uniques = [distinct(s.hashes) for s in scans.values()]
    if not uniques:
        return {}
    all_h = np.concatenate(uniques)
    owner = np.concatenate([np.full(len(u), k, dtype=np.int64) for k, u in enumerate(uniques)])
    values, counts = np.unique(all_h, return_counts=True)
    common = values[counts > 1]
    holders: dict[int, list[int]] = {}
    in_common = np.isin(all_h, common)
    for h, k in zip(all_h[in_common].tolist(), owner[in_common].tolist()):
        holders.setdefault(h, []).append(k)
    out: dict[str, dict[str, int]] = {}
    for k, (name, s) in enumerate(scans.items()):
        counts_k: dict[str, int] = {}
        for h in s.hashes[np.isin(s.hashes, common)].tolist():
            for other in holders[h]:
                if other != k:
                    counts_k[names[other]] = counts_k.get(names[other], 0) + 1
        out[name] = {n: counts_k[n] for n in names if n in counts_k}
    return out


def summarise(scans: dict[str, Scan], ref_names: list[str], decontaminate: bool) -> dict[str, SourceChecks]:
    shared = _shared(scans)
    out = {}
    for name, s in scans.items():
        by_set = {ref: (int((s.exact_set == j).sum()), int((s.near_set == j).sum())) for j, ref in enumerate(ref_names)}
        flagged = np.union1d(s.exact_pos, s.near_pos)
        out[name] = SourceChecks(len(s.hashes), int(len(s.hashes) - len(distinct(s.hashes))), len(s.exact_pos),
                                 len(s.near_pos), shared.get(name, {}), {k: v for k, v in by_set.items() if any(v)},
                                 flagged, dropped=len(flagged) if decontaminate else 0)
    return out


@dataclass
class DataChecks:
    """The checks of a run's sources: per source (weights.json) and the records `data.decontaminate` leaves out."""

    by_source: dict[str, SourceChecks]
    decontaminate: bool = False
    references: list[str] = field(default_factory=list)
    keeps_all: str | None = None  # a stage that uses every record whatever the checks find (the log says so)

    def record(self, name: str) -> dict[str, Any]:
        """weights.json `sources.NAME` gains `checks` (an empty dict for a source that was not checked)."""
        return {"checks": self.by_source[name].record()} if name in self.by_source else {}

    def without_dropped(self, name: str, data: Any) -> Any:
        """The tokens of source `name` as a sampler should draw them: without the dropped records."""
        checks = self.by_source.get(name)
        if checks is None or not checks.dropped:
            return data
        return WithoutRecords(data, checks.flagged)


class WithoutRecords:
    """A source's tokens (TokenizedData or LazyTokens) with some records left out: a sampler passes over them as
    over records that keep no response token (batching.RecordSampler), and they are never tokenized."""

    def __init__(self, data: Any, dropped: np.ndarray):
        self._data = data
        self._dropped = set(np.asarray(dropped).tolist())

    def resolve(self, positions: list[int]) -> list[int | None]:
        kept = [p for p in positions if p not in self._dropped]
        slots = iter(self._data.resolve(kept) if kept else [])
        return [None if p in self._dropped else next(slots) for p in positions]

    def __getattr__(self, name: str) -> Any:  # everything else is the source's own
        return getattr(self._data, name)


def check_sources(sources: dict[str, DataSource], references: dict[str, DataSource], *,
                  decontaminate: bool = False, draws: Draws | None = None, cache_dir: str | Path | None = None,
                  fingerprints: dict[str, str] | None = None, report: Report | None = print_report,
                  keeps_all: str | None = None) -> DataChecks:
    """Check every source (by name) against every reference set (validation and test sets, by the label the log
    gives them, e.g. `data.validation`): duplicates, records shared between sources, exact and near copies of
    reference records, and sources smaller than what the run draws (`draws`). Reports each finding through
    `report` (None: silent, e.g. on processes other than the first). `fingerprints`: sha256 of a source's data
    by its key, where the caller has it (else it is computed). Raises InputError when decontamination would
    leave a source empty."""
    refs = References(references)
    scans = {name: cached_scan(s, refs, Path(cache_dir) if cache_dir else None,
                               (fingerprints or {}).get(s.key)) for name, s in sources.items()}
    result = DataChecks(summarise(scans, refs.names, decontaminate), decontaminate, refs.names, keeps_all)
    empty = [f"{sources[n].key}: every one of its {c.records:,} records copies a record of "
             f"{', '.join(c.overlap_by_set)}, so data.decontaminate: true leaves nothing of it; remove the source"
             for n, c in result.by_source.items() if c.records and c.dropped >= c.records]
    if empty:
        raise InputError(empty)
    if report is not None:
        for level, line in findings(result, draws):
            report(level, line)
    return result
