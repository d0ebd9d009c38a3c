"""This project's models by name, folder, file or Hub repository: :func:`load`.

``unicom.load(spec)`` returns ``(model, transform)``: the module in eval mode with float32
weights, mapping images ``(B, 3, S, S)`` to embeddings ``(B, D)``, and its PIL -> tensor
preprocessing. ``spec`` is one of:

* a registered name with released weights (:func:`available_models`: ``ViT-B/32`` ...):
  the weights are downloaded once into the cache and verified against their SHA-256
  (:mod:`unicom.models.hub`), the architecture, settings and preprocessing come from the
  registry (:mod:`unicom.models.registry`);
* a model folder (``unicom_model.json`` + ``model.safetensors``, :mod:`unicom.models.export`);
* ``hf-hub:org/repo`` or ``hf-hub:org/repo@revision``: a model folder on the Hugging Face Hub (``hf-hub:org/repo/folder`` in a folder of the repository);
* a released-format checkpoint file (named as in :data:`CHECKPOINT_SUFFIXES`: ``.pt``,
  ``.pth.tar``, ``.ckpt``, ``.safetensors`` ..., with the keys of
  :class:`~unicom.models.unicom_vit.UnicomViT`), its sizes given as ``arch`` or read off
  the tensor shapes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from unicom.errors import InputError
from unicom.models.registry import MODELS, available_models, clip_preprocess, get_architecture, model_cfg, released_name
from unicom.models.unicom_vit import ARCHITECTURE as UNICOM_VIT
from unicom.models.unicom_vit import ViTSettings, infer_settings

# Names of checkpoint files: PyTorch's, timm's train.py (model_best.pth.tar), Lightning's (.ckpt),
# Hugging Face's (pytorch_model.bin) and safetensors.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".ckpt", ".safetensors")


def is_unicom_spec(spec: str) -> bool:
    """Whether :func:`load` takes ``spec`` without asking the network: a registered name
    with released weights, a model folder, or a checkpoint file."""
    if spec in MODELS:
        return MODELS[spec].has_weights
    path = Path(spec).expanduser()
    if path.is_dir():
        from unicom.models.export import CONFIG_NAME

        return (path / CONFIG_NAME).is_file()
    return path.is_file() and path.name.endswith(CHECKPOINT_SUFFIXES)


# what to do with an open_clip or timm name, which load() does not take
FOREIGN_MODELS = (
    "open_clip and timm models (ViT-B-32 with its pretrained tag, timm/<name>, local-dir:FOLDER) load with "
    "unicom.load_encoder(name, pretrained=...), whose encode_image and encode_text give what `unicom embed` writes"
)


def _weights_of(name: str):
    cfg = model_cfg(name)
    if not cfg.has_weights:
        raise InputError(
            f"{name} is a {cfg.architecture} size without released weights; train it (unicom train) or give a "
            f"model folder. Names with weights: {', '.join(available_models())}"
        )
    return cfg


def _unknown(spec: str) -> InputError:
    """The error for a spec that names no released model, file or folder."""
    import difflib

    names = available_models()
    same = [name for name in names if name.lower() == spec.lower()]
    close = same or difflib.get_close_matches(spec, names, n=1, cutoff=0.8)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return InputError(
        f"{spec}: neither a released model{hint} ({', '.join(names)}) nor an existing checkpoint file or model folder"
    )


# ------------------------------------------------------------------ released checkpoints


def resolve_settings(arch: str | ViTSettings | Mapping[str, Any] | None) -> ViTSettings | None:
    """``arch`` as :class:`ViTSettings`: a registered ``unicom_vit`` name, a settings object or dict, or None."""
    if arch is None or isinstance(arch, ViTSettings):
        return arch
    if isinstance(arch, str):
        known = [name for name, cfg in MODELS.items() if cfg.architecture == UNICOM_VIT]
        if arch not in known:
            raise InputError(f"unknown architecture {arch!r}; known: {known} (or give a dict of ViT settings)")
        return ViTSettings.from_dict(MODELS[arch].settings)
    return ViTSettings.from_dict(arch)


def load_state(
    name_or_path: str | os.PathLike,
    download_root: str | os.PathLike | None = None,
    arch: str | ViTSettings | Mapping[str, Any] | None = None,
    base_url: str | None = None,
) -> tuple[dict[str, torch.Tensor], ViTSettings, Path]:
    """``(state_dict, settings, path)`` of a released checkpoint: a registered
    ``unicom_vit`` name with weights, or a released-format file whose settings come from
    ``arch`` (a name, or settings; those a dict leaves out are read off the shapes) or from
    its tensor shapes."""
    from unicom.models.hub import weights_path
    from unicom.models.weights import read_state_dict

    _refuse_arch_of_described(name_or_path, arch)  # else the name's own sizes were taken, arch silently dropped
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        cfg = _weights_of(name_or_path)
        if cfg.architecture != UNICOM_VIT:
            raise InputError(f"{name_or_path}: a {cfg.architecture} model, not a released-format ({UNICOM_VIT}) checkpoint")
        path = weights_path(name_or_path, download_root, base_url)
        return read_state_dict(path), ViTSettings.from_dict(cfg.settings), path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        from unicom.models.export import CONFIG_NAME

        what = "a model folder already" if (path / CONFIG_NAME).is_file() else f"a folder, not a model folder ({CONFIG_NAME} is missing)"
        raise InputError(
            f"{name_or_path}: {what}; a released-format checkpoint is one file (.pt); "
            "a model folder is written as one with `unicom convert unicom-to-released FOLDER FILE.pt`"
        )
    if not path.is_file():
        raise _unknown(str(name_or_path))
    state_dict = read_state_dict(path)
    _refuse_other_projects(state_dict, path)
    if isinstance(arch, Mapping):  # the settings given; the others read off the shapes
        inferred = infer_settings(state_dict, str(path), heads=arch.get("heads"))
        return state_dict, ViTSettings.from_dict({**inferred.to_dict(), **arch}), path
    settings = resolve_settings(arch) or infer_settings(state_dict, str(path))
    return state_dict, settings, path


def _refuse_arch_of_described(spec, arch) -> None:
    """An :class:`InputError` when ``arch`` is given for a source that records its own
    architecture (a released name, a model folder, an hf-hub model)."""
    from unicom.models import hub

    if arch is not None and (hub.is_hf_spec(spec) or spec in MODELS or Path(spec).expanduser().is_dir()):
        raise InputError(
            f"{spec}: arch={arch!r} was given, but a released name, a model folder or an hf-hub model "
            "records its own architecture; arch applies only to a released-format file (.pt/.safetensors): "
            "leave it out"
        )


def _refuse_other_projects(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Name the project whose checkpoint ``state_dict`` is, when it is timm's or open_clip's,
    and how to load it instead; the released format has neither a class token nor towers."""
    if "cls_token" in state_dict:
        raise InputError(
            f"{path}: a timm ViT state dict (it has a cls_token, which released Unicom checkpoints lack), "
            "not a released-format checkpoint; load it with its timm name: "
            "load_encoder('timm/<name>', pretrained=FILE) (--model timm/<name> --pretrained FILE), "
            "or, if it is the model.safetensors of a model folder, give the folder"
        )
    if any(key.startswith("visual.") for key in state_dict):
        raise InputError(
            f"{path}: an open_clip CLIP state dict (keys visual.*), not a released-format checkpoint; "
            "load it with its open_clip name: load_encoder('ViT-B-32', pretrained=FILE) "
            "(--model ViT-B-32 --pretrained FILE)"
        )


