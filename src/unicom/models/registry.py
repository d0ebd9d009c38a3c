"""The model registry: every architecture and every named model, as data.

Two tables, one per kind of name (like timm's model entrypoints and pretrained configs):

* :data:`ARCHITECTURES`: architecture name -> :class:`Architecture`, a builder
  ``builder(settings, **options) -> nn.Module`` (images ``(B, 3, S, S)`` -> embeddings
  ``(B, D)``), the layers that produce the embedding, and the form timm reads, if any;
* :data:`MODELS`: model name -> :class:`ModelCfg`, an architecture with its settings, its
  preprocessing and, for released checkpoints, the URL and SHA-256 of its weights.

:func:`unicom.load`, :func:`unicom.models.encoders.load_encoder` and
:func:`unicom.models.vit.create_model` look names up here and nowhere else. Builders are
given as ``"module:function"`` and imported only when a model of that kind is built, so
reading the tables imports neither torch nor timm. A new name is one call:
:func:`register_model` (a size or a checkpoint of a known architecture) or
:func:`register_architecture` (a new kind of network; the module that defines it calls it).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from unicom.errors import InputError

# CLIP's normalisation, used by every model in the table (the released checkpoints too).
ENTRY_POINT_GROUP = "unicom.architectures"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(size: int) -> dict[str, Any]:
    """CLIP's evaluation transform as data (see :func:`unicom.models.export.build_transform`):
    bicubic resize of the short side to ``size``, centre crop, CLIP mean and std."""
    return {"size": size, "resize_mode": "shortest", "interpolation": "bicubic", "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}


def _resolve(target: str | Callable) -> Any:
    """``target`` itself, or the attribute named by ``"module:attribute"``, imported."""
    if not isinstance(target, str):
        return target
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TimmForm:
    """How a model folder of an architecture is written so that timm can build and load it.

    ``config(settings, embedding_dim, data_config)`` gives timm's ``config.json``;
    ``to_timm(state_dict, settings)`` renames the module's tensors to the timm model's keys and
    ``from_timm(state_dict, source, settings)`` renames them back (an :class:`InputError` naming
    ``source`` when a tensor has no counterpart); ``applies(settings)``, when given, says whether
    the network of these settings has that form (a folder of one that has not is written in
    the module's own keys, without timm's ``config.json``).
    """

    config: Callable[[Mapping[str, Any], int, Mapping[str, Any]], dict[str, Any]]
    to_timm: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]
    from_timm: Callable[[Mapping[str, Any], str, Mapping[str, Any]], dict[str, Any]]
    applies: Callable[[Mapping[str, Any]], bool] | None = None


@dataclass(frozen=True)
class Architecture:
    """A kind of network.

    Attributes:
        name: the name recorded in model folders (``unicom_model.json``'s ``architecture``).
        builder: ``builder(settings) -> nn.Module``, or ``"module:function"``. Trainable
            architectures also accept ``drop_path_rate=``.
        embedding_head: prefixes of the state-dict keys of the layers that produce the
            embedding; ``unicom train`` re-initialises them when ``embedding_dim`` changes.
            Empty for architectures that ``unicom train`` does not train.
        timm: a :class:`TimmForm` (or ``"module:attribute"``) when timm can build the
            network; its model folders then also carry timm's ``config.json``.
        preprocess: ``preprocess(settings) -> dict`` (or ``"module:function"``), the
            evaluation transform of a trained model of these settings; None: CLIP's at
            ``settings["image_size"]``.
    """

    name: str
    builder: str | Callable[..., Any]
    embedding_head: tuple[str, ...] = ()
    timm: str | TimmForm | None = None
    preprocess: str | Callable[..., Any] | None = None

    @property
    def module(self) -> str:
        """The module that defines the builder (recorded in model folders)."""
        return self.builder.partition(":")[0] if isinstance(self.builder, str) else self.builder.__module__

    @property
    def trainable(self) -> bool:
        return bool(self.embedding_head)

    def build(self, settings: Mapping[str, Any], **options: Any):
        """``builder(settings, **options)``, importing the builder on first use."""
        return _resolve(self.builder)(settings, **options)

    def timm_form(self, settings: Mapping[str, Any] | None = None) -> TimmForm | None:
        """The :class:`TimmForm`, or None: the architecture has none, or (given ``settings``) not
        for a network of these settings."""
        form = None if self.timm is None else _resolve(self.timm)
        if form is not None and settings is not None and form.applies is not None and not form.applies(settings):
            return None
        return form

    def evaluation_preprocess(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The evaluation transform, as data, of a trained model of ``settings``."""
        if self.preprocess is None:
            return clip_preprocess(int(settings["image_size"]))
        return dict(_resolve(self.preprocess)(settings))


@dataclass(frozen=True)
class ModelCfg:
    """A named model: an architecture, its settings, its preprocessing and maybe its weights.

    ``settings`` is the JSON object given to the architecture's builder (every field, as
    a model folder records it); ``preprocess`` the evaluation transform as data. ``url``
    and ``sha256`` locate released weights (a ``.pt`` state dict with the module's keys);
    names without them are sizes to train from scratch or from other weights.
    """

    name: str
    architecture: str
    settings: Mapping[str, Any]
    preprocess: Mapping[str, Any]
    url: str | None = None
    sha256: str | None = None
    notes: str = field(default="", compare=False)

    @property
    def has_weights(self) -> bool:
        return self.url is not None

    @property
    def file_name(self) -> str:
        """The weights' file name (the cache and a mirror keep it)."""
        if self.url is None:
            raise InputError(f"{self.name} has no released weights")
        return self.url.rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------- tables

ARCHITECTURES: dict[str, Architecture] = {
    "clip_vit": Architecture(
        "clip_vit", "unicom.models.vit:build_clip_vit", embedding_head=("projection.",), timm="unicom.models.vit:TIMM_FORM"
    ),
    "unicom_vit": Architecture("unicom_vit", "unicom.models.unicom_vit:build_unicom_vit", embedding_head=("feature.2.", "feature.3.")),
    # any timm image model with a projection (model.name=timm/<name>)
    "timm": Architecture("timm", "unicom.models.timm_backbone:build_timm_backbone", embedding_head=("projection.",),
                         timm="unicom.models.timm_backbone:TIMM_FORM",
                         preprocess="unicom.models.timm_backbone:timm_preprocess"),
}


def _clip_vit(image_size: int, patch_size: int, width: int, depth: int, heads: int, embedding_dim: int) -> dict[str, Any]:
    return {"image_size": image_size, "patch_size": patch_size, "width": width, "depth": depth, "heads": heads,
            "mlp_ratio": 4.0, "embedding_dim": embedding_dim, "act": "gelu", "in_chans": 3}


def _unicom_vit(image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_dim: int, embedding_dim: int) -> dict[str, Any]:
    return {"image_size": image_size, "patch_size": patch_size, "width": width, "depth": depth, "heads": heads,
            "mlp_dim": mlp_dim, "embedding_dim": embedding_dim, "in_chans": 3}


_RELEASES = "https://github.com/deepglint/unicom/releases/download"
_PAPER_SIZES = "CLIP's image tower with the embedding size of the Unicom paper; no released weights"
_RELEASED = "released Unicom checkpoint, pre-trained on LAION-400M"

MODELS: dict[str, ModelCfg] = {
    cfg.name: cfg
    for cfg in (
        ModelCfg("ViT-B-32", "clip_vit", _clip_vit(224, 32, 768, 12, 12, 512), clip_preprocess(224), notes=_PAPER_SIZES),
        ModelCfg("ViT-B-16", "clip_vit", _clip_vit(224, 16, 768, 12, 12, 768), clip_preprocess(224), notes=_PAPER_SIZES),
        ModelCfg("ViT-L-14", "clip_vit", _clip_vit(224, 14, 1024, 24, 16, 768), clip_preprocess(224), notes=_PAPER_SIZES),
        ModelCfg("ViT-L-14-336", "clip_vit", _clip_vit(336, 14, 1024, 24, 16, 768), clip_preprocess(336), notes=_PAPER_SIZES),
        ModelCfg(
            "ViT-B/32", "unicom_vit", _unicom_vit(224, 32, 768, 12, 12, 3072, 512), clip_preprocess(224),
            f"{_RELEASES}/b32/FP16-ViT-B-32.pt", "f9d5696a9b58dbbbefee2d31615ca59084f2895a0fdd2ca4c235e0f9b2793f7a", _RELEASED,
        ),
        ModelCfg(
            "ViT-B/16", "unicom_vit", _unicom_vit(224, 16, 768, 12, 12, 3072, 768), clip_preprocess(224),
            f"{_RELEASES}/b16/FP16-ViT-B-16.pt", "c04f324f7c3b4435667236ec6c0eca1cd62f9d64fbfc2d06f8e8e60e6497edef", _RELEASED,
        ),
        ModelCfg(
            "ViT-L/14", "unicom_vit", _unicom_vit(224, 14, 1024, 24, 16, 4096, 768), clip_preprocess(224),
            f"{_RELEASES}/l14/FP16-ViT-L-14.pt", "ff3ab62ff782876460099e6e0ee17b73a7c01109de2fffd595f16f4129404bbd", _RELEASED,
        ),
        ModelCfg(
            "ViT-L/14@336px", "unicom_vit", _unicom_vit(336, 14, 1024, 24, 16, 4096, 768), clip_preprocess(336),
            f"{_RELEASES}/l14_336px/FP16-ViT-L-14-336px.pt", "3916ab5aed3b522fc90345be8b4457fe5dad60801ad2af5a6871c0c096e8d7ea", _RELEASED,
        ),
    )
}


# ------------------------------------------------------------------------------ lookup


def list_models(pretrained: bool = False) -> list[str]:
    """Every model name, in table order; with ``pretrained``, only those with released weights."""
    return [name for name, cfg in MODELS.items() if cfg.has_weights or not pretrained]


def available_models() -> list[str]:
    """The names :func:`unicom.load` accepts: ``['ViT-B/32', 'ViT-B/16', 'ViT-L/14', 'ViT-L/14@336px']``."""
    return list_models(pretrained=True)


def model_cfg(name: str) -> ModelCfg:
    """The :class:`ModelCfg` registered as ``name``; an :class:`InputError` lists the known names."""
    cfg = MODELS.get(name)
    if cfg is None:
        raise InputError(f"unknown model {name!r}; known: {list_models()}")
    return cfg


def get_architecture(name: str, module: str | None = None) -> Architecture:
    """The :class:`Architecture` registered as ``name``.

    ``module`` is the module that a model folder says defines it: a module of this
    package is imported (it registers the architecture on import); any other module must
    be imported by the caller first, as importing it runs its code.
    """
    architecture = ARCHITECTURES.get(name)
    if architecture is None and module and module.split(".")[0] == __name__.split(".")[0]:
        importlib.import_module(module)
        architecture = ARCHITECTURES.get(name)
    if architecture is None:
        architecture = _from_entry_points(name)
    if architecture is None:
        hint = f"; it is defined in {module!r}: import that module first" if module else ""
        raise InputError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}{hint}")
    return architecture


