"""RHO-loss's irreducible-loss (IL) model, trained as the method intends: fitted to the holdout data.

Mindermann et al. train their IL models on the holdout set until they are good models of it, choosing them on a
further held-out part. Here: data.validation (all sets together) is split, seeded, into a fit part and a held-out
part (`select.rho_loss.heldout_fraction`); `model`, all parameters, AdamW at a constant `select.rho_loss.lr`, trains
epochs over the fit part until the held-out loss has not improved for `patience` epochs, but never fewer than
`min_steps` optimizer steps (nor more than `holdout_epochs` epochs). The best epoch's weights are kept (written when
the held-out loss improves). A short or motionless fit is warned about: such a model is nearly the base model, and
base-minus-irreducible loss is then mostly noise.

Under torchrun the processes share each step's records (DDP, as `finetune` does) and the held-out loss.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape

from scalebio_cli.console import console, step_progress
from scalebio_cli.data.batching import micro_batches, response_token_count
from scalebio_cli.recipe import Recipe
from scalebio_cli.recipe.schema import LisaConfig
from scalebio_cli.selection.pool import Pool
from scalebio_cli.train import distributed
from scalebio_cli.train.distributed import DistInfo
from scalebio_cli.train.engine import Engine
from scalebio_cli.train.losses import response_losses
from scalebio_cli.train.modeling import load_model, resolve_dtype, save_hf_folder
from scalebio_cli.train.optim import LrSchedule
from scalebio_cli.train.sft import sft_step

_SPLIT_STREAM = 0x1B0  # the fit / held-out split and the epoch orders
FEW_STEPS = 50  # fewer optimizer steps than this: warned (the IL model is nearly the base model)
LITTLE_MOVE = 0.02  # a held-out loss that fell by less than this fraction: warned

Item = tuple[int, int]  # (validation set index, example)


@dataclasses.dataclass
class Fit:
    """What the IL model's training did (the manifest's and the log's record of it)."""

    fit_records: int
    heldout_records: int
    heldout_loss_before: float
    heldout_loss_after: float
    steps: int
    epochs: int
    best_epoch: int
    stopped: str
    warnings: list[str]


