"""The pool a selection scores (every kept example of data.sources) and per-record losses streamed over it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from scalebio_cli.data.batching import MicroBatch, collate
from scalebio_cli.data.read.expand import recipe_sources, validation_sources
from scalebio_cli.data.tokens.render import Renderer
from scalebio_cli.data.tokens.tokenized import TokenizedData
from scalebio_cli.recipe import Recipe
from scalebio_cli.train import loop
from scalebio_cli.train.distributed import DistInfo
from scalebio_cli.train.losses import ResponseLoss, response_losses
from scalebio_cli.train.modeling import load_tokenizer

Advance = Callable[[int], None]


@dataclass
class Pool:
    """The tokenized sources (by name, recipe order) and validation sets of a recipe."""

    sources: dict[str, TokenizedData]
    validation: dict[str, TokenizedData]
    tokenizer: Any
    pad_id: int

    @property
    def size(self) -> int:
        return sum(len(d) for d in self.sources.values())

    def inputs(self, sources: bool = True) -> dict[str, str]:
        """The content of what the pool read, for a results/reuse.py key: each validation set's sha256 and (with
        `sources`) each source's."""
        out = {f"validation {n}": d.sha256 for n, d in self.validation.items()}
        return out | ({f"source {n}": d.sha256 for n, d in self.sources.items()} if sources else {})


def load_pool(recipe: Recipe, dist: DistInfo) -> Pool:
    tokenizer = load_tokenizer(recipe.tokenizer_path, recipe.trust_remote_code, recipe.data.chat_template)
    renderer = Renderer(tokenizer, recipe.data.max_length)
    sources = recipe_sources(recipe)
    validation = validation_sources(recipe)
    named = [(s.key, s) for s in sources.values()] + [(v.key, v) for v in validation.values()]
    loaded = loop.load_data_files(named, renderer, recipe, dist)  # type: ignore[arg-type]
    return Pool(dict(zip(sources, loaded[: len(sources)])), dict(zip(validation, loaded[len(sources):])),
                tokenizer, tokenizer.pad_token_id)


def length_batches(data: TokenizedData, micro_batch_size: int, indices: np.ndarray | None = None
                   ) -> list[np.ndarray]:
    """Positions in `indices` (default: every example) in batches of similar lengths (little padding), each once."""
    lengths = data.lengths if indices is None else data.lengths[indices]
    if not len(lengths):
        return []
    order = np.argsort(lengths, kind="stable")
    return np.array_split(order, math.ceil(len(order) / micro_batch_size))


def shard(n: int, dist: DistInfo) -> np.ndarray:
    """This process's contiguous share of n examples (all of them in one process): rank r scores
    [n r / world, n (r + 1) / world), so the shards laid end to end in rank order are the examples in order."""
    return np.arange(n * dist.rank // dist.world_size, n * (dist.rank + 1) // dist.world_size)


def gather(part: Any, dist: DistInfo) -> Any:
    """Every process's `part` (numpy array or CPU tensor, first axis = its shard), concatenated in rank order."""
    if not dist.distributed:
        return part
    import torch.distributed as tdist

    parts: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(parts, part)
    return torch.cat(parts) if isinstance(part, torch.Tensor) else np.concatenate(parts)


def batch_of(data: TokenizedData, indices: np.ndarray, pad_id: int, device: torch.device) -> MicroBatch:
    return collate([data.example(int(i)) for i in indices], [0] * len(indices), pad_id).to(device)


@torch.no_grad()
def token_losses(model: nn.Module, data: TokenizedData, micro_batch_size: int, pad_id: int, device: torch.device,
                 advance: Advance, dist: DistInfo) -> tuple[np.ndarray, np.ndarray]:
    """Each example's response-token cross-entropy SUM and its response-token count (float64, example order),
    streamed in micro-batches through ResponseLoss (the LM head runs on response positions only, a chunk at a
    time); each process scores its shard, every process gets all."""
    was_training = model.training
    model.eval()
    loss = ResponseLoss(model)
    mine = shard(len(data), dist)
    sums, counts = np.zeros(len(mine)), np.zeros(len(mine))
    for positions in length_batches(data, micro_batch_size, mine):
        s, c = response_losses(loss, batch_of(data, mine[positions], pad_id, device))
        sums[positions], counts[positions] = s.double().cpu().numpy(), c.double().cpu().numpy()
        advance(len(positions))
    model.train(was_training)
    return gather(sums, dist), gather(counts, dist)
