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

from scalebio_cli.data.records import iter_examples
from scalebio_cli.data.render import Renderer
from scalebio_cli.errors import InputError
from scalebio_cli.files import atomic_path, file_sha256

RENDER_VERSION = "1"  # bump when render.py changes what tokens an example becomes
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
    from_cache: bool = False

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


def _tokenize(path: Path, renderer: Renderer) -> tuple[list[list[int]], list[list[bool]], list[int], int]:
    ids: list[list[int]] = []
    masks: list[list[bool]] = []
    kept: list[int] = []
    num_records = 0
    pending: list[tuple[int, str, Any]] = []

    def flush() -> None:
        for (index, _, _), enc in zip(pending, renderer.encode_many([(ex, where) for _, where, ex in pending])):
            if enc.num_trainable > 0:
                ids.append(enc.input_ids)
                masks.append(enc.trainable)
                kept.append(index)
        pending.clear()

    for where, example in iter_examples(path):
        pending.append((num_records, where, example))
        num_records += 1
        if len(pending) >= _CHUNK:
            flush()
    flush()
    return ids, masks, kept, num_records


def load_tokenized(path: str | Path, renderer: Renderer, cache_dir: str | Path | None = None,
                   sha256: str | None = None) -> TokenizedData:
    """Tokenize a data file (or load it from the cache). Raises InputError for unreadable or malformed files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: data file not found")
    sha256 = sha256 or file_sha256(path)
    key = hashlib.sha256(
        f"{sha256}|{tokenizer_fingerprint(renderer.tokenizer)}|{renderer.max_length}|{RENDER_VERSION}".encode()
    ).hexdigest()[:24]
    cache_file = Path(cache_dir or default_cache_dir()) / "tokenized" / f"{key}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                return TokenizedData(path, sha256, z["ids"], z["trainable"], z["offsets"], z["record_index"],
                                     int(z["num_records"]), from_cache=True)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt below

    ids, masks, kept, num_records = _tokenize(path, renderer)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in ids])
    flat_ids = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
    flat_mask = np.fromiter((m for x in masks for m in x), dtype=bool, count=int(offsets[-1]))
    data = TokenizedData(path, sha256, flat_ids, flat_mask, offsets, np.asarray(kept, dtype=np.int64), num_records)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as tmp, open(tmp, "wb") as f:
            np.savez(f, ids=data.ids, trainable=data.trainable, offsets=data.offsets,
                     record_index=data.record_index, num_records=np.int64(num_records))
    except OSError:
        pass  # an unwritable cache only costs time
    return data


def describe(name: str, data: TokenizedData, seconds: float | None = None) -> str:
    """One log line about a tokenized file (markup-safe)."""
    parts = [f"{name}: {len(data):,} examples, {int(data.trainable.sum()):,} response tokens"]
    if data.num_skipped:
        parts.append(f"{data.num_skipped:,} of {data.num_records:,} records skipped (no response token left)")
    parts.append("from cache" if data.from_cache else f"tokenized in {seconds or 0:.1f}s")
    from rich.markup import escape

    return escape(", ".join(parts))


def load_all(files: list[tuple[str, str]], renderer: Renderer, cache_dir: str | Path | None, *, is_main: bool = True,
             barrier: Callable[[], None] = lambda: None, log: Callable[[str], None] = lambda line: None
             ) -> list[TokenizedData]:
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
        barrier()
    empty = [f"{key}: no record of {path} keeps a response token within data.max_length={renderer.max_length} "
             "(raise data.max_length, or shorten the prompts)" for (key, path), d in zip(files, loaded) if not len(d)]
    if empty:
        raise InputError(empty)
    return loaded
