"""Tokenized data files, cached on disk so a second run starts at once.

A data file becomes three flat arrays (token ids, trainable mask, per-example offsets) plus the index of each
kept example in the file, stored as raw `.npy` files that every process of a node memory-maps (token_cache). The
cache key covers everything that changes the tokens: the file's sha256, the tokenizer (vocabulary, merges, special
tokens, chat template), max_length and the rendering code's version. A cold pass over a large file runs on every
core (encode_chunks). Reweight reads large sources lazily instead (lazy_tokens): `load_all` decides.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalebio_cli.data.read import sources as data_sources
from scalebio_cli.data.read.record_reader import full_pass_workers, long_pass, may_read_lazily
from scalebio_cli.data.read.sources import DataSource
from scalebio_cli.data.read.tables import plain_file
from scalebio_cli.data.tokens import token_cache
from scalebio_cli.data.tokens.encode_chunks import CHUNK, encode_all
from scalebio_cli.data.tokens.lazy_tokens import LazyTokens
from scalebio_cli.data.tokens.render import Renderer
from scalebio_cli.errors import InputError

RENDER_VERSION = "3"  # bump when render.py changes what tokens an example becomes
# A progress display for one cold pass: called with the records to come (None: unknown), it returns what to call
# with the records done after each chunk.
Progress = Callable[[int | None], Callable[[int], None]]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in the tokenizer that changes token ids or rendering."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    for attr in ("chat_template", "bos_token", "eos_token", "pad_token"):
        digest.update(repr(getattr(tokenizer, attr, None)).encode())
    digest.update(type(tokenizer).__name__.encode())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SCALEBIO_CACHE") or Path.home() / ".cache" / "scalebio")


@dataclass
class TokenizedData:
    """The kept examples of one data file as flat arrays (memory-mapped from the cache when read from there)."""

    path: Path
    sha256: str
    ids: np.ndarray  # int32, all examples concatenated
    trainable: np.ndarray  # bool, same length as ids
    offsets: np.ndarray  # int64, example i is ids[offsets[i]:offsets[i+1]]
    record_index: np.ndarray  # int64, position of each kept example in the file
    num_records: int  # records in the file, kept or not
    full_lengths: np.ndarray  # int32, per record of the file: tokens before truncation to max_length
    max_length: int
    from_cache: bool = False
    _kept_at: np.ndarray | None = field(default=None, init=False, repr=False)  # record -> example (-1: skipped)
    lazy = False  # every record is tokenized (lazy_tokens.LazyTokens: only the records drawn)

    @property
    def num_truncated(self) -> int:
        """Records of the file cut by max_length (kept or, with no response token left, skipped)."""
        return int((self.full_lengths > self.max_length).sum())

    def length_covering(self, fraction: float) -> int:
        """The smallest max_length that would keep `fraction` of the records whole."""
        return int(np.quantile(self.full_lengths, fraction, method="higher")) if len(self.full_lengths) else 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_kept(self) -> int:
        return len(self)

    @property
    def num_tokenized(self) -> int:
        return self.num_records

    @property
    def num_skipped(self) -> int:
        return self.num_records - len(self)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.ids[lo:hi], self.trainable[lo:hi]

    def resolve(self, positions: list[int]) -> list[int | None]:
        """The example index of each record position (None: the record was skipped), as LazyTokens.resolve."""
        if self._kept_at is None:
            kept_at = np.full(self.num_records, -1, dtype=np.int64)
            kept_at[np.asarray(self.record_index, dtype=np.int64)] = np.arange(len(self), dtype=np.int64)
            self._kept_at = kept_at
        return [None if k < 0 else int(k) for k in self._kept_at[positions]]


_ARRAYS = ("ids", "trainable", "offsets", "record_index", "full_lengths")


def _unshown(records: int) -> None:
    """No progress shown."""


def _tokenize(source: DataSource, renderer: Renderer, workers: int,
              advance: Callable[[int], None] = _unshown) -> dict[str, np.ndarray]:
    """The cache entry's arrays: tokens and masks of the kept records, their indices, every record's length.
    `advance(n)` after each chunk of n records."""
    ids, masks, lengths, kept, full = [], [], [], [], []
    for chunk in encode_all(renderer, data_sources.iter_record_chunks(source, CHUNK), workers):
        advance(len(chunk.full_lengths))
        ids.append(chunk.ids)
        masks.append(chunk.trainable)
        lengths.append(chunk.lengths)
        kept.append(chunk.kept)
        full.append(chunk.full_lengths)

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)

    offsets = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
    np.cumsum(cat(lengths, np.int64), out=offsets[1:])
    return {"ids": cat(ids, np.int32), "trainable": cat(masks, bool), "offsets": offsets,
            "record_index": np.flatnonzero(cat(kept, bool)).astype(np.int64), "full_lengths": cat(full, np.int32)}


def cache_key(source: DataSource, renderer: Renderer, sha256: str) -> str:
    """What the tokens depend on: the content (and how a spec reads and chooses it), the tokenizer, max_length,
    and the rendering code's version."""
    content = data_sources.content_key(source, sha256)
    return hashlib.sha256(
        f"{content}|{tokenizer_fingerprint(renderer.tokenizer)}|{renderer.max_length}|{RENDER_VERSION}".encode()
    ).hexdigest()[:24]


