"""Vision Transformers made to take model inputs of other sizes (multi-scale descriptors,
:class:`unicom.models.encoders.MultiScale`).

A ViT whose learned position embeddings are of one patch grid takes inputs of another size
once those embeddings are resampled to the input's grid (bicubic, antialiased, the class
token's kept: ``timm.layers.resample_abs_pos_embed``). :func:`take_other_sizes` makes two
kinds do so, each as its own library does it:

* timm's ``VisionTransformer`` (timm's ViTs, DeiTs and CLIP ViTs, the ViTs ``unicom train``
  makes, open_clip towers with a timm ViT trunk such as SigLIP's): switched to what timm builds
  with ``dynamic_img_size=True, dynamic_img_pad=True``: position embeddings resampled to each
  input's grid, sides that are no multiple of the patch padded with zeros at the bottom and
  right (timm's padding);
* open_clip's ``VisionTransformer`` (OpenAI's and LAION's CLIP ViTs in open_clip): at each
  input size but its own, its position embeddings resampled to the grid its patch convolution
  makes, what open_clip's loader (``resize_pos_embed``) gives a model made with
  ``force_image_size``; pixels past the last whole patch are left out, as that convolution
  leaves them.

At its own input size each network computes what it computed before.
"""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

__all__ = ["take_other_sizes"]


def take_other_sizes(network: nn.Module) -> list[str]:
    """Make every ViT in ``network`` (itself included) that this module knows take inputs of
    other sizes, in place; returns the class names of those changed (none: nothing to do, or
    networks this module does not know, which keep their one size)."""
    changed = []
    for module in list(network.modules()):
        if _timm_vit_at_any_size(module) or _open_clip_vit_at_any_size(module):
            changed.append(type(module).__name__)
    return changed


def _timm_vit_at_any_size(module: nn.Module) -> bool:
    """A timm ``VisionTransformer`` with a learned position embedding and timm's plain patch
    embedding switched to ``dynamic_img_size`` and ``dynamic_img_pad`` (the settings its
    constructor derives from them); False for anything else or one already switched."""
    try:
        from timm.layers import Format, PatchEmbed
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # timm is optional
        return False
    if not isinstance(module, VisionTransformer) or module.pos_embed is None:
        return False
    embed = module.patch_embed
    if type(embed) is not PatchEmbed or (module.dynamic_img_size and embed.dynamic_img_pad):
        return False
    module.dynamic_img_size = True
    embed.strict_img_size = False
    embed.dynamic_img_pad = True
    embed.flatten = False  # the tokens stay (B, H, W, C) until the position embeddings are added
    embed.output_fmt = Format.NHWC
    return True


def _open_clip_vit_at_any_size(module: nn.Module) -> bool:
    """An open_clip ``VisionTransformer`` given :func:`_open_clip_forward` as its forward;
    False for anything else or one already given it."""
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError:  # open_clip is optional
        return False
    if not isinstance(module, VisionTransformer) or "forward" in vars(module):
        return False
    module.forward = types.MethodType(_open_clip_forward, module)
    return True


def _open_clip_forward(self, images: torch.Tensor):
    """open_clip's ``VisionTransformer.forward`` run by a shallow copy of the tower whose
    ``positional_embedding`` is resampled to the grid of ``images`` (the tower itself, its
    parameters shared, is left as it is, so that concurrent calls at other sizes do not meet)."""
    from timm.layers import resample_abs_pos_embed

    forward = type(self).forward
    stride = self.conv1.stride
    grid = (images.shape[-2] // stride[0], images.shape[-1] // stride[1])
    if grid == tuple(self.grid_size):
        return forward(self, images)
    resampled = resample_abs_pos_embed(self.positional_embedding.unsqueeze(0), new_size=list(grid),
                                       old_size=list(self.grid_size), num_prefix_tokens=1)[0]
    view = copy.copy(self)
    object.__setattr__(view, "positional_embedding", resampled)  # before the shared parameter, for the view alone
    return forward(view, images)
