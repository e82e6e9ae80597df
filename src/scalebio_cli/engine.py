"""One trainable model copy (u, w, or the fine-tuned model) on an existing engine: plain/DDP, or DeepSpeed ZeRO.

The training loops stay explicit and engine-agnostic; an engine hides only what differs between them:
- how gradients are accumulated and synchronised (DDP skips the all-reduce on all but the last micro-batch;
  DeepSpeed counts micro-batches against `gradient_accumulation_steps`),
- that DDP and DeepSpeed average gradients over processes while our losses are already global sums, so each
  process's loss is scaled by the world size,
- what a LISA re-draw means for the optimizer: our AdamW frees the frozen blocks' state; under ZeRO, whose
  partitions cover every parameter from the start, the frozen blocks' parameter groups get learning rate and weight
  decay 0 (and `requires_grad=False`, so their gradients are not computed),
- how a checkpoint is written and how the full weights are gathered for a Hugging Face folder.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
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
    """A model copy trained by our AdamW, in one process or under DDP (torchrun)."""

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, max_grad_norm: float | None,
                 total_steps: int, warmup_ratio: float, lisa: LisaConfig, seed: int, dist: DistInfo,
                 gradient_checkpointing: bool = False):
        self.model, self.dist = model, dist
        self.max_grad_norm = max_grad_norm
        _prepare(model, gradient_checkpointing)
        self.optimizer = AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(total_steps, warmup_ratio))
        self.module: nn.Module = model
        self.grad_scale = 1.0
        if dist.distributed:
            # Wrap while every parameter requires grad; LISA freezes afterwards. Unused (frozen) parameters
            # differ per draw, hence find_unused_parameters. Buffers (rotary tables) never change.
            no_buffer_sync = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                              else {"broadcast_buffers": False})
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.module = DistributedDataParallel(model, find_unused_parameters=True, device_ids=device_ids,
                                                  **no_buffer_sync)
            self.grad_scale = float(dist.world_size)
        self.lisa = Lisa(model, lisa.layers, lisa.interval, seed)

    def begin_step(self, step: int) -> None:
        """Apply the LISA draw covering `step`; frozen blocks give their optimizer state back."""
        if self.lisa.update(step):
            self.optimizer.release(self.lisa.frozen_parameters())

    def __call__(self, batch: MicroBatch) -> torch.Tensor:
        return self.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def sync_context(self, sync: bool) -> Any:
        """Gradient all-reduce happens only on the last micro-batch of a step."""
        if sync or not isinstance(self.module, DistributedDataParallel):
            return nullcontext()
        return self.module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.grad_scale).backward()

    def step(self) -> torch.Tensor | None:
        """Clip, update, advance the schedule, clear gradients. Returns the gradient norm before clipping."""
        norm = None
        if self.max_grad_norm is not None:
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

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
        """The whole model's weights on the main process (None elsewhere)."""
        return self.model.state_dict() if self.dist.is_main else None


