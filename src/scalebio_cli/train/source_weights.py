"""The source weights s = softmax(lam): their gradient, their optimizer, and how sure a run is about them.

    lam gradient = alpha * J^T d,  J = diag(s) - s s^T,  d_k = m_k(w) - m_k(u)   (ALGORITHM.md, step 4)

Adam normalises each coordinate of this gradient, so what decides the weights is how consistently the sign of the
centred paired difference `d_k - s.d` holds, step after step (ALGORITHM.md, "Noise in the lam step"). The options
here cut its variance without changing what it estimates:
- `every` (reweight.lambda_every): one lam step from the mean paired difference of N steps (N times the examples
  per source behind each step);
- `delay` (reweight.lambda_delay): u and w train on the uniform mixture before lam moves; lam's schedule (warmup,
  cosine) starts when it does;
- `schedule: cosine` decays lam's rate; weights.json's `weights_averaged` averages the second half.
A source absent from a step (pooled batches) has no paired difference there: it gets a zero gradient and the
centring runs over the sources present, so absence neither pushes a source up nor down.

`relative` (d_k / m_k(u)) is kept as an option, but it is not a variance reduction: to first order it is the lam
gradient of sum_k s_k log m_k while u and w optimise sum_k s_k m_k, so it moves the method's fixed point.

Evidence (CONTRACT v3, v4): per source, the series of a_k = -(d_k - s.d) over the lam steps in which it was present
(positive: w gains more on it than on the mixture, the direction in which lam raises it), and of its contrast with
the rest of the mixture (`contrasts`: a_k minus the other present sources' advantages weighted by s, which equals
a_k / (1 - s_k) and does not vanish as s_k nears 1); train/verdict.py turns them into means, standard errors that
hold under autocorrelation, a Holm-adjusted p and a verdict.

The optimizer: `adamw` is the reference's (its run scripts pass `name=adamw` and lam's optimizer is built before
the weight decay 5e-4 of u and w is set, so lam gets torch's default decay 0.01, a slow pull towards uniform);
`adam` is the same without decay; `sgd` plain gradient steps. Every lam step's rate is its schedule's times
`lr_scale(step)` (tau's rounds scale every rate by tau^-i in the reference: train/loop.py's tau_scale).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from scalebio_cli.train import verdict
from scalebio_cli.train.optim import warmup_cosine


def centred_difference(s: torch.Tensor, d: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """`d_k - (s.d over the present sources, s renormalised there)` for present sources, 0 for absent ones.
    With every source present this is `d - s.d`."""
    s_present = s * present
    mix = torch.dot(s_present, d) / s_present.sum().clamp(min=torch.finfo(s.dtype).tiny)
    return torch.where(present, d - mix, torch.zeros_like(d))


def paired_difference(m_w: torch.Tensor, m_u: torch.Tensor, signal: str = "difference") -> torch.Tensor:
    """d = m(w) - m(u), or with `relative` (d / m(u)) scaled per source."""
    d = m_w - m_u
    return torch.where(m_u > 0, d / m_u.clamp(min=1e-12), torch.zeros_like(d)) if signal == "relative" else d


def lambda_gradient(s: torch.Tensor, d: torch.Tensor, alpha: float,
                    present: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * J^T d with J = diag(s) - s s^T, over the sources present (all when `present` is None), for the
    paired difference d (`paired_difference(m_w, m_u)`, or the mean of several steps' as `lambda_every` takes).
    The one function the live lam step calls (SourceWeights._step) and the tests check against autograd."""
    if present is None:
        present = torch.ones_like(d, dtype=torch.bool)
    return alpha * s * centred_difference(s, d, present)


