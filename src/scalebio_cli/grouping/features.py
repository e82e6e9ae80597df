"""What `scalebio group` clusters: per record, the model's last hidden states mean-pooled over the prompt and over
the response (side by side), and the response's mean token loss under the model.

Topic embeddings of the prompt cannot see a corrupted answer; the hidden states of the whole conversation and the
response loss can ("." answers and shuffled words cost the model far more than a real answer). Features are
computed in chunks of CHUNK examples, each chunk in micro-batches of similar lengths; a finished chunk is saved in
the cache (content-keyed: the data as tokenized, the model's files, the settings), so an interrupted run resumes
and a rerun costs nothing. Under torchrun, chunk c goes to process c % world_size; a chunk is computed the same way
whichever process takes it, so 1 and N processes give the same features. The main process then reads every chunk
(computing any it cannot find, e.g. on a cache folder the other processes do not share).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scalebio_cli.data.batching import collate
from scalebio_cli.data.tokens.tokenized import TokenizedData, default_cache_dir
from scalebio_cli.files import atomic_path
from scalebio_cli.train.distributed import DistInfo
from scalebio_cli.train.losses import ResponseLoss

FEATURE_VERSION = "2"  # bump when what a feature is changes
CHUNK = 256  # examples per cached chunk: the unit of resuming and of sharding over processes
Item = tuple[int, int]  # (source index, example index)


@dataclass
class Features:
    """Per kept example of every source, in pool order (source by source, example order)."""

    hidden: np.ndarray  # [n, 2d] float32: last hidden states mean-pooled over the prompt, and over the response
    loss: np.ndarray  # [n] float64: mean response-token cross-entropy
    source: np.ndarray  # [n] int64: source index
    example: np.ndarray  # [n] int64: example index within its source


def cache_folder(key: dict[str, Any], cache_dir: str | None) -> Path:
    """CACHE/group-features/DIGEST: the digest of the features' key (results/reuse.py: the sources and the model by
    content, and the settings)."""
    from scalebio_cli.results import reuse

    return Path(cache_dir or default_cache_dir()) / "group-features" / reuse.digest(key, 24)


def items_of(datas: list[TokenizedData]) -> list[Item]:
    return [(s, i) for s, data in enumerate(datas) for i in range(len(data))]


def _forward(model: nn.Module, head_only: bool, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden states mean-pooled over the prompt and over the response, side by side [b, 2d]; summed
    response-token loss [b]) of one micro-batch. Pooled apart, a short corrupted answer is not drowned by its
    prompt (as one mean over the whole conversation drowns a "." answer). The LM head runs on response positions
    only where the model allows it (losses.ResponseLoss's rule), else on full logits."""
    if head_only:
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        logits = model.get_output_embeddings()(hidden[batch.loss_rows, batch.loss_cols])
    else:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        hidden, logits = out.hidden_states[-1], out.logits[batch.loss_rows, batch.loss_cols]
    token_ce = F.cross_entropy(logits.float(), batch.loss_targets, reduction="none")
    sums = torch.zeros(batch.input_ids.shape[0], dtype=torch.float32, device=token_ce.device)
    sums.index_add_(0, batch.loss_rows, token_ce)
    response = torch.zeros_like(batch.attention_mask)
    response[batch.loss_rows, batch.loss_cols + 1] = 1  # the response tokens (each predicted from the one before)
    prompt = batch.attention_mask - response
    pooled = [(hidden * m.unsqueeze(-1).to(hidden.dtype)).sum(dim=1) / m.sum(dim=1, keepdim=True).clamp(min=1)
              for m in (prompt, response)]
    return torch.cat(pooled, dim=1).float(), sums


@torch.no_grad()
def chunk_features(model: nn.Module, datas: list[TokenizedData], items: list[Item], micro_batch_size: int,
                   pad_id: int, device: torch.device) -> dict[str, np.ndarray]:
    """The features of `items` (in their order), computed in micro-batches of similar lengths."""
    head_only = ResponseLoss(model).head_only
    lengths = np.asarray([datas[s].length(i) for s, i in items])
    order = np.argsort(lengths, kind="stable")
    hidden: np.ndarray | None = None
    loss = np.zeros(len(items), dtype=np.float64)
    for rows in np.array_split(order, max(1, math.ceil(len(order) / micro_batch_size))):
        batch = collate([datas[items[r][0]].example(items[r][1]) for r in rows], [0] * len(rows), pad_id).to(device)
        pooled, sums = _forward(model, head_only, batch)
        if hidden is None:
            hidden = np.zeros((len(items), pooled.shape[1]), dtype=np.float32)
        hidden[rows] = pooled.cpu().numpy()
        loss[rows] = (sums / batch.loss_counts.clamp(min=1)).double().cpu().numpy()
    return {"hidden": hidden if hidden is not None else np.zeros((0, 0), np.float32), "loss": loss}


def _chunk_path(folder: Path, c: int) -> Path:
    return folder / f"chunk-{c:06d}.npz"


def _read_chunk(path: Path, size: int) -> dict[str, np.ndarray] | None:
    """A saved chunk, or None when absent or damaged (then it is computed again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            arrays = {"hidden": f["hidden"], "loss": f["loss"]}
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return arrays if len(arrays["loss"]) == size and len(arrays["hidden"]) == size else None


def _save_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # an unwritable cache only costs time
    with contextlib.suppress(OSError), atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


Compute = Callable[[list[Item]], dict[str, np.ndarray]]


def compute(folder: Path, items: list[Item], dist: DistInfo, run: Compute, advance: Callable[[int], None]
            ) -> Features | None:
    """Every chunk's features (from the cache where saved); this process takes its share of the chunks to compute.
    Returns the features on the main process (None on the others)."""
    from scalebio_cli.train.distributed import barrier

    chunks = [items[c: c + CHUNK] for c in range(0, len(items), CHUNK)]
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(dist.rank, len(chunks), dist.world_size):
        path = _chunk_path(folder, c)
        if _read_chunk(path, len(chunks[c])) is None:
            _save_chunk(path, run(chunks[c]))
        advance(len(chunks[c]))
    barrier(dist)
    if not dist.is_main:
        return None
    parts = []
    for c, chunk in enumerate(chunks):
        arrays = _read_chunk(_chunk_path(folder, c), len(chunk))
        if arrays is None:  # another process's chunk that this one cannot see: computed here
            arrays = run(chunk)
            _save_chunk(_chunk_path(folder, c), arrays)
        parts.append(arrays)
    width = next((p["hidden"].shape[1] for p in parts if p["hidden"].size), 0)
    return Features(np.concatenate([p["hidden"].reshape(-1, width) for p in parts]).astype(np.float32),
                    np.concatenate([p["loss"] for p in parts]),
                    np.asarray([s for s, _ in items], dtype=np.int64), np.asarray([i for _, i in items],
                                                                                   dtype=np.int64))
