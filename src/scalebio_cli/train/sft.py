"""One supervised fine-tuning step: the token-mean loss of the global batch, exact under any micro-batching."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scalebio_cli.data.batching import MicroBatch
from scalebio_cli.train import distributed
from scalebio_cli.train.engine import TrainEngine


@dataclass
class LabelLosses:
    """The loss of each label (a training source) within one step's global batch, taken from the per-example loss
    sums the step's forward passes compute anyway: no extra forward, and the totals ride the step's one all-reduce.

    `labels[p]` is the label of the example at position p of the global batch (MicroBatch.position); sft_step fills
    `sums` and `tokens` (per label, all processes together)."""

    labels: torch.Tensor  # [global batch] long, on the step's device
    count: int  # labels 0 .. count - 1
    sums: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    def means(self, names: list[str]) -> dict[str, float]:
        """Token-weighted mean loss per label present in the batch (a label with no response token is left out)."""
        if self.sums is None or self.tokens is None:
            raise RuntimeError("LabelLosses.means before sft_step filled it")
        sums, tokens = self.sums.tolist(), self.tokens.tolist()
        return {name: s / t for name, s, t in zip(names, sums, tokens) if t > 0}


def sft_step(engine: TrainEngine, micro: list[MicroBatch], response_tokens: int, dist: distributed.DistInfo,
             stop_requested: bool = False, by_label: LabelLosses | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One optimizer step on the token-mean loss of the global batch; no host-device synchronisation.

    Returns (global token-loss sum, processes asking to stop, gradient norm). With `by_label`, also fills its
    per-label loss sums and response tokens.
    """
    loss_sum = torch.zeros((), dtype=torch.float32, device=dist.device)
    per_label = None if by_label is None else torch.zeros(2 * by_label.count, dtype=torch.float32, device=dist.device)
    for i, mb in enumerate(micro):
        with engine.sync_context(i == len(micro) - 1):
            sums, counts = engine(mb)
            engine.backward(sums.sum() / response_tokens)
        loss_sum += sums.detach().sum()
        if by_label is not None and per_label is not None:
            rows = by_label.labels[mb.position]
            per_label[: by_label.count].index_add_(0, rows, sums.detach().float())
            per_label[by_label.count:].index_add_(0, rows, counts.float())
    grad_norm = engine.step()
    vote = torch.full((1,), float(stop_requested), device=dist.device)
    parts = [loss_sum.view(1), vote] + ([] if per_label is None else [per_label])
    totals = distributed.all_reduce_sum(torch.cat(parts), dist)
    if by_label is not None:
        by_label.sums, by_label.tokens = totals[2: 2 + by_label.count], totals[2 + by_label.count:]
    return totals[0], totals[1], grad_norm
