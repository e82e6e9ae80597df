"""LoRA: model copies as adapters over one frozen base model (recipe `reweight.lora`, `finetune.lora`).

Reweight holds ONE base model with TWO peft adapters, `u` and `w`: the base (and its embeddings and head) is
frozen and held once, only the adapters and their optimizer state are doubled. `Adapters` is that shared peft
model (and which adapter is in force); each `AdapterEngine` is one adapter on the engine core
(train/engine.AdamWEngine): its forward puts its adapter in force (peft `set_adapter`, which also makes only that
adapter require gradients), its AdamW holds only its adapter's parameters. Both adapters start equal
(w's initialisation is copied from u's; LoRA's B = 0, so both start as the base model).

LISA over adapters (`lisa.layers > 0` with `lora.r > 0`): every block carries both adapters, and only the drawn
blocks' adapters train, re-drawn as LISA re-draws blocks (train/lisa.py: same draws, switched-off adapters give
their optimizer state back and keep their values). The base, its embeddings included, is frozen, so nothing below
the lowest drawn block needs a gradient and autograd's backward pass stops there: with 2 of 30 blocks drawn it runs
through about two thirds of the model, where LoRA alone runs through all of it and adds its adapters' work in
every block. That makes its reweight step faster than LISA's with full model copies (0.80x on SmolLM2 on CPU,
without checkpointing: docs/benchmarks.md), where LoRA in every block is slower (1.09x).

Several processes without DeepSpeed: no DDP wrapper (AdapterEngine._gradients_ready says why); the adapters are
small, so the engine all-reduces its adapter's gradients itself (one flat sum, after the step's last micro-batch).
The losses are global-batch sums, so the summed gradient is the global gradient on every process, as DDP with its
world-size scaling gives. With a DeepSpeed config the adapters run on one DeepSpeed engine instead
(train/zero_adapters.py), which reduces their gradients and, under ZeRO-3, shards the base. The all-reduce stays
for runs without DeepSpeed: DDP cannot do this job (see _gradients_ready), and DeepSpeed is an optional extra a
torchrun LoRA run should not need.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scalebio_cli.data.batching import MicroBatch
from scalebio_cli.errors import InputError
from scalebio_cli.recipe.schema import LisaConfig, LoraConfig
from scalebio_cli.train import distributed
from scalebio_cli.train.engine import AdamWEngine
from scalebio_cli.train.lisa import Lisa
from scalebio_cli.train.losses import ResponseLoss
from scalebio_cli.train.modeling import prepare_for_training
from scalebio_cli.train.optim import LrSchedule

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


class Adapters:
    """The LoRA adapters of one run over one frozen base model: u and w for reweight, one for fine-tuning.

    The engines of a pair share this object, and with it the one peft model: a forward runs whichever adapter peft
    has set, so each engine asks `use` for its own first. This object remembers which adapter (and LISA draw) is
    in force, so consecutive forwards of one engine do not re-apply it.
    """

    def __init__(self, model: nn.Module, cfg: LoraConfig, names: list[str], key: str):
        self.model = add_adapters(model, cfg, names, key)  # the peft model: base + every adapter
        self.cfg, self.key = cfg, key
        self.base: nn.Module = self.model.get_base_model()
        self._in_force: tuple[str, tuple[int, ...]] | None = None

    def parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        return adapter_parameters(self.model, name)

    def use(self, name: str, lisa: Lisa) -> None:
        """Make adapter `name` the one forwards use, with gradients for LISA's drawn blocks only. peft's
        set_adapter makes every parameter of the adapter it activates trainable (and every other adapter's
        frozen), so LISA's draw is applied again after it."""
        wanted = (name, tuple(lisa.active))
        if self._in_force != wanted:
            self.model.set_adapter(name)
            lisa.activate(lisa.active)
            self._in_force = wanted

    def forget(self) -> None:
        """A LISA re-draw changed requires_grad flags behind peft's back: the next `use` applies both again."""
        self._in_force = None


