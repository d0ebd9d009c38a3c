"""Any timm image model as a trainable network of ``unicom train``: the ``timm`` architecture.

:class:`TimmBackbone` is a timm model built without its classifier (``num_classes=0``: its
pooled features, ``num_features`` wide) followed by a linear projection without bias to the
embedding (``(B, 3, S, S) -> (B, D)``, D = ``embedding_dim``), as :class:`unicom.models.vit.ClipViT`
projects CLIP's tower. A recipe names it ``model.name=timm/<name>`` (``timm/resnet50``,
``timm/convnext_tiny``); its settings are the timm name (a pretrained tag written into it,
``resnet50.a1_in1k``, is kept: it chooses the preprocessing and the weights ``model.init=timm``
downloads), the training and evaluation ``image_size`` (default: the tag's input size),
``embedding_dim`` (default: the features' width) and ``in_chans``. Its preprocessing is timm's
evaluation transform for the model at ``image_size`` (its interpolation, ``crop_pct``, mean and
std), recorded in the model folder like any other (:func:`timm_preprocess`).

Starting weights (``model.init``): ``timm`` (timm's pretrained weights of the tag, from the
Hugging Face Hub or timm's cache), a file of the timm model's own state dict (``.pth``, ``.bin``,
``.safetensors``: read by timm's loader, which drops the classifier), or, as for every
architecture, a model folder or a training checkpoint of one.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import torch
from torch import nn

from unicom.errors import InputError
from unicom.models.registry import TimmForm

ARCHITECTURE = "timm"
PREFIX = "timm/"
INIT_PRETRAINED = "timm"  # model.init: timm's pretrained weights of the tag in the name


def is_timm_name(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX) and len(name) > len(PREFIX)


def _create(settings: Mapping[str, Any], num_classes: int = 0, **options: Any) -> nn.Module:
    """The timm model of ``settings``, without its classifier (or with ``num_classes``); an
    :class:`InputError` naming it when timm has no such model or refuses the options."""
    import timm

    name = str(settings["timm_model"])
    if not timm.is_model(name.split(".", 1)[0]):
        raise InputError(f"model.name=timm/{name}: timm {timm.__version__} has no model "
                         f"{name.split('.', 1)[0]!r} (timm.list_models() lists them)")
    sized = {"img_size": int(settings["image_size"])} if settings.get("fixed_input_size") else {}
    try:
        return timm.create_model(name, num_classes=num_classes, in_chans=int(settings.get("in_chans", 3)), **sized,
                                 **options)
    except TypeError as error:  # an option this kind of network does not take
        raise InputError(f"model.name=timm/{name}: timm cannot build it so ({error})") from None


class TimmBackbone(nn.Module):
    """A timm model's pooled features through a projection without bias (module docstring)."""

    def __init__(self, settings: Mapping[str, Any], drop_path_rate: float = 0.0):
        super().__init__()
        self.settings = dict(settings)
        self.trunk = _create(settings, **({"drop_path_rate": drop_path_rate} if drop_path_rate else {}))
        self.embedding_dim = int(settings["embedding_dim"])
        self.projection = nn.Linear(int(self.trunk.num_features), self.embedding_dim, bias=False)
        if not self.projection.weight.is_meta:
            nn.init.normal_(self.projection.weight, std=int(self.trunk.num_features) ** -0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the trunk's stages in the backward pass (where timm's model supports it)."""
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.trunk(images))


def build_timm_backbone(settings: Mapping[str, Any], drop_path_rate: float = 0.0) -> TimmBackbone:
    """Builder of the ``timm`` architecture (:mod:`unicom.models.registry`)."""
    return TimmBackbone(settings, drop_path_rate=drop_path_rate)


def _pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained configuration of ``name`` (its tag's, else the model's default tag)."""
    import timm

    try:
        return dict(timm.models.get_pretrained_cfg(name).to_dict())
    except Exception:  # noqa: BLE001 - a name timm does not know: said by _create with its reason
        return {}


def timm_settings(name: str) -> dict[str, Any]:
    """The settings of ``model.name=timm/<name>`` before a recipe's overrides: the model, its
    tag's input size, the features' width as the embedding size, 3 input channels, and
    whether the network takes one input size only (a ViT's positions)."""
    model_name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    with torch.device("meta"):  # its sizes only: no memory for the weights (an unknown name is refused here)
        probe = _create({"timm_model": model_name, "in_chans": 3})
    cfg = _pretrained_cfg(model_name)
    size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    return {"timm_model": model_name, "image_size": size, "embedding_dim": int(probe.num_features), "in_chans": 3,
            "fixed_input_size": bool(cfg.get("fixed_input_size", False))}


def timm_preprocess(settings: Mapping[str, Any]) -> dict[str, Any]:
    """timm's evaluation transform for the model at ``image_size`` (interpolation, crop_pct,
    mean, std of its tag), as a model folder's ``preprocess``."""
    from timm.data import create_transform, resolve_data_config

    from unicom.models.export import describe_transform

    name = str(settings["timm_model"])
    size = int(settings["image_size"])
    config = resolve_data_config(pretrained_cfg=_pretrained_cfg(name))
    config["input_size"] = (int(settings.get("in_chans", 3)), size, size)
    return describe_transform(create_transform(**config, is_training=False), f"timm/{name}")


