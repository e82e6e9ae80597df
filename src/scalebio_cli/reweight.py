"""`scalebio reweight`: learn source sampling weights with ScaleBiO (see ../shared/docs/ALGORITHM.md).

One step, for u and w two copies of the base model and s = softmax(lam):
  1. draw a balanced training batch B (every source present) and a validation batch V;
  2. u-step:  AdamW on  alpha * L2(u, s)                  over B;
  3. w-step:  AdamW on  L1(w) over V  +  alpha * L2(w, s)  over the same B;
  4. lam-step: Adam on  alpha * J^T (m(w) - m(u)), from the per-source means of steps 2-3;
  5. LISA re-draws the trainable blocks of u and w (the same blocks) every `interval` steps.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from scalebio_cli import checkpoint, distributed, weights_file
from scalebio_cli.batching import (
    CursorSampler,
    MicroBatch,
    Prefetcher,
    balanced_counts,
    micro_batches,
    num_micro_batches,
    response_token_count,
)
from scalebio_cli.bilevel import SourceWeights
from scalebio_cli.config import Recipe
from scalebio_cli.console import console, format_weights, step_progress
from scalebio_cli.dataset import TokenizedData, load_all
from scalebio_cli.engine import TrainEngine, load_deepspeed_config, make_engine, zero3_loading
from scalebio_cli.errors import TrainingStopped
from scalebio_cli.losses import example_losses
from scalebio_cli.metrics import MetricsLog, plot_weights
from scalebio_cli.modeling import count_parameters, load_model, load_tokenizer, resolve_dtype
from scalebio_cli.render import Renderer
from scalebio_cli.stopping import FiniteGuard, StopSignals, StopVote

VALIDATION_STREAM = 10_000  # sampler stream of the validation set; source k uses stream k


@dataclass
class StepBatches:
    """One step's data on this process, with the global normalisers every process agrees on."""

    u: list[MicroBatch]  # this process's share of B
    w: list[MicroBatch]  # this process's share of B and V together; validation rows have source == K
    source_counts: torch.Tensor  # [K] examples of each source in the global batch
    val_tokens: int  # response tokens in the global validation batch
    num_tokens: int  # non-padding tokens this process feeds through u and w
    sampler_state: dict[str, Any]  # sampler positions after this step's draws (what a checkpoint stores)

    def to(self, device: torch.device) -> StepBatches:
        return StepBatches([b.to(device) for b in self.u], [b.to(device) for b in self.w],
                           self.source_counts.to(device), self.val_tokens, self.num_tokens, self.sampler_state)


