"""LESS (Xia et al. 2024, princeton-nlp/LESS): validation-gradient similarity of each record.

1. Warm-up: a LoRA adapter trained on a seeded `warmup_fraction` of the pool for `epochs` epochs (AdamW, linear
   decay after a `warmup_ratio` warmup), its weights, Adam moments and mean learning rate kept after every epoch
   (WORK/less-HASH/epoch-K.pt; reused on a rerun with the same data and settings).
2. Per checkpoint: each pool record's gradient of its mean response-token loss w.r.t. the LoRA parameters,
   Adam-preconditioned with that checkpoint's moments (m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2, feature
   m' / sqrt(v' + eps), eps = 1e-8 inside the root as LESS's `obtain_gradients_with_adam` has it: the
   denominator never falls below ~1e-4, which damps coordinates whose gradients are tiny); each validation record's
   plain gradient. Both projected by one seeded Rademacher projection made once per run (projection.py) and
   L2-normalised.
3. Score = sum over checkpoints of (the epoch's mean lr) x cosine(record, mean of a validation set's rows), the
   largest over the validation sets. Each checkpoint's cosines are kept (WORK/less-HASH/scores-epoch-K.pt), so an
   interrupted scoring resumes at the checkpoint it was on.

Per-record gradients come from one batched backward pass per micro-batch (`BatchGradients`: exact for LoRA's
linear layers), or one backward per record where an adapter cannot be hooked.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape

from scalebio_cli.console import console, step_progress
from scalebio_cli.data.batching import micro_batches, response_token_count
from scalebio_cli.data.tokens.tokenized import TokenizedData
from scalebio_cli.recipe import Recipe
from scalebio_cli.recipe.schema import LoraConfig
from scalebio_cli.results import reuse
from scalebio_cli.selection.pool import Advance, Pool, batch_of, gather, length_batches, shard
from scalebio_cli.selection.projection import Projector, make_projection
from scalebio_cli.train import distributed
from scalebio_cli.train.distributed import DistInfo
from scalebio_cli.train.lora import FINETUNE_ADAPTER, AdapterEngine, Adapters
from scalebio_cli.train.losses import ResponseLoss, response_losses
from scalebio_cli.train.modeling import load_model, resolve_dtype
from scalebio_cli.train.optim import LrSchedule
from scalebio_cli.train.sft import sft_step

_WARMUP_STREAM = 0x1E55  # the warm-up subset and its epoch orders
GROUP = 64  # records whose gradients are projected together (the projection itself is made once per run)


def linear_schedule(total_steps: int, warmup_ratio: float) -> Any:
    """LR multiplier: linear warmup, then linear decay to zero (HF Trainer's `linear`, which LESS trains with)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def build_engine(recipe: Recipe, dist: DistInfo, total_steps: int, seed: int) -> AdapterEngine:
    cfg = recipe.select.less
    model = load_model(recipe.model, resolve_dtype(recipe.precision, dist.device), dist.device,
                       recipe.trust_remote_code)
    lora = LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules))
    engine = AdapterEngine(Adapters(model, lora, [FINETUNE_ADAPTER], "select.less"), FINETUNE_ADAPTER, lr=cfg.lr,
                           weight_decay=0.0, max_grad_norm=1.0, total_steps=total_steps,
                           warmup_ratio=cfg.warmup_ratio, seed=seed, dist=dist)
    # LESS's warm-up rate (its paper: linear warmup, then linear decay) in place of the engines' warmup + cosine
    engine.schedule = LrSchedule(cfg.lr, total_steps, cfg.warmup_ratio, linear_schedule(total_steps, cfg.warmup_ratio))
    return engine



def adam_feature(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-8) -> torch.Tensor:
    """LESS's training feature: the Adam update direction one step on from the checkpoint's moments,
    m' / sqrt(v' + eps) with m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2 (eps inside the root, as LESS has it)."""
    return (b1 * m + (1 - b1) * g) / (b2 * v + (1 - b2) * g * g + eps).sqrt()


