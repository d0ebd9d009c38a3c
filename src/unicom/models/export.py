"""The model folder: the one format in which every stage hands a model to another.

::

    MODEL_DIR/
      unicom_model.json    format, format_version, architecture, architecture_module,
                           settings, embedding_dim, preprocess, weights_layout (optional),
                           provenance (written last: its presence marks a complete folder)
      model.safetensors    the module's tensors, as given (dtypes kept)
      config.json          timm's config, when timm can build the architecture

``architecture`` names an entry of :data:`unicom.models.registry.ARCHITECTURES` and
``architecture_module`` the module that registers it (imported on load when it belongs to
this package). A built module maps images ``(B, 3, S, S)`` to embeddings
``(B, embedding_dim)``. ``model.safetensors`` holds its ``state_dict()`` under the
module's own keys, or, with ``"weights_layout": "timm"`` (format version 2), under the keys
of the timm model that ``config.json`` describes, so that
``timm.create_model("local-dir:MODEL_DIR", pretrained=True)`` (or ``hf-hub:`` on the
Hub) builds and loads the same network. :func:`read_weights` always returns the
module's keys.

``preprocess`` describes the eval transform as data (:func:`build_transform`)::

    {"size": 224, "resize_mode": "shortest", "interpolation": "bicubic",
     "mean": [0.481, 0.458, 0.408], "std": [0.269, 0.261, 0.276]}
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from unicom.errors import InputError
from unicom.files import atomic_path, remove_killed_writes, save_safetensors, write_json_atomic
from unicom.models.registry import get_architecture
from unicom.models.weights import check_state_dict, instantiate, read_safetensors

FORMAT = "unicom-model"
FORMAT_VERSION = 2  # 2: model.safetensors may follow a weights_layout; 1: the module's keys
CONFIG_NAME = "unicom_model.json"
WEIGHTS_NAME = "model.safetensors"
TIMM_CONFIG_NAME = "config.json"
WEIGHTS_LAYOUTS = ("timm",)

RESIZE_MODES = ("shortest", "squash")  # short side to size + centre crop | both sides to size
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")

# ---------------------------------------------------------------------- preprocessing


def _convert_to_rgb(image):
    from unicom.data.transforms import to_rgb

    return to_rgb(image)


def build_transform(preprocess: Mapping[str, Any]):
    """PIL image -> float32 tensor (3, size, size), from a ``preprocess`` description.

    ``resize_mode`` ``"shortest"``: resize the short side to ``resize_size`` (optional,
    default ``size``; the long side to ``int(resize_size * long / short)``), then centre
    crop ``size``; ``"squash"``: resize both sides to ``resize_size`` (the same default),
    then centre crop ``size`` (nothing to crop at the default). Then RGB, values / 255,
    ``(x - mean) / std`` per channel.
    """
    from torchvision import transforms

    def field(name, check, expected):
        if name not in preprocess:
            raise InputError(f"preprocess: missing {name!r} (expected {expected})")
        value = preprocess[name]
        if not check(value):
            raise InputError(f"preprocess: {name}={value!r}, expected {expected}")
        return value

    def is_triple(v):
        return isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)

    size = field("size", lambda v: isinstance(v, int) and v > 0, "a positive integer")
    mode = field("resize_mode", lambda v: v in RESIZE_MODES, f"one of {RESIZE_MODES}")
    interpolation = field("interpolation", lambda v: v in INTERPOLATIONS, f"one of {INTERPOLATIONS}")
    mean = field("mean", is_triple, "3 numbers")
    std = field("std", lambda v: is_triple(v) and all(x > 0 for x in v), "3 positive numbers")
    resize_size = size
    if "resize_size" in preprocess:  # timm's crop_pct: the short side before the centre crop
        resize_size = field("resize_size", lambda v: isinstance(v, int) and v >= size, f"an integer >= size ({size})")
    interpolation = transforms.InterpolationMode(interpolation)
    if mode == "shortest":
        resize = [transforms.Resize(resize_size, interpolation=interpolation), transforms.CenterCrop(size)]
    else:
        resize = [transforms.Resize((resize_size, resize_size), interpolation=interpolation)]
        resize += [transforms.CenterCrop(size)] if resize_size != size else []
    # Resize before the RGB conversion, as the released models' own preprocessing does.
    return transforms.Compose([*resize, _convert_to_rgb, transforms.ToTensor(), transforms.Normalize(mean, std)])


_PASS_THROUGH = {"ToTensor", "MaybeToTensor", "MaybeConvertMode", "_convert_to_rgb", "ConvertImageDtype"}


def describe_transform(transform: Callable, name: str = "backbone") -> dict[str, Any]:
    """A model's evaluation transform as a model folder's ``preprocess`` (see
    :func:`unicom.models.export.build_transform`), or :class:`InputError` when it is not one
    of the forms that description covers (resize, centre crop, to tensor, normalise)."""
    import numpy as np
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", [transform]))
    described: dict[str, Any] = {}
    resize = crop = None
    for step in steps:
        kind = getattr(step, "__name__", type(step).__name__)
        if isinstance(step, T.Resize) and resize is None and step.max_size is None:
            resize = step
        elif isinstance(step, T.CenterCrop) and crop is None:
            crop = step
        elif isinstance(step, T.Normalize):
            described["mean"] = [float(v) for v in np.asarray(step.mean, dtype=np.float64).reshape(-1)]
            described["std"] = [float(v) for v in np.asarray(step.std, dtype=np.float64).reshape(-1)]
        elif kind not in _PASS_THROUGH:
            raise InputError(f"{name}: its image transform has a step the model folder cannot describe ({step!r}); "
                             "use a backbone whose evaluation transform is resize, centre crop and normalise")
    if resize is None or "mean" not in described:
        raise InputError(f"{name}: its image transform ({transform!r}) has no resize or no normalisation to describe")
    size = resize.size if isinstance(resize.size, int) else list(resize.size)
    crop_size = None if crop is None else list(crop.size)
    interpolation = resize.interpolation.value
    if isinstance(size, int) or len(size) == 1:
        short = size if isinstance(size, int) else size[0]
        if crop_size is None or crop_size[0] != crop_size[1] or crop_size[0] > short:
            raise InputError(f"{name}: resizing the short side to {short} needs a square centre crop no larger than it")
        described.update(size=int(crop_size[0]), resize_mode="shortest")
        if short != crop_size[0]:
            described["resize_size"] = int(short)
    else:
        crop = size if crop_size is None else crop_size
        if size[0] != size[1] or crop[0] != crop[1] or crop[0] > size[0]:
            raise InputError(f"{name}: its transform resizes to {size} and crops {crop}; only square outputs, "
                             "cropped square, can be described")
        described.update(size=int(crop[0]), resize_mode="squash")
        if crop[0] != size[0]:
            described["resize_size"] = int(size[0])
    described["interpolation"] = interpolation
    return described


def timm_data_config(preprocess: Mapping[str, Any]) -> dict[str, Any]:
    """``preprocess`` in the terms of timm's ``pretrained_cfg`` (the same transform).

    timm resizes to ``floor(size / crop_pct)``; ``crop_pct`` is chosen so that this is
    exactly ``resize_size``. ``squash`` is timm's ``crop_mode="squash"`` (both sides resized,
    then the centre crop).
    """
    size = int(preprocess["size"])
    resize = int(preprocess.get("resize_size", size))
    crop_pct, crop_mode = size / resize, "squash" if preprocess["resize_mode"] == "squash" else "center"
    while math.floor(size / crop_pct) > resize:  # floating-point rounding in the quotient
        crop_pct = math.nextafter(crop_pct, 1.0)
    while math.floor(size / crop_pct) < resize:
        crop_pct = math.nextafter(crop_pct, 0.0)
    return {
        "input_size": [3, size, size],
        "interpolation": preprocess["interpolation"],
        "mean": list(preprocess["mean"]),
        "std": list(preprocess["std"]),
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
    }


# ---------------------------------------------------------------------------- folder


def save_model(
    folder: str | os.PathLike,
    model: nn.Module | Mapping[str, torch.Tensor],
    arch: str,
    settings: Mapping[str, Any] | Any,
    preprocess: Mapping[str, Any],
    *,
    embedding_dim: int | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a module or its state dict) as a model folder.

    Args:
        folder: created if needed; a model already there is replaced.
        arch: a name in :data:`unicom.models.registry.ARCHITECTURES`.
        settings: the builder's argument (a JSON-able dict, or a dataclass).
        preprocess: the eval transform as data (see :func:`build_transform`).
        embedding_dim: D; read from the built module's ``embedding_dim`` when omitted.
        provenance: free-form facts about the origin (source file, checksum, run, data).

    Everything is checked before anything is written: the weights must load strictly
    into the architecture built with ``settings``. The weights are written first, then
    timm's ``config.json`` (architectures timm can build), the JSON last; the temporary
    files of an earlier write to ``folder`` that was killed are removed.
    """
    folder = local_output(folder, "a model folder")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: is a file; a model is written as a folder ({CONFIG_NAME} + {WEIGHTS_NAME}), give a folder path")
    if dataclasses.is_dataclass(settings):
        settings = dataclasses.asdict(settings)
    settings = dict(settings)
    state_dict = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    architecture = get_architecture(arch)
    with torch.device("meta"):
        reference = architecture.build(settings)
    check_state_dict(reference.state_dict(), state_dict, f"{arch} {settings}")
    embedding_dim = embedding_dim or getattr(reference, "embedding_dim", None)
    if not isinstance(embedding_dim, int) or embedding_dim <= 0:
        raise InputError(f"{arch}: pass embedding_dim= (the module has no integer embedding_dim attribute)")
    build_transform(preprocess)  # validates the description
    timm_form = architecture.timm_form(settings)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if timm_form else 1,  # version 1 readers can read the rest
        "architecture": arch,
        "architecture_module": architecture.module,
        "settings": settings,
        "embedding_dim": embedding_dim,
        "preprocess": dict(preprocess),
        **({"weights_layout": "timm"} if timm_form else {}),
        "provenance": {
            **(provenance or {}),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "unicom_version": _version(),
        },
    }
    try:
        json.dumps(config)
    except TypeError as error:
        raise InputError(f"{arch}: settings, preprocess and provenance must be JSON values ({error})") from error

    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    if timm_form:
        tensors = timm_form.to_timm(tensors, settings)
        timm_config = timm_form.config(settings, embedding_dim, timm_data_config(preprocess))
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / WEIGHTS_NAME).exists() or (folder / CONFIG_NAME).exists():
        (folder / TIMM_CONFIG_NAME).unlink(missing_ok=True)  # it described the weights being replaced
    (folder / CONFIG_NAME).unlink(missing_ok=True)  # the folder is incomplete until the JSON is back
    for name in (WEIGHTS_NAME, TIMM_CONFIG_NAME, CONFIG_NAME):
        remove_killed_writes(folder / name)
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_safetensors(tensors, tmp, {"format": "pt"})
    if timm_form:
        write_json_atomic(folder / TIMM_CONFIG_NAME, timm_config)
    write_json_atomic(folder / CONFIG_NAME, config)
    return folder