def load_tokenized(source: DataSource | str | Path, renderer: Renderer, cache_dir: str | Path | None = None,
                   sha256: str | None = None, workers: int | None = None,
                   progress: Progress | None = None) -> TokenizedData:
    """Tokenize a source (a data file, or any DataSource), or map it from the cache. Raises InputError for
    unreadable or malformed data. `workers`: processes for a cold pass (default: record_reader.full_pass_workers).
    `progress`: shown for a cold pass over a large source (record_reader.long_pass)."""
    if not isinstance(source, DataSource):
        source = data_sources.from_path(str(source), source)
    path = Path(source.path)
    sha256 = sha256 or data_sources.fingerprint(source)
    folder = token_cache.entry(Path(cache_dir or default_cache_dir()), cache_key(source, renderer, sha256))
    cached = token_cache.read(folder, _ARRAYS)
    if cached is not None:
        arrays, meta = cached
        if _consistent(arrays, int(meta.get("num_records", -1))):
            return TokenizedData(path, sha256, **arrays, num_records=int(meta["num_records"]),
                                 max_length=renderer.max_length, from_cache=True)
        # else: a damaged entry, rebuilt below

    long = long_pass(source)
    if workers is None:
        workers = full_pass_workers(source)
    arrays = _tokenize(source, renderer, workers,
                       progress(_cheap_count(source)) if progress is not None and long else _unshown)
    num_records = len(arrays["full_lengths"])
    with contextlib.suppress(OSError):  # an unwritable cache only costs time
        token_cache.write(folder, arrays, {"num_records": num_records, "source": str(path)})
    return TokenizedData(path, sha256, **arrays, num_records=num_records, max_length=renderer.max_length)


def _cheap_count(source: DataSource) -> int | None:
    """The records of a source where counting them costs little next to tokenizing them (not a .json array,
    which would be parsed twice), for a progress bar's total."""
    plain = plain_file(source.spec)
    return None if plain is not None and plain.suffix == ".json" else data_sources.count(source)


def _consistent(arrays: dict[str, np.ndarray], num_records: int) -> bool:
    """An entry whose arrays agree with each other (a truncated or mixed-up entry does not)."""
    offsets = arrays["offsets"]
    return (len(offsets) >= 1 and int(offsets[-1]) == len(arrays["ids"]) == len(arrays["trainable"])
            and len(arrays["record_index"]) == len(offsets) - 1 and len(arrays["full_lengths"]) == num_records)


def describe(name: str, data: TokenizedData | LazyTokens, seconds: float | None = None) -> str:
    """One log line about a tokenized file (markup-safe)."""
    from rich.markup import escape

    if data.lazy:
        return escape(f"{name}: {data.num_records:,} records, tokenized as drawn; of a seeded sample of "
                      f"{data.num_tokenized:,}: {data.num_tokenized - data.num_kept:,} skipped (no response token "
                      f"left), {data.num_truncated:,} truncated at max_length {data.max_length} ({seconds or 0:.1f}s)")
    parts = [f"{name}: {len(data):,} examples, {int(data.trainable.sum()):,} response tokens"]
    if data.num_skipped:
        parts.append(f"{data.num_skipped:,} of {data.num_records:,} records skipped (no response token left)")
    parts.append(f"{data.num_truncated:,} truncated at max_length {data.max_length}")
    parts.append("from cache" if data.from_cache else f"tokenized in {seconds or 0:.1f}s")
    return escape(", ".join(parts))


