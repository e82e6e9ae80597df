"""Records as text, their hashes, and the near copies of reference records (validation and test sets).

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

import functools
import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from scalebio_cli.data.read import sources as data_sources
from scalebio_cli.data.read.records import Example
from scalebio_cli.data.read.sources import DataSource, RecordChunk

NEAR_JACCARD = 0.7  # word 3-gram Jaccard similarity from which a record counts as a near copy
SHINGLE = 3  # words per shingle
NUM_PERM = 128  # MinHash permutations
# LSH finds candidates from a lower similarity on (then checked exactly): at NEAR_JACCARD its recall is ~99%
LSH_THRESHOLD = 0.5
CHUNK = 2048  # records hashed at a time
_MASK32 = np.uint64(0xFFFFFFFF)


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


_POWERS: dict[int, np.ndarray] = {}  # base -> its powers so far: every chunk needs them, computed once


def _powers(base: int, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) modulo 2**64 (numpy's uint64 products wrap)."""
    if len(_POWERS.get(base, ())) < n:
        size = max(n, 2 * len(_POWERS.get(base, ())))
        out = np.full(size, base, dtype=np.uint64)
        out[0] = 1
        _POWERS[base] = np.cumprod(out, dtype=np.uint64)
    return _POWERS[base][:n]


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
    # each word's record: a running count of the text starts up to its byte (a binary search per word cost twice
    # as much: bench_pool's 2M-record pool)
    marks = np.zeros(len(data) + 1, dtype=np.int32)
    marks[starts_of[1:]] = 1
    record = np.cumsum(marks)[starts]
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


def split_sets(record: np.ndarray, shingles: np.ndarray, count: int) -> list[np.ndarray]:
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


def chunk_texts(chunk: RecordChunk) -> list[str]:
    return [record_text(example) for _, example in chunk.examples()]


def text_chunks(source: DataSource) -> Iterator[list[str]]:
    for chunk in data_sources.iter_record_chunks(source, CHUNK):
        yield chunk_texts(chunk)


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
            for texts in text_chunks(source):
                for text in texts:
                    exact.setdefault(exact_hash(text), j)
                self.shingle_sets += split_sets(*chunk_shingles(texts), len(texts))
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

    @functools.cached_property
    def _seen_prefix(self) -> np.ndarray:
        """Which 24-bit prefixes of the 32-bit shingle hashes occur in the references (16 MB)."""
        table = np.zeros(1 << 24, dtype=bool)
        table[(self.union >> np.uint64(8)).astype(np.int64)] = True
        return table

    def contains(self, shingles: np.ndarray) -> np.ndarray:
        """For each shingle hash, whether some reference record has it. A table of prefixes rules most out at one
        lookup each; only the rest are searched in the sorted union (exact: half the time of searching them all)."""
        maybe = np.flatnonzero(self._seen_prefix[(shingles >> np.uint64(8)).astype(np.int64)])
        out = np.zeros(len(shingles), dtype=bool)
        if len(maybe):
            at = np.minimum(np.searchsorted(self.union, shingles[maybe]), len(self.union) - 1)
            out[maybe] = self.union[at] == shingles[maybe]
        return out

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
        inside = np.bincount(record, weights=self.contains(shingles), minlength=len(texts))
        total = np.bincount(record, minlength=len(texts))
        share = np.divide(inside, total, out=np.zeros(len(texts)), where=total > 0)
        candidates = np.flatnonzero(eligible & (share >= NEAR_JACCARD)).tolist()
        if not candidates:
            return []
        sets = split_sets(record, shingles, len(texts))
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
