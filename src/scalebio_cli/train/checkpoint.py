"""Checkpoints that survive preemption: written to a hidden folder, renamed into place when complete.

Layout: `OUTPUT_DIR/checkpoints/step-000200/` holding `meta.json` (step, resolved config, world size) and one
`.pt` file per component, loaded back with `torch.load(weights_only=True)` (no code runs from a checkpoint).
A crash while writing leaves only a `.step-*.tmp-*` folder, never a damaged `step-*`: the last good one is kept.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from scalebio_cli import __version__
from scalebio_cli.errors import InputError
from scalebio_cli.results.run_folder import (  # noqa: F401  (flatten, config_differences: used from here too)
    CHECKPOINT_PREFIX,
    checkpoints_dir,
    complete_checkpoints,
    config_differences,
    flatten,
)
from scalebio_cli.train.distributed import DistInfo, barrier


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`auto`: the latest complete checkpoint in output_dir (None: start fresh); a path: that checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise InputError(f"--resume {resume}: not a complete checkpoint folder (no meta.json)")
    return path


def save(output_dir: str | Path, step: int, meta: dict[str, Any], keep: int, dist: DistInfo,
         write: Callable[[Path], None]) -> Path:
    """Write a checkpoint atomically and keep the newest `keep`. Every process calls it (collective).

    `write(folder)` runs on every process and writes its part (engines save themselves; rank 0 the rest).
    """
    root = checkpoints_dir(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f".{final.name}.tmp"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(dist)
    write(tmp)
    barrier(dist)
    if dist.is_main:
        info = {"step": step, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "version": __version__, "world_size": dist.world_size, **meta}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2))
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        announce(final, step, keep)
    barrier(dist)
    return final


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def format_bytes(n: float) -> str:
    """`512 KB`, `1.7 GB` (powers of 1000, as disk sizes are quoted)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def announce(folder: Path, step: int, keep: int) -> None:
    """The log's line for a checkpoint: where, and what it costs on disk (a 135M model's reweight checkpoint is
    ~1.7 GB: u and w with their optimizer states), `keep` of them together."""
    from rich.markup import escape

    from scalebio_cli.console import console

    size = folder_bytes(folder)
    console.print(f"[dim]checkpoint[/] step {step}: {escape(str(folder))} ({format_bytes(size)}; "
                  f"checkpoint.keep={keep}: up to {format_bytes(size * keep)} on disk)")


def load(path: Path, name: str, rank: int | None = None) -> Any:
    file = path / (f"{name}-rank{rank}.pt" if rank is not None else f"{name}.pt")
    if not file.is_file():
        raise InputError(f"{path}: checkpoint has no {file.name} (was it written by a different number of processes?)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        # A file damaged after the checkpoint was completed (a copy cut short, a bad disk): name it and the way out.
        detail = (str(exc).strip().splitlines() or [""])[0][:200]  # EOFError has no message at all
        raise InputError(f"{file}: damaged checkpoint file ({type(exc).__name__}{': ' + detail if detail else ''}); "
                         f"resume from an earlier checkpoint (--resume {path.parent}/step-...) or start over"
                         ) from None


def meta(path: Path) -> dict[str, Any]:
    """A checkpoint's meta.json: a JSON object with an integer step and a stage, or an InputError naming it."""
    file = path / "meta.json"
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InputError(f"{file}: damaged checkpoint metadata ({exc}); resume from an earlier checkpoint "
                         "(--resume PATH) or start over") from None
    step = info.get("step") if isinstance(info, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(info.get("config"), dict) \
            or not isinstance(info.get("data_sha256", {}), dict):
        raise InputError(f"{file}: damaged checkpoint metadata (needs an integer 'step', the run's 'config' and "
                         "its data files' 'data_sha256')")
    return info


def check_resumable(path: Path, stage: str, config: dict[str, Any], fingerprints: dict[str, str],
                    result_keys: tuple[str, ...], force: bool) -> list[str]:
    """Refuse (InputError, exit 2) to continue a checkpoint under a recipe or data that would change the result.

    Returns the differences accepted with `force` (for a warning), or [].
    """
    info = meta(path)
    if info.get("stage") != stage:
        raise InputError(f"--resume {path}: a checkpoint of '{info.get('stage')}', not of {stage}")
    problems = config_differences(info["config"], config, result_keys)
    problems += [f"{name}: the data file changed since the checkpoint (sha256)"
                 for name, sha in fingerprints.items() if info.get("data_sha256", {}).get(name) not in (None, sha)]
    if problems and not force:
        raise InputError([f"--resume {path}: the recipe differs from the checkpoint's in keys that change the "
                          "result (--force to resume anyway):", *[f"  {p}" for p in problems]])
    return problems


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
