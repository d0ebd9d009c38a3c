"""Process-group helpers for ``torchrun`` jobs (one node or many) and for tests (gloo).

Everything here works without ``torch.distributed`` being initialised: a single process is
rank 0 of a world of size 1.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init_from_env(backend: str | None = None, timeout_minutes: float = 30.0) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment, if launched so.

    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise. Returns
    ``(rank, world_size)``; a plain ``python`` launch returns ``(0, 1)`` and initialises
    nothing.
    """
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not launched_by_torchrun():
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()


def local_device() -> torch.device:
    """The CUDA device of this local rank when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier(group=None) -> None:
    if is_initialized():
        dist.barrier(group)
