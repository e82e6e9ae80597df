"""LISA: train `n` randomly drawn transformer blocks at a time, re-drawn every `interval` steps.

Embeddings, final norm and LM head (everything outside the block list) stay trainable. The draw is a pure function
of (seed, draw index), so every rank and both model copies (u and w) get the same blocks, and a resumed run
continues with exactly the draws it would have had. What a re-draw means for the optimizer (free the frozen
blocks' state; or, under DeepSpeed, zero their learning rate) is the engine's business (engine.py). Blocks below
the lowest active block run without building an autograd graph: their input is detached, so no backward pass (and
no activation memory) is spent on them; the input embedding then learns only through a tied LM head.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch import nn

from scalebio_cli.train.modeling import find_blocks

_STREAM = 0x115A  # separates LISA's random stream from the data samplers' streams under the same seed


def draw_blocks(num_blocks: int, layers: int, seed: int, draw: int) -> list[int]:
    """The active blocks of draw number `draw` (draw d covers steps [d*interval, (d+1)*interval))."""
    rng = np.random.default_rng([seed, _STREAM, draw])
    return sorted(int(i) for i in rng.choice(num_blocks, size=layers, replace=False))


class Lisa:
    """Freezes and unfreezes the blocks of one model copy."""

    def __init__(self, model: nn.Module, layers: int, interval: int, seed: int):
        self.blocks = find_blocks(model)
        self.layers = layers
        self.interval = interval
        self.seed = seed
        self.enabled = 0 < layers < len(self.blocks)
        self.active: list[int] = list(range(len(self.blocks)))
        self.draw: int | None = None
        self.cut_backward = True  # False reproduces the reference implementations (benchmarks only)
        if self.enabled:
            self.blocks[0].register_forward_pre_hook(self._cut_below_active, with_kwargs=True)

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
            for p in block.parameters():
                p.requires_grad_(i in self.active)

    def frozen_parameters(self) -> Iterator[nn.Parameter]:
        for i, block in enumerate(self.blocks):
            if i not in self.active:
                yield from block.parameters()

    def _cut_below_active(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.lowest_active == 0 or not self.cut_backward:
            return None
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}
        return None
