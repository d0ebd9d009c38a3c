"""CLIP, SigLIP, Chinese-CLIP, AltCLIP, ALIGN, MetaCLIP 2, BLIP (retrieval), vision-text dual
encoders and DINOv2 saved by Hugging Face transformers (``CLIPModel``, ``SiglipModel``,
``Dinov2Model``, ... folders: :data:`MODEL_TYPES`) as an :class:`~unicom.models.encoders.Encoder`.

OpenAI's CLIP models on the Hub (``openai/clip-vit-base-patch32``, ``openai/clip-vit-large-patch14``)
and the fine-tunes published the same way (``patrickjohncyh/fashion-clip``, clip-retrieval's
``hf_clip:`` models) are folders of transformers' layout: ``config.json`` (``"model_type": "clip"``),
the weights, the tokenizer's files and ``preprocessor_config.json``. They load from a local
folder or ``hf-hub:org/repo[@revision]`` (a repository that also holds open_clip's
``open_clip_config.json`` is loaded by open_clip, as before).

The network is transformers' ``CLIPModel`` built from the configuration, its weights read by
transformers' ``from_pretrained`` and checked tensor by tensor
(:func:`unicom.models.hf_folders.load_pretrained`); an image's embedding is the vision
tower's pooled state through the visual projection, a text's the text tower's through the
text projection (what ``get_image_features`` / ``get_text_features`` give), not normalised.
Images are prepared as ``preprocessor_config.json`` says (the short side resized to
``size.shortest_edge`` with its ``resample`` filter, the centre ``crop_size`` cut out, values
/ 255, then ``image_mean`` and ``image_std``), with the same transform as the project's other
CLIP models (:func:`unicom.models.export.build_transform`).

SigLIP's folders (``"model_type": "siglip"``: Google's ``google/siglip-*`` models and the
fixed-resolution ``google/siglip2-*`` ones) load the same way into transformers'
``SiglipModel``: an image's embedding is the vision tower's attention-pooled state, a text's
the text tower's last position through its head. Texts are padded to the tower's positions
(64) and run without an attention mask, as SigLIP was trained and as open_clip runs it (the
pad token is the end-of-text token, so the last position is an end of text). Each text is
first made canonical as SigLIP's training made its captions and open_clip makes them
(:func:`canonical_text`: lower case, no punctuation), then tokenized by the folder's own
tokenizer: SigLIP's sentencepiece one (``pip install 'unicom[transformers]'`` brings
sentencepiece) or SigLIP 2's Gemma tokenizer, which left to itself keeps case and
punctuation. Images are resized to ``size`` on both sides (no crop), as SigLIP's image
processor does.

DINOv2's folders (``"model_type": "dinov2"`` or ``"dinov2_with_registers"``: Meta's
``facebook/dinov2-*`` models and their fine-tunes) load into transformers' ``Dinov2Model``
(``Dinov2WithRegistersModel``) as image encoders, with no text tower: an image's embedding is
the model's pooled output, the class token after the last layer norm (what timm's DINOv2
models give for ``num_classes=0``). Images are prepared as for CLIP (DINOv2's processor: the
short side to 256, the centre 224, ImageNet's mean and std).

A CLIP's or SigLIP's vision tower saved alone (``clip_vision_model``: transformers'
``CLIPVisionModelWithProjection``, whose ``image_embeds`` are the CLIP's image embeddings, or
``CLIPVisionModel``, its pooled state; ``siglip_vision_model``: ``SiglipVisionModel``, SigLIP's
image embeddings) is an image encoder likewise.

SigLIP 2's NaFlex folders (``"model_type": "siglip2"``: ``google/siglip2-*-naflex``; its vision
tower alone, ``siglip2_vision_model``) load into transformers' ``Siglip2Model``
(``Siglip2VisionModel``), their texts as SigLIP's. Each image keeps its aspect ratio: it is
resized to at most ``max_num_patches`` patches of ``patch_size`` pixels (its
``preprocessor_config.json``; 256 of 16 by default), with the folder's filter (bilinear), and
goes in as a sequence of patches (:mod:`unicom.models.naflex`).

Chinese-CLIP's folders (``"model_type": "chinese_clip"``: ``OFA-Sys/chinese-clip-vit-*``) load into
transformers' ``ChineseCLIPModel``: an image's embedding and a text's are what
``get_image_features`` and ``get_text_features`` give (the text tower's first token through its
projection), texts tokenized by the folder's BERT tokenizer with their attention mask and token
types. Images are resized as the folder's ``preprocessor_config.json`` says: both sides to
``size`` (Chinese-CLIP's published folders) or CLIP's short side and centre crop.

AltCLIP's folders (``"model_type": "altclip"``: BAAI's ``BAAI/AltCLIP`` and ``AltCLIP-m9``, CLIP's
image tower beside an XLM-RoBERTa text tower) load into ``AltCLIPModel`` and ALIGN's (``"model_type":
"align"``: ``kakaobrain/align-base``, an EfficientNet image tower beside a BERT one) into
``AlignModel``, their embeddings likewise ``get_image_features`` / ``get_text_features``, texts
tokenized by the folder's tokenizer with their mask (AltCLIP's RoBERTa positions begin after the pad
token's id: a text has two positions fewer than the tower). AltCLIP's images are prepared as
CLIP's; ALIGN's as transformers' ``EfficientNetImageProcessor`` prepares them
(:func:`efficientnet_transform`: both sides to ``size``, the centre ``crop_size``, the values
rescaled, offset and normalised as the folder says; its published folder: 346, then 289 pixels,
values / 127.5 - 1).

MetaCLIP 2's folders (``"model_type": "metaclip_2"``: ``facebook/metaclip-2-worldwide-*``, CLIP's
towers with a multilingual XLM-V tokenizer) and the dual encoders people train with transformers'
``VisionTextDualEncoderModel`` (``"model_type": "vision-text-dual-encoder"``: any vision tower
beside any text tower, each with a projection) load likewise, embedded by ``get_image_features``
and ``get_text_features``. A dual encoder's images are prepared as its
``preprocessor_config.json``'s ``image_processor_type`` says (CLIP's, ViT's, SigLIP's or
EfficientNet's processor: :func:`processor_transform`), and a RoBERTa text tower's texts have two
positions fewer, as AltCLIP's.

Apple's AIMv2 LiT models (``"model_type": "aimv2"`` with ``text_config`` and ``vision_config``:
``apple/aimv2-large-patch14-224-lit``) load into ``Aimv2Model`` and embed likewise; AIMv2's image
encoders as transformers converted them (``"model_type": "aimv2_vision_model"``) into
``Aimv2VisionModel``, the embedding its attention-pooling head's output where it has one, else
the mean of its last hidden state's tokens (after the final RMSNorm), as timm pools Apple's
weights (``global_pool="avg"``). Apple's own layout of the image encoders (``"model_type":
"aimv2"`` without the two configurations, its code in the repository) is refused, named, with
timm's way to read it (``timm/aimv2_large_patch14_224.apple_pt``). Images as CLIP's by default.

BLIP's retrieval models (``"model_type": "blip"`` with ``BlipForImageTextRetrieval``:
``Salesforce/blip-itm-base-coco``, ``-large-flickr``, ...) load into that class and embed as its
image-text contrastive scores are computed (``use_itm_head=False``): an image's embedding is the
vision tower's first token through ``vision_proj``, a text's the text encoder's first token (run
without the image) through ``text_proj``; images resized on both sides to ``size`` (384) with
CLIP's mean and std, as ``BlipImageProcessor`` does. BLIP's captioning and question-answering
models have no such embeddings and are refused, named.

sentence-transformers' CLIP models (``sentence-transformers/clip-ViT-B-32``, ``clip-ViT-L-14``: a
``modules.json`` whose one module, ``CLIPModel``, is a transformers CLIP folder such as
``0_CLIPModel/``, perhaps followed by ``Normalize``) load as that folder
(:func:`sentence_transformers_clip`): sentence-transformers embeds with the same
``get_image_features`` and ``get_text_features``.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Sequence

import torch

from unicom.errors import InputError
from unicom.models.encoders import Encoder
from unicom.models.hf_folders import (
    errors_only,
    hub_file,
    hub_folder,
    load_pretrained,
    read_json,
    require_transformers,
    tokenizer,
)
from unicom.models.naflex import NaFlexTransform, unpack

CLIP_TYPE = "clip"
SIGLIP_TYPE = "siglip"
DINOV2_TYPES = ("dinov2", "dinov2_with_registers")
CLIP_VISION_TYPE = "clip_vision_model"  # a CLIP's vision tower saved alone (CLIPVisionModel[WithProjection])
SIGLIP_VISION_TYPE = "siglip_vision_model"  # a SigLIP's vision tower saved alone (SiglipVisionModel)
SIGLIP2_TYPE = "siglip2"  # SigLIP 2's NaFlex models: images at their own aspect ratio, as patch sequences
SIGLIP2_VISION_TYPE = "siglip2_vision_model"
NAFLEX_TYPES = (SIGLIP2_TYPE, SIGLIP2_VISION_TYPE)
CHINESE_CLIP_TYPE = "chinese_clip"  # OFA-Sys' Chinese-CLIP: a BERT text tower
ALTCLIP_TYPE = "altclip"  # BAAI's AltCLIP: CLIP's image tower, an XLM-RoBERTa text tower
ALIGN_TYPE = "align"  # Kakao Brain's ALIGN: an EfficientNet image tower, a BERT text tower
METACLIP2_TYPE = "metaclip_2"  # Meta's MetaCLIP 2: CLIP's towers, a multilingual tokenizer
BLIP_TYPE = "blip"  # Salesforce's BLIP: its retrieval models (BlipForImageTextRetrieval) only
BLIP_RETRIEVAL = "BlipForImageTextRetrieval"
DUAL_ENCODER_TYPE = "vision-text-dual-encoder"  # transformers' VisionTextDualEncoderModel: any two towers
AIMV2_TYPE = "aimv2"  # Apple's AIMv2 LiT models (Aimv2Model): an image tower and a text tower
AIMV2_VISION_TYPE = "aimv2_vision_model"  # AIMv2's image encoders (Aimv2VisionModel)
# embedded by get_image_features / get_text_features
FEATURES_TYPES = (CHINESE_CLIP_TYPE, ALTCLIP_TYPE, ALIGN_TYPE, METACLIP2_TYPE, DUAL_ENCODER_TYPE, AIMV2_TYPE)
MEAN_OF_TOKENS = "mean of tokens"  # an HFImageModel's output: the mean of the last hidden state's tokens
# text towers whose positions are RoBERTa's: numbered from the pad token's id + 1
ROBERTA_TEXT_TYPES = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "altclip_text_model")
MODEL_TYPES = {CLIP_TYPE: ("CLIPConfig", "CLIPModel"), SIGLIP_TYPE: ("SiglipConfig", "SiglipModel"),
               "dinov2": ("Dinov2Config", "Dinov2Model"),
               "dinov2_with_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel"),
               CLIP_VISION_TYPE: ("CLIPVisionConfig", "CLIPVisionModelWithProjection"),
               SIGLIP_VISION_TYPE: ("SiglipVisionConfig", "SiglipVisionModel"),
               SIGLIP2_TYPE: ("Siglip2Config", "Siglip2Model"),
               SIGLIP2_VISION_TYPE: ("Siglip2VisionConfig", "Siglip2VisionModel"),
               CHINESE_CLIP_TYPE: ("ChineseCLIPConfig", "ChineseCLIPModel"),
               ALTCLIP_TYPE: ("AltCLIPConfig", "AltCLIPModel"), ALIGN_TYPE: ("AlignConfig", "AlignModel"),
               METACLIP2_TYPE: ("MetaClip2Config", "MetaClip2Model"), BLIP_TYPE: ("BlipConfig", BLIP_RETRIEVAL),
               DUAL_ENCODER_TYPE: ("VisionTextDualEncoderConfig", "VisionTextDualEncoderModel"),
               AIMV2_TYPE: ("Aimv2Config", "Aimv2Model"), AIMV2_VISION_TYPE: ("Aimv2VisionConfig", "Aimv2VisionModel")}
PREPROCESSOR_FILE = "preprocessor_config.json"
OPEN_CLIP_FILE = "open_clip_config.json"  # a repository open_clip loads (it may hold transformers' files too)
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's filter numbers, as the processor names them
# transformers' CLIPImageProcessor defaults (OpenAI's preprocessing) for a folder without preprocessor_config.json
DEFAULT_PREPROCESSOR = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 3,
                        "image_mean": [0.48145466, 0.4578275, 0.40821073],
                        "image_std": [0.26862954, 0.26130258, 0.27577711]}
# transformers' SiglipImageProcessor defaults, likewise
SIGLIP_PREPROCESSOR = {"size": {"height": 224, "width": 224}, "resample": 3,
                       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
# transformers' Siglip2ImageProcessor defaults (SigLIP 2's NaFlex preprocessing), likewise
NAFLEX_PREPROCESSOR = {"patch_size": 16, "max_num_patches": 256, "resample": 2,
                       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
# Chinese-CLIP's published preprocessing (OFA-Sys' folders): both sides to 224, CLIP's mean and std
CHINESE_CLIP_PREPROCESSOR = {"size": {"height": 224, "width": 224}, "do_center_crop": False, "resample": 3,
                             "image_mean": DEFAULT_PREPROCESSOR["image_mean"], "image_std": DEFAULT_PREPROCESSOR["image_std"]}
# transformers' EfficientNetImageProcessor defaults, for the keys ALIGN's preprocessor_config.json leaves out
EFFICIENTNET_PREPROCESSOR = {"do_resize": True, "size": {"height": 346, "width": 346}, "resample": 3,
                             "do_center_crop": False, "crop_size": {"height": 289, "width": 289}, "do_rescale": True,
                             "rescale_factor": 1 / 255, "rescale_offset": False, "do_normalize": True,
                             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "include_top": True}
# ALIGN's published preprocessing (the processor its weights were converted with), for a folder without the file
ALIGN_PREPROCESSOR = {**EFFICIENTNET_PREPROCESSOR, "resample": 2, "do_center_crop": True, "rescale_factor": 1 / 127.5,
                      "rescale_offset": True, "do_normalize": False, "include_top": False}
# transformers' ViTImageProcessor defaults, likewise (both sides to 224, bilinear)
VIT_PREPROCESSOR = {"size": {"height": 224, "width": 224}, "resample": 2,
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
# transformers' BlipImageProcessor defaults, likewise (both sides to 384, CLIP's mean and std)
BLIP_PREPROCESSOR = {**SIGLIP_PREPROCESSOR, "size": {"height": 384, "width": 384},
                     "image_mean": DEFAULT_PREPROCESSOR["image_mean"], "image_std": DEFAULT_PREPROCESSOR["image_std"]}
# DINOv2's published preprocessing (its repositories' preprocessor_config.json), likewise
DINOV2_PREPROCESSOR = {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "resample": 3,
                       "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


class HFImageModel(Encoder):
    """A transformers model with its image transform; alone, an image model without a text tower
    (DINOv2, a vision tower saved alone), whose ``output`` (its pooled output, a CLIP vision
    tower's projected ``image_embeds``, or :data:`MEAN_OF_TOKENS`: the mean of its last hidden
    state's tokens) is the embedding."""

    vision_entry: str | None = None  # what encode_image gives vision_inputs to: the model, or this method of it

    def __init__(self, model, image_transform, embedding_dim: int, name: str, no_text_reason: str = "",
                 output: str = "pooler_output"):
        super().__init__()
        self.model = model
        self.image_transform = image_transform
        self.embedding_dim = embedding_dim
        self.name = name
        self.no_text_reason = no_text_reason or self.no_text_reason
        self.output = output
        entry = model if self.vision_entry is None else getattr(model, self.vision_entry)
        tower = getattr(model, "vision_model", None)  # where the positions are: a VisionTextDualEncoder's
        # get_image_features hands its keywords on to it, AIMv2's takes the keyword and ignores it
        self._native_side = _native_side(model) if _takes_interpolation(
            tower if isinstance(tower, torch.nn.Module) else entry) else None

    def vision_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The vision tower's inputs from a batch of ``image_transform``'s tensors: the pixels, or
        for a NaFlex model its patch sequences, mask and grid shapes. Pixels of another size than
        the tower's (``--scales``) come with ``interpolate_pos_encoding``, for towers that take it
        (CLIP, SigLIP, BLIP ...): their position embeddings resized to the grid, bicubic, as
        transformers does it."""
        if isinstance(self.image_transform, NaFlexTransform):
            return unpack(images)
        if self._native_side is not None and tuple(images.shape[-2:]) != (self._native_side,) * 2:
            return {"pixel_values": images, "interpolate_pos_encoding": True}
        return {"pixel_values": images}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        output = self.model(**self.vision_inputs(images))
        return output.last_hidden_state.mean(dim=1) if self.output == MEAN_OF_TOKENS else getattr(output, self.output)


def _takes_interpolation(forward) -> bool:
    """Whether ``forward`` (a vision tower, or a model's ``get_image_features``) takes
    ``interpolate_pos_encoding``."""
    import inspect

    forward = forward.forward if isinstance(forward, torch.nn.Module) else forward
    try:
        return "interpolate_pos_encoding" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def _native_side(model) -> int | None:
    """The side of the images ``model``'s vision tower was made for (its configuration's ``image_size``)."""
    config = getattr(model, "config", None)
    size = getattr(getattr(config, "vision_config", None) or config, "image_size", None)
    return int(size) if isinstance(size, int) else None


class HFClip(HFImageModel):
    """A transformers ``CLIPModel`` with its tokenizer and its image transform.

    ``tokenize`` gives int64 (B, 2, L), each text's token ids and attention mask, cut to
    the text tower's positions (77 for OpenAI's models); ``encode_text`` (B, projection_dim).
    """

    has_text = True
    vision_entry = "vision_model"

    def __init__(self, model, image_transform, text_tokenizer, max_tokens: int, embedding_dim: int, name: str):
        super().__init__(model, image_transform, embedding_dim, name)
        self.tokenizer = text_tokenizer
        self.max_tokens = max_tokens

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(**self.vision_inputs(images)).pooler_output
        return self.model.visual_projection(pooled)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1).long()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.model.text_model(input_ids=tokens[:, 0], attention_mask=tokens[:, 1]).pooler_output
        return self.model.text_projection(pooled)


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _pooled(output) -> torch.Tensor:
    """``get_*_features``' embeddings: a tensor (transformers 4), or its output's ``pooler_output`` (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFFeatures(HFClip):
    """A transformers dual encoder whose ``get_image_features`` and ``get_text_features`` give its
    embeddings (Chinese-CLIP, AltCLIP, ALIGN, MetaCLIP 2, ``VisionTextDualEncoderModel``):
    ``tokenize`` gives int64 (B, 3, L), each text's token ids, attention mask and token types (given
    to a model whose ``get_text_features`` takes them)."""

    vision_entry = "get_image_features"

    def __init__(self, *args, **kwargs):
        import inspect

        super().__init__(*args, **kwargs)
        self.token_types = "token_type_ids" in inspect.signature(self.model.get_text_features).parameters

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(**self.vision_inputs(images)))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        types = batch.get("token_type_ids")
        types = torch.zeros_like(batch["input_ids"]) if types is None else types
        return torch.stack([batch["input_ids"], batch["attention_mask"], types], dim=1).long()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        types = {"token_type_ids": tokens[:, 2]} if self.token_types else {}
        return _pooled(self.model.get_text_features(input_ids=tokens[:, 0], attention_mask=tokens[:, 1], **types))