def local_output(location: str | os.PathLike, what: str) -> Path:
    """``location`` as a local path; a URL (``s3://…``) is refused, since ``Path`` would
    quietly turn it into a local folder named ``s3:``."""
    from unicom import storage

    if storage.is_url(os.fspath(location)):
        raise InputError(
            f"{location}: {what} is written to a local path, not to a URL; write it here, then copy it "
            "(aws s3 cp --recursive, gsutil -m cp -r, or huggingface-cli upload for the Hub)"
        )
    return Path(location)


def _version() -> str:
    from unicom import __version__

    return __version__


def not_a_model_folder(folder: str | os.PathLike) -> InputError:
    """The error for a folder without ``unicom_model.json``; for a training run or checkpoint
    folder (a common slip for its model), it says what to give instead."""
    from unicom.engine.checkpoint import CHECKPOINTS, MANIFEST

    folder = Path(folder)
    export = f"`unicom train --export-from {folder} --model-out DIR` exports it as one"
    hint = ""
    if (folder / "open_clip_config.json").is_file():
        hint = f"; it is an open_clip model folder: give local-dir:{folder}"
    elif (folder / TIMM_CONFIG_NAME).is_file():
        from unicom.models.hf_clip import unread_model

        transformers = unread_model(folder / TIMM_CONFIG_NAME)  # transformers' config.json has a model_type
        hint = (f"; it holds {transformers}" if transformers
                else f"; it is a timm model folder: give timm/local-dir:{folder} (its pooled features)")
    elif (folder / MANIFEST).is_file():
        hint = f"; it is a training checkpoint: {export}"
    elif (folder / CHECKPOINTS).is_dir():
        model = folder / "model"
        hint = (f"; it is a training run: its exported model is {model}" if (model / CONFIG_NAME).is_file()
                else f"; it is a training run: {export} from its newest checkpoint")
    elif (folder / "model" / CONFIG_NAME).is_file():  # the output folder of unicom probe
        hint = f"; it holds the model folder {folder / 'model'}: give that"
    return InputError(f"{folder}: no {CONFIG_NAME}; not a unicom model folder (or its export did not finish){hint}")


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The validated ``unicom_model.json`` of a model folder."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise not_a_model_folder(folder)
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise InputError(f"{path}: expected \"format\": \"{FORMAT}\"")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(
            f"{path}: format_version {version!r} is not supported (this unicom reads up to {FORMAT_VERSION}); upgrade unicom"
        )
    for key, kind in (("architecture", str), ("settings", dict), ("embedding_dim", int), ("preprocess", dict)):
        if not isinstance(config.get(key), kind):
            raise InputError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    if not isinstance(config.get("architecture_module", ""), str):
        raise InputError(f"{path}: 'architecture_module' is not a string")
    layout = config.get("weights_layout")
    if layout is not None and layout not in WEIGHTS_LAYOUTS:
        raise InputError(f"{path}: weights_layout {layout!r} is not one of {WEIGHTS_LAYOUTS}; upgrade unicom")
    return config


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` under the module's keys, dtypes as stored."""
    config = read_config(folder)
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise InputError(f"{folder}: {WEIGHTS_NAME} is missing")
    tensors = read_safetensors(path)
    if config.get("weights_layout") is None:
        return tensors
    timm_form = _architecture(config).timm_form(config["settings"])
    if timm_form is None:
        raise InputError(f"{path}: stored in timm's layout, but architecture {config['architecture']!r} has no timm form")
    return timm_form.from_timm(tensors, str(path), config["settings"])


def _architecture(config: Mapping[str, Any]):
    module = config.get("architecture_module")
    try:
        return get_architecture(config["architecture"], module)
    except InputError as error:
        if module:
            raise
        raise InputError(
            f"{error}. The folder does not name the module that registers it (written by an earlier unicom): "
            f"import that module first, or add \"architecture_module\": \"<module>\" to its {CONFIG_NAME}"
        ) from error


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(model, transform)`` from a model folder: the module in eval mode with float32
    weights on ``device``, and its PIL -> tensor preprocessing."""
    config = read_config(folder)
    architecture = _architecture(config)
    config_path = Path(folder) / CONFIG_NAME
    model = instantiate(
        architecture.build, config["settings"], read_weights(folder), source=str(Path(folder) / WEIGHTS_NAME),
        settings_source=f"{config_path} 'settings'",
    )
    _check_recorded(config, model, architecture, config_path)
    return model.to(device), build_transform(config["preprocess"])


def _check_recorded(config: Mapping[str, Any], model: nn.Module, architecture, path: Path) -> None:
    """Refuse a ``unicom_model.json`` whose ``embedding_dim`` is not the size of the
    network's output, or whose ``preprocess`` gives images of a size the network (built
    for ``settings.image_size``) does not take: the folder would describe another model
    than the one its weights make (an index or a search would expect the recorded size; the
    first batch would fail)."""
    arch, recorded = config["architecture"], config["embedding_dim"]
    network = getattr(model, "embedding_dim", None)
    if isinstance(network, int) and network != recorded:
        raise InputError(
            f"{path}: records embedding_dim {recorded}, but its network ({arch} with the recorded settings and the "
            f"weights of {WEIGHTS_NAME}) gives {network}-dimensional embeddings; set \"embedding_dim\": {network} in "
            f"the file (or export the model again)"
        )
    settings, size = config["settings"], config["preprocess"].get("size")
    image_size = settings.get("image_size")
    if not isinstance(image_size, int) or not isinstance(size, int) or size == image_size:
        return
    try:
        with torch.device("meta"):
            architecture.build(settings)(torch.empty(1, int(settings.get("in_chans", 3)), size, size))
    except Exception as error:
        if _meta_cannot_run(error):  # a forward that reads values (a check of the pixels): the first batch will tell
            return
        raise InputError(
            f"{path}: its preprocess gives {size}x{size} images, but its network ({arch}) is built for "
            f"settings.image_size {image_size} and does not take them; set the "
            f"preprocess's \"size\" to {image_size} (a resize_size above it keeps a centre crop)"
        ) from error


def _meta_cannot_run(error: Exception) -> bool:
    """Whether ``error`` is the meta device's refusal of an operation that needs the
    tensors' values (``.item()``, ``nonzero``, an operator without a meta kernel), not the
    network's refusal of the input's shape."""
    return isinstance(error, NotImplementedError) or "meta tensor" in str(error) or "'Meta' backend" in str(error)


__all__ = [
    "CONFIG_NAME", "FORMAT", "FORMAT_VERSION", "TIMM_CONFIG_NAME", "WEIGHTS_NAME", "build_transform", "load_model", "local_output",
    "read_config", "read_weights", "save_model", "timm_data_config",
]
