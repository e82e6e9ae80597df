"""LISA: train `n` randomly drawn transformer blocks at a time, re-drawn every `interval` steps.

Everything outside the block list (embeddings, final norm, LM head) stays trainable, as in LMFlow's LISA and
ALGORITHM.md. The draw is a pure function of (seed, draw index), so every rank and both model copies (u and w) get
the same blocks, and a resumed run continues with exactly the draws it would have had. What a re-draw means for the
optimizer (free the frozen blocks' state; or, under DeepSpeed, zero it) is the engine's business. Which
parameters of a block LISA switches is `block_parameters` (default: all of them): over LoRA adapters
(train/lora.py) it is one adapter's parameters in the block, and the frozen base stays frozen.

`train_embeddings` (recipe `lisa.train_embeddings`) chooses between two behaviours below the lowest active block:
- true (default): the backward pass runs through the frozen blocks down to the input embeddings, so they (and
  position embeddings) learn every step, as the method intends;
- false: the input of block 0 is detached, so no backward pass (and no activation memory for it) is spent on the
  frozen blocks below the lowest active one, and the input embeddings are frozen: they learn only through a tied LM
  head. Cheaper, but the embeddings then never adapt (with 2 of 32 blocks the old cut let them learn in 6% of draws).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from torch import nn

from scalebio_cli.train.modeling import find_blocks

_STREAM = 0x115A  # separates LISA's random stream from the data samplers' streams under the same seed


def draw_blocks(num_blocks: int, layers: int, seed: int, draw: int) -> list[int]:
    """The active blocks of draw number `draw` (draw d covers steps [d*interval, (d+1)*interval))."""
    rng = np.random.default_rng([seed, _STREAM, draw])
    return sorted(int(i) for i in rng.choice(num_blocks, size=layers, replace=False))


def upstream_parameters(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Parameter]:
    """Parameters that feed the first block (input and position embeddings, an embedding norm): the modules
    registered before the block list in its parent, minus any parameter shared with the output head (tied)."""
    parent = next((m for m in model.modules() if any(c is blocks for c in m.children())), None)
    if parent is None:
        return []
    before: list[nn.Parameter] = []
    for child in parent.children():
        if child is blocks:
            break
        before += list(child.parameters())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {id(p) for p in head.parameters()} if head is not None else set()
    return [p for p in before if id(p) not in tied]


class Lisa:
    """Freezes and unfreezes the blocks of one model copy."""

    def __init__(self, model: nn.Module, layers: int, interval: int, seed: int, train_embeddings: bool = True,
                 block_parameters: Callable[[nn.Module], list[nn.Parameter]] | None = None):
        self.blocks = find_blocks(model)
        self.block_parameters = block_parameters or (lambda block: list(block.parameters()))
        self.layers = layers
        self.interval = interval
        self.seed = seed
        self.enabled = 0 < layers < len(self.blocks)
        self.train_embeddings = train_embeddings or not self.enabled
        self.active: list[int] = list(range(len(self.blocks)))
        self.draw: int | None = None
        self.frozen_upstream = [] if self.train_embeddings else upstream_parameters(model, self.blocks)
        for p in self.frozen_upstream:
            p.requires_grad_(False)
        if not self.train_embeddings:
            self.blocks[0].register_forward_pre_hook(self._cut_below_blocks, with_kwargs=True)

    @property
    def lowest_active(self) -> int:
        return self.active[0]

    def update(self, step: int) -> bool:
        """Apply the draw that covers `step`; True when the active blocks changed."""
        if not self.enabled or self.draw == step // self.interval:
            return False
        self.draw = step // self.interval
        self.activate(draw_blocks(len(self.blocks), self.layers, self.seed, self.draw))
        return True

    def activate(self, active: list[int]) -> None:
        self.active = sorted(active)
        for i, block in enumerate(self.blocks):
            for p in self.block_parameters(block):
                p.requires_grad_(i in self.active)

    def frozen_parameters(self) -> Iterator[nn.Parameter]:
        for i, block in enumerate(self.blocks):
            if i not in self.active:
                yield from self.block_parameters(block)

    @staticmethod
    def _cut_below_blocks(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Detaching the first block's input stops the backward pass at the lowest block that has trainable weights:
        # frozen blocks below it see inputs that need no gradient, so autograd records nothing for them.
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}
        return None