TRUNCATION_WARNING = 0.05  # warn when a file loses more than this fraction of its records to truncation


def truncation_warning(name: str, data: TokenizedData | LazyTokens) -> str | None:
    """A warning when truncation cuts more than 5% of a file's records (it shifts that source's mean loss and cuts
    exactly the long answers, e.g. final answers of math solutions), with the max_length that keeps 99% whole.
    For a lazy source both numbers come from its seeded sample, and the warning says so."""
    n = data.num_tokenized
    if not n or data.num_truncated <= TRUNCATION_WARNING * n:
        return None
    from rich.markup import escape

    share = data.num_truncated / n
    of = f"of a seeded sample of {n:,} of its {data.num_records:,} records" if data.lazy else "of the records"
    return escape(f"{name}: {share:.1%} {of} ({data.num_truncated:,} of {n:,}) are longer "
                  f"than data.max_length={data.max_length} and were cut; data.max_length={data.length_covering(0.99)} "
                  "keeps 99% of them whole")


def load_one(source: DataSource | str, renderer: Renderer, cache_dir: str | Path | None,
             lazy_min_records: int | None, seed: int, progress: Progress | None = None) -> TokenizedData | LazyTokens:
    """A source tokenized whole (or mapped from the cache), or, with `lazy_min_records` and at least that many
    records, read lazily (a whole entry already in the cache is used then too: it costs nothing)."""
    if lazy_min_records is None:
        return load_tokenized(source, renderer, cache_dir, progress=progress)
    if not isinstance(source, DataSource):
        source = data_sources.from_path(str(source), source)
    if not may_read_lazily(source, lazy_min_records):
        return load_tokenized(source, renderer, cache_dir, progress=progress)
    sha256 = data_sources.fingerprint(source)
    cache = Path(cache_dir or default_cache_dir())
    folder = token_cache.entry(cache, cache_key(source, renderer, sha256))
    if (folder / token_cache.META).is_file():
        return load_tokenized(source, renderer, cache_dir, sha256=sha256)
    lazy = LazyTokens(source, sha256, renderer, cache)
    if lazy.num_records < lazy_min_records:  # fewer records than the file size suggested: tokenize it whole
        return load_tokenized(source, renderer, cache_dir, sha256=sha256, progress=progress)
    lazy.check_sample(seed)
    return lazy


def load_all(files: list[tuple[str, DataSource | str]], renderer: Renderer, cache_dir: str | Path | None, *,
             is_main: bool = True, barrier: Callable[[], None] = lambda: None,
             log: Callable[[str], None] = lambda line: None,
             warn: Callable[[str], None] = lambda line: None,
             lazy_min_records: int | None = None, seed: int = 0,
             progress: Callable[[str, int | None], Callable[[int], None]] | None = None,
             ) -> list[TokenizedData | LazyTokens]:
    """Tokenize (or read from the cache) each `(key, path)`. The main process goes first, so that the others find
    the cache filled instead of all tokenizing the same files at once. `lazy_min_records`: sources with at least
    this many records are tokenized as drawn (reweight); None: every source whole (finetune, eval).
    `progress(key, total)`: starts the progress display of a long cold pass over that source (as Progress).

    Raises InputError naming every file that keeps no record with a response token within max_length (for a lazy
    source: none of its seeded sample does).
    """
    loaded: list[TokenizedData | LazyTokens] = []
    for main_turn in (True, False):
        if main_turn == is_main:
            for key, path in files:
                start = time.perf_counter()
                shown = functools.partial(progress, key) if progress is not None else None
                loaded.append(load_one(path, renderer, cache_dir, lazy_min_records, seed, shown))
                log(describe(key, loaded[-1], time.perf_counter() - start))
                warning = truncation_warning(key, loaded[-1])
                if warning:
                    warn(warning)
        barrier()
    empty = [f"{key}: no record of {_of(d)}{_label(path)} keeps a response token within "
             f"data.max_length={renderer.max_length} (raise data.max_length, or shorten the prompts)"
             for (key, path), d in zip(files, loaded) if not d.num_kept]
    if empty:
        raise InputError(empty)
    return loaded


def _of(data: TokenizedData | LazyTokens) -> str:
    return f"a seeded sample of {data.num_tokenized:,} records of " if data.lazy else ""


def _label(source: DataSource | str) -> str:
    return source.path if isinstance(source, DataSource) else source
