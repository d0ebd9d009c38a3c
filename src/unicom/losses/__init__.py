"""Losses: margin heads and the sharded, sampled margin softmax (:class:`PartialFC`)."""

from unicom.losses.margins import ArcFace, CombinedMargin, CosFace, MarginContext, MarginHead
from unicom.losses.partial_fc import PartialFC, shard_range

__all__ = ["ArcFace", "CosFace", "CombinedMargin", "MarginHead", "MarginContext", "PartialFC", "shard_range"]
