"""The UniFEx model: a frozen foundation backbone and a small trained neck.

    images (B, 3, S, S) --backbone (frozen)--> features (B, D_in), L2-normalised or raw
                        --neck--> embeddings (B, embedding_dim)

Necks: ``linear`` (dropout on the features, a linear projection, optionally BatchNorm1d)
or ``pooling`` (average pooling of the features down to ``embedding_dim``, nothing to
train). By default the features are L2-normalised before the neck, exactly as ``unicom
embed`` stores them; ``features: raw`` gives the neck the backbone's pooled features as
they are (the UniFEx code). The feature cache stores what the neck takes, so a neck
trained from the cache sees the same inputs as the exported model.

Exported as the ``unifex`` architecture of :mod:`unicom.models.export`: the settings
name the backbone (the spec and weights as given to :func:`unicom.models.encoders.load_encoder`)
and ``model.safetensors`` holds the neck only, so ``load_encoder(folder)`` rebuilds
backbone + neck without storing the backbone's weights a second time.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from unicom.errors import InputError
from unicom.models.encoders import Encoder, load_encoder
from unicom.models.export import describe_transform  # re-exported: the owner of preprocess descriptions
from unicom.models.registry import register_architecture

ARCHITECTURE = "unifex"
NECK_KINDS = ("linear", "pooling")


# --------------------------------------------------------------------------- necks


class LinearNeck(nn.Module):
    """Dropout -> Linear(D_in, D) -> BatchNorm1d(D) (optional): float (B, D_in) -> (B, D)."""

    def __init__(self, in_dim: int, embedding_dim: int, batchnorm: bool = False, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj = nn.Linear(in_dim, embedding_dim)
        self.norm = nn.BatchNorm1d(embedding_dim) if batchnorm else nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(self.dropout(features)))


class PoolingNeck(nn.Module):
    """Average pooling over the feature axis: (B, D_in) -> (B, D), adaptive bins as
    ``AdaptiveAvgPool1d`` (no weights)."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.embedding_dim = embedding_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool1d(features[:, None, :], self.embedding_dim)[:, 0]


def build_neck(in_dim: int, neck: Mapping[str, Any]) -> nn.Module:
    """A neck from its settings ``{"kind", "embedding_dim", "batchnorm", "dropout"}`` (and
    ``features``, which says what the neck is given)."""
    kind = neck.get("kind", "linear")
    if neck.get("features", "normalized") not in FEATURES:
        raise InputError(f"neck features {neck['features']!r}: choose one of {FEATURES}")
    if kind == "linear":
        return LinearNeck(in_dim, int(neck["embedding_dim"]), bool(neck.get("batchnorm", False)), float(neck.get("dropout", 0.0)))
    if kind == "pooling":
        if int(neck["embedding_dim"]) > in_dim:
            raise InputError(f"a pooling neck cannot enlarge {in_dim} features to {neck['embedding_dim']}")
        return PoolingNeck(int(neck["embedding_dim"]))
    raise InputError(f"neck kind {kind!r}: choose one of {NECK_KINDS}")


def has_weights(neck: nn.Module) -> bool:
    return any(True for _ in neck.parameters())


# ------------------------------------------------------------------------- backbone


def freeze(encoder: Encoder) -> Encoder:
    """The backbone in inference mode with no gradient to any of its weights."""
    encoder.requires_grad_(False)
    return encoder.eval()


FEATURES = ("normalized", "raw")