def warmup_items(pool: Pool, fraction: float, seed: int) -> list[tuple[int, int]]:
    """A seeded `fraction` of the pool's examples, as (source index, example) pairs. Drawn from the examples in
    source-NAME order (as the work folder's key sorts them), so the order of data.sources changes nothing."""
    position = {name: k for k, name in enumerate(pool.sources)}
    everything = [(position[n], i) for n in sorted(pool.sources) for i in range(len(pool.sources[n]))]
    n = max(1, round(fraction * len(everything)))
    chosen = np.random.default_rng([seed, _WARMUP_STREAM]).choice(len(everything), n, replace=False)
    return [everything[j] for j in sorted(chosen.tolist())]


def _checkpoint_state(engine: AdapterEngine, lr: float) -> dict[str, Any]:
    state = engine.optimizer.state
    zeros = [torch.zeros_like(p, dtype=torch.float32) for p in engine.params]
    return {"adapter": {n: p.detach().cpu().clone() for n, p in zip(engine.names, engine.params)},
            "exp_avg": {n: state[p].get("exp_avg", z).cpu().clone() for n, p, z in
                        zip(engine.names, engine.params, zeros)},
            "exp_avg_sq": {n: state[p].get("exp_avg_sq", z).cpu().clone() for n, p, z in
                           zip(engine.names, engine.params, zeros)},
            "lr": lr}


def warm_up(recipe: Recipe, pool: Pool, engine: AdapterEngine, dist: DistInfo, seed: int, folder: Path,
            steps_per_epoch: int) -> list[Path]:
    """Train the adapter, keeping a checkpoint after each epoch; returns their paths (reused when all exist)."""
    cfg = recipe.select.less
    paths = [folder / f"epoch-{k + 1}.pt" for k in range(cfg.epochs)]
    if all(p.is_file() for p in paths):
        console.print(f"[dim]less[/] reusing the warm-up checkpoints in {escape(str(folder))}")
        return paths
    items = warmup_items(pool, cfg.warmup_fraction, seed)
    data = list(pool.sources.values())
    console.print(f"[dim]less[/] warm-up: LoRA r={cfg.lora_r} on {len(items):,} of {pool.size:,} records "
                  f"({cfg.warmup_fraction:.0%}), {cfg.epochs} epochs of {steps_per_epoch} steps")
    engine.model.train()
    progress = step_progress("warm-up", dist.is_main)
    task = progress.add_task("warm-up", total=cfg.epochs * steps_per_epoch, info="")
    step = 0
    with progress:
        for epoch in range(cfg.epochs):
            order = np.random.default_rng([seed, _WARMUP_STREAM, epoch]).permutation(len(items))
            lrs, losses = [], []
            for batch in np.array_split(order, steps_per_epoch):
                picked = [items[j] for j in batch.tolist()]
                engine.begin_step(step)
                lrs.append(engine.lr)
                # each process its share of the step's records; the loss is over the global batch's tokens
                micro = [mb.to(dist.device) for mb in micro_batches(picked[dist.rank:: dist.world_size], data,
                                                                    cfg.micro_batch_size, pool.pad_id)]
                tokens = response_token_count(picked, data)
                loss_sum, _, _ = sft_step(engine, micro, tokens, dist)
                losses.append(float(loss_sum) / tokens)
                step += 1
                progress.update(task, advance=1, info=f"epoch {epoch + 1} loss {losses[-1]:.4f}")
            if dist.is_main:
                torch.save(_checkpoint_state(engine, float(np.mean(lrs))), paths[epoch])
    distributed.barrier(dist)  # every process reads the checkpoints next
    return paths


