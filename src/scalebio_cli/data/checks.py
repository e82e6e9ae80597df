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

Near duplicates: MinHash LSH from `datasketch` over the set of word 3-grams (words and punctuation marks), then the
exact Jaccard similarity of each candidate pair, kept at >= NEAR_JACCARD. Why MinHash rather than the n-gram overlap
of decontamination tools (a shared 13-gram flags a record): short records (a math question is 30-60 words) share
13-grams only when copied almost whole, while boilerplate shared by every record of a template shares them
everywhere; a similarity of the whole record says "nearly the same record", which is what a leak is. A record can
be that similar to a reference record only if at least NEAR_JACCARD of its 3-grams occur in some reference record,
so that cheap test (hashes against one sorted array) picks the few records worth a MinHash.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalebio_cli.data.read import sources as data_sources
from scalebio_cli.data.read.records import Example
from scalebio_cli.data.read.sources import DataSource
from scalebio_cli.errors import InputError

NEAR_JACCARD = 0.7  # word 3-gram Jaccard similarity from which a record counts as a near copy
SHINGLE = 3  # words per shingle
NUM_PERM = 128  # MinHash permutations
# LSH finds candidates from a lower similarity on (then checked exactly): at NEAR_JACCARD its recall is ~99%
LSH_THRESHOLD = 0.5
CHUNK = 2048  # records hashed at a time
CHECKS_VERSION = "1"  # bump when what a scan computes changes (cache entries of another version are not read)
_MASK32 = np.uint64(0xFFFFFFFF)

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------------
# Text and hashes.


def record_text(example: Example) -> str:
    """The text a record is compared by: its turns as `role: content`, lower-cased, whitespace runs as one space."""
    text = example if isinstance(example, str) else "\n".join(f"{t.role}: {t.content}" for t in example)
    return " ".join(text.lower().split())


def exact_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


_P = 0x100000001B3  # FNV-64 prime (odd, so invertible modulo 2**64)
_P_INV = pow(_P, -1, 2**64)
_WORD_BYTES = np.zeros(256, dtype=bool)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
    _WORD_BYTES[_c] = True
_WORD_BYTES[0x80:] = True  # bytes of non-ASCII characters: letters of other scripts (\w), taken whole
_SPACE_BYTES = np.zeros(256, dtype=bool)
_SPACE_BYTES[list(b" \t\n\r\x0b\x0c")] = True


