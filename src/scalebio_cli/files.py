"""Files on disk: atomic outputs (a failed command never leaves a partial file where the final output is expected)
and content hashes (how a source file is recognised in weights.json, checkpoints and the token cache)."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of `final` (file or folder); it replaces `final` only if the block succeeds.

    The temporary name lives in the same folder so the final `os.replace` is a rename on one filesystem.
    An existing folder at `final` is replaced as a whole.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if final.is_dir() and tmp.is_dir():
            # os.replace cannot swap a non-empty folder: move the old one aside first, then drop it.
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file: written differently (relative, `..`), through a symlink, or a hard link."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: they cannot be the same file
        return False


def clobbered_input(output: str | os.PathLike[str], inputs: dict[str, str | os.PathLike[str]]) -> str | None:
    """The label of the first input that writing `output` would replace, or None.

    `inputs` maps a label for the message (`--data test`, `source 'clean'`) to a path.
    """
    for label, path in inputs.items():
        if path and same_file(output, path):
            return label
    return None


def did_you_mean(path: str | os.PathLike[str], limit: int = 3) -> str:
    """` (did you mean clean.jsonl?)`: the names in a missing file's folder closest to its name, or ``.

    The nearest folder that exists is searched when the file's own folder is missing too (a typo in a folder name).
    """
    path = Path(path)
    parent, name = path.parent, path.name
    while not parent.is_dir():
        if parent == parent.parent:
            return ""
        parent, name = parent.parent, parent.name
    try:
        names = [p.name for p in parent.iterdir() if not p.name.startswith(".")]
    except OSError:
        return ""
    close = difflib.get_close_matches(name, names, n=limit, cutoff=0.8)  # .jsonl alone must not match
    if not close:
        lowered = {n.lower(): n for n in names}
        close = [lowered[n] for n in difflib.get_close_matches(name.lower(), list(lowered), n=limit, cutoff=0.8)]
    if not close:
        return ""
    shown = " or ".join(str(parent / c) for c in close)
    return f" (did you mean {shown}?)"
