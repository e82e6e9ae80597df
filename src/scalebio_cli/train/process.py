"""What the launcher (torchrun, the deepspeed launcher) says about this process: the one place that reads it.

Torch-free, so the CLI and the up-front checks can ask "am I rank 0?" and "how many processes?" before any heavy
import; train/distributed.py builds the process group from the same facts.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0