class AdapterEngine(AdamWEngine):
    """One adapter of an `Adapters`, trained by our AdamW, in one process or several (torchrun).

    What differs from the whole-model engine: the optimizer holds this adapter's parameters only, a forward first
    puts this adapter in force, LISA switches this adapter's parameters in the drawn blocks (the base stays frozen),
    gradients are all-reduced here (see the module docstring), and a checkpoint holds the adapter's weights only.
    """

    def __init__(self, adapters: Adapters, adapter: str, *, lr: float, weight_decay: float,
                 max_grad_norm: float | None, total_steps: int, warmup_ratio: float, seed: int,
                 dist: distributed.DistInfo, gradient_checkpointing: bool = False, lisa: LisaConfig | None = None):
        prepare_for_training(adapters.base, gradient_checkpointing)
        named = adapters.parameters(adapter)
        if not named:  # pragma: no cover - add_adapters made it
            raise RuntimeError(f"adapter {adapter!r} has no parameters")
        params = [p for _, p in named]
        own = {id(p) for p in params}
        layers, interval = (lisa.layers, lisa.interval) if lisa is not None else (0, 1)
        # lisa.train_embeddings does not apply: the base, its embeddings included, is frozen anyway.
        blocks = Lisa(adapters.base, layers, interval, seed,
                      block_parameters=lambda block: [p for p in block.parameters() if id(p) in own])
        super().__init__(adapters.model, params, ResponseLoss(adapters.base), blocks,
                         LrSchedule(lr, total_steps, warmup_ratio), dist, weight_decay=weight_decay,
                         max_grad_norm=max_grad_norm)
        self.adapters, self.adapter = adapters, adapter
        self.names, self.params = [n for n, _ in named], params
        self.trainable = params  # the parameters of the blocks LISA has drawn (all of them without LISA)

    def _redrawn(self) -> None:
        """The adapters of blocks switched off give their optimizer state back (and keep their values)."""
        super()._redrawn()
        off = {id(p) for p in self.lisa.frozen_parameters()}
        self.trainable = [p for p in self.params if id(p) not in off]
        self.adapters.forget()

    def __call__(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        self.adapters.use(self.adapter, self.lisa)
        return super().__call__(batch)

    def _gradients_ready(self) -> list[nn.Parameter]:
        """One flat all-reduce of the drawn adapters' gradients, after the step's last micro-batch.

        Why not DDP: DDP wraps a module and reduces the parameters that require grad when it is built, but u and w
        are two adapters in ONE peft model over one shared base, and peft's set_adapter flips which adapter requires
        grad between the u- and w-passes of every step. A DDP per adapter would each wrap (and broadcast) the whole
        shared model, own whichever adapter happened to be set at construction, and need unused-parameter detection
        (a walk of the autograd graph every forward) for LISA's switched-off adapters. The adapters are small: one
        sum per step is exact and simpler.
        """
        params = self.trainable  # adapters LISA switched off have no gradient and are not updated
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.dist.distributed:
            flat = torch.cat([g.reshape(-1) for g in grads])
            distributed.all_reduce_sum(flat, self.dist)
            grads = [g.view_as(p) for g, p in zip(flat.split([g.numel() for g in grads]), params)]
        for p, g in zip(params, grads):
            p.grad = g
        return params

    # -- checkpoints and final weights --------------------------------------------------------------------------

    def _weights(self) -> dict[str, Any]:
        """The adapter's weights only: the base is the model folder's, unchanged."""
        return {"adapter": {n: p.detach().clone() for n, p in zip(self.names, self.params)}}

    def _load_weights(self, saved: dict[str, Any], file: Path) -> None:
        weights = saved.get("adapter")
        if not isinstance(weights, dict) or sorted(weights) != sorted(self.names):
            raise InputError(f"{file}: not a checkpoint of this run's LoRA adapter (its parameters differ); resume "
                             "with the recipe that wrote it")
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(weights[n])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return None  # the stage writes the merged model and the adapter folder (save_merged)


def save_merged(engine: Any, tokenizer: Any, out: Path, gathered: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The adapter folder (OUT/adapter/, peft's format) and the merged model as a plain Hugging Face folder in
    OUT (main process only). `gathered`: under ZeRO-3 the engine's tensors are shards, so the base-with-adapter
    weights gathered from them (engine.full_state_dict) are put into a copy of the model built on the CPU and
    merged there. Returns the merged model."""
    import os
    import shutil
    import tempfile

    from scalebio_cli.train.modeling import save_hf_folder

    model = engine.model if gathered is None else _rebuilt(engine.adapters, engine.adapter, gathered)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-tmp-", dir=out))
    try:
        model.save_pretrained(tmp, selected_adapters=[engine.adapter])
        shutil.rmtree(out / "adapter", ignore_errors=True)
        os.replace(tmp, out / "adapter")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    merged = model.merge_and_unload()
    save_hf_folder(merged, tokenizer, out)
    return merged


def _rebuilt(adapters: Adapters, adapter: str, gathered: dict[str, torch.Tensor]) -> Any:
    """A peft model like `adapters.model` with only `adapter`, its tensors the `gathered` ones: built on the meta
    device (no memory, no initialisation) and then given the gathered tensors, so a 70B model costs its weights
    once, in host memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(adapters.base.config)
    model = add_adapters(fresh, adapters.cfg, [adapter], adapters.key)
    base = model.get_base_model()
    missing, unexpected = base.load_state_dict(gathered, strict=False, assign=True)
    tied = {name for name, p in base.named_parameters(remove_duplicate=False)} - {
        name for name, p in base.named_parameters()}  # names of tied tensors (the head tied to the embeddings)
    left = [k for k in missing if k not in tied and not k.endswith("inv_freq")]
    if left or unexpected:
        raise RuntimeError(f"ZeRO-3's gathered weights do not fit the model: missing {left[:3]}, unexpected "
                           f"{unexpected[:3]}")
    base.tie_weights()
    return model