class HFBlip(HFClip):
    """BLIP's retrieval model (``BlipForImageTextRetrieval``): the embeddings its image-text
    contrastive scores are computed from (module docstring); ``tokenize`` as :class:`HFClip`'s."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.vision_proj(self.model.vision_model(**self.vision_inputs(images)).last_hidden_state[:, 0, :])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        states = self.model.text_encoder(input_ids=tokens[:, 0], attention_mask=tokens[:, 1]).last_hidden_state
        return self.model.text_proj(states[:, 0, :])


def canonical_text(text: str) -> str:
    """``text`` as SigLIP's captions were written in training (big_vision's rule, which open_clip
    applies to SigLIP's texts): underscores as spaces, ASCII punctuation dropped, lower case,
    one space between words."""
    return " ".join(text.replace("_", " ").translate(_PUNCTUATION).lower().split())


class HFSiglip(HFClip):
    """A transformers ``SiglipModel``: ``tokenize`` gives int64 (B, L) token ids of the canonical
    texts padded to the text tower's positions; the embeddings are the towers' pooled outputs
    (module docstring)."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(**self.vision_inputs(images)).pooler_output

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer([canonical_text(text) for text in texts], padding="max_length", truncation=True,
                               max_length=self.max_tokens, return_tensors="pt")
        return batch["input_ids"].long()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.text_model(input_ids=tokens).pooler_output


