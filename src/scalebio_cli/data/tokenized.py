"""Tokenized data files, cached on disk so a second run starts at once.

A data file becomes three flat arrays (token ids, trainable mask, per-example offsets) plus the index of each
kept example in the file. The cache key covers everything that changes the tokens: the file's sha256, the
tokenizer (vocabulary, merges, special tokens, chat template), max_length and the rendering code's version.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scalebio_cli.data import sources as data_sources
from scalebio_cli.data.render import Renderer
from scalebio_cli.data.sources import DataSource
from scalebio_cli.errors import InputError
from scalebio_cli.files import atomic_path

RENDER_VERSION = "2"  # bump when render.py changes what tokens an example becomes
_CHUNK = 512  # examples rendered per batched tokenizer call


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
    """The kept examples of one data file as flat arrays."""

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
    def num_skipped(self) -> int:
        return self.num_records - len(self)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.ids[lo:hi], self.trainable[lo:hi]


def _tokenize(source: DataSource, renderer: Renderer) -> tuple[list[list[int]], list[list[bool]], list[int], list[int]]:
    """Token ids and masks of the kept records, their indices, and every record's untruncated length."""
    ids: list[list[int]] = []
    masks: list[list[bool]] = []
    kept: list[int] = []
    full_lengths: list[int] = []
    pending: list[tuple[int, str, Any]] = []

    def flush() -> None:
        for (index, _, _), enc in zip(pending, renderer.encode_many([(ex, where) for _, where, ex in pending])):
            full_lengths.append(enc.full_length)
            if enc.num_trainable > 0:
                ids.append(enc.input_ids)
                masks.append(enc.trainable)
                kept.append(index)
        pending.clear()

    for index, (where, example) in enumerate(data_sources.iter_examples(source)):
        pending.append((index, where, example))
        if len(pending) >= _CHUNK:
            flush()
    flush()
    return ids, masks, kept, full_lengths


def load_tokenized(source: DataSource | str | Path, renderer: Renderer, cache_dir: str | Path | None = None,
                   sha256: str | None = None) -> TokenizedData:
    """Tokenize a source (a data file, or any DataSource), or load it from the cache. Raises InputError for
    unreadable or malformed data."""
    if not isinstance(source, DataSource):
        source = data_sources.from_path(str(source), source)
    path = Path(source.path)
    sha256 = sha256 or data_sources.fingerprint(source)
    content = data_sources.content_key(source, sha256)
    key = hashlib.sha256(
        f"{content}|{tokenizer_fingerprint(renderer.tokenizer)}|{renderer.max_length}|{RENDER_VERSION}".encode()
    ).hexdigest()[:24]
    cache_file = Path(cache_dir or default_cache_dir()) / "tokenized" / f"{key}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                return TokenizedData(path, sha256, z["ids"], z["trainable"], z["offsets"], z["record_index"],
                                     int(z["num_records"]), z["full_lengths"], renderer.max_length, from_cache=True)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt below

    ids, masks, kept, full_lengths = _tokenize(source, renderer)
    num_records = len(full_lengths)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in ids])
    flat_ids = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
    flat_mask = np.fromiter((m for x in masks for m in x), dtype=bool, count=int(offsets[-1]))
    data = TokenizedData(path, sha256, flat_ids, flat_mask, offsets, np.asarray(kept, dtype=np.int64), num_records,
                         np.asarray(full_lengths, dtype=np.int32), renderer.max_length)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as tmp, open(tmp, "wb") as f:
            np.savez(f, ids=data.ids, trainable=data.trainable, offsets=data.offsets,
                     record_index=data.record_index, num_records=np.int64(num_records),
                     full_lengths=data.full_lengths)
    except OSError:
        pass  # an unwritable cache only costs time
    return data


def describe(name: str, data: TokenizedData, seconds: float | None = None) -> str:
    """One log line about a tokenized file (markup-safe)."""
    parts = [f"{name}: {len(data):,} examples, {int(data.trainable.sum()):,} response tokens"]
    if data.num_skipped:
        parts.append(f"{data.num_skipped:,} of {data.num_records:,} records skipped (no response token left)")
    parts.append(f"{data.num_truncated:,} truncated at max_length {data.max_length}")
    parts.append("from cache" if data.from_cache else f"tokenized in {seconds or 0:.1f}s")
    from rich.markup import escape

    return escape(", ".join(parts))


TRUNCATION_WARNING = 0.05  # warn when a file loses more than this fraction of its records to truncation


def truncation_warning(name: str, data: TokenizedData) -> str | None:
    """A warning when truncation cuts more than 5% of a file's records (it shifts that source's mean loss and cuts
    exactly the long answers, e.g. final answers of math solutions), with the max_length that keeps 99% whole."""
    if not data.num_records or data.num_truncated <= TRUNCATION_WARNING * data.num_records:
        return None
    from rich.markup import escape

    share = data.num_truncated / data.num_records
    return escape(f"{name}: {share:.1%} of the records ({data.num_truncated:,} of {data.num_records:,}) are longer "
                  f"than data.max_length={data.max_length} and were cut; data.max_length={data.length_covering(0.99)} "
                  "keeps 99% of them whole")


def load_all(files: list[tuple[str, DataSource | str]], renderer: Renderer, cache_dir: str | Path | None, *,
             is_main: bool = True, barrier: Callable[[], None] = lambda: None,
             log: Callable[[str], None] = lambda line: None,
             warn: Callable[[str], None] = lambda line: None) -> list[TokenizedData]:
    """Tokenize (or read from the cache) each `(key, path)`. The main process goes first, so that the others find
    the cache filled instead of all tokenizing the same files at once.

    Raises InputError naming every file that keeps no record with a response token within max_length.
    """
    loaded: list[TokenizedData] = []
    for main_turn in (True, False):
        if main_turn == is_main:
            for key, path in files:
                start = time.perf_counter()
                loaded.append(load_tokenized(path, renderer, cache_dir))
                log(describe(key, loaded[-1], time.perf_counter() - start))
                warning = truncation_warning(key, loaded[-1])
                if warning:
                    warn(warning)
        barrier()
    empty = [f"{key}: no record of {_label(path)} keeps a response token within data.max_length={renderer.max_length} "
             "(raise data.max_length, or shorten the prompts)" for (key, path), d in zip(files, loaded) if not len(d)]
    if empty:
        raise InputError(empty)
    return loaded


def _label(source: DataSource | str) -> str:
    return source.path if isinstance(source, DataSource) else source