# ------------------------------------------------------------------ the folder timm loads

def _classifier(settings: Mapping[str, Any]) -> tuple[str | None, int]:
    """(the name of the timm model's classifier, where it takes a single linear layer over its
    pooled features, else None; the features' width). Found once per settings: writing and
    reading a folder ask for it several times."""
    return _classifier_of(json.dumps(dict(settings), sort_keys=True))


@functools.lru_cache(maxsize=32)
def _classifier_of(settings_json: str) -> tuple[str | None, int]:
    settings = json.loads(settings_json)
    embedding_dim = int(settings["embedding_dim"])
    with torch.device("meta"):
        model = _create(settings, num_classes=embedding_dim)
    name = model.pretrained_cfg.get("classifier")
    if not isinstance(name, str):
        return None, int(model.num_features)
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        return None, int(model.num_features)
    linear = isinstance(layer, nn.Linear) and layer.in_features == model.num_features and layer.out_features == embedding_dim
    return (name if linear else None), int(model.num_features)


def timm_form_applies(settings: Mapping[str, Any]) -> bool:
    """Whether timm builds this network with ``num_classes=embedding_dim`` as the trunk and the
    projection: its classifier one linear layer over the pooled features."""
    return _classifier(settings)[0] is not None


def timm_config(settings: Mapping[str, Any], embedding_dim: int, data_config: Mapping[str, Any]) -> dict[str, Any]:
    """timm's ``config.json``: the model with ``num_classes=embedding_dim``, whose classifier is
    the projection (its bias zero), and the folder's preprocessing."""
    classifier, width = _classifier(settings)
    name = str(settings["timm_model"])
    size, channels = int(settings["image_size"]), int(settings.get("in_chans", 3))
    return {
        "architecture": name.split(".", 1)[0],
        "num_classes": embedding_dim,
        "num_features": width,
        "model_args": {"in_chans": channels, **({"img_size": size} if settings.get("fixed_input_size") else {})},
        "pretrained_cfg": {**data_config, "input_size": [channels, size, size], "num_classes": embedding_dim,
                           "classifier": classifier, "fixed_input_size": bool(settings.get("fixed_input_size"))},
    }


def to_timm(state_dict: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """:class:`TimmBackbone` keys -> the timm model's: ``trunk.`` dropped, the projection as the
    classifier's weight with a zero bias."""
    classifier, _ = _classifier(settings)
    out = {key[len("trunk."):]: value for key, value in state_dict.items() if key.startswith("trunk.")}
    projection = state_dict["projection.weight"]
    out[f"{classifier}.weight"] = projection
    out[f"{classifier}.bias"] = torch.zeros(projection.shape[0], dtype=projection.dtype)
    return out


def from_timm(state_dict: Mapping[str, torch.Tensor], source: str, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The timm model's keys -> :class:`TimmBackbone`'s (the inverse of :func:`to_timm`)."""
    classifier, _ = _classifier(settings)
    bias = state_dict.get(f"{classifier}.bias")
    if bias is not None and bool(bias.count_nonzero()):
        raise InputError(f"{source}: {classifier}.bias is not zero, but the projection has no bias; these are not the "
                         "weights this folder's unicom_model.json describes")
    out = {}
    for key, value in state_dict.items():
        if key == f"{classifier}.weight":
            out["projection.weight"] = value
        elif key != f"{classifier}.bias":
            out[f"trunk.{key}"] = value
    return out


def load_timm_weights(module: TimmBackbone, init: str | os.PathLike) -> list[str]:
    """Load ``init`` (``timm``: the tag's pretrained weights; else a file of the timm model's
    state dict) into ``module``'s trunk by timm's own loader; returns the tensors left as they
    were (the projection)."""
    import timm

    name = module.settings["timm_model"]
    options: dict[str, Any] = {}
    if os.fspath(init) != INIT_PRETRAINED:
        path = os.fspath(init)
        if not os.path.isfile(path):
            raise InputError(f"model.init={path}: file not found (the state dict of timm's {name}, or 'timm' for "
                             "its pretrained weights)")
        options["pretrained_cfg_overlay"] = {"file": path}
    sized = {"img_size": int(module.settings["image_size"])} if module.settings.get("fixed_input_size") else {}
    try:
        loaded = timm.create_model(name, pretrained=True, num_classes=0, in_chans=int(module.settings.get("in_chans", 3)),
                                   **sized, **options)
    except (RuntimeError, KeyError, ValueError) as error:
        raise InputError(f"model.init={init}: not weights of timm's {name} ({str(error).splitlines()[0]})") from None
    module.trunk.load_state_dict(loaded.state_dict())
    return sorted(f"projection.{key}" for key in module.projection.state_dict())


TIMM_FORM = TimmForm(timm_config, to_timm, from_timm, applies=timm_form_applies)

__all__ = ["ARCHITECTURE", "TIMM_FORM", "TimmBackbone", "build_timm_backbone", "timm_settings", "timm_preprocess",
           "load_timm_weights", "is_timm_name"]
