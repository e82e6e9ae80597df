"""LoRA: model copies as adapters over one frozen base model (recipe `reweight.lora`, `finetune.lora`).

Reweight holds ONE base model with TWO peft adapters, `u` and `w`: the base (and its embeddings and head) is
frozen and held once, only the adapters and their optimizer state are doubled. Each `AdapterEngine` is one
adapter behind train/engine.TrainEngine: its forward activates its adapter (peft `set_adapter`, which also makes
only that adapter require gradients), its AdamW holds only its adapter's parameters. Both adapters start equal
(w's initialisation is copied from u's; LoRA's B = 0, so both start as the base model).

LISA over adapters (`lisa.layers > 0` with `lora.r > 0`): every block carries both adapters, and only the drawn
blocks' adapters train, re-drawn as LISA re-draws blocks (train/lisa.py: same draws, switched-off adapters give
their optimizer state back and keep their values). The base, its embeddings included, is frozen, so nothing below
the lowest drawn block needs a gradient and autograd's backward pass stops there: with 2 of 30 blocks drawn it runs
through about two thirds of the model, where LoRA alone runs through all of it and adds its adapters' work in
every block. That makes its reweight step faster than LISA's with full model copies (0.80x on SmolLM2 on CPU,
without checkpointing: docs/benchmarks.md), where LoRA in every block is slower (1.09x).

Several processes: no DDP wrapper. The parameter set a forward uses changes between the u- and w-passes of one
step, which DDP's reducer handles only with unused-parameter detection; the adapters are small, so the engine
all-reduces its adapter's gradients itself (one flat sum, after the step's last micro-batch). The losses are
global-batch sums, so the summed gradient is the global gradient on every process, as DDP with its world-size
scaling gives.
"""

from __future__ import annotations

import re
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scalebio_cli.data.batching import MicroBatch
from scalebio_cli.errors import InputError
from scalebio_cli.recipe.schema import LisaConfig, LoraConfig
from scalebio_cli.train import distributed
from scalebio_cli.train.engine import clip_and_step
from scalebio_cli.train.lisa import Lisa
from scalebio_cli.train.losses import ResponseLoss, response_losses
from scalebio_cli.train.modeling import prepare_for_training
from scalebio_cli.train.optim import AdamW, warmup_cosine

ALL_LINEAR = "all-linear"
FINETUNE_ADAPTER = "default"  # peft saves the default adapter at the top of its folder


def _adaptable_names(model: nn.Module) -> list[str]:
    """Short names of the modules LoRA can adapt (linear layers, GPT-2's Conv1D, embeddings), for messages."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D":
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def peft_config(cfg: LoraConfig, model: nn.Module, key: str) -> Any:
    """peft's LoraConfig for `cfg`; a target module the model lacks is an InputError naming `key`."""
    from peft import LoraConfig as PeftLoraConfig

    targets: Any = list(cfg.target_modules)
    if targets == [ALL_LINEAR]:
        targets = ALL_LINEAR
    else:
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present and not any(n.endswith(f".{t}") for n, _ in
                                                                         model.named_modules())]
        if missing:
            raise InputError(f"{key}.target_modules: {', '.join(missing)}: no such module in "
                             f"{type(model).__name__}; modules LoRA can adapt here: "
                             f"{', '.join(_adaptable_names(model))} (or all-linear)")
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")


def add_adapters(model: nn.Module, cfg: LoraConfig, names: list[str], key: str) -> Any:
    """`model` (frozen) wrapped by peft with one adapter per name; every adapter starts as a copy of the first."""
    from peft import get_peft_model

    config = peft_config(cfg, model, key)
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question (is_gradient_checkpointing)
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, config, adapter_name=names[0])
            for name in names[1:]:
                peft_model.add_adapter(name, config)
    except (ValueError, TypeError) as exc:  # e.g. a target module of a type LoRA cannot adapt (a norm layer)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{key}.target_modules: {first}") from None
    first = adapter_parameters(peft_model, names[0])
    with torch.no_grad():
        for name in names[1:]:
            for (_, src), (_, dst) in zip(first, adapter_parameters(peft_model, name)):
                dst.copy_(src)
    return peft_model


