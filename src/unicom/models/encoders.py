"""One interface for every model that embeds images (and maybe texts).

Stages (``embed``, ``evaluate``, ``index``/``search``, the UniFEx cache) only ever see an
:class:`Encoder`, so any model the project can load works in all of them.
``load_encoder(spec, pretrained=None, device="cpu")`` understands, in this order:

* without ``pretrained``, this project's models (:func:`unicom.models.factory.load`): a
  registered name with released weights (``ViT-B/32``, ``ViT-L/14@336px``), a model
  folder (``unicom_model.json``), a released-format checkpoint file, or
  ``hf-hub:org/repo`` when that Hub repository holds a model folder (``hf-hub:org/repo/folder``
  when a folder in it does);
* ``timm/<name>`` or ``timm:<name>`` for timm image models, ``timm/local-dir:FOLDER`` or
  ``timm/hf-hub:org/repo`` for timm model folders (:mod:`unicom.models.foundation`);
* a folder of a transformers CLIP, SigLIP (2, NaFlex too), Chinese-CLIP, AltCLIP, ALIGN, MetaCLIP 2,
  BLIP retrieval, vision-text dual encoder, AIMv2 or DINOv2 model (``config.json`` of model type clip,
  siglip, siglip2, chinese_clip, altclip, align, metaclip_2, blip, vision-text-dual-encoder, aimv2,
  dinov2, dinov2_with_registers, or a vision tower's), or an
  ``hf-hub:org/repo`` holding one without
  open_clip's configuration, or a sentence-transformers CLIP (``modules.json`` naming a CLIP folder)
  (:mod:`unicom.models.hf_clip`);
* an open_clip model name (``ViT-B-32``) with ``pretrained`` a tag or a local file, or an
  open_clip ``hf-hub:``/``local-dir:`` reference.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from unicom.errors import InputError


class Encoder(nn.Module):
    """Wraps a model as ``images (B, 3, H, W) -> embeddings (B, D)`` (+ texts if it can).

    Attributes:
        embedding_dim: D, the size of ``encode_image``'s output.
        image_transform: PIL image -> float tensor (3, H, W), the model's own preprocessing.
        has_text: whether ``tokenize`` and ``encode_text`` work, giving embeddings in the
            space of ``encode_image``'s.
        no_text_reason: why not, when ``has_text`` is False (for error messages).
        name: a readable description of the model (for reports and metadata).

    Outputs are not L2-normalised; callers normalise where the layout requires it.
    """

    embedding_dim: int
    image_transform: Callable
    has_text: bool = False
    no_text_reason: str = "it embeds images only"
    name: str = "encoder"

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement encode_image")

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        raise InputError(f"{self.name} has no text tower ({self.no_text_reason}); use --modalities image")

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise InputError(f"{self.name} has no text tower ({self.no_text_reason}); use --modalities image")

    @property
    def device(self) -> torch.device:
        """Where the weights are (the CPU for a model without any)."""
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    def weights_sha256(self) -> str:
        """SHA-256 hex digest of every parameter and buffer (name, dtype, shape and values, in
        module order): the same weights give the same digest wherever they were loaded from,
        and two models built with random weights never share one."""
        digest = hashlib.sha256()
        for name, tensor in itertools.chain(self.named_parameters(), self.named_buffers()):
            tensor = tensor.detach()
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
            digest.update(tensor.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)


class ModelEncoder(Encoder):
    """An image model ``(B, 3, S, S) -> (B, D)`` with its transform, as an :class:`Encoder`.

    A model that also embeds texts into its image space says so with ``has_text`` and
    provides ``tokenize`` and ``encode_text`` (a UniFEx model whose neck keeps a CLIP
    backbone's own space does); otherwise its ``no_text_reason`` or its class names why not.
    """

    def __init__(self, model: nn.Module, transform: Callable, embedding_dim: int, name: str):
        super().__init__()
        self.model = model
        self.image_transform = transform
        self.embedding_dim = embedding_dim
        self.name = name
        self.has_text = bool(getattr(model, "has_text", False))
        self.no_text_reason = getattr(model, "no_text_reason", None) or f"its {type(model).__name__} network embeds images only"

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if not self.has_text:
            return super().tokenize(texts)
        return self.model.tokenize(texts)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.has_text:
            return super().encode_text(tokens)
        return self.model.encode_text(tokens)


class ImageViews(Encoder):
    """An encoder that embeds images otherwise than ``encoder`` from the same weights (test-time
    views: :class:`FlipAveraged`, :class:`MultiScale`): its texts, transform, sizes and weights
    digest are ``encoder``'s own."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.image_transform = encoder.image_transform
        self.embedding_dim = encoder.embedding_dim
        self.name = encoder.name
        self.has_text = encoder.has_text
        self.no_text_reason = encoder.no_text_reason

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encoder.tokenize(texts)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_text(tokens)

    def weights_sha256(self) -> str:
        return self.encoder.weights_sha256()


class FlipAveraged(ImageViews):
    """Test-time augmentation by mirroring: an encoder whose image embedding is the mean of
    its features for the model input and for the same input mirrored left to right (after
    the model's transform: its resize and crop as for the image itself), before any L2
    normalisation, as re-identification and face-recognition evaluations average them.

    Texts, the transform and the weights are the encoder's own (:meth:`weights_sha256` is
    its digest: the same weights, another way of embedding; records that keep both say
    ``flip`` beside it). Two forward passes per batch, each of the batch's size.
    """

    def __init__(self, encoder: Encoder):
        if isinstance(encoder, FlipAveraged):
            encoder = encoder.encoder  # mirrored once: the mean of an image and its mirror is its own mirror's
        super().__init__(encoder)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder.encode_image(images)
        mirrored = self.encoder.encode_image(images.flip(-1))
        return (features.float() + mirrored.float()).mul_(0.5).to(features.dtype)


def with_flip(encoder: Encoder, flip: bool) -> Encoder:
    """``encoder`` averaged with its mirror images (:class:`FlipAveraged`) when ``flip``, else as it is."""
    return FlipAveraged(encoder) if flip else encoder


MAX_SCALE = 4.0  # the largest resize of the model input --scales takes


def check_scales(scales) -> tuple[float, ...] | None:
    """``scales`` (numbers, or text such as ``"1,0.7071,0.5"``) as a tuple in decreasing
    order, or None for the model input alone (none given, or ``1`` alone); an
    :class:`InputError` for a scale that is not a finite number in (0, :data:`MAX_SCALE`] or
    one given twice."""
    import math
    import numbers

    if scales is None:
        return None
    if isinstance(scales, str):
        parts = [part.strip() for part in scales.split(",")]
        try:
            scales = [float(part) for part in parts]
        except ValueError:
            raise InputError(f"--scales {scales!r}: comma-separated numbers, such as 1,0.7071,0.5") from None
    values = []
    for value in scales:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or not 0 < value <= MAX_SCALE:
            raise InputError(f"scales: {value!r} is not a scale; each is a number above 0 and at most {MAX_SCALE:g} "
                             "(1 is the model input, 0.5 half its side)")
        values.append(float(value))
    if not values:
        raise InputError("scales: give at least one (1 is the model input)")
    if len(set(values)) != len(values):
        raise InputError(f"scales {values}: a scale given twice")
    values.sort(reverse=True)
    return None if values == [1.0] else tuple(values)


class MultiScale(ImageViews):
    """Multi-scale descriptors, as landmark retrieval computes them (Radenović et al., cirtorch's
    ``--multiscale``): an encoder whose image embedding is the mean of the L2-normalised
    embeddings of the model input (after the model's transform) resized by each of ``scales``
    (bilinear, ``align_corners=False``, no antialiasing: cirtorch's ``interpolate`` with
    ``scale_factor``; the output side is the floor of side x scale); the caller normalises the
    mean. For networks that take inputs of other sizes: convolutional networks, DINOv2 and the
    CLIP-like ViTs of transformers (their position embeddings interpolated), timm's and
    open_clip's ViTs (made to take them by :func:`unicom.models.resizable.take_other_sizes`,
    in place). Each scale is tried on one blank input when the encoder is made, and a network
    that refuses one is an :class:`InputError` naming it.

    Texts, the transform and the weights are the encoder's own (:meth:`weights_sha256` is its
    digest; records that keep both say ``scales`` beside it). One forward pass per scale.
    """

    def __init__(self, encoder: Encoder, scales):
        from unicom.models.naflex import NaFlexTransform

        scales = check_scales(scales)
        if scales is None:
            raise InputError("MultiScale: give scales other than 1 alone (the model input as it is)")
        if isinstance(encoder.image_transform, NaFlexTransform):
            raise InputError(f"{encoder.name}: a NaFlex model takes each image at its own size as patches; --scales "
                             "resizes a model input of one size: leave --scales out")
        from unicom.models.resizable import take_other_sizes

        super().__init__(encoder)
        self.scales = scales
        take_other_sizes(encoder)
        self._try_every_scale()

    def _resized(self, images: torch.Tensor, scale: float) -> torch.Tensor:
        import torch.nn.functional as F

        if scale == 1.0:
            return images
        return F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def _try_every_scale(self) -> None:
        from PIL import Image

        blank = self.image_transform(Image.new("RGB", (256, 256), (128, 128, 128)))
        if not isinstance(blank, torch.Tensor) or blank.dim() != 3:
            raise InputError(f"{self.name}: its transform does not make one image tensor (3, H, W); --scales resizes "
                             "that: leave --scales out")
        batch = blank.unsqueeze(0).to(self.encoder.device)
        for scale in self.scales:
            resized = self._resized(batch, scale)
            if min(resized.shape[-2:]) < 1:
                raise InputError(f"scale {scale:g} makes the {tuple(batch.shape[-2:])} model input of {self.name} "
                                 "smaller than a pixel: give larger scales")
            try:
                self.encoder.encode_image(resized)
            except Exception as error:  # noqa: BLE001 - whatever the network raises, it takes no such input
                size = " x ".join(str(side) for side in resized.shape[-2:])
                raise InputError(
                    f"{self.name} cannot embed its input resized by {scale:g} ({size} pixels: {error}); --scales "
                    "needs a network that takes inputs of other sizes (a convolutional network, DINOv2, a "
                    "timm, open_clip or transformers ViT): leave "
                    "--scales out for this one") from None

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        total = None
        for scale in self.scales:
            features = F.normalize(self.encoder.encode_image(self._resized(images, scale)).float(), dim=-1)
            total = features if total is None else total + features
        return total.div_(len(self.scales))


def with_views(encoder: Encoder, flip: bool = False, scales=None) -> Encoder:
    """``encoder`` as test-time views make it: averaged with each image's mirror (``flip``,
    :class:`FlipAveraged`), then at each of ``scales`` (:class:`MultiScale`), or as it is when
    neither is asked for. Views asked for replace those ``encoder`` already has (they are
    applied to the network it wraps), so that an index's recorded views are its queries' own."""
    scales = check_scales(scales)
    if not flip and scales is None:
        return encoder
    while isinstance(encoder, ImageViews):
        encoder = encoder.encoder
    encoder = with_flip(encoder, flip)
    return MultiScale(encoder, scales) if scales is not None else encoder


RANDOM_WEIGHTS_SEED = 0  # torch's CPU generator's seed while a timm or open_clip model is built


def load_encoder(spec: str | os.PathLike, pretrained: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu") -> Encoder:
    """Build the :class:`Encoder` named by ``spec`` (see the module docstring), in eval mode."""
    from unicom.engine.device import resolve_device
    from unicom.models import factory, foundation, hf_clip, hub
    from unicom.models.hf_folders import hub_file

    device = resolve_device(str(device), "device")  # "auto", a name or a torch.device, checked
    spec = os.fspath(spec)
    pretrained = None if pretrained is None else os.fspath(pretrained)

    if pretrained is None and factory.is_unicom_spec(spec):
        return ModelEncoder(*factory.load_described(spec, device=device)).eval()
    if pretrained is None and hub.is_hf_spec(spec):
        try:
            folder = hub.hf_model_folder(spec)
        except hub.NotAModelFolder:  # no unicom_model.json: transformers' CLIP/SigLIP/DINOv2, or open_clip's
            transformers_spec = hf_clip.transformers_repository(spec)
            if transformers_spec is not None:
                return hf_clip.load_hf_clip(transformers_spec, device)
            if not hub.split_hf_spec(spec)[1] and not hub_file(spec, hf_clip.OPEN_CLIP_FILE, None):
                unread = hf_clip.unread_repository_model(spec)
                if unread:
                    raise InputError(f"{spec}: the repository holds {unread}") from None
                raise InputError(f"{spec}: the repository holds no unicom model folder (unicom_model.json), no "
                                 "transformers model read here (config.json of model type "
                                 f"{', '.join(hf_clip.MODEL_TYPES)}) and no open_clip model ({hf_clip.OPEN_CLIP_FILE}); "
                                 f"a timm repository is timm/{spec}, a model in a folder of it "
                                 f"hf-hub:{hub.split_hf_spec(spec)[0]}/<folder>") from None
        except hub.NotInCache as missing:  # offline: transformers' or open_clip's files may be in the cache
            transformers_spec = hf_clip.transformers_repository(spec)
            if transformers_spec is not None:
                return hf_clip.load_hf_clip(transformers_spec, device)
            if hub.split_hf_spec(spec)[1]:
                raise
            try:
                return foundation.open_clip_encoder(spec, None, device).eval()
            except Exception:
                raise missing from None
        else:
            return ModelEncoder(*factory.load_described(str(folder), device=device, label=spec)).eval()
        repo, inside, _ = hub.split_hf_spec(spec)
        if inside:  # open_clip reads a repository's root only
            raise InputError(f"{spec}: the folder {inside} of {repo} holds neither a unicom model folder "
                             f"(unicom_model.json) nor a transformers model read here (config.json of model type "
                             f"{', '.join(hf_clip.MODEL_TYPES)})")
    if pretrained is None and os.path.isdir(spec):
        if hf_clip.is_clip_folder(spec):
            return hf_clip.load_hf_clip(spec, device)
        inner = hf_clip.sentence_transformers_clip(Path(spec) / hf_clip.SENTENCE_MODULES)
        if inner is not None and hf_clip.is_clip_folder(Path(spec) / inner):
            return hf_clip.load_hf_clip(Path(spec) / inner, device)
    for accepts, build in ((foundation.accepts_timm, foundation.timm_encoder),
                           (foundation.accepts_open_clip, foundation.open_clip_encoder)):
        if accepts(spec, pretrained):
            # seeded, the caller's generator state restored after: a model without weights (random,
            # for tests) is the same network at every load, so a rerun, `unicom search` and a
            # feature cache find the weights they recorded
            # (the CPU generator alone: the models are built on the CPU, and torch.manual_seed would
            # also reseed the caller's CUDA generators, which fork_rng(devices=[]) does not restore)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(RANDOM_WEIGHTS_SEED)
                return build(spec, pretrained, device).eval()
    if pretrained is None and os.path.isdir(spec):
        from unicom.models.export import not_a_model_folder

        raise not_a_model_folder(spec)
    if pretrained is not None and factory.is_unicom_spec(spec):
        raise InputError(f"{spec}: a unicom model holds its weights; leave out --pretrained {pretrained}")
    if pretrained is None and spec.endswith(factory.CHECKPOINT_SUFFIXES) and not os.path.exists(spec):
        raise InputError(f"{spec}: file not found (a checkpoint file, by its name; a relative path is taken from "
                         f"{os.getcwd()})")
    raise InputError(
        f"no model matches {spec!r}: give a released Unicom name ({', '.join(factory.available_models())}), a model "
        "folder, a checkpoint file, hf-hub:<owner>/<repository>, timm/<name>, or an open_clip model name with --pretrained"
    )

