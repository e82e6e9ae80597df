"""One ScaleBiO step (see ../shared/docs/ALGORITHM.md), for u and w two copies of the base model and s = softmax(lam):

  u-step:   AdamW on  alpha * L2(u, s)                  over B
  w-step:   AdamW on  L1(w) over V  +  alpha * L2(w, s)  over the same B
  lam-step: Adam on   alpha * J^T (m(w) - m(u)),  J = diag(s) - s s^T  (softmax Jacobian, symmetric)

    F(lam) = alpha * (L2(w, s) - L2(u, s)),   L2(., s) = sum_k s_k m_k(.)

The lam step needs only the per-source mean losses that the u- and w-steps already computed: no extra forward
pass. Here live the step (`bilevel_step`), its inputs (`StepBatches`) and outputs (`StepResult`), and the source
weights with their optimizer (`SourceWeights`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from scalebio_cli.data.batching import MicroBatch
from scalebio_cli.train import distributed
from scalebio_cli.train.engine import TrainEngine
from scalebio_cli.train.optim import warmup_cosine


def lambda_gradient(s: torch.Tensor, m_w: torch.Tensor, m_u: torch.Tensor, alpha: float,
                    signal: str = "difference") -> torch.Tensor:
    """alpha * J^T d with J = diag(s) - s s^T. `signal` says what d is: `difference` = m(w) - m(u) (the method as
    written); `relative` = (m(w) - m(u)) / m(u), the same signal scale-free across sources, so a source whose loss
    is tiny (answers replaced by ".") is not favoured just because every loss difference on it is tiny."""
    d = m_w - m_u
    if signal == "relative":
        d = torch.where(m_u > 0, d / m_u.clamp(min=1e-12), torch.zeros_like(d))
    return alpha * s * (d - torch.dot(s, d))  # = alpha * (diag(s) - s s^T) d, without forming the K x K matrix


class SourceWeights:
    """The logits lam (init 0: uniform), their optimizer (Adam as the reference, or SGD) and learning-rate schedule.

    `delay`: the first `delay` steps leave lam at uniform while u and w train (u warms up on the mixture, and w
    moves away from u, before their loss differences steer the weights). `schedule`: `cosine` decays lam's rate with
    u's and w's (the reference); `constant` keeps it after warmup, because the loss differences that steer lam grow
    as w moves away from u, so a short run's last steps carry its clearest signal."""

    def __init__(self, num_sources: int, lr: float, total_steps: int, warmup_ratio: float, device: torch.device,
                 optimizer: str = "adam", signal: str = "difference", delay: int = 0, schedule: str = "cosine"):
        self.lam = torch.zeros(num_sources, dtype=torch.float32, device=device, requires_grad=True)
        if optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD([self.lam], lr=lr)
        else:
            self.optimizer = torch.optim.Adam([self.lam], lr=lr, betas=(0.9, 0.999))
        self.signal, self.delay = signal, delay
        factor = warmup_cosine(total_steps, warmup_ratio, decay=schedule == "cosine")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self._lr = self.optimizer.param_groups[0]["lr"]

    def probs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.softmax(self.lam.detach().to(dtype), dim=0)

    def as_dict(self, names: list[str]) -> dict[str, float]:
        """The weights to report: a float64 softmax, so they sum to 1 to within 1e-15."""
        return dict(zip(names, self.probs(torch.float64).tolist()))

    def step(self, m_w: torch.Tensor, m_u: torch.Tensor, alpha: float) -> torch.Tensor:
        """One optimizer step on lam from the per-source means; returns the gradient (also while delayed)."""
        grad = lambda_gradient(self.probs(), m_w, m_u, alpha, self.signal)
        self._lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler.last_epoch >= self.delay:  # the schedule counts the steps taken so far
            self.lam.grad = grad
            self.optimizer.step()
            self.lam.grad = None
            self.scheduler.step()
        else:
            with warnings.catch_warnings():  # torch warns of a schedule stepped before its optimizer: the delay
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                self.scheduler.step()
        return grad

    @property
    def lr(self) -> float:
        """The learning rate of the latest step (the one its update used)."""
        return self._lr

    def state_dict(self) -> dict:
        return {"lam": self.lam.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.lam.copy_(state["lam"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


@dataclass
class StepBatches:
    """One step's data on this process, with the global normalisers every process agrees on."""

    u: list[MicroBatch]  # this process's share of B
    w: list[MicroBatch]  # this process's share of B and V together; rows of validation set j have source K + j
    source_counts: torch.Tensor  # [K] examples of each source in the global batch
    val_tokens: torch.Tensor  # [J] float32: response tokens of each validation set in the global batch
    val_weights: torch.Tensor  # [J] float32: each validation set's share of L1 (they sum to 1)
    num_tokens: int  # non-padding tokens this process feeds through u and w
    sampler_state: dict[str, Any]  # sampler positions after this step's draws (what a checkpoint stores)

    def to(self, device: torch.device) -> StepBatches:
        return StepBatches([b.to(device) for b in self.u], [b.to(device) for b in self.w],
                           self.source_counts.to(device), self.val_tokens.to(device), self.val_weights.to(device),
                           self.num_tokens, self.sampler_state)

    def l1(self, l1_sums: torch.Tensor) -> torch.Tensor:
        """Per-set L1_j (token means over each set's batch) from their token-loss sums."""
        return l1_sums / self.val_tokens


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


def bilevel_step(u: TrainEngine, w: TrainEngine, lam: SourceWeights, batch: StepBatches, alpha: float,
                 dist: distributed.DistInfo, stop_requested: bool = False) -> StepResult:
    """One ScaleBiO step (u-step, w-step, lam-step) on prepared batches; no host-device synchronisation."""
    s = lam.probs()
    # A source absent from a (pooled) batch has no mean: counting it once makes its m_u = m_w = 0, so it adds
    # nothing to the lam gradient's difference d. Balanced batches hold every source (the clamp changes nothing).
    counts = batch.source_counts.clamp(min=1.0)
    # alpha * s_k / n_k: the gradient of alpha * L2 = alpha * sum_k s_k * mean_k(loss) per example.
    coef = alpha * s / counts
    val_coef = (batch.val_weights, batch.val_tokens)
    sums_u, _ = _pass(u, batch.u, coef, val_coef)  # alpha * L2(u) on B
    grad_norm_u = u.step()
    sums_w, l1_sums = _pass(w, batch.w, coef, val_coef)  # alpha * L2(w) on B + L1(w) on V
    grad_norm_w = w.step()
    # One all-reduce for everything the lam step, the logs and the stop decision need.
    vote = torch.full((1,), float(stop_requested), device=s.device)
    totals = distributed.all_reduce_sum(torch.cat([sums_u, sums_w, l1_sums, vote]), dist)
    k, j = s.shape[0], l1_sums.shape[0]
    m_u, m_w = totals[:k] / counts, totals[k: 2 * k] / counts
    lam_grad = lam.step(m_w, m_u, alpha)
    return StepResult(s, m_u, m_w, totals[2 * k: 2 * k + j], lam_grad, grad_norm_u, grad_norm_w, totals[-1])


def _pass(engine: TrainEngine, micro: list[MicroBatch], coef: torch.Tensor,
          val_coef: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward/backward of a model copy over its micro-batches; returns (per-source sums of example losses,
    per-validation-set token-loss sums).

    Rows of source k < K weigh alpha * s_k / n_k times their mean token loss (alpha * L2); rows of validation set j
    (source K + j) weigh weight_j * their token-loss sum / set j's global token count (L1 = sum_j weight_j * L1_j).
    w's step takes B and V in one pass: the same gradient as two passes, without a second pass's fixed cost.
    """
    val_weights, val_tokens = val_coef
    num_sources, num_val = coef.shape[0], val_weights.shape[0]
    coef = torch.cat([coef, coef.new_zeros(num_val)])
    sums = torch.zeros(num_sources + num_val, dtype=torch.float32, device=coef.device)
    l1_sums = torch.zeros(num_val, dtype=torch.float32, device=coef.device)
    for i, mb in enumerate(micro):
        with engine.sync_context(i == len(micro) - 1):
            token_sums, counts = engine(mb)
            per_example = token_sums / counts
            is_val = mb.source >= num_sources
            val_set = (mb.source - num_sources).clamp(min=0)
            val_term = token_sums * val_weights[val_set] / val_tokens[val_set]
            engine.backward(torch.where(is_val, val_term, coef[mb.source] * per_example).sum())
        sums.index_add_(0, mb.source, per_example.detach())
        l1_sums.index_add_(0, val_set, token_sums.detach() * is_val)
    return sums[:num_sources], l1_sums
