"""Data parallelism for the backbone around a sharded :class:`~unicom.losses.PartialFC`.

PartialFC all-gathers the embeddings of every rank and returns to each rank the exact
gradient of the *global* loss (the mean over all ranks' samples) with respect to its own
embeddings. The backbone's gradient is then the sum over ranks of each rank's
backpropagation of that gradient, so DDP must **sum** the backbone gradients: its default
hook averages them, which would divide the learning signal by the number of ranks (and
make a run depend on it). :func:`sum_allreduce_hook` replaces it. PartialFC itself is not
wrapped: its prototypes are sharded, not replicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def sum_allreduce_hook(process_group, bucket):  # DDP rejects a string return annotation
    """DDP communication hook: all-reduce the bucket's gradients with a sum (no division);
    returns a ``torch.futures.Future`` of the summed tensor."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def wrap_backbone(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel with summed gradients when more than one rank
    runs, else ``module`` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )
    ddp.register_comm_hook(None, sum_allreduce_hook)
    return ddp


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if inner is None:
            return module
        module = inner