def _transformers():
    return require_transformers("transformers' CLIP-like and DINOv2 models", "transformers")


def is_clip_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a local folder of a transformers model read here
    (``config.json`` of one of :data:`MODEL_TYPES`)."""
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        return False
    try:
        return read_json(path, str(folder), "the model's configuration").get("model_type") in MODEL_TYPES
    except (InputError, AttributeError):
        return False


SENTENCE_MODULES = "modules.json"


def sentence_transformers_clip(path: Path) -> str | None:
    """The folder (relative to the model's) of the transformers CLIP that the sentence-transformers
    ``modules.json`` at ``path`` names as its one module (``CLIPModel``, perhaps followed by
    ``Normalize``, which changes no direction), or None when it is not such a model."""
    import json

    try:
        modules = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(modules, list) and modules and all(isinstance(module, dict) for module in modules)):
        return None
    kinds = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in modules]
    inside = modules[0].get("path")
    if kinds[0] != "CLIPModel" or any(kind != "Normalize" for kind in kinds[1:]) or not isinstance(inside, str) \
            or not inside or ".." in inside.split("/") or inside.startswith("/"):
        return None
    return inside


def transformers_repository(spec: str) -> str | None:
    """What :func:`load_hf_clip` reads for the ``hf-hub:`` repository ``spec``: ``spec`` itself when
    it holds a transformers model of :data:`MODEL_TYPES` (:func:`is_clip_repository`), the spec of
    its CLIP folder when it is a sentence-transformers CLIP (:func:`sentence_transformers_clip`), else None."""
    from unicom.models import hub

    if is_clip_repository(spec):
        return spec
    repo, inside, revision = hub.split_hf_spec(spec)
    if inside:
        return None
    try:
        inner = sentence_transformers_clip(hub.hf_file(spec, SENTENCE_MODULES))
    except (hub.NotAModelFolder, hub.NotInCache):
        return None
    return None if inner is None else f"hf-hub:{repo}/{inner}" + (f"@{revision}" if revision else "")


def unread_model(path: Path) -> str | None:
    """What the transformers ``config.json`` at ``path`` holds when its model type is not one of
    :data:`MODEL_TYPES` (its code in its repository, for ``auto_map``), else None (none, or one read here)."""
    import json

    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(kind, str) or kind in MODEL_TYPES:
        return None
    code = (", whose code is in its repository (auto_map; transformers' trust_remote_code, which unicom does not "
            "run)") if config.get("auto_map") else ""
    return f"a transformers model of type {kind!r}{code}; the types read are {', '.join(MODEL_TYPES)}"


def unread_repository_model(spec: str) -> str | None:
    """:func:`unread_model` of the ``config.json`` of the ``hf-hub:`` repository ``spec`` (None without one)."""
    from unicom.models import hub

    try:
        return unread_model(hub.hf_file(spec, "config.json"))
    except (hub.NotAModelFolder, hub.NotInCache):
        return None


def is_clip_repository(spec: str) -> bool:
    """Whether the ``hf-hub:`` repository ``spec`` holds a transformers model of one of :data:`MODEL_TYPES`
    and not open_clip's configuration (its ``config.json`` fetched into the cache to tell)."""
    from unicom.models import hub

    try:
        config = hub.hf_file(spec, "config.json")
    except (hub.NotAModelFolder, hub.NotInCache):  # none (offline: none cached): not one
        return False
    return not hub_file(spec, OPEN_CLIP_FILE, hub.hf_commit(config, spec)) and is_clip_folder(config.parent)


def _rescaled_and_resampled(config: dict, path: Path, default: int) -> int:
    """The resize filter ``preprocessor_config.json`` (``config``, read from ``path``) names (PIL's
    number, ``default`` when it names none), once its values are checked to be rescaled by 1/255
    and the filter to be one of :data:`RESAMPLE`."""
    if abs(float(config.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise InputError(f"{path}: rescale_factor {config['rescale_factor']}; only 1/255 is read")
    return _resample(config, path, default)


def _resample(config: dict, path: Path, default: int) -> int:
    """The resize filter ``config`` names (PIL's number, ``default`` when it names none), one of :data:`RESAMPLE`."""
    resample = config.get("resample", default)
    if resample not in RESAMPLE:
        raise InputError(f"{path}: resample {resample!r}; read are {', '.join(f'{k} ({v})' for k, v in RESAMPLE.items())}")
    return resample


def _pixels(path: Path, value, *keys) -> int:
    """The side in pixels that a ``size`` or ``crop_size`` of ``preprocessor_config.json`` (read
    from ``path``) gives: a whole number, or a dict whose ``keys`` name one same number."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    found = [value.get(key) for key in keys] if isinstance(value, dict) else []
    if found and all(isinstance(number, int) and number > 0 for number in found) and len(set(found)) == 1:
        return found[0]
    raise InputError(f"{path}: {value!r}: read are a square crop and a short side of whole pixels "
                     "({\"shortest_edge\": 224}, {\"height\": 224, \"width\": 224})")


def _three_numbers(path: Path, key: str, value, positive: bool = False) -> list[float]:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)) \
            or (positive and not all(v > 0 for v in value)):
        raise InputError(f"{path}: {key} {value!r}; expected 3 {'positive ' if positive else ''}numbers")
    return [float(v) for v in value]


def image_transform(config: dict, path: Path, squash: bool = False):
    """The image transform ``preprocessor_config.json`` (``config``, read from ``path``) describes:
    CLIP's (short side, centre crop), or with ``squash`` SigLIP's (both sides to ``size``)."""
    from unicom.models.export import build_transform

    def pixels(value, *keys):
        return _pixels(path, value, *keys)

    flags = ("do_resize", "do_normalize", "do_rescale") if squash else ("do_resize", "do_center_crop", "do_normalize",
                                                                         "do_rescale")
    for flag in flags:
        if config.get(flag) is False:
            raise InputError(f"{path}: {flag} false: only {'SigLIP' if squash else 'CLIP'}'s preprocessing (resize, "
                             f"{'' if squash else 'centre crop, '}rescale, normalise) is read")
    if squash and config.get("do_center_crop") is True:
        raise InputError(f"{path}: do_center_crop true: SigLIP's preprocessing resizes both sides and crops nothing")
    resample = _rescaled_and_resampled(config, path, 3)
    if squash:
        return build_transform({"size": pixels(config.get("size", 224), "height", "width"), "resize_mode": "squash",
                                "interpolation": RESAMPLE[resample], "mean": list(config.get("image_mean", [])),
                                "std": list(config.get("image_std", []))})
    size = pixels(config.get("crop_size", 224), "height", "width")
    short_side = pixels(config.get("size", 224), "shortest_edge")
    if short_side < size:
        raise InputError(f"{path}: a short side of {short_side} pixels cannot be cropped to {size}")
    return build_transform({"size": size, "resize_size": short_side, "resize_mode": "shortest",
                            "interpolation": RESAMPLE[resample], "mean": list(config.get("image_mean", [])),
                            "std": list(config.get("image_std", []))})


def _both_sides_or_crop(config: dict) -> tuple[dict, bool]:
    """Chinese-CLIP's preprocessing: (``config``, whether both sides are resized to ``size``).
    Its published folders resize both sides to ``{"height": S, "width": S}`` (a centre crop of
    that same size, if asked for, takes the whole image); with ``{"shortest_edge": S}`` it is
    CLIP's short side and centre crop."""
    size = config.get("size")
    if isinstance(size, dict) and "shortest_edge" in size:
        return config, False
    if config.get("do_center_crop") is True and config.get("crop_size") not in (None, size):
        return config, False  # a crop of another size: as CLIP's (which names what it cannot read)
    return {**config, "do_center_crop": False}, True


def efficientnet_transform(config: dict, path: Path):
    """The image transform of ``preprocessor_config.json`` (``config``, read from ``path``) of an
    ALIGN folder, as transformers' ``EfficientNetImageProcessor`` reads it (its defaults,
    :data:`EFFICIENTNET_PREPROCESSOR`, for the keys left out): both sides resized to ``size``, the
    centre ``crop_size`` cut out (``do_center_crop``), the values x rescaled to
    ``x * rescale_factor`` (less 1 with ``rescale_offset``), normalised by ``image_mean`` and
    ``image_std`` (``do_normalize``) and divided by ``image_std`` once more (``include_top``).
    Each of these is linear in x / 255: they are one mean and std per channel."""
    from unicom.models.export import build_transform

    config = {**EFFICIENTNET_PREPROCESSOR, **config}
    for flag in ("do_resize", "do_rescale"):
        if config[flag] is not True:
            raise InputError(f"{path}: {flag} {config[flag]!r}: only images resized and rescaled (EfficientNet's "
                             "preprocessing) are read")
    resample = _resample(config, path, EFFICIENTNET_PREPROCESSOR["resample"])
    side = _pixels(path, config["size"], "height", "width")
    crop = _pixels(path, config["crop_size"], "height", "width") if config["do_center_crop"] else side
    if crop > side:
        raise InputError(f"{path}: a crop of {crop} pixels cannot be cut from images resized to {side}")
    scale = config["rescale_factor"]
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
        raise InputError(f"{path}: rescale_factor {scale!r}; expected a positive number")
    scale, offset = 255 * float(scale), 1.0 if config["rescale_offset"] else 0.0
    mean, std = [0.0] * 3, [1.0] * 3
    if config["do_normalize"]:
        mean = _three_numbers(path, "image_mean", config["image_mean"])
        std = _three_numbers(path, "image_std", config["image_std"], positive=True)
    # include_top divides by image_std again (whether or not the values were normalised)
    top = _three_numbers(path, "image_std", config["image_std"], positive=True) if config["include_top"] else [1.0] * 3
    # (scale * v - offset - m) / (s * t) = (v - (offset + m) / scale) / (s * t / scale), v = x / 255
    return build_transform({"size": crop, "resize_size": side, "resize_mode": "squash",
                            "interpolation": RESAMPLE[resample], "mean": [(offset + m) / scale for m in mean],
                            "std": [s * t / scale for s, t in zip(std, top)]})


def processor_transform(config: dict, path: Path):
    """The image transform of ``preprocessor_config.json`` (``config``, read from ``path``) as the
    transformers image processor it names (``image_processor_type``) reads it, the processor's
    defaults for the keys left out: CLIP's (short side, centre crop), ViT's and SigLIP's (both
    sides to ``size``) or EfficientNet's (:func:`efficientnet_transform`)."""
    kind = str(config.get("image_processor_type", "")).removesuffix("Fast")
    if kind == "CLIPImageProcessor":
        return image_transform({**DEFAULT_PREPROCESSOR, **config}, path)
    squashed = {"ViTImageProcessor": VIT_PREPROCESSOR, "SiglipImageProcessor": SIGLIP_PREPROCESSOR,
                "BlipImageProcessor": BLIP_PREPROCESSOR}
    if kind in squashed:
        return image_transform({**squashed[kind], **config}, path, squash=True)
    if kind == "EfficientNetImageProcessor":
        return efficientnet_transform(config, path)
    raise InputError(f"{path}: image_processor_type {config.get('image_processor_type')!r}; read are "
                     "CLIPImageProcessor, ViTImageProcessor, SiglipImageProcessor, BlipImageProcessor and "
                     "EfficientNetImageProcessor")


def naflex_transform(config: dict, path: Path, patch: int) -> NaFlexTransform:
    """SigLIP 2's NaFlex preprocessing as ``preprocessor_config.json`` (``config``, read from
    ``path``) describes it, for a vision tower of ``patch``-pixel patches."""
    for flag in ("do_resize", "do_normalize", "do_rescale"):
        if config.get(flag) is False:
            raise InputError(f"{path}: {flag} false: only SigLIP 2's NaFlex preprocessing (resize to at most "
                             "max_num_patches patches, rescale, normalise) is read")
    resample = _rescaled_and_resampled(config, path, NAFLEX_PREPROCESSOR["resample"])
    sizes = {key: config.get(key, NAFLEX_PREPROCESSOR[key]) for key in ("patch_size", "max_num_patches")}
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{path}: {key} {value!r}; expected a positive whole number")
    if sizes["patch_size"] != patch:
        raise InputError(f"{path}: patch_size {sizes['patch_size']}, but the vision tower's patches are {patch} pixels "
                         "(config.json); the two files are of different models")
    mean = _three_numbers(path, "image_mean", config.get("image_mean", NAFLEX_PREPROCESSOR["image_mean"]))
    std = _three_numbers(path, "image_std", config.get("image_std", NAFLEX_PREPROCESSOR["image_std"]), positive=True)
    return NaFlexTransform(patch, sizes["max_num_patches"], RESAMPLE[resample], mean, std)


def _check_align_widths(config, path: Path) -> None:
    """Refuse an ALIGN whose image embeddings (the last block's channels) are not as wide as its
    text embeddings (``projection_dim``): the two would not share a space."""
    from transformers.models.align import modeling_align

    width = modeling_align.round_filters(config.vision_config, config.vision_config.out_channels[-1])
    if width != config.projection_dim:
        raise InputError(f"{path}: the image tower's last block has {width} channels, but the text tower's "
                         f"projection_dim is {config.projection_dim}: the two embeddings would not share a space")


def load_hf_clip(spec: str | os.PathLike, device: str | torch.device = "cpu") -> Encoder:
    """The transformers model (one of :data:`MODEL_TYPES`) of a folder or ``hf-hub:`` repository
    (module docstring), in eval mode."""
    from unicom.engine.device import resolve_device
    from unicom.models import hub

    transformers = _transformers()
    spec = os.fspath(spec)
    device = resolve_device(str(device), "device")
    folder = hub_folder(spec, (PREPROCESSOR_FILE,)) if hub.is_hf_spec(spec) else Path(spec).expanduser()
    path = folder / "config.json"
    config = read_json(path, spec, "a transformers CLIP-like or DINOv2 model folder holds config.json, the weights, "
                                   f"the tokenizer's files (a model with a text tower) and {PREPROCESSOR_FILE}")
    kind = config.get("model_type")
    if kind not in MODEL_TYPES:
        raise InputError(f"{path}: model_type {kind!r}, not one of {', '.join(map(repr, MODEL_TYPES))}")
    names = MODEL_TYPES[kind]
    # a CLIP vision tower is saved with its projection into CLIP's space (CLIPVisionModelWithProjection) or without
    clip_projected = kind == CLIP_VISION_TYPE and names[1] in (config.get("architectures") or [])
    if kind == CLIP_VISION_TYPE and not clip_projected:
        names = (names[0], "CLIPVisionModel")
    if kind == BLIP_TYPE and config.get("architectures") and BLIP_RETRIEVAL not in config["architectures"]:
        raise InputError(f"{path}: a BLIP {', '.join(config['architectures'])} (captioning or question answering) "
                         f"has no image-text embeddings; BLIP's retrieval models ({BLIP_RETRIEVAL}: "
                         "Salesforce/blip-itm-base-coco, ...) have them")
    if kind == AIMV2_TYPE and not {"text_config", "vision_config"} <= set(config):
        raise InputError(f"{path}: an AIMv2 image encoder in Apple's own layout (model_type 'aimv2' without "
                         "text_config and vision_config; its code in the repository, auto_map "
                         f"{config.get('auto_map')!r}), which transformers does not build: load its weights with "
                         "timm (timm/aimv2_large_patch14_224.apple_pt, the size and resolution of the repository's "
                         f"name), or give the folder transformers' conversion wrote (model_type {AIMV2_VISION_TYPE!r})")
    missing = [name for name in names if not hasattr(transformers, name)]
    if missing:
        raise InputError(f"{path}: model_type {kind!r} needs transformers' {missing[-1]}, which transformers "
                         f"{transformers.__version__} does not have; pip install -U transformers")
    config_class, model_class = (getattr(transformers, name) for name in names)
    try:
        with errors_only(transformers):  # SigLIP's builds default tower configurations first, and warns about them
            model_config = config_class.from_dict(config)
    except (TypeError, ValueError, KeyError) as error:
        raise InputError(f"{path}: not a {model_class.__name__} configuration transformers reads ({error})") from error
    siglip = kind in (SIGLIP_TYPE, SIGLIP2_TYPE)
    if siglip:  # the text head's width: projection_size (transformers 4.47 on), the tower's own width before
        text_width = getattr(model_config.text_config, "projection_size", None) or model_config.text_config.hidden_size
        if text_width != model_config.vision_config.hidden_size:
            raise InputError(f"{path}: the text tower's projection_size ({text_width}) is not the vision tower's "
                             f"hidden_size ({model_config.vision_config.hidden_size}): the two embeddings would not "
                             "share a space")
    if kind == ALIGN_TYPE:
        _check_align_widths(model_config, path)
    model = load_pretrained(model_class, model_config, folder, spec, transformers)
    if kind == AIMV2_TYPE:
        # AIMv2's text tower attends causally (its mask is causal and padded), but transformers' attention
        # modules say they do not, so a batch without padding (no mask) would attend both ways under SDPA:
        # a text's embedding would depend on the other texts of its batch
        for module in model.text_model.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = True
    squash = kind in (SIGLIP_TYPE, SIGLIP_VISION_TYPE)
    defaults = (SIGLIP_PREPROCESSOR if squash else NAFLEX_PREPROCESSOR if kind in NAFLEX_TYPES
                else DINOV2_PREPROCESSOR if kind in DINOV2_TYPES else ALIGN_PREPROCESSOR if kind == ALIGN_TYPE
                else BLIP_PREPROCESSOR if kind == BLIP_TYPE
                else CHINESE_CLIP_PREPROCESSOR if kind == CHINESE_CLIP_TYPE else DEFAULT_PREPROCESSOR)
    preprocess = (read_json(folder / PREPROCESSOR_FILE, spec, "the image preprocessing")
                  if (folder / PREPROCESSOR_FILE).is_file() else defaults)
    if kind == CHINESE_CLIP_TYPE:
        preprocess, squash = _both_sides_or_crop(preprocess)
    if kind in NAFLEX_TYPES:
        vision = model_config.vision_config if kind == SIGLIP2_TYPE else model_config
        transform = naflex_transform(preprocess, folder / PREPROCESSOR_FILE, int(vision.patch_size))
    elif kind == ALIGN_TYPE:
        transform = efficientnet_transform(preprocess, folder / PREPROCESSOR_FILE)
    elif kind == BLIP_TYPE:
        transform = image_transform({**BLIP_PREPROCESSOR, **preprocess}, folder / PREPROCESSOR_FILE, squash=True)
    elif kind == DUAL_ENCODER_TYPE:
        if preprocess is defaults:
            raise InputError(f"{folder}: a vision-text dual encoder's folder holds {PREPROCESSOR_FILE}, which says "
                             "how its vision tower's images are prepared (save the model's processor with it)")
        transform = processor_transform(preprocess, folder / PREPROCESSOR_FILE)
    else:
        transform = image_transform(preprocess, folder / PREPROCESSOR_FILE, squash=squash)
    if kind in DINOV2_TYPES:
        return HFImageModel(model, transform, int(model_config.hidden_size), f"transformers DINOv2 {spec}",
                            "DINOv2 embeds images only").to(device).eval()
    if kind == AIMV2_VISION_TYPE:  # with its attention-pooling head its output, else the tokens averaged (as timm's)
        pooled = "pooler_output" if model_config.use_head else MEAN_OF_TOKENS
        return HFImageModel(model, transform, int(model_config.hidden_size), f"transformers AIMv2 {spec}",
                            "an AIMv2 image encoder has no text tower (its LiT models, model_type 'aimv2', have one)",
                            pooled).to(device).eval()
    if kind in (CLIP_VISION_TYPE, SIGLIP_VISION_TYPE, SIGLIP2_VISION_TYPE):
        family = {CLIP_VISION_TYPE: "CLIP", SIGLIP_VISION_TYPE: "SigLIP"}.get(kind, "SigLIP 2")
        dims = int(model_config.projection_dim if clip_projected else model_config.hidden_size)
        encoder = HFImageModel(model, transform, dims, f"transformers {model_class.__name__} {spec}",
                               f"a {family} vision tower saved alone has no text tower",
                               "image_embeds" if clip_projected else "pooler_output")
        return encoder.to(device).eval()
    text_tokenizer = tokenizer(folder, spec, transformers)
    positions = int(model_config.text_config.max_position_embeddings)
    if kind in FEATURES_TYPES:
        if model_config.text_config.model_type in ROBERTA_TEXT_TYPES:  # positions from the pad token's id + 1
            positions -= int(model_config.text_config.pad_token_id) + 1
        max_tokens = min(positions, text_tokenizer.model_max_length or positions)
        family = {CHINESE_CLIP_TYPE: "Chinese-CLIP", ALTCLIP_TYPE: "AltCLIP", ALIGN_TYPE: "ALIGN",
                  METACLIP2_TYPE: "MetaCLIP 2", DUAL_ENCODER_TYPE: "VisionTextDualEncoder", AIMV2_TYPE: "AIMv2"}[kind]
        return HFFeatures(model, transform, text_tokenizer, max_tokens, int(model_config.projection_dim),
                          f"transformers {family} {spec}").to(device).eval()
    if kind == BLIP_TYPE:
        max_tokens = min(positions, text_tokenizer.model_max_length or positions)
        return HFBlip(model, transform, text_tokenizer, max_tokens, int(model_config.image_text_hidden_size),
                      f"transformers BLIP {spec}").to(device).eval()
    if siglip:  # padded to all positions: the last one is read
        family = "SigLIP 2 NaFlex" if kind == SIGLIP2_TYPE else "SigLIP"
        return HFSiglip(model, transform, text_tokenizer, positions, int(model_config.vision_config.hidden_size),
                        f"transformers {family} {spec}").to(device).eval()
    max_tokens = min(positions, text_tokenizer.model_max_length or positions)
    encoder = HFClip(model, transform, text_tokenizer, max_tokens, int(model_config.projection_dim),
                     f"transformers CLIP {spec}")
    return encoder.to(device).eval()
