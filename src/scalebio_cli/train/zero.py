"""The DeepSpeed ZeRO engine (stages 0-3, offloading, from the user's config file) behind train/engine.TrainEngine.

LISA under ZeRO: every transformer block is its own optimizer parameter group. ZeRO's partitions cover every
parameter from the start and it feeds frozen blocks zero gradients, so a frozen block's group gets learning rate
and weight decay 0 (it does not move), and when a block becomes active its group's optimizer state (moments and
step count) is zeroed: it starts fresh, exactly as our AdamW's released state does under the plain engine. Without
that reset the step count and decayed moments of the frozen period would give the first real update the bias
correction of a much later step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scalebio_cli.errors import InputError
from scalebio_cli.recipe.schema import LisaConfig
from scalebio_cli.train.deepspeed_config import finalize_deepspeed_config, offloads_optimizer
from scalebio_cli.train.deepspeed_config import load_deepspeed_config as load_deepspeed_config  # the stages' import
from scalebio_cli.train.distributed import DistInfo
from scalebio_cli.train.engine import EngineCore
from scalebio_cli.train.lisa import Lisa
from scalebio_cli.train.losses import ResponseLoss
from scalebio_cli.train.modeling import prepare_for_training
from scalebio_cli.train.optim import LrSchedule


class DeepSpeedEngine(EngineCore):
    """A model copy trained by a DeepSpeed engine: the engine core (LISA, schedule, loss forward) over ZeRO, which
    synchronises the gradients and holds the optimizer; LISA's freezing is enforced through parameter groups."""

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, max_grad_norm: float | None,
                 total_steps: int, warmup_ratio: float, lisa: LisaConfig, seed: int, dist: DistInfo,
                 gradient_checkpointing: bool = False, ds_config: dict[str, Any], micro_batches: int):
        import deepspeed

        prepare_for_training(model, gradient_checkpointing)
        blocks = Lisa(model, lisa.layers, lisa.interval, seed, lisa.train_embeddings)
        groups, self.never_trained = lisa_groups(model, blocks)
        self.weight_decay = weight_decay
        optimizer = make_optimizer(groups, lr, weight_decay, ds_config)
        config = finalize_deepspeed_config(ds_config, micro_batches, dist.world_size, max_grad_norm,
                                           bf16=next(model.parameters()).dtype == torch.bfloat16)
        skip_inference_comm_op()
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=ResponseLoss(model), optimizer=optimizer,
                                                             config=config)
        if len(self.optimizer.param_groups) != len(groups):  # DeepSpeed drops empty groups: indices would shift
            raise RuntimeError(f"DeepSpeed kept {len(self.optimizer.param_groups)} of the {len(groups)} optimizer "
                               "parameter groups scalebio made (one per block); LISA cannot address them")
        super().__init__(model, self.ds, blocks, LrSchedule(lr, total_steps, warmup_ratio), dist,
                         grad_scale=float(dist.world_size))
        self.stage = self.ds.zero_optimization_stage()
        self._active: set[int] = set(range(len(blocks.blocks)))
        self._stepped = False  # has the optimizer state been made (a step taken, or a checkpoint loaded)?

    def _redrawn(self) -> None:
        """Newly active blocks start from fresh optimizer state."""
        active = set(self.lisa.active)
        for group in sorted(active - self._active):
            reset_group_state(self.ds.optimizer, group, self.stage, self._stepped)
        self._active = active

    def _set_lr(self, lr: float) -> None:
        """This step's rate for the active blocks' groups; 0 (and no decay) for the frozen ones, which ZeRO feeds
        zero gradients and would otherwise decay."""
        frozen = (set(range(len(self.lisa.blocks))) - set(self.lisa.active)) | self.never_trained
        for i, group in enumerate(self.ds.optimizer.param_groups):
            group["lr"] = 0.0 if i in frozen else lr
            group["weight_decay"] = 0.0 if i in frozen else self.weight_decay

    def sync_context(self, sync: bool) -> AbstractContextManager[Any]:
        # DeepSpeed reduces gradients at the accumulation boundary: the step's last micro-batch.
        self.ds.set_gradient_accumulation_boundary(sync)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss * self.grad_scale, scale_wrt_gas=False)

    def step(self) -> torch.Tensor | None:
        self.ds.step()  # the boundary was set on the last micro-batch: this is the optimizer step
        self._stepped = True
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm, dtype=torch.float32)

    def save(self, folder: Path, name: str) -> None:
        self.ds.save_checkpoint(str(folder / name), tag="state", save_latest=False)

    def load(self, folder: Path, name: str) -> None:
        if not (folder / name / "state").is_dir():
            raise InputError(f"{folder}: checkpoint has no DeepSpeed state '{name}/state' (was it written by a run "
                             "without `deepspeed:` in its recipe?)")
        path, _ = self.ds.load_checkpoint(str(folder / name), tag="state", load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise InputError(f"{folder / name}: DeepSpeed could not load this checkpoint")
        self._active = set(self.lisa.active)  # the state saved under this draw is the state to continue from
        self._stepped = True

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.ds.zero_optimization_stage() == 3:
            return gathered_state_dict(self.ds, self.dist)
        return self.model.state_dict() if self.dist.is_main else None


def gathered_state_dict(ds: Any, dist: DistInfo) -> dict[str, torch.Tensor] | None:
    """A ZeRO-3 engine's whole weights on the main process (None elsewhere), gathered from the shards one module at
    a time (collective: every process calls it), by the call transformers' Trainer makes to save under ZeRO-3. The
    engine wraps ResponseLoss(model): the wrapper's `model.` prefix is taken off the keys."""
    # Private (DeepSpeed 0.19.8: DeepSpeedEngine._zero3_consolidated_16bit_state_dict); transformers' Trainer calls
    # the same method. tests/test_zero.py::test_the_private_deepspeed_internals_scalebio_reads_are_there fails if
    # it moves.
    state = ds._zero3_consolidated_16bit_state_dict()
    return {k.removeprefix("model."): v for k, v in state.items()} if dist.is_main else None


def make_optimizer(groups: list[dict[str, Any]], lr: float, weight_decay: float,
                   ds_config: dict[str, Any]) -> torch.optim.Optimizer:
    """The Adam the DeepSpeed engine steps: torch's AdamW, or under ZeRO-Offload (`offload_optimizer` to cpu or
    nvme) DeepSpeed's CPU Adam, the vectorised host-side step DeepSpeed requires there (it refuses a torch
    optimizer: `zero_force_ds_cpu_optimizer`). Both are decoupled-weight-decay Adam with the same defaults and keep
    `step`/`exp_avg`/`exp_avg_sq` per tensor, so LISA's state reset (reset_group_state) treats them alike; CPU Adam
    reads each group's rate and decay at every step, as ours does. It is a C++ op built on first use (~2 min, cached
    in TORCH_EXTENSIONS_DIR) unless DeepSpeed was installed with DS_BUILD_CPU_ADAM=1."""
    if not offloads_optimizer(ds_config):
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    try:
        return DeepSpeedCPUAdam(groups, lr=lr, weight_decay=weight_decay, adamw_mode=True)
    except Exception as exc:  # a failed C++ build surfaces as many exception types; say what it was for
        raise RuntimeError(f"ZeRO-Offload (the DeepSpeed config's offload_optimizer) steps with DeepSpeed's CPU "
                           f"Adam, which could not be built or loaded here: {exc}") from exc


def lisa_groups(model: nn.Module, lisa: Lisa) -> tuple[list[dict[str, Any]], set[int]]:
    """Optimizer parameter groups: one per block (group i is block i), then everything else, then (with
    lisa.train_embeddings: false) the frozen input embeddings, whose index is returned as never trained: ZeRO gives
    them zero gradients, and a group of their own with learning rate and decay 0 keeps them exactly still, as the
    plain engine (no gradient) does."""
    in_blocks = {id(p) for block in lisa.blocks for p in block.parameters()}
    fixed = {id(p) for p in lisa.frozen_upstream}
    groups = [{"params": list(block.parameters())} for block in lisa.blocks]
    groups.append({"params": [p for p in model.parameters() if id(p) not in in_blocks | fixed]})
    never_trained: set[int] = set()
    if fixed:
        never_trained = {len(groups)}
        groups.append({"params": list(lisa.frozen_upstream)})
    return groups, never_trained


# -- DeepSpeed internals ------------------------------------------------------------------------------------------
# Resetting one group's Adam state needs the fp32 tensors DeepSpeed's inner optimizer steps for it. Every wrapper
# but ZeRO-3 points the inner optimizer's param group at them (torch's public param_groups); ZeRO-3 splits groups
# into sub-groups and fills the inner group only during its step, so only its private attributes say which tensors
# belong to a group. Anything unexpected raises: a renamed attribute must not silently reset nothing (a block would
# then resume the moments and step count of its frozen period). pyproject.toml pins deepspeed below 0.20;
# tests/test_zero.py checks the reset on ZeRO-2 and ZeRO-3 (and under offload, on DeepSpeed's CPU Adam).
# Private, as of DeepSpeed 0.19.8: DeepSpeedZeroOptimizer_Stage3.sub_group_to_group_id (sub-group -> client group)
# and .fp32_partitioned_groups_flat (the fp32 tensor each sub-group steps); tests/test_zero.py::
# test_the_private_deepspeed_internals_scalebio_reads_are_there fails if either moves.

_ZERO3_ATTRIBUTES = ("sub_group_to_group_id", "fp32_partitioned_groups_flat")
_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def _internal(obj: Any, name: str) -> Any:
    if not hasattr(obj, name):
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("deepspeed")
        except PackageNotFoundError:  # pragma: no cover - a DeepSpeed engine exists, so DeepSpeed is installed
            installed = "?"
        raise RuntimeError(f"DeepSpeed {installed}: {type(obj).__name__} has no attribute {name!r}, which "
                           "scalebio reads to reset a LISA block's optimizer state (train/zero.py); this DeepSpeed "
                           "version is not supported (pyproject.toml pins the tested range)")
    return getattr(obj, name)


def _inner(zero_optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that holds the state (DeepSpeed's wrappers keep it in `.optimizer`)."""
    inner = getattr(zero_optimizer, "optimizer", zero_optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise RuntimeError(f"DeepSpeed's optimizer {type(zero_optimizer).__name__} wraps a "
                           f"{type(inner).__name__}, not a torch optimizer: cannot reset LISA blocks' state")
    return inner


def group_partitions(zero_optimizer: Any, group: int, stage: int) -> list[torch.Tensor]:
    """The fp32 tensors the inner optimizer steps for client parameter group `group` on this process."""
    if stage == 3:
        sub_groups = _internal(zero_optimizer, _ZERO3_ATTRIBUTES[0])
        flat = _internal(zero_optimizer, _ZERO3_ATTRIBUTES[1])
        tensors = [flat[sub] for sub, g in sorted(sub_groups.items()) if g == group]
    else:
        tensors = list(_inner(zero_optimizer).param_groups[group]["params"])
    if not tensors:
        raise RuntimeError(f"DeepSpeed (ZeRO stage {stage}) holds no optimizer tensors for parameter group {group}: "
                           "cannot reset the optimizer state of a LISA block that becomes active")
    return tensors


def reset_group_state(zero_optimizer: Any, group: int, stage: int, stepped: bool) -> None:
    """Zero the Adam moments and step count of one parameter group, as if it had never been stepped.

    `stepped`: the optimizer has state (a step was taken or a checkpoint loaded). ZeRO steps every group every step
    (frozen blocks with zero gradients and rate 0), so then every group must have state; none is an error.
    """
    inner = _inner(zero_optimizer)
    for tensor in group_partitions(zero_optimizer, group, stage):
        state = inner.state.get(tensor)
        if not state:
            if stepped:
                raise RuntimeError(f"DeepSpeed (ZeRO stage {stage}): parameter group {group} has no optimizer state "
                                   "after steps were taken; its LISA block would not start fresh")
            continue  # nothing stepped yet: already fresh
        missing = [key for key in _ADAM_STATE if key not in state]
        if missing:
            raise RuntimeError(f"DeepSpeed (ZeRO stage {stage}): the optimizer state of parameter group {group} has "
                               f"no {', '.join(missing)} (keys: {', '.join(state)}); not Adam's state")
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                state[key] = 0


def skip_inference_comm_op() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op when it sets up communication: that op serves
    only `inference_all_reduce` (tensor-parallel inference), never training, and compiling it takes 30-40 s of C++
    on a machine's first run (and a compiler). Only DeepSpeed's CPU accelerator has the op, so elsewhere this
    changes nothing. The op table's own comment allows editing it."""
    import deepspeed.ops

    # deepspeed.ops.__compatible_ops__ (DeepSpeed 0.19.8): module-level, documented as editable in its source;
    # tests/test_distributed.py checks that a CPU run compiles no op.
    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(ops, dict) and "deepspeed_shm_comm" in ops:
        ops["deepspeed_shm_comm"] = False


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
    skip_inference_comm_op()
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    marker = HfDeepSpeedConfig(finalize_deepspeed_config(ds_config, 1, world_size, None, bf16))  # noqa: F841
    yield
