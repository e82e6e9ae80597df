"""RHO-loss (Mindermann et al. 2022), offline, as LLM data selection adapts it: score = a record's mean
response-token loss under the base model minus its loss under an irreducible-loss model (the base model
fine-tuned on the holdout data: here data.validation, all sets together).

The irreducible-loss model is trained by the finetune stage (handed in by the CLI: stages never import each other)
into WORK/rho-loss-HASH/model, HASH covering everything it depends on (model, validation data, max_length, the
finetune settings with select.rho_loss's overrides); a rerun with the same settings reuses it, an interrupted one
resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from scalebio_cli.console import console, step_progress
from scalebio_cli.data.out.normalize import to_messages
from scalebio_cli.data.read import sources as data_sources
from scalebio_cli.files import write_json, write_text
from scalebio_cli.recipe import Recipe
from scalebio_cli.results import run_folder
from scalebio_cli.selection.pool import Pool, example_losses
from scalebio_cli.train.distributed import DistInfo
from scalebio_cli.train.modeling import load_model, resolve_dtype

Finetune = Callable[[Recipe, str | None, bool], Path]
DONE = "done.json"


def settings(recipe: Recipe) -> dict[str, Any]:
    """The irreducible-loss model's training settings: the finetune section, select.rho_loss overriding."""
    cfg, ft = recipe.select.rho_loss, recipe.finetune
    return {"holdout_epochs": cfg.holdout_epochs if cfg.holdout_epochs is not None else ft.epochs,
            "lr": cfg.lr if cfg.lr is not None else ft.lr,
            "batch_size": cfg.batch_size if cfg.batch_size is not None else ft.batch_size,
            "micro_batch_size": cfg.micro_batch_size}


def irreducible_recipe(recipe: Recipe, folder: Path, holdout: Path) -> Recipe:
    s = settings(recipe)
    ft = dataclasses.replace(recipe.finetune, data=str(holdout), weights=None, validation=None,
                             epochs=float(s["holdout_epochs"]), lr=float(s["lr"]), batch_size=int(s["batch_size"]))
    return dataclasses.replace(recipe, finetune=ft, output_dir=str(folder), report_to=[])


def _fingerprint(recipe: Recipe, pool: Pool) -> str:
    key = {"model": recipe.model, "tokenizer": recipe.tokenizer_path, "template": recipe.data.chat_template,
           "max_length": recipe.data.max_length, "seed": recipe.seed, "precision": recipe.precision,
           "validation": {n: d.sha256 for n, d in pool.validation.items()},
           "finetune": dataclasses.asdict(irreducible_recipe(recipe, Path("."), Path(".")).finetune)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _write_holdout(recipe: Recipe, path: Path) -> None:
    """Every validation record (all sets) as one JSON-lines file in one schema (what finetune.data reads)."""
    lines = []
    for source in data_sources.validation_sources(recipe).values():
        for _, example in data_sources.iter_examples(source):
            record = {"text": example} if isinstance(example, str) else {"messages": to_messages(example)}
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    write_text(path, "".join(lines))


def irreducible_model(recipe: Recipe, pool: Pool, finetune: Finetune, work: Path) -> Path:
    """The irreducible-loss model's folder: reused when finished with the same settings, else trained (resuming
    an interrupted run)."""
    folder = work / f"rho-loss-{_fingerprint(recipe, pool)}"
    model_dir = folder / "model"
    if (folder / DONE).is_file() and (model_dir / "config.json").is_file():
        console.print(f"[dim]rho-loss[/] reusing the irreducible-loss model {escape(str(model_dir))}")
        return model_dir
    holdout = folder / "holdout.jsonl"
    _write_holdout(recipe, holdout)
    console.print(f"[dim]rho-loss[/] training the irreducible-loss model on the validation data "
                  f"({escape(str(model_dir))})")
    sub = irreducible_recipe(recipe, model_dir, holdout)
    from scalebio_cli.recipe.preflight import check_finetune

    check_finetune(sub, "the irreducible-loss model (select.rho_loss)")
    with run_folder.claim(model_dir, "finetune", "auto", False):
        finetune(sub, "auto", False)
    write_json(folder / DONE, {"model": str(model_dir), "settings": settings(recipe)})
    return model_dir


def scores(recipe: Recipe, pool: Pool, dist: DistInfo, finetune: Finetune, work: Path
           ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Per source: each kept example's reducible holdout loss (base loss - irreducible loss)."""
    irreducible = irreducible_model(recipe, pool, finetune, work)
    dtype = resolve_dtype(recipe.precision, dist.device)
    mb = recipe.select.rho_loss.micro_batch_size
    losses: dict[str, dict[str, np.ndarray]] = {}
    progress = step_progress("score", dist.is_main)
    task = progress.add_task("score", total=2 * pool.size, info="")
    with progress:
        for label, path in (("base", recipe.model), ("irreducible", str(irreducible))):
            progress.update(task, info=f"loss under the {label} model")
            model = load_model(path, dtype, dist.device, recipe.trust_remote_code)
            losses[label] = {n: example_losses(model, d, mb, pool.pad_id, dist.device,
                                               lambda k: progress.advance(task, k))
                             for n, d in pool.sources.items()}
            del model
    out = {n: losses["base"][n] - losses["irreducible"][n] for n in pool.sources}
    info = {**settings(recipe), "irreducible_model": str(irreducible),
            "mean_loss": {label: {n: float(v.mean()) if len(v) else None for n, v in by.items()}
                          for label, by in losses.items()}}
    return out, info