def split(pool: Pool, fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(fit, held-out) validation examples, seeded; drawn in validation-set NAME order so the recipe's order of
    named sets changes nothing. The held-out part gets round(fraction x n) records, at least 1, at most n - 1."""
    position = {name: k for k, name in enumerate(pool.validation)}
    items = [(position[n], i) for n in sorted(pool.validation) for i in range(len(pool.validation[n]))]
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(len(items))
    n_held = min(len(items) - 1, max(1, round(fraction * len(items))))
    held = sorted(items[j] for j in order[:n_held].tolist())
    fit = sorted(items[j] for j in order[n_held:].tolist())
    return fit, held


@torch.no_grad()
def heldout_loss(engine: Engine, items: list[Item], data: list[Any], micro_batch_size: int, pad_id: int,
                 dist: DistInfo) -> float:
    """Token-mean response loss of `items` (each process its share, summed over processes)."""
    engine.model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device)
    for mb in micro_batches(items[dist.rank:: dist.world_size], data, micro_batch_size, pad_id):
        sums, counts = response_losses(engine.module, mb.to(dist.device))
        totals += torch.stack([sums.double().sum(), counts.double().sum()])
    distributed.all_reduce_sum(totals, dist)
    engine.model.train()
    return float(totals[0] / totals[1])


def _warnings(fit: Fit) -> list[str]:
    out = []
    if fit.steps < FEW_STEPS:
        out.append(f"the irreducible-loss model trained only {fit.steps} optimizer steps (< {FEW_STEPS}): it is "
                   "nearly the base model, and its scores are mostly noise; raise select.rho_loss.min_steps or "
                   "select.rho_loss.holdout_epochs, or lower select.rho_loss.batch_size")
    moved = (fit.heldout_loss_before - fit.heldout_loss_after) / max(abs(fit.heldout_loss_before), 1e-12)
    if moved < LITTLE_MOVE:
        out.append(f"the irreducible-loss model's held-out loss barely moved ({fit.heldout_loss_before:.4f} -> "
                   f"{fit.heldout_loss_after:.4f}, {moved:+.1%}): it has not learnt the validation data; raise "
                   "select.rho_loss.lr or its epochs")
    return out


def train(recipe: Recipe, pool: Pool, dist: DistInfo, seed: int, model_dir: Path) -> Fit:
    """Fit the IL model and write its best epoch's weights to `model_dir` (a Hugging Face folder)."""
    cfg = recipe.select.rho_loss
    fit_items, held = split(pool, cfg.heldout_fraction, seed)
    data = list(pool.validation.values())
    steps_per_epoch = -(-len(fit_items) // cfg.batch_size)
    torch.manual_seed(seed * 1_000_003 + _SPLIT_STREAM)  # dropout: not whatever ran before
    model = load_model(recipe.model, resolve_dtype(recipe.precision, dist.device), dist.device,
                       recipe.trust_remote_code)
    engine = Engine(model, lr=cfg.lr, weight_decay=0.0, max_grad_norm=1.0, total_steps=1, warmup_ratio=0.0,
                    lisa=LisaConfig(layers=0), seed=seed, dist=dist)
    engine.schedule = LrSchedule(cfg.lr, 1, 0.0, lambda _: 1.0)  # constant: the length is not known up front

    def save() -> None:
        if dist.is_main:
            model_dir.mkdir(parents=True, exist_ok=True)
            save_hf_folder(engine.model, pool.tokenizer, model_dir)
        distributed.barrier(dist)

    before = best = heldout_loss(engine, held, data, cfg.micro_batch_size, pool.pad_id, dist)
    save()  # the base model stands until an epoch beats it
    console.print(f"[dim]rho-loss[/] irreducible-loss model: {len(fit_items):,} validation records to fit, "
                  f"{len(held):,} held out (loss {before:.4f}); lr {cfg.lr:g}, {steps_per_epoch} steps an epoch")
    step, best_epoch, epoch, stopped = 0, 0, 0, f"holdout_epochs={cfg.holdout_epochs} reached"
    progress = step_progress("irreducible", dist.is_main)
    task = progress.add_task("irreducible", total=cfg.holdout_epochs * steps_per_epoch, info="")
    with progress:
        for epoch in range(1, cfg.holdout_epochs + 1):
            order = np.random.default_rng([seed, _SPLIT_STREAM, epoch]).permutation(len(fit_items))
            for batch in np.array_split(order, steps_per_epoch):
                picked = [fit_items[j] for j in batch.tolist()]
                engine.begin_step(step)
                micro = [mb.to(dist.device) for mb in micro_batches(picked[dist.rank:: dist.world_size], data,
                                                                    cfg.micro_batch_size, pool.pad_id)]
                sft_step(engine, micro, response_token_count(picked, data), dist)
                step += 1
                progress.advance(task)
            loss = heldout_loss(engine, held, data, cfg.micro_batch_size, pool.pad_id, dist)
            progress.update(task, info=f"epoch {epoch} held-out {loss:.4f} (best {best:.4f})")
            console.print(f"[dim]rho-loss[/] irreducible-loss model epoch {epoch}: {step} steps, held-out loss "
                          f"{loss:.4f} (best {min(best, loss):.4f})")  # a line an epoch: logs that are not a terminal
            if loss < best:
                best, best_epoch = loss, epoch
                save()
            elif step >= cfg.min_steps and epoch - best_epoch >= cfg.patience:
                stopped = f"held-out loss not improved for {cfg.patience} epochs"
                break
    fit = Fit(len(fit_items), len(held), before, best, step, epoch, best_epoch, stopped, [])
    fit.warnings = _warnings(fit)
    console.print(f"[dim]rho-loss[/] irreducible-loss model: held-out loss {before:.4f} -> {best:.4f} (epoch "
                  f"{best_epoch} of {epoch}, {step} steps; {stopped}) -> {escape(str(model_dir))}")
    for warning in fit.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    return fit
