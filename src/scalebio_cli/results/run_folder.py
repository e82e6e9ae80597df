"""A run's output folder: one run at a time, and a fresh run never on top of another run's checkpoints or results.

- A lock held for the run's life: `fcntl.flock` on `OUTPUT_DIR/.scalebio.lock` (for `sample`, on a hidden sibling
  of the output file). The kernel drops it when the process ends however it ends (an exception, SIGKILL, OOM),
  so a lock file left behind by a dead run is free at once: stale locks need no pid guessing. Under torchrun only
  rank 0 locks; the other ranks are its processes.
- A fresh run (no `--resume`, or `--resume auto` finding no checkpoint) in a folder holding complete checkpoints,
  a weights.json or a model is refused: its first checkpoint would join the old ones under one `keep` rotation,
  and resuming later could pick the old run's. `--resume auto` continues the old run; `--force` starts over and
  deletes the old checkpoints first (weights.json and the model are replaced when the new run finishes).

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
from pathlib import Path

from rich.markup import escape

from scalebio_cli.console import console
from scalebio_cli.errors import InputError
from scalebio_cli.train import process

LOCK_NAME = ".scalebio.lock"
CHECKPOINT_PREFIX = "step-"


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
    if any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        held.append("a model")
    return held


def check_fresh_start(folder: Path, stage: str, resume: str | None, force: bool) -> None:
    """Refuse a fresh run where another run lives (see the module docstring); with --force, clear its checkpoints."""
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
    how = "continue it with --resume auto, " if steps else ""
    raise InputError(f"output_dir {folder} already holds another run ({', '.join(held)}); a fresh {stage} run "
                     f"there would mix with it: {how}write elsewhere (output_dir=NEW_FOLDER), or start over with "
                     "--force (its checkpoints are deleted)")


@contextmanager
def claim(output_dir: str | Path, stage: str, resume: str | None, force: bool) -> Iterator[None]:
    """Hold OUTPUT_DIR for a reweight/finetune run (rank 0 locks) and refuse a fresh run over another one."""
    folder = Path(output_dir)
    with locked(folder / LOCK_NAME, _command(), take=process.is_main()):
        check_fresh_start(folder, stage, resume, force)
        yield


@contextmanager
def claim_output_file(output: Path) -> Iterator[None]:
    """Hold an output file (sample): a second command writing the same file is refused while this one runs."""
    with locked(output.parent / f".{output.name}{LOCK_NAME}", _command(), take=process.is_main()):
        yield
