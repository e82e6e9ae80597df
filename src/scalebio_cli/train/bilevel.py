"""One ScaleBiO step (see ../shared/docs/ALGORITHM.md), for u and w two copies of the base model and s = softmax(lam):

  u-step:   AdamW on  alpha * L2(u, s)                  over B
  w-step:   AdamW on  L1(w) over V  +  alpha * L2(w, s)  over the same B
  lam-step: Adam on   alpha * J^T (m(w) - m(u)),  J = diag(s) - s s^T  (softmax Jacobian; train/source_weights.py)

The lam step needs only the per-source mean losses that the u- and w-steps already computed: no extra forward
pass. u's and w's means are paired: the same micro-batches of B in the same order, the same dropout masks (the RNG
is replayed for w), so where u and w are equal (step 0) their means are bitwise equal and the lam gradient is
exactly zero, on any number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scalebio_cli.data.batch_plan import StepBatches
from scalebio_cli.data.batching import MicroBatch
from scalebio_cli.train import checkpoint, distributed
from scalebio_cli.train.engine import TrainEngine
from scalebio_cli.train.source_weights import SourceWeights


@dataclass
class StepResult:
    s: torch.Tensor  # the weights the step used
    m_u: torch.Tensor  # [K] per-source mean losses of u on B (global)
    m_w: torch.Tensor  # [K] the same for w
    l1_sums: torch.Tensor  # [J] token-loss sums of w on each validation set (global); L1_j = l1_sums_j / tokens_j
    lam_grad: torch.Tensor
    grad_norm_u: torch.Tensor | None
    grad_norm_w: torch.Tensor | None
    stop_votes: torch.Tensor  # processes that asked to stop (rides the step's all-reduce)


def bilevel_step(u: TrainEngine, w: TrainEngine, lam: SourceWeights, batch: StepBatches, step: int, alpha: float,
                 dist: distributed.DistInfo, stop_requested: bool = False) -> StepResult:
    """One ScaleBiO step (u-step, w-step, lam-step) on prepared batches; no host-device synchronisation."""
    s = lam.probs()
    counts = batch.source_counts
    # alpha * s_k / n_k: the gradient of alpha * L2 = alpha * sum_k s_k * mean_k(loss) per example (a source absent
    # from a pooled batch has no term: its coefficient multiplies no row)
    coef = alpha * s / counts.clamp(min=1.0)
    val_coef = batch.val_weights / batch.val_tokens
    replay = checkpoint.rng_state()  # w's pass over B draws the dropout masks u's pass drew
    losses_u, _ = _pass(u, batch.train, [], coef, val_coef, len(batch.train_sources), len(batch.val_sets))
    grad_norm_u = u.step()
    checkpoint.set_rng_state(replay)
    losses_w, val_sums = _pass(w, batch.train, batch.val, coef, val_coef, len(batch.train_sources),
                               len(batch.val_sets))
    grad_norm_w = w.step()
    # One all-reduce for everything the lam step, the logs and the stop decision need. Each entry of the loss
    # vectors comes from exactly one process (the others add zeros), so the sums below are the same on 1 or N.
    vote = torch.full((1,), float(stop_requested), device=s.device)
    totals = distributed.all_reduce_sum(torch.cat([losses_u, losses_w, val_sums, vote]), dist)
    n_b, n_v = len(batch.train_sources), len(batch.val_sets)
    m_u = _per_group(totals[:n_b], batch.train_sources, s.shape[0]) / counts.clamp(min=1.0)
    m_w = _per_group(totals[n_b: 2 * n_b], batch.train_sources, s.shape[0]) / counts.clamp(min=1.0)
    l1_sums = _per_group(totals[2 * n_b: 2 * n_b + n_v], batch.val_sets, batch.val_weights.shape[0])
    lam_grad = lam.observe(step, m_w, m_u, counts > 0, alpha)
    return StepResult(s, m_u, m_w, l1_sums, lam_grad, grad_norm_u, grad_norm_w, totals[-1])


def _per_group(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sums of `values` per group, as a one-hot matrix product: a fixed order on every device (index_add_ on a GPU
    adds in whatever order its atomics land)."""
    return F.one_hot(groups, num_groups).T.to(values.dtype) @ values


def _pass(engine: TrainEngine, train: list[MicroBatch], val: list[MicroBatch], coef: torch.Tensor,
          val_coef: torch.Tensor, num_train: int, num_val: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward/backward of a model copy over B's micro-batches, then V's (w only); returns the per-example mean
    losses of B and the token-loss sums of V, each at its position in the global batch (zeros elsewhere).

    Rows of source k weigh alpha * s_k / n_k times their mean token loss (alpha * L2); rows of validation set j
    weigh weight_j / (set j's global token count) times their token-loss sum (L1 = sum_j weight_j * L1_j).
    """
    losses = torch.zeros(num_train, dtype=torch.float32, device=coef.device)
    val_sums = torch.zeros(num_val, dtype=torch.float32, device=coef.device)
    num_sources = coef.shape[0]
    micro = [*train, *val]
    for i, mb in enumerate(micro):
        with engine.sync_context(i == len(micro) - 1):
            token_sums, token_counts = engine(mb)
            if i < len(train):
                per_example = token_sums / token_counts
                engine.backward((coef[mb.source] * per_example).sum())
                losses.index_put_((mb.position,), per_example.detach())
            else:
                val_set = mb.source - num_sources
                engine.backward((token_sums * val_coef[val_set]).sum())
                val_sums.index_put_((mb.position,), token_sums.detach())
    return losses, val_sums
