"""train/host_memory: freed tensor memory goes back to the system on a CPU run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, write_recipe
from scalebio_cli.train import host_memory

# Allocates 4 MiB blocks in pairs and frees one of each pair: with glibc's dynamic threshold (raised by the first
# large free) the freed blocks are holes inside the heap, which it keeps; with a fixed threshold each block is an
# mmap of its own, returned on free. Prints the RSS growth that remains after the frees, in MiB.
PROBE = """
import os, sys
import torch
from scalebio_cli.train import host_memory
if sys.argv[1] == "fixed":
    assert host_memory.return_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
torch.ones(2**20)  # a first large block freed: glibc raises its threshold above 4 MiB here
start = rss()
kept, freed = [], []
for _ in range(100):
    freed.append(torch.ones(2**20))
    kept.append(torch.ones(2**20))
del freed
print(rss() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_blocks_go_back_to_the_system() -> None:
    def remaining(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                             env={"PATH": "/usr/bin:/bin"})
        return float(out.stdout.strip().splitlines()[-1])

    heap, fixed = remaining("heap"), remaining("fixed")
    assert heap > 700  # 200 blocks of 4 MiB touched, the 100 freed ones still held
    assert fixed < heap - 300  # the 100 freed blocks (400 MiB) returned


def test_a_users_own_malloc_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert host_memory.return_freed_memory() is False


def test_where_blocks_live_changes_no_weight(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpointed reweight gives freed blocks back (fixed threshold); with the user's own threshold at glibc's
    maximum, activations come from the heap instead. The weights are bitwise the same."""
    weights = []
    for name, tunables in (("given-back", None), ("heap", "glibc.malloc.mmap_threshold=33554432")):
        if tunables:
            monkeypatch.setenv("GLIBC_TUNABLES", tunables)
        recipe = write_recipe(tmp_path / name / "recipe.yaml", demo)
        result = run_cli("reweight", "--config", str(recipe), "reweight.steps=3", "reweight.log_every=1",
                         "reweight.gradient_checkpointing=true", "reweight.micro_batch_size=8")
        assert result.returncode == 0, result.stderr
        weights.append(json.loads(Path(result.stdout.strip()).read_text())["weights"])
    assert weights[0] == weights[1]
