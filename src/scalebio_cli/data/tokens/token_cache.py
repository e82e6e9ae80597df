"""The on-disk token cache: one folder of raw `.npy` arrays per cache key, memory-mapped when read.

Raw `.npy` files (not `.npz`, whose members are zip entries that must be read into memory) map straight into the
page cache, so the processes of one node share one copy of the tokens and a second run starts at once. A folder
is written under a temporary name and renamed into place (readers never see half an entry); an entry that does
not read back whole and consistent is rebuilt by its reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scalebio_cli.files import atomic_path

FORMAT = "scalebio-tokens/1"
META = "meta.json"


def entry(cache_dir: Path, key: str) -> Path:
    return cache_dir / "tokenized" / key


def read(folder: Path, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict] | None:
    """The arrays of one entry, memory-mapped read-only, and its metadata; None when absent or damaged."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            return None
        arrays = {}
        for name in names:
            # An empty array cannot be mapped (mmap of 0 bytes): np.load reads it as a plain array.
            arrays[name] = np.load(folder / f"{name}.npy", mmap_mode="r" if meta["sizes"][name] else None,
                                   allow_pickle=False)
            if arrays[name].shape[0] != meta["sizes"][name]:
                return None
        return arrays, meta
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


def write(folder: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write an entry atomically (a crash or a full disk leaves no entry, never a partial one)."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        full = {**meta, "format": FORMAT, "sizes": {n: int(a.shape[0]) for n, a in arrays.items()}}
        (tmp / META).write_text(json.dumps(full), encoding="utf-8")  # last: an entry without it is incomplete