def record_gradients(module: ResponseLoss, params: list[torch.nn.Parameter], data: TokenizedData,
                     indices: np.ndarray, pad_id: int, device: torch.device) -> torch.Tensor:
    """`[len(indices), P]`: each record's gradient of its mean response-token loss, flattened; one record per
    backward pass (the reference `BatchGradients` is tested against, and the way for adapters it cannot hook)."""
    rows = []
    for i in indices.tolist():
        sums, counts = response_losses(module, batch_of(data, np.array([i]), pad_id, device))
        grads = torch.autograd.grad(sums[0] / counts[0], params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float()
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


class BatchGradients:
    """Per-record gradients of LoRA weights from ONE batched backward pass, exactly: a linear layer's weight
    gradient is a sum over positions of (output gradient) x (input), so keeping the sum per row instead of over the
    batch gives every record's own gradient. Padding adds nothing (right padding: no real token attends to it, and
    it carries no loss). 4-8x faster than one backward per record on a CPU; torch.func's vmap over grad would need
    transformers' mask construction (which branches on tensor values) to run under vmap."""

    def __init__(self, peft_model: torch.nn.Module, names: list[str], params: list[torch.nn.Parameter]):
        self.params = params
        self.modules = [peft_model.get_submodule(n.rsplit(".", 1)[0]) for n in names]
        self.usable = all(isinstance(m, torch.nn.Linear) and m.bias is None and m.weight is p
                          for m, p in zip(self.modules, params))

    def __call__(self, module: ResponseLoss, data: TokenizedData, indices: np.ndarray, pad_id: int,
                 device: torch.device) -> torch.Tensor:
        saved: dict[int, torch.Tensor] = {}

        def forward_hook(k: int) -> Any:
            def hook(_: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                x = inputs[0].detach()

                def grad_hook(g: torch.Tensor) -> None:
                    per_row = torch.einsum("bto,bti->boi", g.float(), x.float()).reshape(g.shape[0], -1)
                    saved[k] = saved[k] + per_row if k in saved else per_row
                output.register_hook(grad_hook)
            return hook

        handles = [m.register_forward_hook(forward_hook(k)) for k, m in enumerate(self.modules)]
        try:
            sums, counts = response_losses(module, batch_of(data, indices, pad_id, device))
            torch.autograd.grad((sums / counts).sum(), self.params, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        n = len(indices)
        return torch.cat([saved.get(k, torch.zeros(n, p.numel(), device=device))
                          for k, p in enumerate(self.params)], dim=1)


@dataclasses.dataclass
class Features:
    """What turns gradients into unit feature rows at one checkpoint."""

    module: ResponseLoss
    params: list[torch.nn.Parameter]
    batched: BatchGradients
    projection: Projector
    pad_id: int
    device: torch.device
    moments: tuple[torch.Tensor, torch.Tensor] | None = None  # (exp_avg, exp_avg_sq) flattened; None: plain

    micro_batch_size: int = 8

    def gradients(self, data: TokenizedData, indices: np.ndarray) -> torch.Tensor:
        if not self.batched.usable:
            return record_gradients(self.module, self.params, data, indices, self.pad_id, self.device)
        return torch.cat([self.batched(self.module, data, part, self.pad_id, self.device)
                          for part in np.array_split(indices, math.ceil(len(indices) / self.micro_batch_size))])

    def rows(self, data: TokenizedData, indices: np.ndarray) -> torch.Tensor:
        g = self.gradients(data, indices)
        if self.moments is not None:
            m, v = self.moments
            g = adam_feature(g, m, v)
        y = self.projection(g)
        return y / y.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def over(self, data: TokenizedData, group: int, advance: Advance, dist: DistInfo) -> torch.Tensor:
        """Unit rows of every example of `data` (example order): each process makes its shard's, all get all."""
        mine = shard(len(data), dist)
        out = torch.zeros(len(mine), self.projection.dim)
        for positions in length_batches(data, group, mine):
            out[torch.from_numpy(positions)] = self.rows(data, mine[positions]).cpu()
            advance(len(positions))
        return gather(out, dist)


def _load_checkpoint(engine: AdapterEngine, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the adapter to a checkpoint's weights; its Adam moments, flattened in parameter order."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for n, p in zip(engine.names, engine.params):
            p.copy_(state["adapter"][n])
    flat = tuple(torch.cat([state[key][n].reshape(-1).float() for n in engine.names]).to(engine.params[0].device)
                 for key in ("exp_avg", "exp_avg_sq"))
    return flat  # type: ignore[return-value]


def checkpoint_cosines(engine: AdapterEngine, pool: Pool, path: Path, projection: Projector,
                       micro_batch_size: int, advance: Advance, dist: DistInfo) -> dict[str, torch.Tensor]:
    """Per source `[n, S]`: cosine of each record's preconditioned feature to each validation set's mean row."""
    moments = _load_checkpoint(engine, path)
    engine.adapters.use(engine.adapter, engine.lisa)  # this adapter in force, its parameters trainable
    engine.model.eval()  # no LoRA dropout: a record's feature is a function of the record
    device = engine.params[0].device
    plain = Features(engine.module, engine.params, BatchGradients(engine.model, engine.names, engine.params),
                     projection, pool.pad_id, device, micro_batch_size=micro_batch_size)
    targets = torch.stack([plain.over(d, GROUP, advance, dist).mean(dim=0) for d in pool.validation.values()])
    adam = dataclasses.replace(plain, moments=moments)
    return {n: adam.over(d, GROUP, advance, dist) @ targets.T for n, d in pool.sources.items()}


def scores(recipe: Recipe, pool: Pool, dist: DistInfo, seed: int, work: Path
           ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    cfg = recipe.select.less
    settings = dataclasses.asdict(cfg)
    model = {f"the {k}": v for k, v in reuse.model_identity(recipe.model, recipe.tokenizer).items()}
    key = reuse.make_key(pool.inputs() | model, {"less": settings, "template": recipe.data.chat_template,
                                                 "max_length": recipe.data.max_length, "seed": seed,
                                                 "precision": recipe.precision})
    folder = work / f"less-{reuse.digest(key)}"
    folder.mkdir(parents=True, exist_ok=True)
    n_warm = len(warmup_items(pool, cfg.warmup_fraction, seed))
    steps_per_epoch = max(1, math.ceil(n_warm / cfg.batch_size))
    torch.manual_seed(seed * 1_000_003 + _WARMUP_STREAM)  # LoRA init and dropout: not whatever ran before
    engine = build_engine(recipe, dist, cfg.epochs * steps_per_epoch, seed)
    num_params = sum(p.numel() for p in engine.params)
    # made before the warm-up: a projection the device cannot hold is refused before hours of work
    projection = make_projection(num_params, cfg.projection_dim, seed, engine.params[0].device)
    checkpoints = warm_up(recipe, pool, engine, dist, seed, folder, steps_per_epoch)
    val_size = sum(len(d) for d in pool.validation.values())
    totals = {n: torch.zeros(len(d), len(pool.validation)) for n, d in pool.sources.items()}
    progress = step_progress("score", dist.is_main)
    task = progress.add_task("score", total=len(checkpoints) * (pool.size + val_size), info="")
    with progress:
        for k, path in enumerate(checkpoints):
            progress.update(task, info=f"gradients at checkpoint {k + 1} of {len(checkpoints)}")
            cached = folder / f"scores-epoch-{k + 1}.pt"
            if cached.is_file():
                cos = torch.load(cached, weights_only=True)
                progress.advance(task, pool.size + val_size)
            else:
                cos = checkpoint_cosines(engine, pool, path, projection, cfg.micro_batch_size,
                                         lambda m: progress.advance(task, m), dist)
                if dist.is_main:
                    torch.save(cos, cached)
            lr = float(torch.load(path, map_location="cpu", weights_only=True)["lr"])
            for n in totals:
                totals[n] += lr * cos[n]
    out = {n: t.max(dim=1).values.double().numpy() for n, t in totals.items()}
    info = {**settings, "lora_parameters": num_params, "warmup_records": n_warm, "work": str(folder),
            "validation_sets": list(pool.validation)}
    return out, info
