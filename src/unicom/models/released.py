"""Names that code written against the earlier layout imports from here.

The released checkpoints are entries of :mod:`unicom.models.registry`; their architecture
is :mod:`unicom.models.unicom_vit`, their download :mod:`unicom.models.hub`, loading
:mod:`unicom.models.factory` and conversion :mod:`unicom.models.convert`.
"""

from unicom.models.registry import CLIP_MEAN, CLIP_STD, clip_preprocess

__all__ = ["CLIP_MEAN", "CLIP_STD", "clip_preprocess"]
