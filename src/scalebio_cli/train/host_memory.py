"""Give freed tensor memory back to the operating system on CPU runs (glibc), instead of holding it for reuse.

glibc's malloc serves a large request with its own mmap and returns it to the system on free, but only above a
threshold that it raises to the size of each large block freed (the "dynamic mmap threshold", up to 32 MiB on
64-bit). After the first training step nearly every activation, logit chunk and gradient is below the raised
threshold, so it comes from the heap, and the heap keeps what is freed for reuse: a ScaleBiO step on
SmolLM2-135M (two model copies, three passes of different shapes) then holds ~1 GB more than its live tensors,
measured in scripts/bench_reweight.py. Fixing the threshold (which also switches the dynamic raise off) makes
every block above it an mmap of its own, returned when the tensor is freed. The same effect as starting the
process with MALLOC_MMAP_THRESHOLD_ set, which a user's own setting keeps precedence over. Other C libraries
(musl, macOS) and CUDA memory are left alone: the CUDA caching allocator has its own rules.

The price is a page fault for every page of every fresh block (~1.3x the time of a checkpointed SmolLM2 step on 2
cores), so it comes with gradient checkpointing, the setting that already trades time for memory
(modeling.prepare_for_training), not with every run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value: blocks of 32 x 1,024 fp32 and up are mmapped


def user_threshold() -> bool:
    """Did the user choose glibc's mmap threshold themselves (their setting wins)?"""
    return bool(os.environ.get("MALLOC_MMAP_THRESHOLD_")) or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold for this process; False where it was not done (not glibc, or the user set it)."""
    if user_threshold():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (and mallopt's M_MMAP_THRESHOLD)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
