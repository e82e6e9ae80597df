"""The source weights: s = softmax(lam), and the analytic lam gradient of the penalty objective.

    F(lam) = alpha * (L2(w, s) - L2(u, s)),   L2(., s) = sum_k s_k m_k(.)
    dF/dlam = alpha * J^T (m(w) - m(u)),      J = diag(s) - s s^T   (softmax Jacobian, symmetric)

It needs only the per-source mean losses that the u- and w-steps already computed: no extra forward pass.
"""

from __future__ import annotations

import torch

from scalebio_cli.optim import warmup_cosine


def lambda_gradient(s: torch.Tensor, m_w: torch.Tensor, m_u: torch.Tensor, alpha: float) -> torch.Tensor:
    d = m_w - m_u
    return alpha * s * (d - torch.dot(s, d))  # = alpha * (diag(s) - s s^T) d, without forming the K x K matrix


class SourceWeights:
    """The logits lam (init 0: uniform), their Adam optimizer and learning-rate schedule."""

    def __init__(self, num_sources: int, lr: float, total_steps: int, warmup_ratio: float, device: torch.device):
        self.lam = torch.zeros(num_sources, dtype=torch.float32, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.lam], lr=lr, betas=(0.9, 0.999))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(total_steps, warmup_ratio))

    def probs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.softmax(self.lam.detach().to(dtype), dim=0)

    def as_dict(self, names: list[str]) -> dict[str, float]:
        """The weights to report: a float64 softmax, so they sum to 1 to within 1e-15."""
        return dict(zip(names, self.probs(torch.float64).tolist()))

    def step(self, m_w: torch.Tensor, m_u: torch.Tensor, alpha: float) -> torch.Tensor:
        """One Adam step on lam from the per-source means; returns the gradient used."""
        grad = lambda_gradient(self.probs(), m_w, m_u, alpha)
        self.lam.grad = grad
        self.optimizer.step()
        self.scheduler.step()
        self.lam.grad = None
        return grad

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"lam": self.lam.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.lam.copy_(state["lam"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
