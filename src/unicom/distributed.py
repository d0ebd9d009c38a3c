"""Process-group helpers for ``torchrun`` jobs (one node or many) and for tests (gloo).

Everything here works without ``torch.distributed`` being initialised: a single process is
rank 0 of a world of size 1.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterator

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


def launched_world_size() -> int:
    """The processes of the torchrun launch this process belongs to (1 without torchrun),
    known before any process group exists."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


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
        torch.cuda.set_device(local_device())
    _bind_group_defaults()
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()


def _bind_group_defaults() -> None:
    """Import ``torch.distributed.nn`` while no process group exists.

    Its functions take ``group=group.WORLD`` as a default argument, evaluated on import: a
    module imported after the group is made (open_clip's loss imports it) keeps the group in
    ten defaults, so :func:`shutdown` cannot free it, its gloo threads outlive the command,
    and the group's destruction during interpreter shutdown aborts the process now and then
    ("terminate called without an active exception"). Imported first, the defaults are None
    (the default group at call time).
    """
    try:
        import torch.distributed.nn  # noqa: F401
    except ImportError:  # a build without it: nothing captures the group
        pass


@contextlib.contextmanager
def process_group(backend: str | None = None) -> Iterator[tuple[int, int]]:
    """:func:`init_from_env` for the length of a command, torn down cleanly at its end.

    Yields ``(rank, world_size)``. When the body succeeds, every rank waits for the others
    (a barrier) before the group is destroyed, so no rank closes its connections while a
    peer still sends on them; the group is destroyed while the interpreter is fully alive,
    as a group left to interpreter shutdown, its worker threads still running, aborts the
    process ("terminate called without an active exception"). After an error the group is
    destroyed without waiting (gloo only: NCCL's teardown is collective and would hang on
    a dead peer; ``torchrun`` stops the other ranks). A group initialised by the caller is
    left alone.
    """
    ours = not is_initialized()
    rank, world_size = init_from_env(backend)
    succeeded = False
    try:
        yield rank, world_size
        succeeded = True
    finally:
        if ours and is_initialized():
            shutdown(wait=succeeded)


def shutdown(wait: bool = True) -> None:
    """Destroy the default process group (and every other): after a barrier when ``wait``;
    without one only for gloo (see :func:`process_group`)."""
    if not is_initialized():
        return
    if wait:
        dist.barrier()
    elif dist.get_backend() != "gloo":
        return
    dist.destroy_process_group()


def local_device() -> torch.device:
    """The CUDA device of this local rank when CUDA is present, else the CPU.

    Raises :class:`InputError` when the node runs more processes than it has GPUs.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= count:
        from unicom.errors import InputError

        raise InputError(
            f"LOCAL_RANK={local_rank} but this node has {count} CUDA device(s): start at most {count} "
            f"process(es) per node (torchrun --nproc_per_node {count}), or run on the CPU")
    return torch.device("cuda", local_rank)


def waiting_group(days: float = 7.0):
    """A gloo group of every rank whose collectives wait up to ``days`` (None without a
    process group). For ranks that wait while others work, such as a rank whose share of the
    parts is done waiting for the slowest: the default group's timeout (30 minutes) would
    stop a healthy job there. A rank that dies does not leave the others waiting: torchrun
    stops them. Collective: every rank must call it, at the same point."""
    if not is_initialized():
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(days=days))


def barrier(group=None) -> None:
    if is_initialized():
        dist.barrier(group)


def broadcast_object(value):
    """Rank 0's ``value`` (any picklable object) on every rank: one decision for all."""
    if get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_object(value, group=None) -> list:
    """``value`` (any picklable object) of every rank, in rank order; ``group``: the process
    group to gather over (default: the world's)."""
    if get_world_size(group) == 1:
        return [value]
    gathered: list = [None] * get_world_size(group)  # one per rank of the group, as torch requires
    dist.all_gather_object(gathered, value, group=group)
    return gathered


SHARED_WAIT_ENV = "UNICOM_SHARED_FOLDER_WAIT"  # seconds a rank looks for rank 0's marker file (default 60)


def require_shared_folder(folder: str | os.PathLike, option: str, why: str, wait_seconds: float | None = None) -> None:
    """Refuse, on every rank, a ``folder`` that some rank does not see as rank 0 does.

    Under ``torchrun --nnodes N`` a path names one folder only when it lies on a file system
    every node mounts; on a node's own disk (or given relative to working folders that
    differ) each node has a folder of its own. Rank 0 creates ``folder`` and writes a marker
    file with a random name into it; every rank looks for it (for up to ``wait_seconds``, by
    default ``UNICOM_SHARED_FOLDER_WAIT`` or 60: an NFS client may cache a name's absence
    for up to a minute) and the marker is removed. An
    :class:`~unicom.errors.InputError` names the ranks, their hosts and the paths they
    looked at, and says ``why`` the folder must be one. A folder rank 0 cannot write is
    left to the caller's own write to report. Collective: every rank calls it, at the same
    point; nothing is done in a world of one.
    """
    if get_world_size() == 1:
        return
    folder = Path(folder)
    rank = get_rank()
    marker = folder / f".shared-{broadcast_object(secrets.token_hex(8))}"
    written = None
    if rank == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            marker.write_text(marker.name)
            written = True
        except OSError:
            written = False
    if not broadcast_object(written):
        return
    if wait_seconds is None:
        wait_seconds = float(os.environ.get(SHARED_WAIT_ENV) or 60)
    deadline = time.monotonic() + wait_seconds
    while not (seen := _lists(folder, marker.name)) and time.monotonic() < deadline:
        time.sleep(0.5)
    views = all_gather_object((seen, socket.gethostname(), str(folder.absolute())))
    if rank == 0:
        marker.unlink(missing_ok=True)
    blind = [f"rank {r} (host {host}, {path})" for r, (saw, host, path) in enumerate(views) if not saw]
    if blind:
        from unicom.errors import InputError

        raise InputError(
            f"{option}={folder}: {', '.join(blind)} {'does' if len(blind) == 1 else 'do'} not see the folder that rank 0 (host {views[0][1]}) writes "
            f"to, {views[0][2]}; {why}, so it must be one folder that every node sees: give a path on a file "
            f"system that every node mounts, the same path on each (an absolute one)")


def _lists(folder: Path, name: str) -> bool:
    """Whether ``folder`` holds a file ``name``: looked up, then listed (a listing is read
    from the server where a network file system may answer a lookup from its cache)."""
    if (folder / name).is_file():
        return True
    try:
        return name in os.listdir(folder)
    except OSError:
        return False


def all_gather_tensor(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``tensor`` (rows along dim 0) of every rank of ``group``, in rank order."""
    world_size = get_world_size(group)
    tensor = tensor.contiguous()
    out = torch.empty((world_size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    gather(out, tensor, group=group)
    return out


def reduce_scatter_tensor(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks and return this rank's block of rows."""
    world_size = get_world_size(group)
    tensor = tensor.contiguous()
    out = torch.empty((tensor.shape[0] // world_size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, tensor, group=group)
    return out
