"""Response-token cross-entropy, per example."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scalebio_cli.batching import MicroBatch


def example_losses(logits: torch.Tensor, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropy over each example's response tokens, and their count.

    Token t is predicted from position t-1. Only response positions are gathered before the (fp32) cross-entropy,
    so prompt and padding cost no softmax; the positions were listed on the CPU (collate), so the gather has a
    known size and needs no host-device synchronisation (a boolean mask would).
    Returns `(sums, counts)`, both `[b]` float32; the per-example loss is `sums / counts`.
    """
    picked = logits[batch.loss_rows, batch.loss_cols].float()
    token_ce = F.cross_entropy(picked, batch.loss_targets, reduction="none")
    sums = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    return sums.index_add_(0, batch.loss_rows, token_ce), batch.loss_counts