def backbone_features(encoder: Encoder, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """float32 (B, D_in) features of ``images`` (the neck's input), L2-normalised or raw."""
    features = encoder.encode_image(images).float()
    return F.normalize(features, dim=-1) if normalize else features


def weights_reference(pretrained: str | None) -> str | None:
    """``pretrained`` as stored in an exported model: a local file as an absolute path, a tag as given."""
    if pretrained is not None and os.path.isfile(pretrained):
        return os.path.abspath(pretrained)
    return pretrained


# ---------------------------------------------------------------------------- model


class UniFExModel(nn.Module):
    """Frozen backbone + neck: images (B, 3, S, S) -> embeddings (B, embedding_dim).

    ``settings``: ``{"backbone": spec, "pretrained": weights or None, "input_dim": D_in,
    "neck": {...}}``; ``neck["features"]`` is ``normalized`` (the default, also for folders
    written before the key existed) or ``raw``. The state dict holds the neck only (keys ``neck.*``); the backbone is
    a reference to weights that live elsewhere and stays in inference mode.
    """

    def __init__(self, settings: Mapping[str, Any], backbone: Encoder | None = None):
        super().__init__()
        self.settings = dict(settings)
        self.neck = build_neck(int(settings["input_dim"]), settings["neck"])
        self.embedding_dim = int(settings["neck"]["embedding_dim"])
        self.normalize_features = settings["neck"].get("features", "normalized") == "normalized"
        self.backbone = freeze(backbone) if backbone is not None else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.backbone is None:
            raise RuntimeError("this UniFExModel was built without its backbone (a shape check); load it with load_model")
        return self.neck(backbone_features(self.backbone, images, self.normalize_features))

    @property
    def has_text(self) -> bool:
        """Texts embed into this model's space when the neck has no weights (pooling keeps the
        backbone's own space) and the backbone has a text tower: the neck of the text features,
        prepared as the image features are."""
        return self.backbone is not None and self.backbone.has_text and not has_weights(self.neck)

    @property
    def no_text_reason(self) -> str:
        backbone = self.settings["backbone"]
        if self.backbone is None or not self.backbone.has_text:
            return f"its backbone {backbone} has no text tower"
        return f"its trained {self.settings['neck'].get('kind', 'linear')} neck projects {backbone}'s features away from its text space"

    def tokenize(self, texts):
        return self.backbone.tokenize(texts)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        features = self.backbone.encode_text(tokens).float()
        return self.neck(F.normalize(features, dim=-1) if self.normalize_features else features)

    def train(self, mode: bool = True) -> "UniFExModel":
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()  # frozen: its dropout and normalisation statistics never change
        return self

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        # the backbone's weights belong to its own checkpoint, named in the settings
        return self.neck.state_dict(destination=destination, prefix=prefix + "neck.", keep_vars=keep_vars)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        foreign = [key for key in state_dict if not key.startswith("neck.")]
        if strict and foreign:
            raise RuntimeError(f"unexpected keys in the UniFEx state dict: {foreign[:5]}")
        neck_state = {key[len("neck."):]: value for key, value in state_dict.items() if key.startswith("neck.")}
        return self.neck.load_state_dict(neck_state, strict=strict, assign=assign)


def unifex_settings(backbone: str, pretrained: str | None, input_dim: int, neck: Mapping[str, Any],
                    backbone_sha256: str | None = None) -> dict[str, Any]:
    """A ``unifex`` model folder's settings; ``backbone_sha256``: the backbone's
    :meth:`~unicom.models.encoders.Encoder.weights_sha256` when the head was trained, checked
    on every load (a weights file written over since is refused, not used)."""
    from unicom.models.foundation import recorded_spec

    return {
        "backbone": recorded_spec(backbone),  # a local folder by its absolute path: loadable from anywhere
        "pretrained": weights_reference(pretrained),
        "input_dim": int(input_dim),
        "neck": {"kind": neck["kind"], "embedding_dim": int(neck["embedding_dim"]),
                 "batchnorm": bool(neck.get("batchnorm", False)), "dropout": float(neck.get("dropout", 0.0)),
                 "features": neck.get("features", "normalized")},
        **({} if backbone_sha256 is None else {"backbone_sha256": backbone_sha256}),
    }


def _building_on_meta() -> bool:
    return torch.empty(0).device.type == "meta"


def build_unifex(settings: Mapping[str, Any]) -> UniFExModel:
    """Builder of the ``unifex`` architecture: loads the backbone named in ``settings``.

    Under ``torch.device("meta")`` (the shape check of :func:`unicom.models.export.save_model`
    and the first pass of ``instantiate``) the backbone's weights are not read: the neck
    is all the state dict holds. A meta placeholder buffer then marks the module as
    incomplete, and ``instantiate`` builds it again for real.
    """
    if _building_on_meta():
        model = UniFExModel(settings)
        model.register_buffer("backbone_placeholder", torch.empty(0), persistent=False)
        return model
    backbone = load_encoder(settings["backbone"], settings.get("pretrained"))  # random weights: seeded
    if backbone.embedding_dim != int(settings["input_dim"]):
        raise InputError(
            f"{settings['backbone']} ({settings.get('pretrained')}) gives {backbone.embedding_dim} features but the "
            f"head was trained on {settings['input_dim']}: the backbone reference points to other weights"
        )
    digest = backbone.weights_sha256() if "backbone_sha256" in settings else None
    if digest is not None and digest != settings["backbone_sha256"]:
        raise InputError(
            f"{settings['backbone']} ({settings.get('pretrained')}) holds other weights than the backbone the head was "
            f"trained on (weights_sha256 {settings['backbone_sha256'][:12]}... then, {digest[:12]}... now): "
            f"{changed_backbone_advice(settings['backbone'], settings.get('pretrained'))}")
    return UniFExModel(settings, backbone)


def changed_backbone_advice(spec: str, pretrained: str | None) -> str:
    """Why a backbone named by ``spec`` and ``pretrained`` may hold other weights than when a
    head was trained on it, and what to do: weights read from a file or folder were written
    over; a Hub repository named without a revision was updated; weights named by a tag (or
    none) are built by the installed unicom, timm or open_clip, which may be another version."""
    again = "or train the head again"
    if (pretrained is not None and os.path.exists(pretrained)) or os.path.exists(spec) or "local-dir:" in spec:
        return f"the file or folder was written over; put the weights trained on back, {again}"
    if "hf-hub:" in spec and "@" not in spec:
        return ("the repository was updated since; when it holds a unicom model folder, name the revision the head was "
                f"trained on in settings.backbone of this model's unicom_model.json ({spec}@<commit>), {again}")
    return ("the weights named so are built by the installed unicom, timm or open_clip, which may be another version "
            f"than the one the head was trained with: install that one, {again}")


register_architecture(ARCHITECTURE, build_unifex)  # model folders name it; loading imports this module



__all__ = [
    "UniFExModel", "LinearNeck", "PoolingNeck", "build_neck", "build_unifex", "unifex_settings", "describe_transform",
    "backbone_features", "freeze", "has_weights", "ARCHITECTURE",
]
