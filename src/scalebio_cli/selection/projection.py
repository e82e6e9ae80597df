"""A seeded Rademacher (random +-1) projection of long gradient vectors to a few dimensions (Johnson-Lindenstrauss,
as LESS uses through TRAK's projector).

`make_projection` picks the projector once per run: on CUDA, TRAK's `fast_jl` kernel (`traker`, what LESS itself
runs; it makes its random signs inside the kernel and holds no matrix) when it is installed; otherwise
`RademacherProjection`, which generates the P x d sign matrix ONCE, on the compute device, in row chunks (each from
its own seeded generator, so a chunk is the same however the matrix is cut), and keeps it for the whole run: as
float32 while small, packed 8 signs a byte beyond that (1/32 of the float size; a chunk is unpacked with two bit
operations when used, never drawn again). A matrix whose packed size would not fit in half the device's free memory
is refused before any work starts, naming the settings that set its size.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from scalebio_cli.errors import InputError

ROWS_PER_CHUNK = 1 << 14
FLOAT_ENTRIES = 1 << 26  # up to this many entries (256 MiB as float32) the matrix is kept unpacked
_SHIFTS = torch.arange(8, dtype=torch.uint8)


class Projector(Protocol):
    dim: int

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor: ...


def packed_bytes(num_inputs: int, dim: int) -> int:
    return num_inputs * ((dim + 7) // 8)


def free_memory(device: torch.device) -> int:
    """Bytes the device has free now (CUDA: the driver's count; CPU: available physical pages)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # no sysconf (not Linux): assume the common 8 GiB free
        return 8 << 30


class RademacherProjection:
    def __init__(self, num_inputs: int, dim: int, seed: int, device: torch.device,
                 float_entries: int = FLOAT_ENTRIES):
        self.num_inputs, self.dim, self.seed, self.device = num_inputs, dim, seed, device
        self.packed = num_inputs * dim > float_entries
        self.chunks = [self._generate(c) for c in range(0, (num_inputs + ROWS_PER_CHUNK - 1) // ROWS_PER_CHUNK)]

    def _generate(self, c: int) -> torch.Tensor:
        rows = min(ROWS_PER_CHUNK, self.num_inputs - c * ROWS_PER_CHUNK)
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + c)
        bits = torch.randint(0, 2, (rows, self.dim), generator=gen, dtype=torch.uint8, device=self.device)
        if not self.packed:
            return bits.float() * 2 - 1
        padded = torch.nn.functional.pad(bits, (0, (-self.dim) % 8)).view(rows, -1, 8)
        return (padded << _SHIFTS.to(self.device)).sum(dim=2, dtype=torch.uint8)

    def signs(self, c: int) -> torch.Tensor:
        """Chunk c of the matrix as float +-1 `[rows, dim]`."""
        chunk = self.chunks[c]
        if not self.packed:
            return chunk
        bits = (chunk.unsqueeze(2) >> _SHIFTS.to(self.device)) & 1
        return bits.view(chunk.shape[0], -1)[:, : self.dim].float() * 2 - 1

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """`[n, P]` float -> `[n, d]`, scaled by 1/sqrt(d) (inner products preserved in expectation)."""
        out = torch.zeros(vectors.shape[0], self.dim, dtype=torch.float32, device=self.device)
        for c, start in enumerate(range(0, self.num_inputs, ROWS_PER_CHUNK)):
            out += vectors[:, start: start + ROWS_PER_CHUNK].float() @ self.signs(c)
        return out / self.dim ** 0.5


class TrakProjection:
    """TRAK's CUDA projector (fast_jl), Rademacher, in its batch size; rows scaled as ours (cosines are what count)."""

    def __init__(self, num_inputs: int, dim: int, seed: int, device: torch.device, batch: int = 32):
        from trak.projectors import CudaProjector, ProjectionType

        self.dim, self.batch = dim, batch
        self.projector = CudaProjector(grad_dim=num_inputs, proj_dim=dim, seed=seed,
                                       proj_type=ProjectionType.rademacher, device=device, max_batch_size=batch)

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        parts = [self.projector.project(vectors[i: i + self.batch].float().contiguous(), model_id=0)
                 for i in range(0, vectors.shape[0], self.batch)]
        return torch.cat(parts).float() / self.dim ** 0.5


def _trak_available() -> bool:
    try:
        import fast_jl  # noqa: F401
        import trak.projectors  # noqa: F401
    except ImportError:
        return False
    return True


def make_projection(num_inputs: int, dim: int, seed: int, device: torch.device) -> Projector:
    """The run's one projector: TRAK's on CUDA when installed, else the matrix made once here (refused, exit 2, when
    it cannot be held)."""
    if device.type == "cuda" and _trak_available():
        return TrakProjection(num_inputs, dim, seed, device)
    need, free = packed_bytes(num_inputs, dim), free_memory(device)
    if num_inputs * dim > FLOAT_ENTRIES and need > free // 2:
        hint = " or install traker[fast] (TRAK's CUDA projector, no matrix held)" if device.type == "cuda" else ""
        raise InputError(f"select.less.projection_dim={dim}: the projection of {num_inputs:,} LoRA parameters needs "
                         f"{need / 2**30:.1f} GiB held on {device} (half the free memory is "
                         f"{free / 2**31:.1f} GiB); lower select.less.projection_dim or select.less.lora_r{hint}")
    return RademacherProjection(num_inputs, dim, seed, device)
