"""One trainable model copy (u, w, or the fine-tuned model) behind one interface, and the core every engine shares.

The training loops stay explicit and engine-agnostic; an engine hides only what differs between engines:
- how gradients are accumulated and synchronised (none in one process; DDP skips the all-reduce on all but the
  last micro-batch; DeepSpeed is told which micro-batch is the accumulation boundary; LoRA adapters all-reduce
  their own gradients once per step),
- that DDP and DeepSpeed average gradients over processes while our losses are already global sums, so each
  process's loss is scaled by the world size,
- how LISA's freezing is enforced: a block that becomes active starts from fresh optimizer state under every
  engine (our AdamW frees the frozen blocks' state; under ZeRO, whose partitions cover every parameter, the newly
  active blocks' state is zeroed and the frozen blocks' groups get learning rate and weight decay 0),
- how a checkpoint is written and how the full weights are gathered for a Hugging Face folder.

What is shared lives here, once: `EngineCore` (LISA, the learning-rate schedule, the loss forward and its scaling,
the begin-step order) and `AdamWEngine` (our AdamW with releasable state, clipping, save/load). `Engine` is the
whole-model copy on it, in one process or under DDP; train/lora.py's AdapterEngine is one LoRA adapter on it;
train/zero.py's DeepSpeedEngine is the core over a DeepSpeed engine. train/factory.py chooses among them.
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
from scalebio_cli.train.optim import AdamW, LrSchedule


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


class EngineCore:
    """What every engine shares: the model copy, its LISA, its learning-rate schedule and the loss forward.

    Subclasses build `module` (what forwards run through) and say what a LISA re-draw and a step's learning rate
    mean for their optimizer (`_redrawn`, `_set_lr`), then how they step, save and load.
    """

    def __init__(self, model: nn.Module, module: nn.Module, lisa: Lisa, schedule: LrSchedule, dist: DistInfo,
                 grad_scale: float = 1.0):
        self.model, self.module, self.lisa, self.schedule, self.dist = model, module, lisa, schedule, dist
        self.grad_scale = grad_scale  # world size under DDP/DeepSpeed (they average; our losses are global sums)
        self._lr = schedule.base

    def begin_step(self, step: int) -> None:
        """The LISA draw covering `step` first (a re-draw changes what the optimizer holds), then its rate."""
        if self.lisa.update(step):
            self._redrawn()
        self._lr = self.schedule(step)
        self._set_lr(self._lr)

    def _redrawn(self) -> None:
        """LISA has just changed the active blocks."""
        raise NotImplementedError

    def _set_lr(self, lr: float) -> None:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return self._lr

    def __call__(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return response_losses(self.module, batch)

    def sync_context(self, sync: bool) -> AbstractContextManager[Any]:
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.grad_scale).backward()


class AdamWEngine(EngineCore):
    """A model copy whose `params` our AdamW trains (train/optim.py): a LISA re-draw frees the optimizer state of the
    parameters it freezes, so those drawn again later start fresh and state never exceeds the active blocks'.

    Subclasses say how gradients reach the step (`_gradients_ready`) and what a checkpoint holds of the weights
    (`_weights`, `_load_weights`). A checkpoint is `NAME.pt`: those weights and the optimizer state (the schedule
    is a function of the step and needs no state).
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], module: nn.Module, lisa: Lisa,
                 schedule: LrSchedule, dist: DistInfo, *, weight_decay: float, max_grad_norm: float | None,
                 grad_scale: float = 1.0):
        super().__init__(model, module, lisa, schedule, dist, grad_scale)
        self.max_grad_norm = max_grad_norm
        self.optimizer = AdamW(params, lr=schedule.base, weight_decay=weight_decay)

    def _redrawn(self) -> None:
        self.optimizer.release(self.lisa.frozen_parameters())

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _gradients_ready(self) -> list[nn.Parameter]:
        """Finish the step's gradient synchronisation; the parameters to clip and update."""
        raise NotImplementedError

    def step(self) -> torch.Tensor | None:
        params = self._gradients_ready()
        norm = None
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # set_to_none: DDP's LISA needs unused gradients absent
        return norm

    # -- checkpoints (every process calls these; the main process writes) ---------------------------------------

    def _weights(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_weights(self, saved: dict[str, Any], file: Path) -> None:
        raise NotImplementedError

    def save(self, folder: Path, name: str) -> None:
        if self.dist.is_main:
            torch.save({**self._weights(), "optimizer": self.optimizer.state_dict()}, folder / f"{name}.pt")

    def load(self, folder: Path, name: str) -> None:
        file = folder / f"{name}.pt"
        saved = torch.load(file, map_location=self.dist.device, weights_only=True)
        self._load_weights(saved, file)
        self.optimizer.load_state_dict(saved["optimizer"])


def ddp_wrap(module: nn.Module, dist: DistInfo) -> DistributedDataParallel:
    """`module` under DDP, for LISA: wrapped while every parameter requires grad (LISA freezes afterwards); the
    unused (frozen) parameters differ per draw, hence find_unused_parameters. Buffers (rotary tables) never change."""
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(module, find_unused_parameters=True, device_ids=device_ids, **no_buffer_sync)


class Engine(AdamWEngine):
    """A whole model copy on our AdamW, in one process or under DDP (torchrun). LISA freezes by requires_grad."""

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, max_grad_norm: float | None,
                 total_steps: int, warmup_ratio: float, lisa: LisaConfig, seed: int, dist: DistInfo,
                 gradient_checkpointing: bool = False):
        prepare_for_training(model, gradient_checkpointing)
        module: nn.Module = ResponseLoss(model)
        if dist.distributed:
            module = ddp_wrap(module, dist)
        blocks = Lisa(model, lisa.layers, lisa.interval, seed, lisa.train_embeddings)  # after wrapping (ddp_wrap)
        super().__init__(model, list(model.parameters()), module, blocks, LrSchedule(lr, total_steps, warmup_ratio),
                         dist, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                         grad_scale=float(dist.world_size) if dist.distributed else 1.0)

    def sync_context(self, sync: bool) -> AbstractContextManager[Any]:
        """Gradient all-reduce happens only on the last micro-batch of a step."""
        if sync or not isinstance(self.module, DistributedDataParallel):
            return nullcontext()
        return self.module.no_sync()

    def _gradients_ready(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.grad is not None]  # DDP reduced them during backward

    def _weights(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def _load_weights(self, saved: dict[str, Any], file: Path) -> None:
        self.model.load_state_dict(saved["model"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.model.state_dict() if self.dist.is_main else None
