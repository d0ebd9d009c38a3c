"""CLIP-shaped Vision Transformers (built with timm) and the factory of trainable models.

:class:`ClipViT` is CLIP's image tower: patch embedding without bias, a class token, a
learned position embedding for the class token and every patch, a LayerNorm before the
blocks (``ln_pre``), pre-norm blocks with GELU (QuickGELU for OpenAI's weights), a final
LayerNorm on the class token and a linear projection without bias to the embedding
(``(B, 3, S, S) -> (B, D)``, D configurable). The sizes of the models of the Unicom paper
are rows of :data:`unicom.models.registry.MODELS`; a new size is
:func:`unicom.models.registry.register_model`. ``ClipViT`` is a timm ``VisionTransformer``
plus a projection, so its model folders also carry timm's config (:data:`TIMM_FORM`).

:func:`create_model` builds any trainable model of the registry by name and optionally
initialises it:

* the CLIP-shaped sizes (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, ``ViT-L-14-336``) build
  a :class:`ClipViT` (architecture ``clip_vit``);
* the released checkpoints (``ViT-B/32`` ... ``ViT-L/14@336px``) build their architecture
  (:class:`unicom.models.unicom_vit.UnicomViT`, ``unicom_vit``);
* ``init`` is a registered name with weights (downloaded and verified), a released-format
  ``.pt`` file, a model folder, an open_clip checkpoint file (``visual.*`` keys) or a
  training checkpoint of ``unicom train``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from unicom.errors import InputError
from unicom.models.registry import TimmForm

ARCHITECTURE = "clip_vit"  # the name of ClipViT in unicom.models.registry.ARCHITECTURES
ACTIVATIONS = ("gelu", "quick_gelu")


@dataclass(frozen=True)
class ClipViTSettings:
    """The sizes of a :class:`ClipViT`.

    ``image_size`` and ``patch_size`` in pixels; ``width`` the token dimension; ``heads``
    attention heads; ``mlp_ratio`` the MLP's hidden size over ``width``; ``embedding_dim``
    D, the output size; ``act`` the MLP activation (``gelu``, or ``quick_gelu`` as in
    OpenAI's CLIP weights).
    """

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    embedding_dim: int = 512
    act: str = "gelu"
    in_chans: int = 3

    def __post_init__(self):
        from unicom.models.unicom_vit import ViTSettings

        if self.act not in ACTIVATIONS:
            raise InputError(f"ViT setting act={self.act!r}: expected one of {ACTIVATIONS}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise InputError(f"ViT setting mlp_ratio={self.mlp_ratio!r}: expected a positive number")
        # the integer sizes obey the same rules as the released architecture's
        ViTSettings(self.image_size, self.patch_size, self.width, self.depth, self.heads,
                    max(1, round(self.width * self.mlp_ratio)), self.embedding_dim, self.in_chans)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> "ClipViTSettings":
        """Settings from a JSON object; unknown keys are an error (as for the released architecture)."""
        from unicom.models.unicom_vit import ViTSettings

        return ViTSettings.from_dict.__func__(cls, settings)


class PatchConv(nn.Conv2d):
    """A patch embedding's convolution (kernel = stride, no padding) computed as one matrix
    product over the flattened patches: the same function and parameters as the Conv2d
    (checkpoints unchanged), but the GPU runs it as a plain GEMM instead of leaving the
    choice to cuDNN, whose kernels for this shape's weight gradient were measured at 8.5 ms
    of a 298 ms ViT-B/16 step at batch 1024 on an H200 (a GEMM of that size takes ~0.3 ms).
    Other shapes of input (a side not a multiple of the patch) take the convolution."""

    @classmethod
    def of(cls, conv: nn.Conv2d) -> nn.Conv2d:
        """``conv`` as a PatchConv sharing its parameters, or ``conv`` itself when it is not a
        patch embedding's (kernel != stride, padding, groups or dilation)."""
        if (conv.kernel_size != conv.stride or conv.padding != (0, 0) or conv.groups != 1
                or conv.dilation != (1, 1) or conv.padding_mode != "zeros"):
            return conv
        patch = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, bias=False, device="meta")
        patch.weight, patch.bias = conv.weight, conv.bias
        return patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.kernel_size
        if x.dim() != 4 or x.shape[2] % ph or x.shape[3] % pw:
            return super().forward(x)
        batch, channels, height, width = x.shape
        h, w = height // ph, width // pw
        patches = x.reshape(batch, channels, h, ph, w, pw).permute(0, 2, 4, 1, 3, 5).reshape(batch, h * w, -1)
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)  # (B, h·w, out)
        return out.transpose(1, 2).reshape(batch, self.out_channels, h, w)  # a view: (B, out, h, w)