def _from_entry_points(name: str) -> Architecture | None:
    """An architecture that an installed package declares in its metadata (the entry-point
    group ``unicom.architectures``, ``name = "module"``): its module is imported, which
    registers it. Packages declare their architectures so; folders that do not name their
    module (written before ``architecture_module`` existed) load through it too."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP, name=name):
        importlib.import_module(entry.module)
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    return None


# ------------------------------------------------------------------------ registration


def register_architecture(
    name: str,
    builder: str | Callable[..., Any],
    *,
    embedding_head: tuple[str, ...] = (),
    timm: str | TimmForm | None = None,
    overwrite: bool = False,
) -> Architecture:
    """Add an architecture (see :class:`Architecture`); the module defining it calls this.

    Registering the same builder again is a no-op; another builder under a taken name is
    a :class:`ValueError` unless ``overwrite``.
    """
    architecture = Architecture(name, builder, tuple(embedding_head), timm)
    known = ARCHITECTURES.get(name)
    if known is not None and known != architecture and not overwrite:
        raise ValueError(f"architecture {name!r} is already registered; pass overwrite=True to replace it")
    ARCHITECTURES[name] = architecture
    return architecture


def register_model(
    name: str,
    architecture: str,
    settings: Mapping[str, Any] | Any,
    preprocess: Mapping[str, Any] | None = None,
    *,
    url: str | None = None,
    sha256: str | None = None,
    notes: str = "",
    overwrite: bool = False,
) -> ModelCfg:
    """Add a named model: a size to train (``create_model(name)``) or, with ``url`` and
    ``sha256``, released weights (``unicom.load(name)``, ``--model name``).

    ``settings`` is a dict or a settings dataclass; fields left out take the
    architecture's defaults (the entry records them all). ``preprocess`` defaults to
    CLIP's at the settings' ``image_size``. The settings are checked by building the
    architecture on the meta device (no memory, no weights).
    """
    import torch

    from unicom.models.export import build_transform

    if dataclasses.is_dataclass(settings):
        settings = dataclasses.asdict(settings)
    settings = dict(settings)
    if (url is None) != (sha256 is None):
        raise InputError(f"model {name!r}: give both url and sha256 (the download is verified), or neither")
    with torch.device("meta"):
        module = get_architecture(architecture).build(settings)
    complete = getattr(getattr(module, "settings", None), "to_dict", None)
    if complete is not None:
        settings = complete()
    if preprocess is None:
        if "image_size" not in settings:
            raise InputError(f"model {name!r}: give preprocess= (the settings have no image_size)")
        preprocess = clip_preprocess(int(settings["image_size"]))
    build_transform(preprocess)  # validates the description
    cfg = ModelCfg(name, architecture, settings, dict(preprocess), url, sha256, notes)
    known = MODELS.get(name)
    if known is not None and known != cfg and not overwrite:
        raise ValueError(f"model {name!r} is already registered; pass overwrite=True to replace it")
    MODELS[name] = cfg
    return cfg


def released_name(architecture: str, settings: Mapping[str, Any]) -> str | None:
    """The name of the released checkpoint with exactly this architecture and settings, or None."""
    return next(
        (cfg.name for cfg in MODELS.values() if cfg.has_weights and cfg.architecture == architecture and dict(cfg.settings) == dict(settings)),
        None,
    )


__all__ = [
    "ARCHITECTURES", "MODELS", "Architecture", "ModelCfg", "TimmForm", "CLIP_MEAN", "CLIP_STD", "available_models",
    "clip_preprocess", "get_architecture", "list_models", "model_cfg", "register_architecture", "register_model",
    "released_name",
]
