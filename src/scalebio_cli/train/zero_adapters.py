"""LoRA under DeepSpeed ZeRO-2/3: the adapters of a run (u and w, or fine-tuning's one) on ONE DeepSpeed engine over
one frozen base, which ZeRO-3 shards (recipe `deepspeed:` with `lora.r > 0`).

This is transformers' Trainer path for LoRA under ZeRO-3 (the base loaded partitioned by zero.Init, peft adapters
added, `deepspeed.initialize` with an optimizer over the adapter parameters only), with two adapters in one engine:
a second engine over the same peft model would register its ZeRO hooks on the same modules a second time. The
optimizer has one parameter group per (adapter, block), so each adapter keeps its own learning rate and Adam
state, and LISA over the adapters works as for whole models under ZeRO (train/zero.py: a frozen block's group
gets rate and decay 0, a block drawn again starts from zeroed state).

A step of the pair is one DeepSpeed accumulation window: u's micro-batches, then w's, then one optimizer step for
both. That is the method's step, not an approximation: u's and w's updates do not depend on each other (separate
adapters over a frozen base), and the lam step uses the losses of the passes. u's `step()` therefore only marks
u done; w's `step()` clips each adapter by its OWN gradient norm (the method clips u and w separately; DeepSpeed's
`gradient_clipping` would clip them by their joint norm, so it is off), then steps. u's norm tensor is filled in
place at that moment, before the step's results are read. Under ZeRO-3 the clipping is one collective per step
for all adapters: each process sums the squares of its own gradient partitions (DeepSpeed's public
`safe_get_local_grad`), one all-reduce of those sums gives every adapter's norm, and each process scales its own
partitions (`safe_set_local_grad`); at 70B that replaces thousands of per-tensor gathers. Under ZeRO-2 DeepSpeed
has no public per-partition gradient API, so each tensor is gathered (`safe_get_full_grad`, one all-reduce each):
ZeRO-2 holds the whole base on every GPU and suits smaller models, where that count is small.

Every adapter parameter that LISA has drawn requires grad during the whole window, whichever adapter a pass uses:
ZeRO replaces the gradients of parameters that do not require grad by zeros at the accumulation boundary, and a
pass reaches only its own adapter's modules (peft runs the adapter in force), so the other adapter gets no
gradient from it. peft's `set_adapter` flips requires_grad to the adapter it activates; `use` restores them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scalebio_cli.data.batching import MicroBatch
from scalebio_cli.errors import InputError
from scalebio_cli.recipe.schema import LisaConfig, LoraConfig
from scalebio_cli.train.deepspeed_config import finalize_deepspeed_config
from scalebio_cli.train.distributed import DistInfo
from scalebio_cli.train.engine import EngineCore
from scalebio_cli.train.lisa import Lisa
from scalebio_cli.train.lora import Adapters
from scalebio_cli.train.losses import ResponseLoss
from scalebio_cli.train.modeling import prepare_for_training
from scalebio_cli.train.optim import LrSchedule
from scalebio_cli.train.zero import gathered_state_dict, make_optimizer, reset_group_state, skip_inference_comm_op

STATE_NAME = "adapters"  # the checkpoint folder of the pair's one DeepSpeed engine


class ZeroAdapters(Adapters):
    """The adapters of one run on one DeepSpeed engine (see the module docstring). `copies`: (name, learning rate,
    micro-batches per step) per adapter, in the order their passes run each step."""

    def __init__(self, model: nn.Module, cfg: LoraConfig, copies: list[tuple[str, float, int]], key: str, *,
                 lisa: LisaConfig, seed: int, weight_decay: float, max_grad_norm: float | None,
                 ds_config: dict[str, Any], dist: DistInfo, gradient_checkpointing: bool = False):
        import deepspeed

        names = [name for name, _, _ in copies]
        super().__init__(model, cfg, names, key)
        prepare_for_training(self.base, gradient_checkpointing)
        self.names, self.dist, self.weight_decay, self.max_grad_norm = names, dist, weight_decay, max_grad_norm
        self.params = {name: [p for _, p in self.parameters(name)] for name in names}
        self._ids = {name: {id(p) for p in self.params[name]} for name in names}
        self.lisas: dict[str, Lisa] = {}
        groups: list[dict[str, Any]] = []
        self.groups: dict[str, list[int]] = {}  # adapter -> its group index per block (-1: no adapter there)
        for name, lr, _ in copies:
            own = self._ids[name]
            self.lisas[name] = Lisa(self.base, lisa.layers, lisa.interval, seed,
                                    block_parameters=lambda block, own=own: [p for p in block.parameters()
                                                                             if id(p) in own])
            in_blocks = {id(p) for block in self.lisas[name].blocks for p in block.parameters()}
            outside = [p for p in self.params[name] if id(p) not in in_blocks]
            if outside:  # peft's all-linear leaves the head alone; an explicit target outside the blocks would not
                raise InputError(f"{key}.target_modules: under DeepSpeed LoRA adapts modules inside the transformer "
                                 f"blocks only; {len(outside)} adapter tensors lie outside them")
            self.groups[name] = []
            for block in self.lisas[name].blocks:
                block_params = [p for p in block.parameters() if id(p) in own]
                self.groups[name].append(len(groups) if block_params else -1)
                if block_params:
                    groups.append({"params": block_params, "lr": lr})
        for p in self.trainable():  # ZeRO hooks the gradients of parameters that require grad when it starts
            p.requires_grad_(True)
        optimizer = make_optimizer(groups, copies[0][1], weight_decay, ds_config)
        micro_batches = sum(n for _, _, n in copies)  # one accumulation window per step: every adapter's passes
        config = finalize_deepspeed_config(ds_config, micro_batches, dist.world_size, None,
                                           bf16=next(self.base.parameters()).dtype == torch.bfloat16)
        skip_inference_comm_op()
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=ResponseLoss(self.base), optimizer=optimizer,
                                                             config=config)
        if len(self.optimizer.param_groups) != len(groups):
            raise RuntimeError(f"DeepSpeed kept {len(self.optimizer.param_groups)} of the {len(groups)} optimizer "
                               "parameter groups scalebio made (one per adapter and block)")
        self.stage = self.ds.zero_optimization_stage()
        self.active = {name: set(range(len(self.lisas[name].blocks))) for name in names}
        self.stepped = False
        self.norms = {name: torch.zeros((), dtype=torch.float32, device=dist.device) for name in names}
        self._current: str | None = None

    def trainable(self) -> Iterator[nn.Parameter]:
        """Every adapter parameter LISA has drawn (all of them without LISA)."""
        for name in self.names:
            off = {id(p) for p in self.lisas[name].frozen_parameters()}
            yield from (p for p in self.params[name] if id(p) not in off)

    def use(self, name: str, lisa: Lisa) -> None:
        if self._current != name:
            self.model.set_adapter(name)
            self._current = name
            self._restore_requires_grad()
            if self.stage == 3 and name != self.names[0]:
                self._clear_gradients(name)

    def _clear_gradients(self, name: str) -> None:
        """ZeRO-3 overwrites a gradient buffer with the window's first micro-batch and adds every later one to it:
        it assumes every parameter gets a gradient from the first. A later adapter's first gradient of the window
        comes from a later micro-batch, so its buffers still hold the previous step's gradient: zero them first
        (each process its own partitions, no collective)."""
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        for p in self.trainable():
            if id(p) in self._ids[name]:
                safe_set_local_grad(p, torch.zeros_like(safe_get_local_grad(p)))

    def _restore_requires_grad(self) -> None:
        for name in self.names:
            self.lisas[name].activate(self.lisas[name].active)

    def redrawn(self, name: str) -> None:
        """Adapter `name`'s newly drawn blocks start from fresh Adam state."""
        active = set(self.lisas[name].active)
        for block in sorted(active - self.active[name]):
            if self.groups[name][block] >= 0:
                reset_group_state(self.ds.optimizer, self.groups[name][block], self.stage, self.stepped)
        self.active[name] = active
        self._restore_requires_grad()

    def set_lr(self, name: str, lr: float) -> None:
        """`lr` (and the weight decay) for the drawn blocks of `name`; 0 for its frozen ones (ZeRO feeds them zero
        gradients and would otherwise decay them)."""
        active = set(self.lisas[name].active)
        for block, group in enumerate(self.groups[name]):
            if group >= 0:
                self.ds.optimizer.param_groups[group]["lr"] = lr if block in active else 0.0
                self.ds.optimizer.param_groups[group]["weight_decay"] = self.weight_decay if block in active else 0.0

    def boundary(self, name: str, last_micro_batch: bool) -> None:
        """The accumulation window ends with the last adapter's last micro-batch."""
        self.ds.set_gradient_accumulation_boundary(last_micro_batch and name == self.names[-1])

    def step(self, name: str) -> torch.Tensor | None:
        """After the last adapter's pass: clip each adapter by its own norm, then one DeepSpeed step for all."""
        if name != self.names[-1]:
            return self.norms[name] if self.max_grad_norm is not None else None
        if self.max_grad_norm is not None:
            params = {a: [p for p in self.trainable() if id(p) in self._ids[a]] for a in self.names}
            (self._clip_zero3 if self.stage == 3 else self._clip_gathered)(params)
        self.ds.step()
        self.stepped = True
        return self.norms[name] if self.max_grad_norm is not None else None

    def _clip_zero3(self, params: dict[str, list[nn.Parameter]]) -> None:
        """Each adapter clipped by its own norm from the local gradient partitions: one all-reduce per step."""
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        local = {a: [safe_get_local_grad(p) for p in ps] for a, ps in params.items()}
        squares = torch.stack([sum((g.float().pow(2).sum() for g in local[a]),
                                   torch.zeros((), dtype=torch.float32, device=self.dist.device))
                               for a in self.names]).to(self.dist.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(squares)  # ZeRO-3 partitions over every process of the run
        for adapter, norm in zip(self.names, squares.sqrt()):
            coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ rule
            for p, grad in zip(params[adapter], local[adapter]):
                safe_set_local_grad(p, grad * coef.to(grad.device, grad.dtype))
            self.norms[adapter].copy_(norm)

    def _clip_gathered(self, params: dict[str, list[nn.Parameter]]) -> None:
        """ZeRO-2: the same rule on whole gradients, gathered per tensor (every process in the same order)."""
        from deepspeed.utils import safe_get_full_grad, safe_update_full_grad_vectorized

        for adapter in self.names:
            if not params[adapter]:
                continue
            norm = torch.stack([safe_get_full_grad(p).float().pow(2).sum() for p in params[adapter]]).sum().sqrt()
            coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            safe_update_full_grad_vectorized(params[adapter], lambda grad, _p, coef=coef: grad * coef.to(grad.dtype))
            self.norms[adapter].copy_(norm)

    # -- checkpoints -------------------------------------------------------------------------------------------

    @contextmanager
    def _every_adapter_trainable(self) -> Iterator[None]:
        """Checkpoints leave out frozen parameters (the base): every adapter parameter counts as trainable then,
        LISA's switched-off blocks included (the optimizer holds them too)."""
        for name in self.names:
            for p in self.params[name]:
                p.requires_grad_(True)
        try:
            yield
        finally:
            self._restore_requires_grad()

    def save(self, folder: Path) -> None:
        with self._every_adapter_trainable():
            self.ds.save_checkpoint(str(folder / STATE_NAME), tag="state", save_latest=False,
                                    exclude_frozen_parameters=True)

    def load(self, folder: Path) -> None:
        if not (folder / STATE_NAME / "state").is_dir():
            raise InputError(f"{folder}: checkpoint has no DeepSpeed adapter state '{STATE_NAME}/state' (was it "
                             "written by a run without LoRA under `deepspeed:`?)")
        with self._every_adapter_trainable():
            path, _ = self.ds.load_checkpoint(str(folder / STATE_NAME), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=False)
        if path is None:
            raise InputError(f"{folder / STATE_NAME}: DeepSpeed could not load this checkpoint")
        self.active = {name: set(self.lisas[name].active) for name in self.names}
        self.stepped = True

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Under ZeRO-3, base and adapters gathered to the main process (collective; keys as the base's), for
        lora.save_merged to merge on the CPU; None otherwise (ZeRO-2 holds whole tensors: the peft model merges
        itself, as on our engine)."""
        return gathered_state_dict(self.ds, self.dist) if self.stage == 3 else None


class ZeroAdapterEngine(EngineCore):
    """One adapter of a `ZeroAdapters`, behind the engine interface the loops use."""

    def __init__(self, adapters: ZeroAdapters, adapter: str, *, lr: float, total_steps: int, warmup_ratio: float,
                 dist: DistInfo):
        super().__init__(adapters.model, adapters.ds, adapters.lisas[adapter], LrSchedule(lr, total_steps,
                                                                                          warmup_ratio), dist,
                         grad_scale=float(dist.world_size))  # DeepSpeed averages; our losses are global sums
        self.adapters, self.adapter = adapters, adapter

    def _redrawn(self) -> None:
        self.adapters.redrawn(self.adapter)

    def _set_lr(self, lr: float) -> None:
        self.adapters.set_lr(self.adapter, lr)

    def __call__(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        self.adapters.use(self.adapter, self.lisa)
        return super().__call__(batch)

    def sync_context(self, sync: bool) -> AbstractContextManager[Any]:
        self.adapters.boundary(self.adapter, sync)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.adapters.ds.backward(loss * self.grad_scale, scale_wrt_gas=False)

    def step(self) -> torch.Tensor | None:
        return self.adapters.step(self.adapter)

    def save(self, folder: Path, name: str) -> None:
        if self.adapter == self.adapters.names[-1]:  # one engine, one checkpoint: written once per pair
            self.adapters.save(folder)

    def load(self, folder: Path, name: str) -> None:
        if self.adapter == self.adapters.names[-1]:
            self.adapters.load(folder)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.adapters.full_state_dict()