class ClipViT(nn.Module):
    """CLIP's image tower with a projection to ``embedding_dim``: ``(B, 3, S, S) -> (B, D)``.

    ``trunk`` is a timm ``VisionTransformer`` (``num_classes=0``: it returns the final
    LayerNorm of the class token, CLIP's ``ln_post``); ``projection`` is CLIP's ``proj``
    as a Linear without bias. Outputs are not L2-normalised.

    Args:
        settings: the sizes (:class:`ClipViTSettings`).
        drop_path_rate: stochastic depth for training (timm's linear rule over the blocks).
    """

    def __init__(self, settings: ClipViTSettings, drop_path_rate: float = 0.0):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.settings = settings
        self.embedding_dim = settings.embedding_dim
        self.trunk = VisionTransformer(
            img_size=settings.image_size,
            patch_size=settings.patch_size,
            in_chans=settings.in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=settings.width,
            depth=settings.depth,
            num_heads=settings.heads,
            mlp_ratio=settings.mlp_ratio,
            qkv_bias=True,
            class_token=True,
            pre_norm=True,  # CLIP's ln_pre; timm then drops the patch embedding's bias, as CLIP has none
            norm_layer=partial(nn.LayerNorm, eps=1e-5),
            act_layer=settings.act,
            drop_path_rate=drop_path_rate,
        )
        self.trunk.patch_embed.proj = PatchConv.of(self.trunk.patch_embed.proj)
        for block in self.trunk.blocks:
            # attention through F.scaled_dot_product_attention (flash attention on GPUs),
            # whatever timm's TIMM_FUSED_ATTN says: the explicit softmax path stores the
            # (tokens x tokens) attention matrix of every head and runs several times slower
            block.attn.fused_attn = True
        self.projection = nn.Linear(settings.width, settings.embedding_dim, bias=False)
        if not self.projection.weight.is_meta:
            self.reset_projection()

    @torch.no_grad()
    def reset_projection(self) -> None:
        """CLIP's initialisation of ``proj``: normal with std width^-0.5."""
        nn.init.normal_(self.projection.weight, std=self.settings.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.trunk(images))


def build_clip_vit(settings: Mapping[str, Any], drop_path_rate: float = 0.0) -> ClipViT:
    """Builder of the ``clip_vit`` architecture (:mod:`unicom.models.registry`)."""
    return ClipViT(ClipViTSettings.from_dict(settings), drop_path_rate=drop_path_rate)


# ----------------------------------------------------------------------- timm's form

_TIMM_SIZES = {768: "base", 1024: "large", 1280: "huge"}


def _timm_entry_point(settings: ClipViTSettings) -> str:
    """A timm CLIP ViT of these sizes if timm names one, else its B/16. Every size is
    given again in the config's ``model_args``; the entry point only contributes CLIP's
    pre-norm and LayerNorm (eps 1e-5), which all of them share."""
    import timm

    act = "quickgelu_" if settings.act == "quick_gelu" else ""
    name = f"vit_{_TIMM_SIZES.get(settings.width, 'base')}_patch{settings.patch_size}_clip_{act}{settings.image_size}"
    return name if timm.is_model(name) else "vit_base_patch16_clip_224"