def _powers(base: int, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) modulo 2**64 (numpy's uint64 products wrap)."""
    out = np.full(n, base, dtype=np.uint64)
    out[0] = 1
    return np.cumprod(out, dtype=np.uint64)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit moves about half the output bits."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def chunk_shingles(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct word 3-gram hashes of each text, as `(record, shingle)` pairs sorted by record then hash.

    Words are runs of letters, digits and `_` (any non-ASCII character counts as a letter), and every other
    non-space character is a word of its own (`3+4=7` is five words). Computed over the whole chunk at once with
    numpy (a word's hash from prefix sums of a polynomial hash of the bytes), so a million records take about a
    minute; deterministic, so every process of a run flags the same records. A text of fewer than three words is
    one shingle of them all."""
    if not texts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    data = np.frombuffer("\n".join(texts).encode(), dtype=np.uint8)
    starts_of = np.cumsum([0] + [len(t.encode()) + 1 for t in texts])[:-1]  # byte offset of each text
    word, space = _WORD_BYTES[data], _SPACE_BYTES[data]
    punct = ~word & ~space
    prev_word = np.concatenate([[False], word[:-1]])
    next_word = np.concatenate([word[1:], [False]])
    starts = np.flatnonzero((word & ~prev_word) | punct)
    ends = np.flatnonzero((word & ~next_word) | punct) + 1
    if not len(starts):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    # hash of bytes [s, e) = (prefix[e] - prefix[s]) * P^-s, with prefix[i] = sum_{k<i} (byte_k + 1) * P^k
    zero = np.zeros(SHINGLE, dtype=np.uint64)  # (a plain 0 would turn uint64 arrays into float64 when joined)
    prefix = np.concatenate([zero[:1], np.cumsum((data.astype(np.uint64) + np.uint64(1)) * _powers(_P, len(data)),
                                                 dtype=np.uint64)])
    words = (prefix[ends] - prefix[starts]) * _powers(_P_INV, len(data) + 1)[starts]
    record = np.searchsorted(starts_of, starts, side="right") - 1
    same1 = np.concatenate([record[1:] == record[:-1], [False]])
    same2 = np.concatenate([record[2:] == record[:-2], [False, False]])
    w1 = np.where(same1, np.concatenate([words[1:], zero[:1]]), zero[0])
    w2 = np.where(same2, np.concatenate([words[2:], zero[:2]]), zero[0])
    first = np.concatenate([[True], record[1:] != record[:-1]])
    short = np.bincount(record, minlength=len(texts))[record] < SHINGLE
    keep = same2 | (short & first)
    shingle = _mix(_mix(_mix(words) + w1) + w2)[keep] & _MASK32
    pairs = distinct((record[keep].astype(np.uint64) << np.uint64(32)) | shingle)
    return (pairs >> np.uint64(32)).astype(np.int64), pairs & _MASK32


def distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (by sorting: numpy 2's hash-based np.unique is several times slower on hashes)."""
    values = np.sort(values)
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if len(values) else values


def _split(record: np.ndarray, shingles: np.ndarray, count: int) -> list[np.ndarray]:
    """Each record's shingle set, from chunk_shingles's pairs."""
    bounds = np.searchsorted(record, np.arange(count + 1))
    return [shingles[bounds[i]:bounds[i + 1]] for i in range(count)]


def _identity(value: int) -> int:
    return value


def _minhashes(shingle_sets: Iterable[np.ndarray]) -> Iterator[Any]:
    from datasketch import MinHash

    return MinHash.generator((s.tolist() for s in shingle_sets), num_perm=NUM_PERM, seed=1, hashfunc=_identity)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Of two sorted sets of distinct hashes."""
    if not len(a) and not len(b):
        return 1.0
    both = len(np.intersect1d(a, b, assume_unique=True))
    return both / (len(a) + len(b) - both)


# ---------------------------------------------------------------------------------------------------------------
# The reference sets (validation, test): small, held whole.


class References:
    """Every record of the validation (and test) sets: exact hashes, 3-gram sets, and an LSH index of them."""

    def __init__(self, refs: dict[str, DataSource]):
        self.names = list(refs)
        exact: dict[int, int] = {}  # hash -> the first set holding it
        self.shingle_sets: list[np.ndarray] = []
        self.set_of: list[int] = []  # reference record -> its set
        for j, source in enumerate(refs.values()):
            for texts in _chunks(source):
                for text in texts:
                    exact.setdefault(exact_hash(text), j)
                self.shingle_sets += _split(*chunk_shingles(texts), len(texts))
                self.set_of += [j] * len(texts)
        self.exact = np.fromiter(sorted(exact), dtype=np.uint64, count=len(exact))
        self.exact_set = np.asarray([exact[int(h)] for h in self.exact], dtype=np.int64)
        self.union = (distinct(np.concatenate(self.shingle_sets)) if self.shingle_sets
                      else np.zeros(0, dtype=np.uint64))

    @functools.cached_property
    def lsh(self) -> Any:
        """The LSH index of the reference records (built on first use: a source whose scan is cached needs none, nor
        datasketch's ~3 s import)."""
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=LSH_THRESHOLD, num_perm=NUM_PERM, weights=(0.3, 0.7))
        for i, m in enumerate(_minhashes(self.shingle_sets)):
            lsh.insert(i, m, check_duplication=False)
        return lsh

    def exact_match(self, hashes: np.ndarray) -> np.ndarray:
        """For each hash, the reference set holding that text, or -1."""
        if not len(self.exact):
            return np.full(len(hashes), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.exact, hashes), len(self.exact) - 1)
        return np.where(self.exact[at] == hashes, self.exact_set[at], -1)

    def near_matches(self, texts: list[str], eligible: np.ndarray) -> list[tuple[int, int]]:
        """`(i, reference set)` for each eligible text that nearly copies a reference record: Jaccard of 3-gram sets
        >= NEAR_JACCARD with the most similar LSH candidate. Only texts with that share of their 3-grams among the
        references' get a MinHash (Jaccard(A, B) >= t needs |A & B| >= t |A|)."""
        if not len(self.union):
            return []
        record, shingles = chunk_shingles(texts)
        at = np.minimum(np.searchsorted(self.union, shingles), len(self.union) - 1)
        inside = np.bincount(record, weights=self.union[at] == shingles, minlength=len(texts))
        total = np.bincount(record, minlength=len(texts))
        share = np.divide(inside, total, out=np.zeros(len(texts)), where=total > 0)
        candidates = np.flatnonzero(eligible & (share >= NEAR_JACCARD)).tolist()
        if not candidates:
            return []
        sets = _split(record, shingles, len(texts))
        out = []
        for i, minhash in zip(candidates, _minhashes(sets[i] for i in candidates)):
            best, best_set = NEAR_JACCARD, -1
            for r in self.lsh.query(minhash):
                similarity = jaccard(sets[i], self.shingle_sets[r])
                if similarity >= best:
                    best, best_set = similarity, self.set_of[r]
            if best_set >= 0:
                out.append((i, best_set))
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(self.exact.tobytes() + self.union.tobytes()).hexdigest()[:16]


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


def _chunks(source: DataSource) -> Iterator[list[str]]:
    texts: list[str] = []
    for _, example in data_sources.iter_examples(source):
        texts.append(record_text(example))
        if len(texts) >= CHUNK:
            yield texts
            texts = []
    if texts:
        yield texts


def scan(source: DataSource, refs: References) -> Scan:
    """Stream over the source's records: hashes, exact copies of reference records, then near copies among the
    records whose 3-grams lie mostly (>= NEAR_JACCARD) in the references' (the only ones that can be near)."""
    hashes: list[np.ndarray] = []
    exact_pos, exact_set, near_pos, near_set = [], [], [], []
    start = 0
    for texts in _chunks(source):
        h = np.fromiter((exact_hash(t) for t in texts), dtype=np.uint64, count=len(texts))
        hashes.append(h)
        found = refs.exact_match(h)
        exact_pos += (np.flatnonzero(found >= 0) + start).tolist()
        exact_set += found[found >= 0].tolist()
        for i, j in refs.near_matches(texts, found < 0):
            near_pos.append(start + i)
            near_set.append(j)
        start += len(texts)
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


# ---------------------------------------------------------------------------------------------------------------
# What a stage calls.


@dataclass(frozen=True)
class Draws:
    """What a run draws from each source: `per_step[NAME]` records a step (on average) over `steps` steps."""

    stage: str
    steps: int
    per_step: dict[str, float]


def reweight_draws(steps: int, batch_size: int, composition: str, sizes: dict[str, int]) -> Draws:
    """reweight's draws: batch_size a step, split evenly over the sources (`balanced`) or by their sizes
    (`pooled`)."""
    total = sum(sizes.values()) or 1
    share = {n: (1 / len(sizes) if composition == "balanced" else size / total) for n, size in sizes.items()}
    return Draws("reweight", steps, {n: batch_size * s for n, s in share.items()})


Report = Callable[[str, str], None]  # (level: info | warning | leak, markup-safe text)


def print_report(level: str, text: str) -> None:
    """The log's lines: overlap with a validation or test set in red (it decides what the weights measure)."""
    from scalebio_cli.console import console

    style = {"info": "[dim]checks[/]", "warning": "[bold yellow]warning:[/]",
             "leak": "[bold red]warning: validation data in a source:[/]"}[level]
    console.print(f"{style} {text}")


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


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


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


def findings(checks: DataChecks, draws: Draws | None) -> list[tuple[str, str]]:
    """The log's lines about the checks, `(level, markup-safe text)`: leaks first."""
    leaks, warnings, infos = [], [], []
    for name, c in checks.by_source.items():
        for ref, (exact, near) in c.overlap_by_set.items():
            fix = ("dropped (data.decontaminate: true)" if checks.decontaminate
                   else f"{checks.keeps_all} uses every record; remove them from the source (reweight drops them "
                   "with data.decontaminate: true)" if checks.keeps_all
                   else "set data.decontaminate: true to drop them")
            held = " and ".join(([f"{exact:,} records of {ref} verbatim"] if exact else [])
                                + ([f"{near:,} near copies of its records (word 3-gram Jaccard >= {NEAR_JACCARD})"]
                                   if near else []))
            leaks.append(f"source '{name}' holds {held}: a method that lowers the loss on {ref} favours '{name}' "
                         f"for holding them, not for its quality; {fix}")
        usable = c.records - c.dropped
        drawn = draws.per_step.get(name, 0.0) * draws.steps if draws is not None else 0.0
        if draws is not None and usable < drawn:
            warnings.append(f"source '{name}' has {usable:,} records, fewer than the ~{drawn:,.0f} {draws.stage} "
                            f"draws from it ({draws.steps:,} steps x {draws.per_step[name]:.3g} a step): each record "
                            f"is seen ~{drawn / max(usable, 1):.1f} times, so its loss tells how well it is "
                            "memorised more than what it teaches; add records or merge it with a like source")
        parts = ([f"{c.duplicates:,} of {c.records:,} records repeat another of the source"] if c.duplicates else [])
        parts += [f"{n:,} records also in '{other}'" for other, n in c.shared_with.items()]
        if parts:
            infos.append(f"{name}: {'; '.join(parts)}")
    if not leaks and not infos:
        refs = ", ".join(checks.references) or "no validation set"
        infos.append(f"no duplicates, no record shared between sources, none of {refs} in a source")
    return [("leak", _escape(t)) for t in leaks] + [("warning", _escape(t)) for t in warnings] + \
        [("info", _escape(t)) for t in infos]



def before_training(recipe: Any, sources: dict[str, DataSource], references: dict[str, DataSource], *,
                    draws: Draws | None = None, fingerprints: dict[str, str] | None = None, is_main: bool = True,
                    barrier: Callable[[], None] = lambda: None, keeps_all: str | None = None) -> DataChecks:
    """What a stage calls before it trains (reweight; select, compare, group alike): `check_sources` with the
    recipe's `data.decontaminate` and cache, the main process first (it logs and fills the cache), then the others,
    silently, from the cache. `references`: the validation sets and any test files, by the label the log gives
    them (e.g. `data.validation`, `test set 'gsm8k'`). `keeps_all`: the name of a stage that drops nothing
    (select, compare, group): `data.decontaminate` is reweight's, so the log tells to remove the copies instead."""
    result: DataChecks | None = None
    decontaminate = recipe.data.decontaminate and keeps_all is None
    for main_turn in (True, False):
        if main_turn == is_main:
            result = check_sources(sources, references, decontaminate=decontaminate, draws=draws,
                                   cache_dir=recipe.data.cache_dir, fingerprints=fingerprints,
                                   report=print_report if is_main else None, keeps_all=keeps_all)
        barrier()
    assert result is not None
    return result


def for_reweight(recipe: Any, data: Any, is_main: bool = True,
                 barrier: Callable[[], None] = lambda: None) -> DataChecks:
    """reweight's checks (`data`: stages/reweight.RunData): its sources against its validation sets, with the
    draws of its steps and batches."""
    cfg = recipe.reweight
    draws = reweight_draws(cfg.steps, cfg.batch_size, cfg.batch_composition,
                           {n: d.num_records for n, d in zip(data.sources, data.source_data)})
    fingerprints = {s.key: d.sha256 for s, d in zip(data.sources.values(), data.source_data)}
    return before_training(recipe, data.sources, {s.key: s for s in data.vals.values()}, draws=draws,
                           fingerprints=fingerprints, is_main=is_main, barrier=barrier)
