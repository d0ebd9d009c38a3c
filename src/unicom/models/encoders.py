"""One interface for every model that embeds images (and maybe texts).

``load_encoder(spec, pretrained=None, device="cpu")`` resolves ``spec`` through the
``BACKENDS`` table below, in order; the first backend whose ``accepts(spec, pretrained)``
is true builds the encoder. Stages (``embed``, ``evaluate``, ``index``/``search``, the
UniFEx cache) only ever see an :class:`Encoder`, so any model the project can load works
in all of them.

Specs understood (each backend documents its own):

* a released Unicom name (``ViT-B/32``, ``ViT-L/14@336px``) or a released ``.pt`` file;
* a folder exported by ``unicom train`` or ``unicom probe`` (it holds ``unicom_model.json``);
* ``timm/<name>`` or ``timm:<name>`` for timm image models;
* an open_clip model name (``ViT-B-32``), with ``pretrained`` a tag or a local file.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, Sequence

import torch
from torch import nn

from unicom.errors import InputError


class Encoder(nn.Module):
    """Wraps a model as ``images (B, 3, H, W) -> embeddings (B, D)`` (+ texts if it can).

    Attributes:
        embedding_dim: D, the size of ``encode_image``'s output.
        image_transform: PIL image -> float tensor (3, H, W), the model's own preprocessing.
        has_text: whether ``tokenize`` and ``encode_text`` work.
        name: a readable description of the model (for reports and metadata).

    Outputs are not L2-normalised; callers normalise where the layout requires it.
    """

    embedding_dim: int
    image_transform: Callable
    has_text: bool = False
    name: str = "encoder"

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement encode_image")

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        raise InputError(f"{self.name} has no text tower; use --modalities image")

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise InputError(f"{self.name} has no text tower; use --modalities image")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)


# (module, accepts, build), tried in order: ``module.accepts(spec, pretrained) -> bool``
# and ``module.build(spec, pretrained, device) -> Encoder``. A module that is not
# installed is skipped.
BACKENDS: list[tuple[str, str, str]] = [
    ("unicom.models.released", "accepts_released", "released_encoder"),
    ("unicom.models.export", "accepts_export", "exported_encoder"),
    ("unicom.models.foundation", "accepts_timm", "timm_encoder"),
    ("unicom.models.foundation", "accepts_open_clip", "open_clip_encoder"),
]


def load_encoder(spec: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> Encoder:
    """Build the :class:`Encoder` named by ``spec`` (see the module docstring), in eval mode."""
    tried = []
    for module_name, accepts, build in BACKENDS:
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        tried.append(module_name)
        if getattr(module, accepts)(spec, pretrained):
            return getattr(module, build)(spec, pretrained, device).eval()
    raise InputError(
        f"no model matches {spec!r} (looked in {', '.join(tried)}): give a released Unicom name, "
        "an exported model folder, timm/<name>, or an open_clip model name with --pretrained"
    )
