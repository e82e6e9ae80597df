"""Up-front checks of a stage's inputs, before torch is imported or any model is loaded.

A bad input must never cost a run: everything here is cheap and runs first, and every problem is reported at once.
"""

from __future__ import annotations

import os
from pathlib import Path

from scalebio_cli.config import Recipe
from scalebio_cli.errors import InputError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_reweight(recipe: Recipe, where: str | Path = "recipe") -> None:
    problems = []
    data, rw = recipe.data, recipe.reweight
    if len(data.sources) < 2:
        problems.append(f"data.sources: reweight needs at least 2 sources, got {len(data.sources)}")
    if not data.validation:
        problems.append("data.validation: reweight needs a validation file (what the model should become good at)")
    for name, path in [*data.sources.items(), ("validation", data.validation)]:
        if path and not Path(path).is_file():
            key = "data.validation" if name == "validation" else f"data.sources.{name}"
            problems.append(f"{key}: file not found: {path}")
    if rw.batch_size < len(data.sources):
        problems.append(f"reweight.batch_size: {rw.batch_size} is less than the {len(data.sources)} sources; "
                        "every source must appear in every batch")
    for key in ("batch_size", "val_batch_size"):
        if getattr(rw, key) % world_size():
            problems.append(f"reweight.{key}: {getattr(rw, key)} does not divide over {world_size()} processes")
    if problems:
        raise InputError([f"{where}: {p}" for p in problems])


def check_finetune(recipe: Recipe, where: str | Path = "recipe") -> None:
    ft = recipe.finetune
    problems = []
    if bool(ft.data) == bool(ft.weights):
        problems.append("finetune: set exactly one of finetune.data (a data file) and finetune.weights (a "
                        "weights.json to mix data.sources by)")
    for key, path in (("finetune.data", ft.data), ("finetune.weights", ft.weights),
                      ("finetune.validation", ft.validation)):
        if path and not Path(path).is_file():
            problems.append(f"{key}: file not found: {path}")
    if ft.batch_size % world_size():
        problems.append(f"finetune.batch_size: {ft.batch_size} does not divide over {world_size()} processes")
    if problems:
        raise InputError([f"{where}: {p}" for p in problems])
