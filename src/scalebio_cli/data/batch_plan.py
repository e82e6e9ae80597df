"""Which examples each reweight step sees: the seeded draws of every source and validation set, and how they become
one process's micro-batches (`BatchPlan`), and what a step receives (`StepBatches`).

One sampling rule for every source, whatever the cache holds: each source is drawn by *record* position (a seeded
permutation per epoch), passing over records that keep no response token within max_length (batching's
RecordSampler). A source tokenized whole and the same source tokenized as drawn (lazy_tokens) give the same draws,
so an `eval` or `finetune` that filled the token cache changes nothing, and a checkpoint's cursor means one thing.

Pairing (ALGORITHM.md, "Noise in the lam step"): u's and w's per-source losses come from the same micro-batches of
the training batch B (the same shapes, the same order); w's validation examples come in micro-batches of their own
after them. Each row carries its position in the global batch, so the per-example losses of all processes can be
summed into one vector in which every entry comes from exactly one process: the per-source means are then the
same sums in the same order on 1 or N processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from scalebio_cli.data.batching import MicroBatch, RecordSampler, balanced_counts, micro_batches, response_token_count
from scalebio_cli.data.tokens.lazy_tokens import LazyTokens
from scalebio_cli.data.tokens.tokenized import TokenizedData
from scalebio_cli.errors import InputError
from scalebio_cli.recipe import Recipe
from scalebio_cli.train.distributed import DistInfo

Tokens = TokenizedData | LazyTokens
VALIDATION_STREAM = 10_000  # sampler stream of validation set j is VALIDATION_STREAM + j; source k uses stream k
_POOLED_STREAM = 0xB001  # the per-step source counts of pooled batches
# What a saved cursor counts: records drawn (skipped ones included). A checkpoint without this tag counted
# something else (kept examples, for sources tokenized whole) and cannot be continued exactly.
SAMPLING_RULE = "records/1"


@dataclass
class StepBatches:
    """One step's data on this process, with the global quantities every process agrees on."""

    train: list[MicroBatch]  # this process's share of B: u's pass, and the first part of w's
    val: list[MicroBatch]  # this process's share of V (rows of validation set j have source K + j): w only
    train_sources: torch.Tensor  # [|B|] long: the source of each example of the global batch B
    val_sets: torch.Tensor  # [|V|] long: the validation set of each example of the global batch V
    source_counts: torch.Tensor  # [K] examples of each source in B
    val_tokens: torch.Tensor  # [J] float32: response tokens of each validation set in V
    val_weights: torch.Tensor  # [J] float32: each validation set's share of L1 (they sum to 1)
    num_tokens: int  # non-padding tokens this process feeds through u and w
    sampler_state: dict[str, Any]  # sampler positions after this step's draws (what a checkpoint stores)

    def to(self, device: torch.device) -> StepBatches:
        return StepBatches([b.to(device) for b in self.train], [b.to(device) for b in self.val],
                           self.train_sources.to(device), self.val_sets.to(device), self.source_counts.to(device),
                           self.val_tokens.to(device), self.val_weights.to(device), self.num_tokens,
                           self.sampler_state)

    def l1(self, l1_sums: torch.Tensor) -> torch.Tensor:
        """Per-set L1_j (token means over each set's batch) from their token-loss sums."""
        return l1_sums / self.val_tokens


class BatchPlan:
    """Seeded samplers for every source and validation set; the same draws on every process.

    Every step holds every validation set: val_batch_size is split over them as evenly as possible.
    `next` runs on the prefetch thread (batching.Prefetcher): it only touches numpy and CPU tensors.
    """

    def __init__(self, sources: list[Tokens], vals: list[Tokens], val_weights: list[float], recipe: Recipe,
                 dist: DistInfo, pad_id: int):
        self.data = [*sources, *vals]  # validation set j is "source" K + j
        seed, rw = recipe.seed, recipe.reweight
        self.samplers = [RecordSampler(d, seed, k) for k, d in enumerate(sources)]
        self.val_samplers = [RecordSampler(v, seed, VALIDATION_STREAM + j) for j, v in enumerate(vals)]
        sizes = np.asarray([d.num_records for d in sources], dtype=np.float64)  # records, as drawn
        self.pool, self.seed = sizes / sizes.sum(), seed
        self.batch_size, self.val_batch_size, self.composition = rw.batch_size, rw.val_batch_size, rw.batch_composition
        self.micro_batch_size, self.dist, self.pad_id = rw.micro_batch_size, dist, pad_id
        self.val_weights = torch.tensor(val_weights, dtype=torch.float32)
        self.pin = dist.device.type == "cuda"

    def source_counts(self, step: int) -> list[int]:
        if self.composition == "pooled":  # the reference's batches: proportional to source sizes
            rng = np.random.default_rng([self.seed, _POOLED_STREAM, step])
            return rng.multinomial(self.batch_size, self.pool).tolist()
        return balanced_counts(self.batch_size, len(self.samplers), step)

    def next(self, step: int) -> StepBatches:
        k_val = len(self.samplers)
        counts = self.source_counts(step)
        items = [(k, int(i)) for k, n in enumerate(counts) for i in self.samplers[k].take(n)]
        val_counts = balanced_counts(self.val_batch_size, len(self.val_samplers), step)
        val_items = [(k_val + j, int(i)) for j, n in enumerate(val_counts) for i in self.val_samplers[j].take(n)]
        val_tokens = torch.tensor([response_token_count([it for it in val_items if it[0] == k_val + j], self.data)
                                   for j in range(len(val_counts))], dtype=torch.float32)
        train = self._shard(items)
        val = self._shard(val_items)
        source_counts = torch.tensor(counts, dtype=torch.float32)
        return StepBatches(train, val, torch.tensor([k for k, _ in items], dtype=torch.long),
                           torch.tensor([k - k_val for k, _ in val_items], dtype=torch.long),
                           source_counts.pin_memory() if self.pin else source_counts,
                           val_tokens=val_tokens, val_weights=self.val_weights,
                           num_tokens=sum(b.num_tokens for b in train) * 2 + sum(b.num_tokens for b in val),
                           sampler_state=self.state_dict())

    def _shard(self, items: list[tuple[int, int]]) -> list[MicroBatch]:
        """This process's items (every world_size-th, from its rank) in micro-batches, rows tagged with their
        position in the global list."""
        rank, world = self.dist.rank, self.dist.world_size
        return micro_batches(items[rank::world], self.data, self.micro_batch_size, self.pad_id, self.pin,
                             positions=list(range(len(items)))[rank::world])

    def state_dict(self) -> dict[str, Any]:
        cursors = [s.cursor for s in self.val_samplers]
        return {"rule": SAMPLING_RULE, "sources": [s.cursor for s in self.samplers],
                "validation": cursors[0] if len(cursors) == 1 else cursors}

    def load_state_dict(self, state: dict[str, Any], where: str = "checkpoint") -> None:
        if state.get("rule") != SAMPLING_RULE:
            raise InputError(f"{where}: its data position was saved by an older version, which counted draws "
                             "differently for sources tokenized whole; it cannot be continued exactly. Start the run "
                             "again without --resume (or into a new output_dir)")
        for sampler, cursor in zip(self.samplers, state["sources"]):
            sampler.cursor = cursor
        cursors = state["validation"] if isinstance(state["validation"], list) else [state["validation"]]
        for sampler, cursor in zip(self.val_samplers, cursors):
            sampler.cursor = cursor
