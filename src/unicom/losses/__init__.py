"""Losses: margin heads and the sharded, sampled margin softmax (:class:`PartialFC`)."""

from unicom.losses.margins import (
    AdaCos,
    AdaFace,
    ArcFace,
    CombinedMargin,
    CosFace,
    CurricularFace,
    DynMArcFace,
    LiArcFace,
    MarginContext,
    MarginHead,
)
from unicom.losses.partial_fc import PartialFC, shard_range

__all__ = [
    "ArcFace", "CosFace", "CombinedMargin", "DynMArcFace", "AdaCos", "LiArcFace", "CurricularFace", "AdaFace",
    "MarginHead", "MarginContext", "PartialFC", "shard_range",
]
