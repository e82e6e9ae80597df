"""One trainable model copy (u, w, or the fine-tuned model): its wrapper, optimizer, schedule and LISA state.

The training loops stay explicit; this class only hides what differs between a single process and DDP:
skipping gradient synchronisation on accumulation micro-batches, and undoing DDP's gradient averaging (our losses
are already global sums, so each process's contribution must be summed, not averaged).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scalebio_cli.batching import MicroBatch
from scalebio_cli.config import LisaConfig
from scalebio_cli.distributed import DistInfo
from scalebio_cli.lisa import Lisa
from scalebio_cli.optim import AdamW, warmup_cosine


class Engine:
    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, max_grad_norm: float | None,
                 total_steps: int, warmup_ratio: float, lisa: LisaConfig, seed: int, dist: DistInfo,
                 gradient_checkpointing: bool = False):
        self.model = model
        self.max_grad_norm = max_grad_norm
        if gradient_checkpointing:
            # Non-reentrant checkpointing: with LISA the lowest active block's input needs no grad, which the
            # reentrant variant would turn into "no gradient for this block".
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.optimizer = AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(total_steps, warmup_ratio))
        self.module: nn.Module = model
        self.grad_scale = 1.0
        if dist.distributed:
            # Wrap while every parameter requires grad; LISA freezes afterwards. Unused (frozen) parameters
            # differ per draw, hence find_unused_parameters. Buffers (rotary tables) never change.
            self.module = DistributedDataParallel(model, find_unused_parameters=True, broadcast_buffers=False,
                                                  device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
            self.grad_scale = float(dist.world_size)
        self.lisa = Lisa(model, self.optimizer, lisa.layers, lisa.interval, seed)

    def __call__(self, batch: MicroBatch) -> torch.Tensor:
        return self.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def sync_context(self, sync: bool) -> Any:
        """Gradient all-reduce happens only on the last micro-batch of a step."""
        if sync or not isinstance(self.module, DistributedDataParallel):
            return nullcontext()
        return self.module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.grad_scale).backward()

    def step(self, clip_scale: float = 1.0) -> torch.Tensor | None:
        """Clip, update, advance the schedule, clear gradients. Returns the gradient norm before clipping."""
        norm = None
        if self.max_grad_norm is not None:
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm * clip_scale, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
