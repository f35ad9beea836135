"""Which process this is: the rank, before and after the process group exists, and the launch's world size."""

from __future__ import annotations

import os

import torch.distributed as dist


def get_rank() -> int:
    """The global rank: from the process group once it exists, else from the launcher's `RANK` variable."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_rank_zero() -> bool:
    return get_rank() == 0


def launch_world_size() -> int:
    """The number of ranks the launcher started (torchrun, the DeepSpeed launcher and accelerate set it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
