"""A run's output folder: one run at a time, and a fresh run never on top of another run's checkpoints or results.

- A lock held for the run's life: `fcntl.flock` on `OUTPUT_DIR/.scalebio.lock` (for `sample`, on a hidden sibling
  of the output file). The kernel drops it when the process ends however it ends (an exception, SIGKILL, OOM),
  so a lock file left behind by a dead run is free at once: stale locks need no pid guessing. Under torchrun only
  rank 0 locks; the other ranks are its processes.
- A fresh run (no `--resume`, or `--resume auto` finding no checkpoint) in a folder holding complete checkpoints,
  a weights.json or a model is refused: its first checkpoint would join the old ones under one `keep` rotation,
  and resuming later could pick the old run's. `--resume auto` continues the old run; `--force` starts over and
  deletes the old checkpoints first (weights.json and the model are replaced when the new run finishes).
- A finished run says so: `finished.json` (stage, result path, resolved recipe) is written after the result and
  removed when a run starts writing into the folder again. `--resume auto` on a finished run of the same recipe
  recomputes nothing: it reports "already complete" and prints the result path. The refusals tell apart this
  run finished, this run interrupted at step N, and a run of another recipe (the keys that differ are named).

Torch-free: the CLI claims the folder before any heavy import, so a second run is refused at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.markup import escape

from scalebio_cli.console import console
from scalebio_cli.errors import InputError
from scalebio_cli.train import process

LOCK_NAME = ".scalebio.lock"
CHECKPOINT_PREFIX = "step-"
FINISHED_NAME = "finished.json"
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _missing_parents(folder: Path) -> list[Path]:
    """The folders that creating `folder` would create, deepest first."""
    missing = []
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        missing.append(p)
    return missing


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, `{info['command']}` since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said which"


def _acquire(lock_path: Path, what: str) -> int:
    """Lock `lock_path` (created if missing) or raise InputError naming the holder. Returns the open descriptor."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise InputError(f"{lock_path.parent}: another scalebio run is writing here ({holder}); wait for it to "
                             f"end or write elsewhere (if no such process runs, {lock_path} is stale: delete it)"
                             ) from None
        # The previous holder unlinks the file when it releases; if that happened between our open and our flock,
        # we hold a lock on a file nobody else will open: start again on the path's current file.
        try:
            current = os.stat(lock_path)
            mine = os.fstat(fd)
            if (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": what, "started": started}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


@contextmanager
def locked(lock_path: Path, what: str, take: bool = True) -> Iterator[None]:
    """Hold the lock at `lock_path` for the block; a folder created only to hold it is removed again if the block
    leaves it empty (bad input found later must leave nothing behind)."""
    if not take:
        yield
        return
    created = _missing_parents(lock_path.parent)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock_path, what)
    try:
        yield
    finally:
        # Unlink while still holding the lock: a process waiting on this file sees it gone (see _acquire).
        lock_path.unlink(missing_ok=True)
        os.close(fd)
        for folder in created:
            try:
                folder.rmdir()  # only if empty: a run's outputs keep it
            except OSError:
                break


def _command() -> str:
    return " ".join(["scalebio", *sys.argv[1:]])[:500]


