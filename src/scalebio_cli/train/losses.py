"""Response-token cross-entropy: per example (the training losses) and over a whole data set (eval, validation).

`ResponseLoss` wraps a causal LM so that its forward returns the per-example loss sums directly: the model body
runs on the whole micro-batch, its hidden states are gathered at the loss positions (listed on the CPU by collate),
and only those go through the LM head, a chunk of tokens at a time under activation checkpointing. So the
`[batch, length, vocab]` logits never exist (2.1 GB in bf16 for Llama-3 at 8 x 1,024 tokens), prompt and padding
positions cost no head matmul, and at most one chunk's logits live at a time, in forward and in backward. Engines
wrap this module (DDP, DeepSpeed), so the head's weight is synchronised, and gathered under ZeRO-3, as any other.
Models whose logits are more than `head(hidden)` (a final soft-cap or logit scale) take the full-logits path.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scalebio_cli.data.batching import MicroBatch, micro_batches
from scalebio_cli.data.tokens.tokenized import TokenizedData
from scalebio_cli.train import distributed


def example_losses(logits: torch.Tensor, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropy over each example's response tokens, and their count, from full logits (the
    reference the head-only path is tested against).

    Token t is predicted from position t-1. Only response positions are gathered before the (fp32) cross-entropy,
    so prompt and padding cost no softmax; the positions were listed on the CPU (collate), so the gather has a
    known size and needs no host-device synchronisation (a boolean mask would).
    Returns `(sums, counts)`, both `[b]` float32; the per-example loss is `sums / counts`.
    """
    picked = logits[batch.loss_rows, batch.loss_cols].float()
    token_ce = F.cross_entropy(picked, batch.loss_targets, reduction="none")
    sums = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    return sums.index_add_(0, batch.loss_rows, token_ce), batch.loss_counts


HEAD_CHUNK_TOKENS = 1024  # loss tokens per LM-head chunk: [1024, vocab] fp32 logits at a time
# SCALEBIO_FULL_LOGITS=1 takes the full-logits path everywhere: how the tests (and a doubting user) check, under
# every engine, that head-only losses change no result.
FULL_LOGITS_ENV = "SCALEBIO_FULL_LOGITS"
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _head_ce(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


class ResponseLoss(nn.Module):
    """A causal LM whose forward gives `(loss sums, loss-token counts)` per example of a micro-batch."""

    def __init__(self, model: nn.Module, chunk_tokens: int = HEAD_CHUNK_TOKENS):
        super().__init__()
        if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            # A peft model: its `base_model` is the tuner, not the transformer body. The adapters live inside the
            # underlying transformers model, so its body and head (the active adapter included) are what we call.
            model = model.get_base_model()
        self.model, self.chunk_tokens = model, chunk_tokens
        config = getattr(model, "config", None)
        transformed = any(getattr(config, key, None) not in (None, 1, 1.0) for key in _LOGIT_TRANSFORMS)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        body = getattr(model, "base_model", None)
        self.head_only = (head is not None and body is not None and body is not model and not transformed
                          and os.environ.get(FULL_LOGITS_ENV) != "1")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        if not self.head_only:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            token_ce = F.cross_entropy(logits[rows, cols].float(), targets, reduction="none")
        else:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            picked = hidden[rows, cols]
            head = self.model.get_output_embeddings()
            pieces = []
            for h, t in zip(picked.split(self.chunk_tokens), targets.split(self.chunk_tokens)):
                if torch.is_grad_enabled():  # recompute the chunk's logits in backward instead of keeping them
                    pieces.append(checkpoint(_head_ce, head, h, t, use_reentrant=False))
                else:
                    pieces.append(_head_ce(head, h, t))
            token_ce = torch.cat(pieces) if pieces else picked.new_zeros(0, dtype=torch.float32)
        sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
        return sums.index_add_(0, rows, token_ce)


def response_losses(module: nn.Module, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sums, counts)` of a micro-batch through a ResponseLoss (or an engine's wrapper of one)."""
    sums = module(batch.input_ids, batch.attention_mask, batch.loss_rows, batch.loss_cols, batch.loss_targets)
    return sums, batch.loss_counts


@torch.no_grad()
def dataset_totals(model: nn.Module, data: TokenizedData, micro_batch_size: int, pad_id: int,
                   dist: distributed.DistInfo, labels: np.ndarray | None = None, count: int = 0) -> list[float]:
    """Response-token loss sum and token count over every example of `data` (all processes together, one
    all-reduce), then with `labels` (each example's label in 0 .. count - 1) the sum and the count of each label:
    `[sum, tokens, sum_0 .. sum_{count-1}, tokens_0 .. tokens_{count-1}]`."""
    was_training = model.training
    model.eval()
    items = [(0, i) for i in range(len(data))][dist.rank:: dist.world_size]
    width = count if labels is not None else 0
    totals = torch.zeros(2 + 2 * width, dtype=torch.float64, device=dist.device)
    on_device = None if labels is None else torch.as_tensor(labels, dtype=torch.long, device=dist.device)
    loss = ResponseLoss(model)
    # positions: each row's example index, so that a row finds its label
    for mb in micro_batches(items, [data], micro_batch_size, pad_id, positions=[i for _, i in items]):
        mb = mb.to(dist.device)
        sums, counts = response_losses(loss, mb)
        totals[:2] += torch.stack([sums.sum().double(), counts.sum().double()])
        if on_device is not None:
            rows = on_device[mb.position]
            totals[2: 2 + width].index_add_(0, rows, sums.double())
            totals[2 + width:].index_add_(0, rows, counts.double())
    distributed.all_reduce_sum(totals, dist)
    model.train(was_training)
    return totals.tolist()


def dataset_loss(model: nn.Module, data: TokenizedData, micro_batch_size: int, pad_id: int,
                 dist: distributed.DistInfo) -> tuple[float, int]:
    """Mean cross-entropy over every response token of `data` (all processes together), and the token count."""
    total, tokens, *_ = dataset_totals(model, data, micro_batch_size, pad_id, dist)
    return (total / tokens if tokens else float("nan")), int(tokens)
