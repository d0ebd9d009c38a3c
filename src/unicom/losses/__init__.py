"""Losses: margin heads, the table of heads, and the sharded, sampled margin softmax (:class:`PartialFC`).

* :mod:`~unicom.losses.margins`: every margin function, once;
* :mod:`~unicom.losses.heads`: the table of heads with their options, read by every recipe;
* :mod:`~unicom.losses.partial_fc`: prototypes, sampling, sharding, distributed softmax.

The names below are imported on first use, so ``import unicom.losses.heads`` (what a
recipe needs to check ``loss.*`` keys) does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ArcFace": "margins", "CosFace": "margins", "CombinedMargin": "margins", "DynMArcFace": "margins",
    "AdaCos": "margins", "LiArcFace": "margins", "CurricularFace": "margins", "AdaFace": "margins",
    "MarginHead": "margins", "MarginContext": "margins", "straight_through": "margins",
    "PartialFC": "partial_fc", "shard_range": "partial_fc", "classes_per_step": "partial_fc",
    "HEADS": "heads", "build_margin_head": "heads",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'unicom.losses' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"unicom.losses.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
