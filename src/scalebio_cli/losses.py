"""Response-token cross-entropy, per example."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scalebio_cli.batching import MicroBatch


def example_losses(logits: torch.Tensor, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropy over each example's response tokens, and their count.

    Token t is predicted from positions < t, so logits[:, t-1] scores input_ids[:, t]. Only response positions
    are gathered before the (fp32) cross-entropy, so prompt and padding cost no softmax.
    Returns `(sums, counts)`, both `[b]` float32; the per-example loss is `sums / counts`.
    """
    mask = batch.trainable[:, 1:]
    rows = mask.nonzero(as_tuple=True)[0]
    picked = logits[:, :-1][mask].float()
    targets = batch.input_ids[:, 1:][mask]
    token_ce = F.cross_entropy(picked, targets, reduction="none")
    sums = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device).index_add_(0, rows, token_ce)
    counts = mask.sum(dim=1).to(torch.float32)
    return sums, counts
