"""One trainable model copy (u, w, or the fine-tuned model) on an existing engine, behind one interface.

The training loops stay explicit and engine-agnostic; an engine hides only what differs between engines:
- how gradients are accumulated and synchronised (DDP skips the all-reduce on all but the last micro-batch;
  DeepSpeed is told which micro-batch is the accumulation boundary),
- that DDP and DeepSpeed average gradients over processes while our losses are already global sums, so each
  process's loss is scaled by the world size,
- what a LISA re-draw means for the optimizer: a block that becomes active starts from fresh optimizer state under
  every engine (ours frees the frozen blocks' state; under ZeRO, whose partitions cover every parameter, the
  newly active blocks' state is zeroed and the frozen blocks' groups get learning rate and weight decay 0),
- how a checkpoint is written and how the full weights are gathered for a Hugging Face folder.

This module holds the interface and the plain/DDP engine; train/zero.py the DeepSpeed one.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scalebio_cli.data.batching import MicroBatch
from scalebio_cli.recipe.schema import LisaConfig
from scalebio_cli.train.distributed import DistInfo
from scalebio_cli.train.lisa import Lisa
from scalebio_cli.train.losses import ResponseLoss, response_losses
from scalebio_cli.train.modeling import prepare_for_training
from scalebio_cli.train.optim import AdamW, warmup_cosine


class TrainEngine(Protocol):
    """What a training loop may ask of a model copy. Every engine honours it identically."""

    model: nn.Module
    lisa: Lisa

    def begin_step(self, step: int) -> None:
        """Apply the LISA draw and the learning rate of `step` (0-based), before its first forward."""

    def __call__(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """`(loss sums, loss-token counts)` per example of one micro-batch (train/losses.ResponseLoss)."""

    def sync_context(self, sync: bool) -> AbstractContextManager[Any]:
        """Wrap each micro-batch's forward+backward; `sync` is True on the step's last micro-batch."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of `loss` (a global-batch sum term); never steps."""

    def step(self) -> torch.Tensor | None:
        """Clip, update, clear gradients; returns the gradient norm before clipping (None if not clipped)."""

    @property
    def lr(self) -> float:
        """The learning rate of the current step (the one `begin_step` set up)."""

    def save(self, folder: Path, name: str) -> None: ...

    def load(self, folder: Path, name: str) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on the main process (None elsewhere); collective under ZeRO-3."""


def clip_and_step(params: list[torch.Tensor], max_grad_norm: float | None, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler) -> torch.Tensor | None:
    """Clip `params`' gradients (if asked), update, advance the schedule, clear; the norm before clipping."""
    norm = None
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


class Engine:
    """A model copy trained by our AdamW, in one process or under DDP (torchrun)."""

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, max_grad_norm: float | None,
                 total_steps: int, warmup_ratio: float, lisa: LisaConfig, seed: int, dist: DistInfo,
                 gradient_checkpointing: bool = False):
        self.model, self.dist = model, dist
        self.max_grad_norm = max_grad_norm
        prepare_for_training(model, gradient_checkpointing)
        self.optimizer = AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(total_steps, warmup_ratio))
        self.module: nn.Module = ResponseLoss(model)
        self.grad_scale = 1.0
        if dist.distributed:
            # Wrap while every parameter requires grad; LISA freezes afterwards. Unused (frozen) parameters
            # differ per draw, hence find_unused_parameters. Buffers (rotary tables) never change.
            no_buffer_sync = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                              else {"broadcast_buffers": False})
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.module = DistributedDataParallel(self.module, find_unused_parameters=True, device_ids=device_ids,
                                                  **no_buffer_sync)
            self.grad_scale = float(dist.world_size)
        self.lisa = Lisa(model, lisa.layers, lisa.interval, seed, lisa.train_embeddings)
        self._lr = lr

    def begin_step(self, step: int) -> None:
        """Apply the LISA draw covering `step`; frozen blocks give their optimizer state back."""
        if self.lisa.update(step):
            self.optimizer.release(self.lisa.frozen_parameters())
        self._lr = self.optimizer.param_groups[0]["lr"]  # the schedule has advanced to `step` by now

    def __call__(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return response_losses(self.module, batch)

    def sync_context(self, sync: bool) -> AbstractContextManager[Any]:
        """Gradient all-reduce happens only on the last micro-batch of a step."""
        if sync or not isinstance(self.module, DistributedDataParallel):
            return nullcontext()
        return self.module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.grad_scale).backward()

    def step(self) -> torch.Tensor | None:
        return clip_and_step([p for p in self.model.parameters() if p.grad is not None], self.max_grad_norm,
                             self.optimizer, self.scheduler)

    @property
    def lr(self) -> float:
        return self._lr

    # -- checkpoints and final weights (every process calls these) ----------------------------------------------

    def save(self, folder: Path, name: str) -> None:
        if self.dist.is_main:
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, folder / f"{name}.pt")

    def load(self, folder: Path, name: str) -> None:
        state = torch.load(folder / f"{name}.pt", map_location=self.dist.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.model.state_dict() if self.dist.is_main else None


def make_engine(model: nn.Module, *, ds_config: dict[str, Any] | None, micro_batches: int,
                **kwargs: Any) -> TrainEngine:
    if ds_config is None:
        return Engine(model, **kwargs)
    from scalebio_cli.train.zero import DeepSpeedEngine

    return DeepSpeedEngine(model, ds_config=ds_config, micro_batches=micro_batches, **kwargs)
