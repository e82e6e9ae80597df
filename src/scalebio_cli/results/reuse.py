"""A content key over what a piece of work read: the sha256 of every input it reads (data files, weights files,
the model's and tokenizer's files) and its resolved settings. Finished work is reused only when the key it
recorded equals the key of what it would read now, so a file rewritten at the same path is never taken for the
old one (paths and modification times say nothing about contents).

Every reuse keys this way: compare's cells, select's work folders (selection/rho_loss.py, selection/less.py) and
group's feature cache (stages/group.py) name their folders by `digest` of such a key.

`finetuned` is the one "fine-tune this record file into this folder, reuse if done" helper: `compare` uses it for
every cell, and anything else that trains a model on a file it wrote (RHO-loss's irreducible-loss model) can.
The finetune stage is handed in (stages never import each other).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from scalebio_cli.errors import InputError
from scalebio_cli.files import file_sha256, write_json

Finetune = Callable[[Any, "str | None", bool], Path]
KEY_NAME = "key.json"  # written before the work starts: an unfinished run of another key is never resumed
DONE_NAME = "done.json"  # written after it finished: the key and the seconds it took


def path_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a folder: every file under it by relative path and contents (a model folder)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    import hashlib

    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\0".encode())
    return digest.hexdigest()


def model_identity(model: str, tokenizer: str | None = None) -> dict[str, str]:
    """The model's (and a separate tokenizer's) contents: a local folder or file by its sha256; a Hub id (nothing
    local to hash) by its name."""
    out = {}
    for label, where in (("model", model), ("tokenizer", tokenizer)):
        if where:
            out[label] = path_sha256(where) if Path(where).exists() else f"hub:{where}"
    return out


def make_key(inputs: Mapping[str, str], settings: Mapping[str, Any]) -> dict[str, Any]:
    """A key: {"inputs": {label: sha256}, "settings": {...}} (settings JSON-normalised, so a recorded key read
    back compares equal)."""
    return json.loads(json.dumps({"inputs": dict(inputs), "settings": dict(settings)}, sort_keys=True, default=str))


def digest(key: Mapping[str, Any], length: int = 12) -> str:
    """A short name for a key (a cache or work folder's): the start of the sha256 of its JSON."""
    import hashlib

    text = json.dumps(make_key(key["inputs"], key["settings"]), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: tree}


def differences(recorded: Any, current: Mapping[str, Any], limit: int = 4) -> list[str]:
    """What changed between a recorded key and the current one, in words (empty: the same work)."""
    if not isinstance(recorded, dict) or "inputs" not in recorded:
        return ["no content key recorded (written by an earlier version)"]
    old, new = recorded.get("inputs") or {}, dict(current.get("inputs", {}))  # flat: labels hold dots (paths)
    out = [f"{k}: {'changed' if k in old and k in new else 'new' if k in new else 'gone'}"
           for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    old, new = _flat(recorded.get("settings", {})), _flat(dict(current.get("settings", {})))
    out += [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return out[:limit] + ([f"and {len(out) - limit} more"] if len(out) > limit else [])


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class FineTuned:
    model: Path
    seconds: float  # the fine-tuning's wall time (of the run that finished it)
    reused: bool


def finished_differences(folder: Path, key: Mapping[str, Any]) -> list[str] | None:
    """None: `folder` holds no finished fine-tuning; []: one of this key; else what differs from the one it holds."""
    done = read_json(folder / DONE_NAME)
    if not isinstance(done, dict) or not (folder / "model" / "config.json").is_file():
        return None
    return differences(done.get("key"), key)


def finetuned(recipe: Any, data: Path, folder: Path, finetune: Finetune, key: Mapping[str, Any],
              force: bool = False) -> FineTuned:
    """`recipe`'s model fine-tuned (its finetune section) on the record file `data` into folder/model.

    A finished run of the same key is reused; an unfinished one of the same key resumes from its last checkpoint;
    an unfinished one of another key is cleared and started over (never resumed under the new label). A finished
    one of another key is refused (InputError naming what changed) unless `force`, which starts over."""
    changed = finished_differences(folder, key)
    if changed == [] and not force:
        done = read_json(folder / DONE_NAME)
        return FineTuned(folder / "model", float(done.get("seconds") or 0.0), True)
    if changed and not force:
        raise InputError(f"{folder}: fine-tuned from other inputs ({'; '.join(changed)}); pass --force to redo it")
    if force or read_json(folder / KEY_NAME) != key:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / KEY_NAME, key)
    return _train(recipe, data, folder, finetune, key)


def _train(recipe: Any, data: Path, folder: Path, finetune: Finetune, key: Mapping[str, Any]) -> FineTuned:
    from scalebio_cli.results import run_folder

    model_dir = folder / "model"
    ft = dataclasses.replace(recipe.finetune, data=str(data), weights=None)
    sub = dataclasses.replace(recipe, output_dir=str(model_dir), finetune=ft, report_to=[])
    start = time.perf_counter()
    with run_folder.claim(model_dir, "finetune", "auto", False):
        finetune(sub, "auto", False)
    seconds = time.perf_counter() - start
    write_json(folder / DONE_NAME, {"key": dict(key), "seconds": round(seconds, 2)})
    return FineTuned(model_dir, seconds, False)
