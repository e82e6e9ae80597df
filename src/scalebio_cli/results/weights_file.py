"""`RUN/weights.json`: the product of `scalebio reweight` (format `scalebio-weights/1`, see CONTRACT.md)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from scalebio_cli import __version__
from scalebio_cli.files import write_json

FORMAT = "scalebio-weights/1"


def build(*, weights: dict[str, float], weights_averaged: dict[str, float], sources: dict[str, dict[str, Any]],
          validation: dict[str, Any] | None, trajectory: list[dict[str, Any]], steps: int, seed: int, model: str,
          config: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "weights": weights,
        "weights_averaged": weights_averaged,
        "sources": sources,
        "validation": validation,
        "trajectory": trajectory,
        "steps": steps,
        "seed": seed,
        "model": model,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "version": __version__,
        "config": config,
    }


def write(path: Path, doc: dict[str, Any]) -> None:
    write_json(path, doc)


def load(path: str | Path, allow_changed_sources: bool = False,
         averaged: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
    """Read and validate a weights file. Returns (weights, document); every defect is an InputError naming it.

    Checks the format tag, that weights are numbers in [0, 1] summing to 1 (within 1e-6), that they name exactly
    the recorded sources, and that each source file still exists with its recorded sha256.
    """
    import json
    import math

    from scalebio_cli.errors import InputError
    from scalebio_cli.files import file_sha256

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a valid weights file (not JSON: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise InputError(f"{path}: format is {found!r}, expected {FORMAT!r} (a weights.json written by "
                         "`scalebio reweight`)")
    key = "weights_averaged" if averaged else "weights"
    weights, sources = doc.get(key), doc.get("sources")
    problems = []
    if not isinstance(weights, dict) or not weights:
        raise InputError(f"{path}: '{key}' must be a non-empty mapping of source name to weight")
    if not isinstance(sources, dict):
        raise InputError(f"{path}: 'sources' must map each source name to its path and sha256")
    for name, value in weights.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            problems.append(f"{path}: {key}.{name} is {value!r}, not a number")
        elif not 0.0 <= value <= 1.0:
            problems.append(f"{path}: {key}.{name} = {value} is outside [0, 1]")
    if not problems and abs(sum(weights.values()) - 1.0) > 1e-6:
        problems.append(f"{path}: {key} sum to {sum(weights.values()):.9f}, not 1 (within 1e-6)")
    for name in weights:
        if name not in sources:
            problems.append(f"{path}: {key} names source '{name}', which is not among its sources "
                            f"({', '.join(sources)})")
    for name in sources:
        if name not in weights:
            problems.append(f"{path}: source '{name}' has no weight in '{key}'")
    for name, info in sources.items():
        if name not in weights:
            continue
        if not isinstance(info, dict) or not isinstance(info.get("path"), str):
            problems.append(f"{path}: sources.{name} must have a 'path'")
            continue
        source_path = Path(info["path"])
        if not source_path.is_file():
            problems.append(f"{path}: source '{name}' file not found: {source_path}")
        elif not allow_changed_sources and file_sha256(source_path) != info.get("sha256"):
            problems.append(f"{path}: source '{name}' changed since the weights were learned: {source_path} no "
                            "longer matches its recorded sha256 (--allow-changed-sources to sample anyway)")
    if problems:
        raise InputError(problems)
    return {name: float(v) for name, v in weights.items()}, doc
