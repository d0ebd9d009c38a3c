"""Margin functions: cosines of (embedding, prototype) pairs -> scaled logits.

Every head is called as ``head(cosines, labels) -> logits``:

* ``cosines``: (B, C) cosine similarities, any float dtype;
* ``labels``: (B,) int64, the column of each row's target class in ``cosines``, or -1 when
  the row's class is not among the columns (it lives on another shard of a
  :class:`~unicom.losses.PartialFC`);
* ``logits``: (B, C) float32 (float64 if the cosines are float64), ready for a softmax.

Heads that need more than the cosines (the global class ids, the embedding norms, the
target cosine of rows whose target lives on another shard) receive a
:class:`MarginContext` as a third argument from ``PartialFC``; called directly, they build
one from the arguments (a single shard holding every class).

This module is the one implementation of the margin mathematics in the project.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class MarginContext:
    """What a margin head may need beyond ``(cosines, labels)``.

    Attributes:
        class_ids: (B,) int64 global class of every row (the softmax's target class).
        column_classes: (C,) int64 global class of every column of ``cosines``.
        norms: (B,) float, the L2 norms of the embeddings before normalisation (AdaFace).
        group: the process group over which the columns are sharded (None: one shard).
        world_size: number of shards.
    """

    class_ids: torch.Tensor
    column_classes: torch.Tensor
    norms: torch.Tensor | None = None
    group: Any = None
    world_size: int = 1

    def target_cosine(self, cosines: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,) the cosine of each row with its target prototype, gathered over the shards."""
        has_target = labels >= 0
        value = torch.zeros(labels.shape[0], dtype=cosines.dtype, device=cosines.device)
        value[has_target] = cosines[has_target, labels[has_target]].detach()
        if self.world_size > 1:
            dist.all_reduce(value, group=self.group)
        return value

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the shards in place (no-op with one shard)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor


def local_context(cosines: torch.Tensor, labels: torch.Tensor) -> MarginContext:
    """The context of a call without ``PartialFC``: one shard holds every class."""
    columns = torch.arange(cosines.shape[1], device=cosines.device)
    return MarginContext(class_ids=labels.clamp_min(0), column_classes=columns)


def _float_logits(cosines: torch.Tensor) -> torch.Tensor:
    """A float32 (or float64) copy of ``cosines`` that may be modified in place."""
    dtype = torch.float64 if cosines.dtype == torch.float64 else torch.float32
    return cosines.to(dtype, copy=True)


class MarginHead(nn.Module):
    """Base class: subclasses implement :meth:`target_logit` (and may override ``forward``).

    The default ``forward`` replaces the target entry of every row that has one by
    ``target_logit(cos_target, rows)`` and multiplies all logits by ``scale``.
    """

    scale: float

    def target_logit(self, cos_target: torch.Tensor, rows: torch.Tensor, context: MarginContext) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, cosines: torch.Tensor, labels: torch.Tensor, context: MarginContext | None = None) -> torch.Tensor:
        if context is None:
            context = local_context(cosines, labels)
        logits = _float_logits(cosines)
        rows = torch.nonzero(labels >= 0).squeeze(1)
        columns = labels[rows]
        logits[rows, columns] = self.target_logit(logits[rows, columns], rows, context)
        return logits * self.scale


def _angle(cos: torch.Tensor) -> torch.Tensor:
    # acos has an infinite derivative at +-1; keep strictly inside
    eps = 1e-7 if cos.dtype == torch.float32 else 1e-12
    return torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))


class CombinedMargin(MarginHead):
    """cos(m1·θ + m2) − m3 on the target class, logits scaled by ``scale``.

    ``m1=1, m2=m, m3=0`` is ArcFace, ``m1=1, m2=0, m3=m`` is CosFace. Where the angle
    m1·θ + m2 would pass π (so that cos would rise again and the loss reward a worse
    angle), the target logit falls back to cos θ − m3 − m2·sin(m2), the standard
    monotonic continuation of ArcFace implementations.
    """

    def __init__(self, m1: float = 1.0, m2: float = 0.3, m3: float = 0.0, scale: float = 64.0):
        super().__init__()
        if m1 <= 0:
            raise ValueError(f"m1 must be positive, got {m1}")
        self.m1, self.m2, self.m3, self.scale = float(m1), float(m2), float(m3), float(scale)

    def target_logit(self, cos_target, rows, context):
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos_target - self.m3
        angle = self.m1 * _angle(cos_target) + self.m2
        fallback = cos_target - self.m3 - self.m2 * math.sin(self.m2)
        return torch.where(angle <= math.pi, torch.cos(angle) - self.m3, fallback)

    def extra_repr(self) -> str:
        return f"m1={self.m1}, m2={self.m2}, m3={self.m3}, scale={self.scale}"


class ArcFace(CombinedMargin):
    """Additive angular margin: cos(θ + margin) on the target class (Deng et al. 2019)."""

    def __init__(self, margin: float = 0.3, scale: float = 64.0):
        super().__init__(m1=1.0, m2=margin, m3=0.0, scale=scale)
        self.margin = float(margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, scale={self.scale}"


class CosFace(CombinedMargin):
    """Additive cosine margin: cos θ − margin on the target class (Wang et al. 2018)."""

    def __init__(self, margin: float = 0.35, scale: float = 64.0):
        super().__init__(m1=1.0, m2=0.0, m3=margin, scale=scale)
        self.margin = float(margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, scale={self.scale}"