# -------------------------------------------------------------------------------- load


def load_described(
    spec: str | os.PathLike,
    device: str | torch.device = "cpu",
    download_root: str | os.PathLike | None = None,
    arch: str | ViTSettings | Mapping[str, Any] | None = None,
    base_url: str | None = None,
    label: str | None = None,
) -> tuple[nn.Module, Callable, int, str]:
    """:func:`load` plus the embedding size D and a readable description of the model
    (``label`` names the source in it instead of ``spec``)."""
    from unicom.models import export, hub
    from unicom.models.weights import instantiate, read_state_dict

    label = label or str(spec)
    _refuse_arch_of_described(spec, arch)
    if hub.is_hf_spec(spec):
        return load_described(hub.hf_model_folder(str(spec)), device, label=label)
    if isinstance(spec, str) and spec in MODELS:
        cfg = _weights_of(spec)
        path = hub.weights_path(spec, download_root, base_url)
        model = instantiate(get_architecture(cfg.architecture).build, cfg.settings, read_state_dict(path), source=str(path))
        return model.to(device), export.build_transform(cfg.preprocess), int(cfg.settings["embedding_dim"]), f"unicom {spec}"
    path = Path(spec).expanduser()
    if path.is_dir():
        config = export.read_config(path)
        model, transform = export.load_model(path, device=device)
        origin = config.get("provenance", {}).get("released_name")
        return model, transform, config["embedding_dim"], f"{config['architecture']} {origin or ''} ({label})".replace("  ", " ")
    state_dict, settings, path = load_state(spec, download_root, arch, base_url)
    model = instantiate(get_architecture(UNICOM_VIT).build, settings.to_dict(), state_dict, source=str(path))
    transform = export.build_transform(clip_preprocess(settings.image_size))
    name = released_name(UNICOM_VIT, settings.to_dict()) or "ViT"
    return model.to(device), transform, settings.embedding_dim, f"unicom {name} ({label})"


def load(
    spec: str | os.PathLike,
    device: str | torch.device = "cpu",
    download_root: str | os.PathLike | None = None,
    arch: str | ViTSettings | Mapping[str, Any] | None = None,
    base_url: str | None = None,
):
    """Load one of this project's models: ``(model, transform)``.

    Args:
        spec: a name from :func:`available_models`, a model folder, ``hf-hub:org/repo``,
            or a released-format ``.pt`` (or ``.safetensors``) file (module docstring).
        device: where the model goes.
        download_root: the cache folder for released weights (default: see
            :func:`unicom.models.hub.cache_dir`).
        arch: the sizes of a released-format file, as a registered name or ViT
            settings; read off the tensor shapes when omitted. Refused for the other specs,
            which record their own architecture.
        base_url: a mirror holding the released files (default ``$UNICOM_BASE_URL``).

    Returns:
        ``model``: the module in eval mode with float32 weights, mapping
        ``(B, 3, S, S)`` to ``(B, D)``; ``transform``: PIL image -> (3, S, S).

    Every key of the weights must match the architecture (``num_batches_tracked``
    counters may be absent); missing, unexpected or mis-shaped keys raise :class:`InputError`.
    """
    from unicom.engine.device import resolve_device

    from unicom.models import hub

    device = resolve_device(str(device), "device")  # "auto", a name or a torch.device, checked
    try:
        model, transform, _, _ = load_described(spec, device, download_root, arch, base_url)
    except InputError as error:
        # a file or folder that is there (damaged, of another format, a training run) is no open_clip or timm name
        if is_unicom_spec(os.fspath(spec)) or hub.is_hf_spec(spec) or Path(os.fspath(spec)).expanduser().exists():
            raise
        raise InputError(f"{error}; {FOREIGN_MODELS}") from None  # perhaps an open_clip or timm name
    return model, transform


__all__ = ["CHECKPOINT_SUFFIXES", "available_models", "is_unicom_spec", "load", "load_described", "load_state", "resolve_settings"]