class DeepSpeedEngine:
    """A model copy trained by a DeepSpeed engine; ZeRO stage, offloading etc. come from the user's config file."""

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, max_grad_norm: float | None,
                 total_steps: int, warmup_ratio: float, lisa: LisaConfig, seed: int, dist: DistInfo,
                 gradient_checkpointing: bool = False, ds_config: dict[str, Any], micro_batches: int):
        import deepspeed

        self.model, self.dist = model, dist
        _prepare(model, gradient_checkpointing)
        self.lisa = Lisa(model, lisa.layers, lisa.interval, seed)
        in_blocks = {id(p) for block in self.lisa.blocks for p in block.parameters()}
        groups = [{"params": list(block.parameters())} for block in self.lisa.blocks]
        groups.append({"params": [p for p in model.parameters() if id(p) not in in_blocks]})
        self.base_lr, self.weight_decay = lr, weight_decay
        self.factor = warmup_cosine(total_steps, warmup_ratio)
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        config = finalize_deepspeed_config(ds_config, micro_batches, dist.world_size, max_grad_norm,
                                           bf16=next(model.parameters()).dtype == torch.bfloat16)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.module = self.ds
        self.grad_scale = float(dist.world_size)
        self._lr = lr

    def begin_step(self, step: int) -> None:
        """LISA draw, then this step's learning rates: 0 (and no decay) for the frozen blocks' groups."""
        self.lisa.update(step)
        self._lr = self.base_lr * self.factor(step)
        frozen = set(range(len(self.lisa.blocks))) - set(self.lisa.active)
        for i, group in enumerate(self.ds.optimizer.param_groups):
            group["lr"] = 0.0 if i in frozen else self._lr
            group["weight_decay"] = 0.0 if i in frozen else self.weight_decay

    def __call__(self, batch: MicroBatch) -> torch.Tensor:
        return self.ds(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def sync_context(self, sync: bool) -> Any:
        return nullcontext()  # DeepSpeed synchronises at its gradient-accumulation boundary

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss * self.grad_scale, scale_wrt_gas=False)
        self.ds.step()  # a no-op except on the step's last micro-batch (the accumulation boundary)

    def step(self) -> torch.Tensor | None:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm, dtype=torch.float32)

    @property
    def lr(self) -> float:
        return self._lr

    def save(self, folder: Path, name: str) -> None:
        self.ds.save_checkpoint(str(folder / name), tag="state", save_latest=False)

    def load(self, folder: Path, name: str) -> None:
        path, _ = self.ds.load_checkpoint(str(folder / name), tag="state", load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{folder / name}: no DeepSpeed checkpoint")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.ds.zero_optimization_stage() == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict()  # gathers the shards; collective
            return state if self.dist.is_main else None
        return self.model.state_dict() if self.dist.is_main else None


def _prepare(model: nn.Module, gradient_checkpointing: bool) -> None:
    if gradient_checkpointing:
        # Non-reentrant checkpointing: with LISA the lowest active block's input needs no grad, which the
        # reentrant variant would turn into "no gradient for this block".
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def load_deepspeed_config(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def finalize_deepspeed_config(base: dict[str, Any], micro_batches: int, world_size: int,
                              max_grad_norm: float | None, bf16: bool) -> dict[str, Any]:
    """The user's DeepSpeed config with the values scalebio owns filled in.

    Batch sizes are bookkeeping only (our micro-batches are counted, each with its own rows): DeepSpeed must
    step once per `micro_batches` backward passes. Clipping and precision follow the recipe.
    """
    config = copy.deepcopy(base)
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=micro_batches,
                  train_batch_size=micro_batches * world_size, gradient_clipping=max_grad_norm or 0.0,
                  zero_allow_untested_optimizer=True, wall_clock_breakdown=False)
    config.setdefault("steps_per_print", 1 << 30)
    config.pop("fp16", None)
    config["bf16"] = {"enabled": bf16}
    return config


TrainEngine = Engine | DeepSpeedEngine


@contextmanager
def zero3_loading(ds_config: dict[str, Any] | None, bf16: bool, world_size: int) -> Iterator[None]:
    """Under ZeRO-3, models loaded inside this block are partitioned as they load (transformers' zero.Init), so no
    process ever holds a whole 30B model. Elsewhere a no-op."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    # zero.Init asks deepspeed.comm for the world size; bind it to the process group we already joined.
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    marker = HfDeepSpeedConfig(finalize_deepspeed_config(ds_config, 1, world_size, None, bf16))  # noqa: F841
    yield


def make_engine(model: nn.Module, *, ds_config: dict[str, Any] | None, micro_batches: int,
                **kwargs: Any) -> TrainEngine:
    if ds_config is None:
        return Engine(model, **kwargs)
    return DeepSpeedEngine(model, ds_config=ds_config, micro_batches=micro_batches, **kwargs)
