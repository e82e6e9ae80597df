"""One supervised fine-tuning step: the token-mean loss of the global batch, exact under any micro-batching."""

from __future__ import annotations

import torch

from scalebio_cli.data.batching import MicroBatch
from scalebio_cli.train import distributed
from scalebio_cli.train.engine import TrainEngine


def sft_step(engine: TrainEngine, micro: list[MicroBatch], response_tokens: int, dist: distributed.DistInfo,
             stop_requested: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One optimizer step on the token-mean loss of the global batch; no host-device synchronisation.

    Returns (global token-loss sum, processes asking to stop, gradient norm).
    """
    loss_sum = torch.zeros((), dtype=torch.float32, device=dist.device)
    for i, mb in enumerate(micro):
        with engine.sync_context(i == len(micro) - 1):
            sums, _ = engine(mb)
            engine.backward(sums.sum() / response_tokens)
        loss_sum += sums.detach().sum()
    grad_norm = engine.step()
    vote = torch.full((1,), float(stop_requested), device=dist.device)
    totals = distributed.all_reduce_sum(torch.cat([loss_sum.view(1), vote]), dist)
    return totals[0], totals[1], grad_norm
