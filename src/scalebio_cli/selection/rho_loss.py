"""RHO-loss (Mindermann et al. 2022), offline, as LLM data selection adapts it: a record's reducible holdout loss,
its loss under the base model minus its loss under an irreducible-loss (IL) model fitted to the holdout data
(data.validation; selection/irreducible.py trains it).

The score (`select.rho_loss.score`): `sum` (default) adds the record's per-token reducible losses over its response
tokens; `mean` divides that by the number of response tokens. docs/internals.md ("RHO-loss") gives the measurement
behind the default: a per-token mean lets a 1-2 token answer, whose mean is the noisiest of all, rank first.

The IL model is kept in WORK/rho-loss-HASH/model, HASH covering everything it depends on (model, validation data as
tokenized, max_length, seed, precision, select.rho_loss's training settings); a rerun with the same settings
reuses it (an interrupted training starts again).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from scalebio_cli.console import console, step_progress
from scalebio_cli.files import write_json
from scalebio_cli.recipe import Recipe
from scalebio_cli.results import reuse
from scalebio_cli.selection import irreducible
from scalebio_cli.selection.pool import Pool, token_losses
from scalebio_cli.train import distributed
from scalebio_cli.train.distributed import DistInfo
from scalebio_cli.train.modeling import load_model, resolve_dtype

DONE = "done.json"
_TRAINING = ("heldout_fraction", "holdout_epochs", "patience", "min_steps", "lr", "batch_size")


def _fingerprint(recipe: Recipe, pool: Pool, seed: int) -> str:
    """The IL model's key (results/reuse.py): the validation sets and the model by content, and the settings."""
    cfg = dataclasses.asdict(recipe.select.rho_loss)
    model = {f"the {k}": v for k, v in reuse.model_identity(recipe.model, recipe.tokenizer).items()}
    settings = {"template": recipe.data.chat_template, "max_length": recipe.data.max_length, "seed": seed,
                "precision": recipe.precision, "training": {k: cfg[k] for k in _TRAINING}}
    return reuse.digest(reuse.make_key(pool.inputs(sources=False) | model, settings))


def irreducible_model(recipe: Recipe, pool: Pool, dist: DistInfo, seed: int, work: Path
                      ) -> tuple[Path, dict[str, Any]]:
    """The IL model's folder and its training record: reused when finished with the same settings, else trained."""
    folder = work / f"rho-loss-{_fingerprint(recipe, pool, seed)}"
    model_dir = folder / "model"
    if (folder / DONE).is_file() and (model_dir / "config.json").is_file():
        fit = json.loads((folder / DONE).read_text())["fit"]
        console.print(f"[dim]rho-loss[/] reusing the irreducible-loss model {escape(str(model_dir))} (held-out "
                      f"loss {fit['heldout_loss_before']:.4f} -> {fit['heldout_loss_after']:.4f})")
        for warning in fit["warnings"]:
            console.print(f"[yellow]warning:[/] {escape(warning)}")
        return model_dir, fit
    console.print(f"[dim]rho-loss[/] training the irreducible-loss model on the validation data "
                  f"({escape(str(model_dir))})")
    fit = dataclasses.asdict(irreducible.train(recipe, pool, dist, seed, model_dir))
    if dist.is_main:
        write_json(folder / DONE, {"model": str(model_dir), "fit": fit})
    distributed.barrier(dist)
    return model_dir, fit


def reducible(base: np.ndarray, il: np.ndarray, counts: np.ndarray, rule: str) -> np.ndarray:
    """Scores from token-loss sums under the base and IL models: their difference (`sum`) or that per token."""
    diff = base - il
    return diff if rule == "sum" else diff / np.maximum(counts, 1)


def scores(recipe: Recipe, pool: Pool, dist: DistInfo, seed: int, work: Path
           ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Per source: each kept example's reducible holdout loss (select.rho_loss.score)."""
    cfg = recipe.select.rho_loss
    model_dir, fit = irreducible_model(recipe, pool, dist, seed, work)
    dtype = resolve_dtype(recipe.precision, dist.device)
    sums: dict[str, dict[str, np.ndarray]] = {}
    counts: dict[str, np.ndarray] = {}
    progress = step_progress("score", dist.is_main)
    task = progress.add_task("score", total=2 * pool.size, info="")
    with progress:
        for label, path in (("base", recipe.model), ("irreducible", str(model_dir))):
            progress.update(task, info=f"loss under the {label} model")
            model = load_model(path, dtype, dist.device, recipe.trust_remote_code)
            sums[label] = {}
            for n, d in pool.sources.items():
                sums[label][n], counts[n] = token_losses(model, d, cfg.micro_batch_size, pool.pad_id, dist.device,
                                                         lambda k: progress.advance(task, k), dist)
            del model
    out = {n: reducible(sums["base"][n], sums["irreducible"][n], counts[n], cfg.score) for n in pool.sources}
    mean_loss = {label: {n: float(v.sum() / counts[n].sum()) if len(v) else None for n, v in by.items()}
                 for label, by in sums.items()}
    info = {**dataclasses.asdict(cfg), "irreducible_model": str(model_dir), "irreducible": fit,
            "mean_loss": mean_loss,
            "mean_response_tokens": {n: float(c.mean()) if len(c) else None for n, c in counts.items()}}
    return out, info
