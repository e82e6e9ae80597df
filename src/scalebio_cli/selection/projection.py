"""A seeded Rademacher (random +-1) projection of long gradient vectors to a few dimensions (Johnson-Lindenstrauss,
as LESS uses through TRAK's projector), without a new dependency.

The P x d matrix is never held whole unless small: its rows come in chunks, each generated from its own seeded
generator, so any chunk is the same whenever it is made. Chunks are kept up to `cache_entries` entries and
regenerated beyond that; callers project many vectors per call so that each chunk is made once per call.
"""

from __future__ import annotations

import torch

ROWS_PER_CHUNK = 1 << 14


class RademacherProjection:
    def __init__(self, num_inputs: int, dim: int, seed: int, device: torch.device, cache_entries: int = 1 << 26):
        self.num_inputs, self.dim, self.seed, self.device = num_inputs, dim, seed, device
        self.cache: dict[int, torch.Tensor] | None = {} if num_inputs * dim <= cache_entries else None

    def _chunk(self, c: int) -> torch.Tensor:
        if self.cache is not None and c in self.cache:
            return self.cache[c]
        rows = min(ROWS_PER_CHUNK, self.num_inputs - c * ROWS_PER_CHUNK)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + c)
        signs = torch.randint(0, 2, (rows, self.dim), generator=gen, dtype=torch.int8)
        chunk = (signs.to(self.device, torch.float32) * 2 - 1)
        if self.cache is not None:
            self.cache[c] = chunk
        return chunk

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """`[n, P]` float -> `[n, d]`, scaled by 1/sqrt(d) (inner products preserved in expectation)."""
        out = torch.zeros(vectors.shape[0], self.dim, dtype=torch.float32, device=self.device)
        for c, start in enumerate(range(0, self.num_inputs, ROWS_PER_CHUNK)):
            out += vectors[:, start: start + ROWS_PER_CHUNK].float() @ self._chunk(c)
        return out / self.dim ** 0.5
