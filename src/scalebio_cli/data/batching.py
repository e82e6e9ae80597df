"""Which examples each step sees, and how they become padded tensors on each process.

Every process draws the same *global* batch from the same seeded samplers, then keeps its own shard. So every
process knows, without communicating, how many examples of each source the global batch holds and how many
validation tokens it has: the normalisers of the per-source means and of L1. The loss of any micro-batch on any
process is then a plain weighted sum, and gradient accumulation and data parallelism give exactly the gradient of
the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from scalebio_cli.data.tokens.lazy_tokens import LazyTokens
from scalebio_cli.data.tokens.tokenized import TokenizedData


class CursorSampler:
    """Endless sampling without replacement from `n` items: one seeded permutation per epoch.

    The whole state is `cursor` (items drawn so far), so a checkpoint stores one integer.
    """

    def __init__(self, n: int, seed: int, stream: int, cursor: int = 0):
        self.n, self.seed, self.stream, self.cursor = n, seed, stream, cursor
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n)
        return self._perm

    def take(self, k: int) -> np.ndarray:
        out = np.empty(k, dtype=np.int64)
        for j in range(k):
            epoch, pos = divmod(self.cursor + j, self.n)
            out[j] = self._permutation(epoch)[pos]
        self.cursor += k
        return out


class RecordSampler:
    """A CursorSampler over the records of a source that passes over records keeping no response token within
    max_length, returning example indices (TokenizedData's, or LazyTokens' slots).

    Sampling records rather than kept examples is what lets a lazy source draw before anything is tokenized; a
    source whose records are all kept draws exactly the permutation a sampler over its examples would. Whether a
    record is kept depends only on its tokens, so every process skips the same records and the cursor (records
    drawn, skipped ones included) stays the whole state.
    """

    def __init__(self, data: TokenizedData | LazyTokens, seed: int, stream: int, cursor: int = 0):
        self.data = data
        self.records = CursorSampler(data.num_records, seed, stream, cursor)

    @property
    def cursor(self) -> int:
        return self.records.cursor

    @cursor.setter
    def cursor(self, value: int) -> None:
        self.records.cursor = value

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:  # exactly the records needed each round: the cursor stops after the k-th kept one
            slots = self.data.resolve(self.records.take(k - len(out)).tolist())
            out += [s for s in slots if s is not None]
        return out


def balanced_counts(batch_size: int, num_sources: int, step: int) -> list[int]:
    """Examples per source in a step's batch: as equal as possible, the remainder rotating over sources."""
    base, extra = divmod(batch_size, num_sources)
    return [base + int((k - step) % num_sources < extra) for k in range(num_sources)]


@dataclass
class MicroBatch:
    """Padded token ids plus where the loss is taken, worked out on the CPU so the loss needs no device sync."""

    input_ids: torch.Tensor  # [b, T] long
    attention_mask: torch.Tensor  # [b, T] long
    source: torch.Tensor  # [b] long, source index (K = the validation set in reweight)
    loss_rows: torch.Tensor  # [n] long: row of each response token ...
    loss_cols: torch.Tensor  # [n] long: ... and the position whose logits predict it (token position - 1)
    loss_targets: torch.Tensor  # [n] long: the response token ids
    loss_counts: torch.Tensor  # [b] float32: response tokens per row
    position: torch.Tensor  # [b] long: each row's position in the step's global batch (all processes together)
    num_tokens: int  # non-padding tokens

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_rows.shape[0])

    def to(self, device: torch.device) -> MicroBatch:
        nb = device.type == "cuda"
        moved = [t.to(device, non_blocking=nb) for t in (self.input_ids, self.attention_mask, self.source,
                                                          self.loss_rows, self.loss_cols, self.loss_targets,
                                                          self.loss_counts, self.position)]
        return MicroBatch(*moved, self.num_tokens)


def collate(examples: list[tuple[np.ndarray, np.ndarray]], sources: list[int], pad_id: int,
            pin: bool = False, rows_at: list[int] | None = None) -> MicroBatch:
    """Right-pad token ids to the longest example and list the response positions (pinned memory for a GPU).
    `rows_at`: each example's position in the step's global batch (default: its row)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(examples), width), dtype=np.int64)
    trainable = np.zeros((len(examples), width), dtype=bool)
    for row, (ids, mask) in enumerate(examples):
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
        trainable[row, : len(ids)] = mask
    # Token t is predicted by the logits at t - 1; position 0 is predicted by nothing.
    rows, positions = np.nonzero(trainable[:, 1:])
    positions = positions + 1
    tensors = [torch.from_numpy(input_ids), torch.from_numpy(attention), torch.tensor(sources, dtype=torch.long),
               torch.from_numpy(rows), torch.from_numpy(positions - 1), torch.from_numpy(input_ids[rows, positions]),
               torch.from_numpy(trainable[:, 1:].sum(axis=1).astype(np.float32)),
               torch.tensor(range(len(examples)) if rows_at is None else rows_at, dtype=torch.long)]
    if pin:  # lets .to(cuda, non_blocking=True) overlap the copy with compute
        tensors = [t.pin_memory() for t in tensors]
    return MicroBatch(*tensors, int(attention.sum()))


def num_micro_batches(num_items: int, micro_batch_size: int) -> int:
    """How many forward passes `micro_batches` makes of `num_items` items (DeepSpeed must know it up front)."""
    return -(-num_items // micro_batch_size)


def micro_batches(items: list[tuple[int, int]], data: Sequence[TokenizedData | LazyTokens], micro_batch_size: int,
                  pad_id: int, pin: bool = False, positions: list[int] | None = None) -> list[MicroBatch]:
    """Split one process's `(source, example)` items into micro-batches of similar lengths (less padding).
    `positions`: each item's position in the step's global batch (default: its position in `items`).

    The chunk count depends only on len(items), so every process runs the same number of forward passes.
    """
    if not items:
        return []
    where = list(range(len(items))) if positions is None else positions
    order = sorted(range(len(items)), key=lambda j: data[items[j][0]].length(items[j][1]))
    chunks = np.array_split(np.arange(len(order)), num_micro_batches(len(order), micro_batch_size))
    batches = []
    for chunk in chunks:
        picked = [order[i] for i in chunk]
        batches.append(collate([data[items[j][0]].example(items[j][1]) for j in picked],
                               [items[j][0] for j in picked], pad_id, pin, [where[j] for j in picked]))
    return batches


def response_token_count(items: list[tuple[int, int]], data: Sequence[TokenizedData | LazyTokens]) -> int:
    """Tokens that carry loss in these examples (position 0 predicts nothing, so it never counts)."""
    total = 0
    for s, i in items:
        _, mask = data[s].example(i)
        total += int(mask[1:].sum())
    return total


T = TypeVar("T")


class Prefetcher(Generic[T]):
    """Builds step t+1's batches on a worker thread while step t computes (sampling, padding and pinning, and for
    a lazy source tokenizing the records drawn, which would otherwise sit between two steps)."""

    def __init__(self, build: Callable[[int], T], steps: range):
        self.build, self.steps = build, steps
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scalebio-prefetch")
        self.pending: dict[int, Future[T]] = {}

    def get(self, step: int) -> T:
        future = self.pending.pop(step, None) or self.pool.submit(self.build, step)
        result = future.result()
        if step + 1 in self.steps:
            self.pending[step + 1] = self.pool.submit(self.build, step + 1)
        return result

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
