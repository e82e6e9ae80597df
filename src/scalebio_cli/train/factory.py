"""Which engine trains the model copies of a stage, chosen from its recipe section, so the stages never branch on it:

- `lora.r > 0`: the copies are LoRA adapters over the one loaded model (train/lora.py), each an AdapterEngine: one
  process or several, all-reducing its own gradients; with a DeepSpeed config all adapters share one DeepSpeed
  engine over the (ZeRO-3: sharded) base, each behind a ZeroAdapterEngine (train/zero_adapters.py);
- a DeepSpeed config: a whole model per copy on a DeepSpeedEngine (train/zero.py);
- otherwise a whole model per copy on our Engine (train/engine.py), under DDP when the world size is above 1.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from scalebio_cli.recipe.schema import LisaConfig, LoraConfig
from scalebio_cli.train.distributed import DistInfo
from scalebio_cli.train.engine import Engine, TrainEngine
from scalebio_cli.train.lora import FINETUNE_ADAPTER, AdapterEngine, Adapters
from scalebio_cli.train.zero import DeepSpeedEngine, zero3_loading


@dataclass(frozen=True)
class Copy:
    """One model copy to train: its learning rate, its micro-batches per step (DeepSpeed's accumulation count), and
    its name as a LoRA adapter (u, w; fine-tuning's one adapter is peft's default, saved at the top of its folder)."""

    lr: float
    micro_batches: int
    name: str = FINETUNE_ADAPTER


def make_engines(model: nn.Module, copies: list[Copy], *, lora: LoraConfig, lora_key: str, lisa: LisaConfig,
                 ds_config: dict[str, Any] | None, dist: DistInfo, reload: Callable[[], nn.Module] | None = None,
                 **common: Any) -> list[TrainEngine]:
    """One engine per copy, in order. `model` is the loaded model (under ZeRO-3 already partitioned: see
    zero.zero3_loading); a whole-model copy beyond the first is a deep copy of it, or under DeepSpeed `reload()`
    (partitioned weights cannot be deep-copied). `common`: weight_decay, max_grad_norm, total_steps, warmup_ratio,
    seed, gradient_checkpointing. `lora_key` names the recipe key in messages (an unknown target module)."""
    if lora.r > 0 and ds_config is not None:
        from scalebio_cli.train.zero_adapters import ZeroAdapterEngine, ZeroAdapters

        pair = ZeroAdapters(model, lora, [(c.name, c.lr, c.micro_batches) for c in copies], lora_key, lisa=lisa,
                            seed=common["seed"], weight_decay=common["weight_decay"],
                            max_grad_norm=common["max_grad_norm"], ds_config=ds_config, dist=dist,
                            gradient_checkpointing=common.get("gradient_checkpointing", False))
        return [ZeroAdapterEngine(pair, c.name, lr=c.lr, total_steps=common["total_steps"],
                                  warmup_ratio=common["warmup_ratio"], dist=dist) for c in copies]
    if lora.r > 0:
        adapters = Adapters(model, lora, [c.name for c in copies], lora_key)
        return [AdapterEngine(adapters, c.name, lr=c.lr, lisa=lisa, dist=dist, **common) for c in copies]
    models = [model]
    for _ in copies[1:]:  # every copy loaded before any engine prepares one for training
        models.append(copy.deepcopy(model) if ds_config is None else _load_again(reload, ds_config, model, dist))
    if ds_config is None:
        return [Engine(m, lr=c.lr, lisa=lisa, dist=dist, **common) for m, c in zip(models, copies)]
    return [DeepSpeedEngine(m, lr=c.lr, lisa=lisa, dist=dist, ds_config=ds_config, micro_batches=c.micro_batches,
                            **common) for m, c in zip(models, copies)]


def _load_again(reload: Callable[[], nn.Module] | None, ds_config: dict[str, Any], like: nn.Module,
                dist: DistInfo) -> nn.Module:
    if reload is None:
        raise ValueError("make_engines: a second DeepSpeed model copy needs `reload`")
    with zero3_loading(ds_config, next(like.parameters()).dtype == torch.bfloat16, dist.world_size):
        return reload()