def timm_config(settings: Mapping[str, Any], embedding_dim: int, data_config: Mapping[str, Any]) -> dict[str, Any]:
    """timm's ``config.json`` for a :class:`ClipViT`: a ``VisionTransformer`` with
    ``num_classes=embedding_dim`` whose ``head`` is the projection (its bias zero)."""
    s = ClipViTSettings.from_dict(settings)
    return {
        "architecture": _timm_entry_point(s),
        "num_classes": embedding_dim,
        "num_features": s.width,
        "global_pool": "token",
        "model_args": {
            "img_size": s.image_size, "patch_size": s.patch_size, "in_chans": s.in_chans, "embed_dim": s.width,
            "depth": s.depth, "num_heads": s.heads, "mlp_ratio": s.mlp_ratio, "act_layer": s.act,
            "class_token": True, "global_pool": "token", "pre_norm": True, "qkv_bias": True,
        },
        "pretrained_cfg": {
            **data_config,
            "input_size": [s.in_chans, s.image_size, s.image_size],
            "fixed_input_size": True,
            "num_classes": embedding_dim,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def to_timm(state_dict: Mapping[str, torch.Tensor], settings: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """:class:`ClipViT` keys -> timm ``VisionTransformer`` keys: ``trunk.`` dropped, the
    projection as ``head.weight`` with a zero ``head.bias``."""
    out = {key[len("trunk."):]: value for key, value in state_dict.items() if key.startswith("trunk.")}
    projection = state_dict["projection.weight"]
    out["head.weight"] = projection
    out["head.bias"] = torch.zeros(projection.shape[0], dtype=projection.dtype)
    return out


def from_timm(state_dict: Mapping[str, torch.Tensor], source: str = "state dict",
              settings: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """timm ``VisionTransformer`` keys -> :class:`ClipViT` keys (the inverse of :func:`to_timm`)."""
    bias = state_dict.get("head.bias")
    if bias is not None and bool(bias.count_nonzero()):
        raise InputError(
            f"{source}: head.bias is not zero, but a ClipViT's projection has no bias; these are not the weights "
            "this folder's unicom_model.json describes"
        )
    out = {}
    for key, value in state_dict.items():
        if key == "head.weight":
            out["projection.weight"] = value
        elif key != "head.bias":
            out[f"trunk.{key}"] = value
    return out


TIMM_FORM = TimmForm(timm_config, to_timm, from_timm)


# ------------------------------------------------------------------ open_clip weights

# open_clip / OpenAI key (after ``visual.``) -> ClipViT key; ``{i}`` is a block index.
_OPEN_CLIP_KEYS = {
    "class_embedding": "trunk.cls_token",
    "positional_embedding": "trunk.pos_embed",
    "conv1.weight": "trunk.patch_embed.proj.weight",
    "ln_pre.weight": "trunk.norm_pre.weight",
    "ln_pre.bias": "trunk.norm_pre.bias",
    "ln_post.weight": "trunk.norm.weight",
    "ln_post.bias": "trunk.norm.bias",
    "proj": "projection.weight",
}
_OPEN_CLIP_BLOCK_KEYS = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight",
    "attn.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_BLOCK_PREFIX = "transformer.resblocks."


def is_open_clip_state(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict holds an open_clip / OpenAI CLIP image tower (``visual.*`` keys)."""
    return "visual.conv1.weight" in state_dict


def open_clip_head_count(width: int, depth: int, patch_size: int) -> int:
    """The attention heads of an open_clip image tower of these sizes: width / head_width,
    with the head width of open_clip's model configs of that width, depth and patch size
    (80 for ViT-H-14, 88 for ViT-g-14, 104 for ViT-bigG-14), else 64 (CLIP's B and L towers)."""
    import open_clip

    head_widths = set()
    for name in open_clip.list_models():
        vision = (open_clip.get_model_config(name) or {}).get("vision_cfg") or {}
        if (vision.get("width"), vision.get("layers"), vision.get("patch_size")) == (width, depth, patch_size):
            head_widths.add(vision.get("head_width", 64))
    head_width = head_widths.pop() if len(head_widths) == 1 else 64
    return max(1, width // head_width)


def open_clip_settings(state_dict: Mapping[str, torch.Tensor], act: str = "gelu", source: str = "checkpoint",
                       heads: int | None = None) -> ClipViTSettings:
    """The :class:`ClipViTSettings` of an open_clip image tower, read off its tensor shapes.

    The head count is in no shape: ``heads`` when given, else :func:`open_clip_head_count`.
    Neither is the activation: ``act`` (``quick_gelu`` for OpenAI's weights, ``gelu`` for
    open_clip's LAION ones).
    """
    try:
        width, in_chans, patch, _ = state_dict["visual.conv1.weight"].shape
        tokens = state_dict["visual.positional_embedding"].shape[0]
        mlp = state_dict[f"visual.{_BLOCK_PREFIX}0.mlp.c_fc.weight"].shape[0]
    except (KeyError, ValueError) as error:
        raise InputError(f"{source}: not an open_clip ViT image tower ({error})") from error
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise InputError(f"{source}: {tokens} position embeddings do not form a square grid plus a class token")
    depth = len({key.split(".")[3] for key in state_dict if key.startswith(f"visual.{_BLOCK_PREFIX}")})
    embedding_dim = state_dict["visual.proj"].shape[1] if "visual.proj" in state_dict else width
    heads = heads or open_clip_head_count(width, depth, patch)
    return ClipViTSettings(grid * patch, patch, width, depth, heads, mlp / width, embedding_dim, act, in_chans)


def open_clip_to_clip_vit(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename (and reshape) the image tower of an open_clip state dict into :class:`ClipViT` keys.

    Text-tower keys are ignored; an image-tower key that has no counterpart is an error
    (an attention-pooling or other non-standard tower this model cannot represent).
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if not key.startswith("visual."):
            continue
        name = key[len("visual."):]
        if name.startswith(_BLOCK_PREFIX):
            index, rest = name[len(_BLOCK_PREFIX):].split(".", 1)
            target = _OPEN_CLIP_BLOCK_KEYS.get(rest)
            if target is None:
                unknown.append(key)
                continue
            out[f"trunk.blocks.{index}.{target}"] = value
            continue
        target = _OPEN_CLIP_KEYS.get(name)
        if target is None:
            unknown.append(key)
            continue
        if name == "class_embedding":
            value = value.reshape(1, 1, -1)
        elif name == "positional_embedding":
            value = value.unsqueeze(0)
        elif name == "proj":
            value = value.t()  # CLIP computes x @ proj; a Linear computes x @ weight.T
        out[target] = value
    if unknown:
        raise InputError(f"{source}: image-tower keys without a counterpart in a CLIP ViT: {unknown[:10]}")
    return out


# --------------------------------------------------------------------------- factory


def model_names() -> list[str]:
    """Every name :func:`create_model` accepts: the registered models of trainable architectures."""
    from unicom.models.registry import MODELS, get_architecture

    return [name for name, cfg in MODELS.items() if get_architecture(cfg.architecture).trainable]


def named_settings(name: str) -> tuple[str, dict[str, Any]]:
    """``(architecture, settings)`` of a model name (see :func:`model_names`), or of
    ``timm/<name>``, any timm image model (:mod:`unicom.models.timm_backbone`)."""
    from unicom.models.registry import MODELS
    from unicom.models.timm_backbone import ARCHITECTURE as TIMM, is_timm_name, timm_settings

    if is_timm_name(name):
        return TIMM, timm_settings(name)
    if name not in model_names():
        raise InputError(f"unknown model {name!r}; known: {model_names()}, or timm/<name> for a timm image model")
    return MODELS[name].architecture, dict(MODELS[name].settings)


@dataclass
class CreatedModel:
    """A model ready to train: the module, its architecture and settings (for export),
    where its weights came from, and the names of tensors that were freshly initialised."""

    module: nn.Module
    architecture: str
    settings: dict[str, Any]
    init: str | None = None
    init_kind: str = "random"
    reinitialised: list[str] = dataclasses.field(default_factory=list)
    prototypes_from: Path | None = None  # a training checkpoint whose prototypes can be loaded too
    registered_preprocess: dict[str, Any] | None = None  # the registry entry's, when a name chose the model

    @property
    def embedding_dim(self) -> int:
        return int(self.settings["embedding_dim"])

    @property
    def image_size(self) -> int:
        return int(self.settings["image_size"])

    def preprocess(self) -> dict[str, Any]:
        """The evaluation transform as data: the registry entry's for a registered name at
        its own image size, else the architecture's (CLIP's: bicubic shortest side, centre
        crop, CLIP mean/std; a timm model's: timm's at ``image_size``)."""
        from unicom.models.registry import get_architecture

        if self.registered_preprocess is not None and self.registered_preprocess["size"] == self.image_size:
            return dict(self.registered_preprocess)
        return get_architecture(self.architecture).evaluation_preprocess(self.settings)


def _build(architecture: str, settings: dict[str, Any], drop_path_rate: float) -> nn.Module:
    from unicom.models.registry import get_architecture

    found = get_architecture(architecture)
    if not found.trainable:
        raise InputError(f"architecture {architecture!r} cannot be trained; use one of {model_names()}")
    return found.build(settings, drop_path_rate=drop_path_rate)


def _registered_preprocess(name: str | None) -> dict[str, Any] | None:
    from unicom.models.registry import MODELS

    return dict(MODELS[name].preprocess) if name in MODELS else None


def _merge(architecture: str, base: dict[str, Any], overrides: Mapping[str, Any], source: str) -> dict[str, Any]:
    settings = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in settings:
            raise InputError(f"{source}: the {architecture} architecture has no setting {key!r}; its settings are {sorted(settings)}")
        settings[key] = value
    return settings


def _head_keys(architecture: str) -> tuple[str, ...]:
    """The tensors that map to the embedding: re-initialised when its size changes."""
    from unicom.models.registry import get_architecture

    return get_architecture(architecture).embedding_head


def _init_source(init: str) -> tuple[str, Path | None]:
    """What ``init`` names: ``released`` (a registered name with weights), ``folder``
    (a model folder), ``checkpoint`` (training), ``run``, ``file``."""
    from unicom.engine.checkpoint import CHECKPOINTS, MANIFEST, missing_checkpoint_hint
    from unicom.models.export import CONFIG_NAME
    from unicom.models.registry import available_models

    if init in available_models():
        return "released", None
    path = Path(init).expanduser()
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return "folder", path
        if (path / MANIFEST).is_file():
            return "checkpoint", path
        if (path / CHECKPOINTS).is_dir():
            return "run", path
        raise InputError(
            f"{init}: a folder that is neither a model folder (no {CONFIG_NAME}), a training checkpoint "
            f"(no {MANIFEST}) nor a training run (no {CHECKPOINTS}/)"
        )
    if path.is_file():
        return "file", path
    raise InputError(
        f"model.init={init!r}: not a released model ({', '.join(available_models())}), nor an existing file or folder"
        f"{missing_checkpoint_hint(path)}"
    )


def create_model(
    name: str | None = None,
    *,
    init: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    drop_path_rate: float = 0.0,
    act: str | None = None,
) -> CreatedModel:
    """Build a trainable model by ``name`` and/or from the weights of ``init``.

    Args:
        name: a name of :func:`model_names`; may be None when ``init`` fixes the architecture
            (a released model, a released-format file, a model folder, a checkpoint).
        init: where the starting weights come from (module docstring); None: random.
        overrides: settings that replace the named ones (``embedding_dim``, ``image_size``...).
            With ``init``, only ``embedding_dim`` may differ from the weights: the head that
            produces the embedding is then initialised afresh (listed in ``reinitialised``).
        drop_path_rate: stochastic depth for training.
        act: for open_clip weights, the activation (``quick_gelu`` for OpenAI's weights).

    Every tensor of the module is either loaded from ``init`` or listed in ``reinitialised``;
    a key of ``init`` that fits nowhere, or a shape that differs, is an :class:`InputError`.
    """
    overrides = {k: v for k, v in dict(overrides or {}).items() if v is not None}
    if act is not None:
        overrides.setdefault("act", act)
    if init is None:
        if name is None:
            raise InputError("model.name is required when model.init is not given")
        architecture, base = named_settings(name)
        settings = _merge(architecture, base, overrides, f"model {name}")
        return CreatedModel(_build(architecture, settings, drop_path_rate), architecture, settings,
                            registered_preprocess=_registered_preprocess(name))

    init = os.fspath(init)
    from unicom.models.timm_backbone import INIT_PRETRAINED, is_timm_name, load_timm_weights

    if is_timm_name(name) and (init == INIT_PRETRAINED or os.path.isfile(init)):
        # timm's pretrained weights, or a file of the timm model's state dict, read by timm's loader
        architecture, base = named_settings(name)
        settings = _merge(architecture, base, overrides, f"model {name}")
        module = _build(architecture, settings, drop_path_rate)
        return CreatedModel(module, architecture, settings, init, "timm", load_timm_weights(module, init))
    kind, path = _init_source(init)
    prototypes_from = None
    if kind == "released":
        from unicom.models.hub import weights_path
        from unicom.models.registry import model_cfg
        from unicom.models.weights import read_state_dict

        state_dict = read_state_dict(weights_path(init))
        architecture, base = model_cfg(init).architecture, dict(model_cfg(init).settings)
    elif kind == "folder":
        from unicom.models.export import read_config, read_weights

        config = read_config(path)
        architecture, base, state_dict = config["architecture"], dict(config["settings"]), read_weights(path)
    elif kind in ("checkpoint", "run"):
        from unicom.engine.checkpoint import read_model_checkpoint

        architecture, base, state_dict, prototypes_from = read_model_checkpoint(path)
    else:
        from unicom.models.unicom_vit import ARCHITECTURE as UNICOM_VIT
        from unicom.models.unicom_vit import infer_settings
        from unicom.models.weights import read_state_dict

        state_dict = read_state_dict(path)
        if is_open_clip_state(state_dict):
            inferred = open_clip_settings(state_dict, act=overrides.get("act", "gelu"), source=init,
                                          heads=overrides.get("heads"))
            if name is not None:
                named_arch, named = named_settings(name)
                if named_arch != ARCHITECTURE:
                    raise InputError(f"{init}: open_clip weights fit a CLIP ViT (e.g. ViT-B-16), not {name!r}")
                named = _merge(named_arch, named, {k: v for k, v in overrides.items() if k != "embedding_dim"}, init)
                mismatched = [
                    f"{k} {inferred.to_dict()[k]} in the file, {named[k]} for {name}"
                    for k in ("image_size", "patch_size", "width", "depth")
                    if named[k] != inferred.to_dict()[k]
                ]
                if mismatched:
                    raise InputError(f"{init}: the weights are not a {name}: {'; '.join(mismatched)}")
                inferred = dataclasses.replace(inferred, heads=named["heads"], act=named["act"])
            architecture, base = ARCHITECTURE, inferred.to_dict()
            state_dict = open_clip_to_clip_vit(state_dict, init)
        elif "patch_embed.proj.weight" in state_dict and "feature.0.weight" in state_dict:
            architecture, base = UNICOM_VIT, infer_settings(state_dict, init).to_dict()
        else:
            raise InputError(
                f"{init}: neither an open_clip checkpoint (visual.* keys) nor a released Unicom checkpoint "
                f"(patch_embed.*, blocks.*, feature.*); its first keys are {sorted(state_dict)[:6]}"
            )

    if name is not None and kind != "file":
        named_arch, named = named_settings(name)
        # the name as the recipe resizes it (scratch_small.yaml: ViT-B-32 at 32 pixels, 96 wide)
        resized = {k: v for k, v in overrides.items() if k not in ("embedding_dim", "act")}  # as fixed_overrides below
        named = _merge(named_arch, named, resized, f"model {name}")
        fixed = {k: v for k, v in named.items() if k not in ("embedding_dim",)}
        differs = [k for k, v in fixed.items() if base.get(k) != v]
        if named_arch != architecture or differs:
            raise InputError(
                f"model.name={name!r} does not describe the weights of model.init={init!r} "
                f"({architecture} {base}); leave model.name empty to take the architecture from model.init"
            )
    fixed_overrides = {k: v for k, v in overrides.items() if k not in ("embedding_dim", "act")}
    for key, value in fixed_overrides.items():
        if base.get(key) != value:
            raise InputError(
                f"model.{key}={value!r} differs from the weights of {init} ({key}={base.get(key)!r}); "
                "only embedding_dim can be changed when starting from weights"
            )
    settings = _merge(architecture, base, overrides, init)
    module = _build(architecture, settings, drop_path_rate)
    expected = module.state_dict()
    reinitialised = []
    if settings["embedding_dim"] != base["embedding_dim"]:
        head = _head_keys(architecture)
        reinitialised = sorted(k for k in expected if k.startswith(head))
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(head)}
    if architecture == ARCHITECTURE and "projection.weight" not in state_dict and "projection.weight" not in reinitialised:
        reinitialised.append("projection.weight")  # an open_clip tower saved without proj
    from unicom.models.weights import OPTIONAL_KEY_SUFFIXES, check_state_dict

    check_state_dict({k: v for k, v in expected.items() if k not in reinitialised}, state_dict, init)
    loaded = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
    for key in expected:
        if key not in loaded and key not in reinitialised and key.endswith(OPTIONAL_KEY_SUFFIXES):
            loaded[key] = expected[key]
    missing, _ = module.load_state_dict(loaded, strict=False)
    assert set(missing) <= set(reinitialised), missing
    registered = _registered_preprocess(init if kind == "released" else name)
    return CreatedModel(module, architecture, settings, init, kind, reinitialised, prototypes_from, registered)


__all__ = [
    "ClipViT",
    "ClipViTSettings",
    "CreatedModel",
    "TIMM_FORM",
    "build_clip_vit",
    "create_model",
    "model_names",
    "named_settings",
    "open_clip_head_count",
    "open_clip_settings",
    "open_clip_to_clip_vit",
]