class BatchPlan:
    """Seeded samplers for every source and the validation set; the same draws on every process.

    `next` runs on the prefetch thread (batching.Prefetcher): it only touches numpy and CPU tensors.
    """

    def __init__(self, sources: list[TokenizedData], val: TokenizedData, recipe: Recipe, dist: distributed.DistInfo,
                 pad_id: int):
        self.data = [*sources, val]  # the validation set is "source" K
        self.dist, self.pad_id, self.rw = dist, pad_id, recipe.reweight
        self.samplers = [CursorSampler(len(d), recipe.seed, k) for k, d in enumerate(sources)]
        self.val_sampler = CursorSampler(len(val), recipe.seed, VALIDATION_STREAM)
        self.pin = dist.device.type == "cuda"

    def next(self, step: int) -> StepBatches:
        k_val = len(self.samplers)
        counts = balanced_counts(self.rw.batch_size, k_val, step)
        items = [(k, int(i)) for k, n in enumerate(counts) for i in self.samplers[k].take(n)]
        val_items = [(k_val, int(i)) for i in self.val_sampler.take(self.rw.val_batch_size)]
        rank, world = self.dist.rank, self.dist.world_size
        u = micro_batches(items[rank::world], self.data, self.rw.micro_batch_size, self.pad_id, self.pin)
        w = micro_batches(items[rank::world] + val_items[rank::world], self.data, self.rw.micro_batch_size,
                          self.pad_id, self.pin)
        source_counts = torch.tensor(counts, dtype=torch.float32)
        return StepBatches(u, w, source_counts.pin_memory() if self.pin else source_counts,
                           val_tokens=response_token_count(val_items, self.data),
                           num_tokens=sum(b.num_tokens for b in u + w), sampler_state=self.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"sources": [s.cursor for s in self.samplers], "validation": self.val_sampler.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for sampler, cursor in zip(self.samplers, state["sources"]):
            sampler.cursor = cursor
        self.val_sampler.cursor = state["validation"]


def load_data(recipe: Recipe, renderer: Renderer,
              dist: distributed.DistInfo) -> tuple[list[TokenizedData], TokenizedData]:
    """Every source and the validation set, tokenized (or from the cache)."""
    files = [(f"data.sources.{n}", p) for n, p in recipe.data.sources.items()]
    files.append(("data.validation", recipe.data.validation or ""))
    loaded = load_all(files, renderer, recipe.data.cache_dir, is_main=dist.is_main,
                      barrier=lambda: distributed.barrier(dist), log=lambda line: console.print(f"[dim]data[/] {line}"))
    return loaded[:-1], loaded[-1]


# Recipe keys that change the learned weights: resuming with any of them changed needs --force.
RESULT_KEYS = ("model", "tokenizer", "seed", "precision", "trust_remote_code", "data.sources", "data.validation",
               "data.max_length", "reweight.steps", "reweight.alpha", "reweight.lr_u", "reweight.lr_w",
               "reweight.lr_lambda", "reweight.batch_size", "reweight.val_batch_size", "reweight.warmup_ratio",
               "reweight.weight_decay", "reweight.max_grad_norm", "reweight.lisa")


def run(recipe: Recipe, resume: str | None = None, force: bool = False) -> Path:
    """Run the reweighting described by `recipe`; returns the path of weights.json.

    `resume`: None (start fresh), "auto" (the latest complete checkpoint in output_dir, if any) or a checkpoint
    folder. `force`: resume even if the recipe changed in a key that changes the result.
    """
    dist = distributed.setup(need_group=bool(recipe.deepspeed))
    try:
        return _run(recipe, dist, resume, force)
    finally:
        distributed.teardown()


def _run(recipe: Recipe, dist: distributed.DistInfo, resume: str | None, force: bool) -> Path:
    rw, names = recipe.reweight, list(recipe.data.sources)
    out = Path(recipe.output_dir)
    start_from = checkpoint.resolve_resume(out, resume)
    torch.manual_seed(recipe.seed)

    tokenizer = load_tokenizer(recipe.tokenizer_path, recipe.trust_remote_code)
    renderer = Renderer(tokenizer, recipe.data.max_length)
    sources, val = load_data(recipe, renderer, dist)
    fingerprints = {n: d.sha256 for n, d in zip(names, sources)} | {"validation": val.sha256}
    if start_from is not None:
        accepted = checkpoint.check_resumable(start_from, "reweight", recipe.to_dict(), fingerprints, RESULT_KEYS,
                                              force)
        if accepted and dist.is_main:
            console.print(f"[yellow]resuming despite differences (--force):[/] {escape('; '.join(accepted))}")
    plan = BatchPlan(sources, val, recipe, dist, tokenizer.pad_token_id)

    dtype = resolve_dtype(recipe.precision, dist.device)
    ds_config = load_deepspeed_config(recipe.deepspeed) if recipe.deepspeed else None
    # Under ZeRO-3 each process loads only its shards.
    with zero3_loading(ds_config, dtype == torch.bfloat16, dist.world_size):
        model_u = load_model(recipe.model, dtype, dist.device, recipe.trust_remote_code)
        model_w = (copy.deepcopy(model_u) if ds_config is None
                   else load_model(recipe.model, dtype, dist.device, recipe.trust_remote_code))
    local_batch = rw.batch_size // dist.world_size
    engine_kwargs = dict(weight_decay=rw.weight_decay, total_steps=rw.steps, warmup_ratio=rw.warmup_ratio,
                         lisa=rw.lisa, seed=recipe.seed, dist=dist, gradient_checkpointing=rw.gradient_checkpointing,
                         # both objectives carry alpha * L2, so the clipping threshold scales with alpha
                         max_grad_norm=None if rw.max_grad_norm is None else rw.max_grad_norm * rw.alpha,
                         ds_config=ds_config)
    u = make_engine(model_u, lr=rw.lr_u, micro_batches=num_micro_batches(local_batch, rw.micro_batch_size),
                    **engine_kwargs)
    w = make_engine(model_w, lr=rw.lr_w, micro_batches=num_micro_batches(
        local_batch + rw.val_batch_size // dist.world_size, rw.micro_batch_size), **engine_kwargs)
    lam = SourceWeights(len(names), rw.lr_lambda, rw.steps, rw.warmup_ratio, dist.device)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)  # only now: bad inputs leave nothing behind
        lisa = (f"LISA {rw.lisa.layers} of {len(u.lisa.blocks)} blocks every {rw.lisa.interval} steps"
                if u.lisa.enabled else f"all {len(u.lisa.blocks)} blocks")
        engine = "DeepSpeed" if ds_config else ("DDP" if dist.distributed else "single process")
        console.print(f"[dim]model[/] {escape(recipe.model)} ({count_parameters(model_u) / 1e6:.1f}M parameters, "
                      f"{dtype}, {dist.device}, {engine} x {dist.world_size}, {lisa})")

    trajectory = [{"step": 0, "weights": lam.as_dict(names)}]
    avg_from = rw.steps // 2  # weights_averaged: mean of s after each step of the second half
    weights_sum = torch.zeros(len(names), dtype=torch.float64, device=dist.device)
    start = 0

    def save_checkpoint(done: int, sampler_state: dict[str, Any]) -> Path:
        def write(folder: Path) -> None:
            u.save(folder, "u")
            w.save(folder, "w")
            if dist.is_main:
                torch.save({"lambda": lam.state_dict(), "plan": sampler_state, "trajectory": trajectory,
                            "weights_sum": weights_sum}, folder / "trainer.pt")
            torch.save(checkpoint.rng_state(), folder / f"rng-rank{dist.rank}.pt")

        meta = {"stage": "reweight", "config": recipe.to_dict(), "data_sha256": fingerprints}
        return checkpoint.save(out, done, meta, recipe.checkpoint.keep, dist, write)

    if start_from is not None:
        start = checkpoint.meta(start_from)["step"]
        u.begin_step(start - 1)  # the LISA draw the checkpoint was written under, before its state comes back
        w.begin_step(start - 1)
        u.load(start_from, "u")
        w.load(start_from, "w")
        saved = checkpoint.load(start_from, "trainer")
        lam.load_state_dict(saved["lambda"])
        plan.load_state_dict(saved["plan"])
        trajectory = saved["trajectory"]
        weights_sum = saved["weights_sum"].to(dist.device)
        checkpoint.set_rng_state(checkpoint.load(start_from, "rng", dist.rank))
        if dist.is_main:
            console.print(f"[bold]resumed[/] from {escape(str(start_from))} (step {start} of {rw.steps})")

    metrics = MetricsLog(out / "metrics.jsonl", start) if dist.is_main else None
    guard = FiniteGuard([f"loss_u[{n}]" for n in names] + [f"loss_w[{n}]" for n in names] + ["L1_sum"]
                        + [f"lambda[{n}]" for n in names], dist.device)
    signals = StopSignals()
    stop_vote = StopVote(signals, dist.distributed)
    tokens_since_log, last_log_time = 0, time.perf_counter()

    progress = step_progress("reweight", dist.is_main)
    task = progress.add_task("reweight", total=rw.steps, completed=start,
                             info=format_weights(trajectory[-1]["weights"], 14))
    with progress, signals.installed(), Prefetcher(plan.next, range(start, rw.steps)) as prefetched:
        for step in range(start, rw.steps):
            u.begin_step(step)
            w.begin_step(step)
            batch = prefetched.get(step).to(dist.device)
            result = bilevel_step(u, w, lam, batch, rw.alpha, dist, stop_requested=signals.received is not None)
            guard.observe(step + 1, torch.cat([result.m_u, result.m_w, result.l1_sum.view(1), lam.lam.detach()]))
            if step >= avg_from:
                weights_sum += lam.probs(torch.float64)
            tokens_since_log += batch.num_tokens * dist.world_size

            done = step + 1
            if done % rw.log_every == 0 or done == rw.steps:
                guard.check()
                now = time.perf_counter()
                weights = lam.as_dict(names)
                trajectory.append({"step": done, "weights": weights})
                record = {
                    "step": done,
                    "L1": float(result.l1_sum / batch.val_tokens),
                    "L2_u": float(torch.dot(result.s, result.m_u)),
                    "L2_w": float(torch.dot(result.s, result.m_w)),
                    "loss_u": dict(zip(names, result.m_u.tolist())),
                    "loss_w": dict(zip(names, result.m_w.tolist())),
                    "weights": weights,
                    "lambda_grad": dict(zip(names, result.lam_grad.tolist())),
                    "grad_norm_u": None if result.grad_norm_u is None else float(result.grad_norm_u),
                    "grad_norm_w": None if result.grad_norm_w is None else float(result.grad_norm_w),
                    "lr_u": u.lr, "lr_w": w.lr, "lr_lambda": lam.lr,
                    "active_blocks": u.lisa.active if u.lisa.enabled else "all",
                    "tokens_per_s": tokens_since_log / (now - last_log_time),
                }
                tokens_since_log, last_log_time = 0, now
                if metrics is not None:
                    metrics.write(record)
                    progress.console.print(
                        f"step {done:>5}/{rw.steps}  L1 {record['L1']:.4f}  L2(u) {record['L2_u']:.4f}  "
                        f"L2(w) {record['L2_w']:.4f}  {record['tokens_per_s']:,.0f} tok/s  | "
                        f"{format_weights(weights)}")
                progress.update(task, info=format_weights(weights, 14))
            progress.advance(task)

            # A signal on any process stops every process at the same step (the vote rode the all-reduce).
            stop = stop_vote(result.stop_votes)
            periodic = recipe.checkpoint.every and done % recipe.checkpoint.every == 0
            if (stop or periodic) and done < rw.steps:  # after the last step, finishing beats checkpointing
                guard.check()
                path = save_checkpoint(done, batch.sampler_state)
                if stop:
                    raise TrainingStopped(f"stopped by {signals.received or 'a signal on another process'} after "
                                          f"step {done} of {rw.steps}; checkpoint saved to {path}; continue with "
                                          "--resume auto")

    guard.check()
    final = lam.as_dict(names)
    averaged = dict(zip(names, (weights_sum / (rw.steps - avg_from)).tolist()))
    path = out / "weights.json"
    if dist.is_main:
        doc = weights_file.build(
            weights=final, weights_averaged=averaged,
            sources={n: _source_info(recipe.data.sources[n], d) for n, d in zip(names, sources)},
            validation=_source_info(recipe.data.validation, val), trajectory=trajectory, steps=rw.steps,
            seed=recipe.seed, model=recipe.model, config=recipe.to_dict())
        weights_file.write(path, doc)
        plot_weights(trajectory, out / "weights.png")
        console.print(f"[bold green]weights[/] {format_weights(doc['weights'])}")
        console.print(f"[dim]averaged over steps {avg_from + 1}-{rw.steps}:[/] "
                      f"{format_weights(doc['weights_averaged'])}")
    distributed.barrier(dist)
    return path


@dataclass
class StepResult:
    s: torch.Tensor  # the weights the step used
    m_u: torch.Tensor  # [K] per-source mean losses of u on B (global)
    m_w: torch.Tensor  # [K] the same for w
    l1_sum: torch.Tensor  # token-loss sum of w on V (global); L1 = l1_sum / val_tokens
    lam_grad: torch.Tensor
    grad_norm_u: torch.Tensor | None
    grad_norm_w: torch.Tensor | None
    stop_votes: torch.Tensor  # processes that asked to stop (rides the step's all-reduce)


def bilevel_step(u: TrainEngine, w: TrainEngine, lam: SourceWeights, batch: StepBatches, alpha: float,
                 dist: distributed.DistInfo, stop_requested: bool = False) -> StepResult:
    """One ScaleBiO step (u-step, w-step, lam-step) on prepared batches; no host-device synchronisation."""
    s = lam.probs()
    # alpha * s_k / n_k: the gradient of alpha * L2 = alpha * sum_k s_k * mean_k(loss) per example.
    coef = alpha * s / batch.source_counts
    sums_u, _ = _pass(u, batch.u, coef, batch.val_tokens)  # alpha * L2(u) on B
    grad_norm_u = u.step()
    sums_w, l1_sum = _pass(w, batch.w, coef, batch.val_tokens)  # alpha * L2(w) on B + L1(w) on V
    grad_norm_w = w.step()
    # One all-reduce for everything the lam step, the logs and the stop decision need.
    vote = torch.full((1,), float(stop_requested), device=s.device)
    totals = distributed.all_reduce_sum(torch.cat([sums_u, sums_w, l1_sum.view(1), vote]), dist)
    k = s.shape[0]
    m_u, m_w = totals[:k] / batch.source_counts, totals[k: 2 * k] / batch.source_counts
    lam_grad = lam.step(m_w, m_u, alpha)
    return StepResult(s, m_u, m_w, totals[2 * k], lam_grad, grad_norm_u, grad_norm_w, totals[-1])


def _pass(engine: TrainEngine, micro: list[MicroBatch], coef: torch.Tensor, val_tokens: int) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """One forward/backward of a model copy over its micro-batches; returns (per-source sums of example losses,
    validation token-loss sum).

    Rows of source k < K weigh alpha * s_k / n_k times their mean token loss (alpha * L2); validation rows (source
    K) weigh their token-loss sum / the global validation token count (L1). w's step takes B and V in one pass:
    the same gradient as two passes, without a second pass's fixed cost.
    """
    num_sources = coef.shape[0]
    coef = torch.cat([coef, coef.new_zeros(1)])
    sums = torch.zeros(num_sources + 1, dtype=torch.float32, device=coef.device)
    l1_sum = torch.zeros((), dtype=torch.float32, device=coef.device)
    for i, mb in enumerate(micro):
        with engine.sync_context(i == len(micro) - 1):
            token_sums, counts = example_losses(engine(mb), mb)
            per_example = token_sums / counts
            is_val = mb.source == num_sources
            engine.backward(torch.where(is_val, token_sums / val_tokens, coef[mb.source] * per_example).sum())
        sums.index_add_(0, mb.source, per_example.detach())
        l1_sum += (token_sums.detach() * is_val).sum()
    return sums[:num_sources], l1_sum


def _source_info(path: str | None, data: TokenizedData) -> dict[str, Any]:
    return {"path": str(Path(path).resolve()), "num_examples": data.num_records, "num_trainable": len(data),
            "sha256": data.sha256}