def adapter_parameters(peft_model: nn.Module, name: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of one adapter, in module order (the same order for every adapter)."""
    pattern = re.compile(rf"\.lora_[A-Za-z_]+\.{re.escape(name)}(\.|$)")
    return [(n, p) for n, p in peft_model.named_parameters() if pattern.search(n)]


class AdapterEngine:
    """One LoRA adapter of a shared peft model, trained by our AdamW, in one process or several (torchrun)."""

    def __init__(self, peft_model: nn.Module, adapter: str, *, lr: float, weight_decay: float,
                 max_grad_norm: float | None, total_steps: int, warmup_ratio: float, seed: int,
                 dist: distributed.DistInfo, gradient_checkpointing: bool = False, lisa: LisaConfig | None = None):
        self.model, self.adapter, self.dist = peft_model, adapter, dist
        self.max_grad_norm = max_grad_norm
        base = peft_model.get_base_model()
        prepare_for_training(base, gradient_checkpointing)
        named = adapter_parameters(peft_model, adapter)
        if not named:  # pragma: no cover - add_adapters made it
            raise RuntimeError(f"adapter {adapter!r} has no parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(total_steps, warmup_ratio))
        self.module = ResponseLoss(base)
        own = {id(p) for p in self.params}
        layers, interval = (lisa.layers, lisa.interval) if lisa is not None else (0, 1)
        self.lisa = Lisa(base, layers, interval, seed,
                         block_parameters=lambda block: [p for p in block.parameters() if id(p) in own])
        self.trainable = self.params  # the parameters of the blocks LISA has drawn (all of them without LISA)
        self._lr = lr

    def activate(self) -> None:
        """Make this engine's adapter the one forwards use, with gradients for its drawn blocks only. peft's
        set_adapter makes every parameter of the adapter it activates trainable (and every other adapter's
        frozen); LISA's draw is applied again after it."""
        applied = (self.adapter, tuple(self.lisa.active))
        if getattr(self.model, "_scalebio_trainable", None) != applied:
            self.model.set_adapter(self.adapter)
            self.lisa.activate(self.lisa.active)
            self.model._scalebio_trainable = applied

    def begin_step(self, step: int) -> None:
        """Apply the LISA draw covering `step`: the adapters of blocks switched off give their state back."""
        if self.lisa.update(step):
            frozen = list(self.lisa.frozen_parameters())
            self.optimizer.release(frozen)
            off = {id(p) for p in frozen}
            self.trainable = [p for p in self.params if id(p) not in off]
            self.model._scalebio_trainable = None  # the next forward applies the draw after set_adapter
        self._lr = self.optimizer.param_groups[0]["lr"]

    def __call__(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        self.activate()
        return response_losses(self.module, batch)

    def sync_context(self, sync: bool) -> AbstractContextManager[Any]:
        return nullcontext()  # gradients are reduced once, in `step`

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor | None:
        params = self.trainable  # adapters LISA switched off have no gradient and are not updated
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.dist.distributed:
            flat = torch.cat([g.reshape(-1) for g in grads])
            distributed.all_reduce_sum(flat, self.dist)
            grads = list(flat.split([g.numel() for g in grads]))
            grads = [g.view_as(p) for g, p in zip(grads, params)]
        for p, g in zip(params, grads):
            p.grad = g
        return clip_and_step(params, self.max_grad_norm, self.optimizer, self.scheduler)

    @property
    def lr(self) -> float:
        return self._lr

    # -- checkpoints and final weights --------------------------------------------------------------------------

    def save(self, folder: Path, name: str) -> None:
        """The adapter's weights (the base is the model folder's, unchanged), optimizer and schedule."""
        if self.dist.is_main:
            weights = {n: p.detach().clone() for n, p in zip(self.names, self.params)}
            torch.save({"adapter": weights, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, folder / f"{name}.pt")

    def load(self, folder: Path, name: str) -> None:
        state = torch.load(folder / f"{name}.pt", map_location=self.dist.device, weights_only=True)
        saved = state.get("adapter")
        if not isinstance(saved, dict) or sorted(saved) != sorted(self.names):
            raise InputError(f"{folder / (name + '.pt')}: not a checkpoint of this run's LoRA adapter (its "
                             "parameters differ); resume with the recipe that wrote it")
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(saved[n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return None  # the stage writes the merged model and the adapter folder (save_merged)


def adapter_pair(model: nn.Module, cfg: LoraConfig, key: str, *, lr_u: float, lr_w: float,
                 **kwargs: Any) -> tuple[AdapterEngine, AdapterEngine]:
    """u and w: two adapters over the one frozen `model`, each with its own engine and AdamW."""
    peft_model = add_adapters(model, cfg, ["u", "w"], key)
    return AdapterEngine(peft_model, "u", lr=lr_u, **kwargs), AdapterEngine(peft_model, "w", lr=lr_w, **kwargs)


def single_adapter(model: nn.Module, cfg: LoraConfig, key: str, **kwargs: Any) -> AdapterEngine:
    """Fine-tuning: one adapter over the frozen `model`."""
    return AdapterEngine(add_adapters(model, cfg, [FINETUNE_ADAPTER], key), FINETUNE_ADAPTER, **kwargs)


def save_merged(engine: AdapterEngine, tokenizer: Any, out: Path) -> nn.Module:
    """The adapter folder (OUT/adapter/, peft's format) and the merged model as a plain Hugging Face folder in
    OUT (main process only). Returns the merged model."""
    import os
    import shutil
    import tempfile

    from scalebio_cli.train.modeling import save_hf_folder

    tmp = Path(tempfile.mkdtemp(prefix=".adapter-tmp-", dir=out))
    try:
        engine.model.save_pretrained(tmp, selected_adapters=[engine.adapter])
        shutil.rmtree(out / "adapter", ignore_errors=True)
        os.replace(tmp, out / "adapter")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    merged = engine.model.merge_and_unload()
    save_hf_folder(merged, tokenizer, out)
    return merged