# ---------------------------------------------------------------------------------------------------------------
# What a folder already holds.


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoints/step-NNNNNN/` folders that have their meta.json (written last), oldest first. Torch-free, so the
    CLI can look at a folder before any heavy import; train/checkpoint.py writes and reads by the same rule."""
    root = checkpoints_dir(output_dir)
    found = [p for p in (root.iterdir() if root.is_dir() else [])
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()
             and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def complete_steps(folder: Path) -> list[tuple[int, str]]:
    """(step, stage) of every complete checkpoint."""
    found = []
    for p in complete_checkpoints(folder):
        try:
            stage = json.loads((p / "meta.json").read_text()).get("stage", "?")
        except (OSError, ValueError, AttributeError):
            stage = "?"
        found.append((int(p.name[len(CHECKPOINT_PREFIX):]), str(stage)))
    return found


def held_results(folder: Path) -> list[str]:
    """What of another run `folder` holds, in words ([] if nothing)."""
    held = []
    steps = complete_steps(folder)
    if steps:
        stages = sorted({stage for _, stage in steps})
        held.append(f"{', '.join(stages)} checkpoints up to step {steps[-1][0]}")
    if (folder / "weights.json").is_file():
        held.append("weights.json")
    if any((folder / name).is_file() for name in MODEL_WEIGHTS):
        held.append("a model")
    return held


# ---------------------------------------------------------------------------------------------------------------
# Which run a folder holds: finished or interrupted, and of which recipe.


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a resolved recipe (a source's mapping stays one value: it is compared whole)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not (prefix + key).startswith("data.sources"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any], result_keys: tuple[str, ...],
                       there: str = "checkpoint") -> list[str]:
    """Keys (dotted) under `result_keys` prefixes whose values differ between two resolved recipes."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(k for k in set(a) | set(b) if k.startswith(result_keys))
    problems = [f"{k}: {there} {a.get(k)!r}, now {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    old, new = a.get("data.sources"), b.get("data.sources")
    if "data.sources" in keys and isinstance(old, dict) and isinstance(new, dict) and old == new \
            and list(old) != list(new):
        # Dicts compare equal in any order, but a source's position fixes its sampler stream and weight index.
        problems.append(f"data.sources: reordered ({there} {', '.join(old)}; now {', '.join(new)})")
    return problems


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def mark_finished(folder: Path, stage: str, result: Path, config: dict[str, Any]) -> None:
    """Record that the run in `folder` finished (after its result is written; main process only). A result that
    does not exist marks nothing: only a run that wrote its result has finished."""
    if not process.is_main() or not Path(result).exists():
        return
    from scalebio_cli.files import write_json

    try:  # relative: the folder may be moved or copied whole
        where = str(Path(result).resolve().relative_to(folder.resolve()))
    except ValueError:
        where = str(result)
    write_json(folder / FINISHED_NAME, {"stage": stage, "result": where, "config": config,
                                        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})


def clear_finished(folder: Path) -> None:
    """A run starts writing into `folder`: it no longer holds a finished run."""
    (folder / FINISHED_NAME).unlink(missing_ok=True)


@dataclass
class HeldRun:
    """The run a folder holds: its stage, its resolved recipe (None: unknown), and how far it got."""

    stage: str | None
    config: dict[str, Any] | None
    result: Path | None  # set when it finished
    step: int | None  # its latest complete checkpoint
    held: list[str] = field(default_factory=list)  # what it left, in words

    def differences(self, stage: str, config: dict[str, Any]) -> list[str]:
        """Why it is a run of another recipe than `config`'s `stage` run ([] if it is this run)."""
        if self.stage != stage:
            return [f"stage: there {self.stage}, now {stage}"]
        from scalebio_cli.recipe.schema import result_keys

        found = config_differences(self.config or {}, config, result_keys(stage), there="there")
        return [d if len(d) <= 240 else d[:239] + "…" for d in found]  # a whole data.sources mapping is long


def held_run(folder: Path) -> HeldRun | None:
    """What run `folder` holds (None if none). Finished: finished.json, or (runs from before it existed) a result
    newer than every checkpoint that records its recipe."""
    held = held_results(folder)
    if not held:
        return None
    checkpoints = complete_checkpoints(folder)
    latest = checkpoints[-1] if checkpoints else None
    step = int(latest.name[len(CHECKPOINT_PREFIX):]) if latest else None
    newest_checkpoint = _mtime(latest / "meta.json") if latest else 0.0
    marker = _read_json(folder / FINISHED_NAME)
    if isinstance(marker, dict) and isinstance(marker.get("config"), dict) and marker.get("result"):
        return HeldRun(str(marker.get("stage")), marker["config"], folder / str(marker["result"]), step, held)
    weights = folder / "weights.json"
    doc = _read_json(weights) if weights.is_file() and _mtime(weights) >= newest_checkpoint else None
    if isinstance(doc, dict) and isinstance(doc.get("config"), dict):
        return HeldRun("reweight", doc["config"], weights, step, held)
    model = next((folder / m for m in MODEL_WEIGHTS if (folder / m).is_file()), None)
    if model is not None and _mtime(model) >= newest_checkpoint and (folder / "recipe.yaml").is_file():
        import yaml

        try:
            config = yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            config = None
        if isinstance(config, dict):
            return HeldRun("finetune", config, folder, step, held)
    if latest is not None:
        meta = _read_json(latest / "meta.json")
        if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
            return HeldRun(str(meta.get("stage")), meta["config"], None, step, held)
    return HeldRun(None, None, None, step, held)


def finished_result(folder: Path, stage: str, config: dict[str, Any]) -> Path | None:
    """The result of a finished `stage` run of this very recipe in `folder` (what `--resume auto` returns at once
    instead of recomputing), or None."""
    run = held_run(folder)
    if run is None or run.result is None or run.config is None or run.differences(stage, config):
        return None
    return run.result if run.result.exists() else None


def _shown(differences: list[str], limit: int = 3) -> str:
    more = f"; and {len(differences) - limit} more" if len(differences) > limit else ""
    return "; ".join(differences[:limit]) + more


def check_fresh_start(folder: Path, stage: str, resume: str | None, force: bool,
                      config: dict[str, Any] | None = None) -> None:
    """Refuse a fresh run where another run lives (see the module docstring); with --force, clear its checkpoints.

    With the run's resolved recipe (`config`), the refusal says which run is there: this run, finished; this run,
    interrupted at step N; or a run of another recipe (and the keys that differ)."""
    if resume not in (None, "auto"):
        return  # resuming a named checkpoint: the run continues what is there
    steps = complete_steps(folder)
    if resume == "auto" and steps:
        return  # continues the latest of them
    held = held_results(folder)
    if not held:
        return
    if force:
        if process.is_main():
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            console.print(f"[yellow]starting over (--force) in {escape(str(folder))}:[/] it held "
                          f"{escape(', '.join(held))}; old checkpoints deleted")
        return
    elsewhere = "write elsewhere (output_dir=NEW_FOLDER)"
    over = "start over with --force (its checkpoints are deleted)"
    run = held_run(folder) if config is not None else None
    if run is not None and run.config is not None:
        differences = run.differences(stage, config)  # type: ignore[arg-type]
        if not differences and run.result is not None:
            raise InputError(f"output_dir {folder} already holds this run, finished ({run.result}): "
                             f"`--resume auto` prints its result without recomputing anything; to run it again, "
                             f"{over}, or {elsewhere}")
        if not differences and run.step is not None:
            raise InputError(f"output_dir {folder} already holds this run, interrupted at step {run.step} "
                             f"(resume with --resume auto); or {over}, or {elsewhere}")
        if differences:
            state = "finished" if run.result is not None else (
                f"interrupted at step {run.step}" if run.step is not None else "unfinished")
            raise InputError(f"output_dir {folder} already holds a {run.stage} run of another recipe ({state}; "
                             f"{', '.join(held)}; {_shown(differences)}); a fresh {stage} run there would mix "
                             f"with it: {elsewhere}, or {over}")
    how = "continue it with --resume auto, " if steps else ""
    raise InputError(f"output_dir {folder} already holds another run ({', '.join(held)}); a fresh {stage} run "
                     f"there would mix with it: {how}{elsewhere}, or {over}")


@contextmanager
def claim(output_dir: str | Path, stage: str, resume: str | None, force: bool,
          config: dict[str, Any] | None = None) -> Iterator[None]:
    """Hold OUTPUT_DIR for a reweight/finetune run (rank 0 locks) and refuse a fresh run over another one."""
    folder = Path(output_dir)
    with locked(folder / LOCK_NAME, _command(), take=process.is_main()):
        check_fresh_start(folder, stage, resume, force, config)
        yield


@contextmanager
def claim_output_file(output: Path) -> Iterator[None]:
    """Hold an output file (sample): a second command writing the same file is refused while this one runs."""
    with locked(output.parent / f".{output.name}{LOCK_NAME}", _command(), take=process.is_main()):
        yield
