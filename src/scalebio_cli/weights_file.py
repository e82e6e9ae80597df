"""`RUN/weights.json`: the product of `scalebio reweight` (format `scalebio-weights/1`, see CONTRACT.md)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from scalebio_cli import __version__
from scalebio_cli.atomic import write_json

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
