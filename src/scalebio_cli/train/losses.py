"""Response-token cross-entropy: per example (the training losses) and over a whole data set (eval, validation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalebio_cli.data.batching import MicroBatch, micro_batches
from scalebio_cli.data.tokenized import TokenizedData
from scalebio_cli.train import distributed


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


@torch.no_grad()
def dataset_loss(model: nn.Module, data: TokenizedData, micro_batch_size: int, pad_id: int,
                 dist: distributed.DistInfo) -> tuple[float, int]:
    """Mean cross-entropy over every response token of `data` (all processes together), and the token count."""
    was_training = model.training
    model.eval()
    items = [(0, i) for i in range(len(data))][dist.rank:: dist.world_size]
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device)
    for mb in micro_batches(items, [data], micro_batch_size, pad_id):
        mb = mb.to(dist.device)
        sums, counts = example_losses(model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits, mb)
        totals += torch.stack([sums.sum().double(), counts.sum().double()])
    distributed.all_reduce_sum(totals, dist)
    model.train(was_training)
    tokens = int(totals[1].item())
    return (totals[0].item() / tokens if tokens else float("nan")), tokens