class SourceWeights:
    """The logits lam (init 0: uniform), their optimizer (Adam as the reference, or SGD) and schedule, the paired
    differences of the current window of `every` steps, and the evidence series."""

    def __init__(self, num_sources: int, lr: float, total_steps: int, warmup_ratio: float, device: torch.device,
                 optimizer: str = "adamw", signal: str = "difference", delay: int = 0, schedule: str = "cosine",
                 every: int = 1, lr_scale: Callable[[int], float] | None = None):
        self.lam = torch.zeros(num_sources, dtype=torch.float32, device=device, requires_grad=True)
        if optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD([self.lam], lr=lr)
        elif optimizer == "adam":
            self.optimizer = torch.optim.Adam([self.lam], lr=lr, betas=(0.9, 0.999))
        else:  # the reference: torch.optim.AdamW with its default weight decay
            self.optimizer = torch.optim.AdamW([self.lam], lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
        self.signal, self.delay, self.every = signal, delay, max(1, every)
        lam_steps = max(1, (total_steps - delay) // self.every)
        self.base_lr, self.lr_scale = lr, lr_scale or (lambda step: 1.0)
        self.factor = warmup_cosine(lam_steps, warmup_ratio, decay=schedule == "cosine")
        self._lr = lr * self.factor(0)
        zeros = torch.zeros(num_sources, dtype=torch.float64, device=device)
        self.window_d, self.window_n = zeros.clone(), zeros.clone()  # sums of d and counts of presence
        self.advantages: list[list[float | None]] = []  # per lam step, per source: a_k (None: absent)
        self.history: list[list[float]] = []  # per lam step: the weights after it (train/settled.py reads them)
        self.last_grad = torch.zeros(num_sources, dtype=torch.float32, device=device)

    def probs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.softmax(self.lam.detach().to(dtype), dim=0)

    def as_dict(self, names: list[str]) -> dict[str, float]:
        """The weights to report: a float64 softmax, so they sum to 1 to within 1e-15."""
        return dict(zip(names, self.probs(torch.float64).tolist()))

    def observe(self, step: int, m_w: torch.Tensor, m_u: torch.Tensor, present: torch.Tensor,
                alpha: float) -> torch.Tensor:
        """Take step `step`'s per-source means (of the sources `present` in its batch); at the end of a window of
        `every` steps after the delay, one lam step from the window's mean paired differences. Returns the latest
        lam gradient (zeros before the first lam step)."""
        if step < self.delay:
            return self.last_grad
        d = paired_difference(m_w.double(), m_u.double(), self.signal)
        self.window_d += torch.where(present, d, torch.zeros_like(d))
        self.window_n += present.double()
        if (step - self.delay + 1) % self.every == 0:
            self._step(alpha, step)
        return self.last_grad

    def _step(self, alpha: float, step: int) -> None:
        present = self.window_n > 0
        d = (self.window_d / self.window_n.clamp(min=1)).float()
        s = self.probs()
        grad = lambda_gradient(s, d, alpha, present)
        self._lr = self.base_lr * self.factor(len(self.advantages)) * self.lr_scale(step)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr
        self.lam.grad = grad
        self.optimizer.step()
        self.lam.grad = None
        self.last_grad = grad
        centred = centred_difference(s, d, present)
        self.advantages.append([-float(a) if p else None for a, p in zip(centred.tolist(), present.tolist())])
        self.history.append(self.probs(torch.float64).tolist())
        self.window_d.zero_()
        self.window_n.zero_()

    @property
    def lr(self) -> float:
        """The learning rate of the latest lam step (the one its update used)."""
        return self._lr

    def series(self, twins: dict[int, int] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per source, over the lam steps in which it was present: a_k, and the contrast its verdict tests (against
        the rest of the mixture's real sources; for a source in `twins`, a placebo, against the source it was split
        from)."""
        k = self.lam.shape[0]
        a = np.asarray([[np.nan if v is None else v for v in row] for row in self.advantages],
                       dtype=np.float64).reshape(-1, k)
        if len(self.history) == len(self.advantages):  # the weights each lam step used: those before it
            s = np.vstack([np.full((1, k), 1.0 / k), np.asarray(self.history, dtype=np.float64).reshape(-1, k)[:-1]])
        else:  # a checkpoint of a version that kept no history: the rest unweighted
            s = np.full(a.shape, 1.0 / k)
        real = a.copy()
        real[:, list(twins or {})] = np.nan  # a placebo is no part of the rest: it is its twin's data, and would
        c = verdict.contrasts(real, s)       # cancel most of that source's contrast (the twin against itself)
        for placebo, twin in (twins or {}).items():
            c[:, placebo] = a[:, placebo] - a[:, twin]
        return [a[~np.isnan(a[:, j]), j] for j in range(k)], [c[~np.isnan(c[:, j]), j] for j in range(k)]

    def evidence(self, names: list[str], min_batch: int = 1, level: float = verdict.DEFAULT_LEVEL,
                 twins: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """weights.json `evidence`: per source, mean advantage, its standard error, z, the lam steps behind it, the
        contrast with the rest and its t, p (Holm-adjusted over `names`) and the verdict at `level`
        (train/verdict.py). `min_batch`: the shortest batch of lam steps the error may use (the LISA interval in
        lam steps). `twins`: a placebo's name -> the source it was split from (its contrast is against that)."""
        index = {n: i for i, n in enumerate(names)}
        a, c = self.series({index[p]: index[t] for p, t in (twins or {}).items()})
        return dict(zip(names, verdict.evaluate(a, c, min_batch, level)))

    def state_dict(self) -> dict:
        return {"lam": self.lam.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "window_d": self.window_d.clone(), "window_n": self.window_n.clone(), "advantages": self.advantages,
                "history": self.history, "last_grad": self.last_grad, "lr": self._lr}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.lam.copy_(state["lam"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.window_d.copy_(state["window_d"])
        self.window_n.copy_(state["window_n"])
        self.advantages = [list(row) for row in state["advantages"]]
        self.history = [list(row) for row in state.get("history", [])]
        self.last_grad = state["last_grad"].to(self.lam.device)
        self._lr = state["lr"]

