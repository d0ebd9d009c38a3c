"""The project's own model format: a folder that any stage can load without the trainer.

::

    MODEL_DIR/
      unicom_model.json    format, format_version, architecture, settings, embedding_dim,
                           preprocess, provenance (written last: its presence marks a
                           complete folder)
      model.safetensors    the module's state dict, tensors stored as given

``architecture`` names an entry of :data:`ARCHITECTURES`, a table of builders kept as
data: ``builder(settings) -> nn.Module`` where ``settings`` is the JSON object saved in
the folder. A built module maps images ``(B, 3, S, S)`` to embeddings
``(B, embedding_dim)``, and ``model.safetensors`` holds exactly its ``state_dict()``.
A new architecture is one line in the table (``"name": "module:function"``, imported
only when used) or a call to :func:`register_architecture`.

``preprocess`` describes the eval transform as data (:func:`build_transform`)::

    {"size": 224, "resize_mode": "shortest", "interpolation": "bicubic",
     "mean": [0.481, 0.458, 0.408], "std": [0.269, 0.261, 0.276]}
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from unicom.errors import InputError
from unicom.files import atomic_path, write_json_atomic
from unicom.models.encoders import Encoder

FORMAT = "unicom-model"
FORMAT_VERSION = 1
CONFIG_NAME = "unicom_model.json"
WEIGHTS_NAME = "model.safetensors"

# architecture name -> builder, or "module:function" imported on first use
ARCHITECTURES: dict[str, str | Callable[[Mapping[str, Any]], nn.Module]] = {
    "unicom_vit": "unicom.models.released:build_unicom_vit",
    "clip_vit": "unicom.models.vit:build_clip_vit",
    "unifex": "unicom.unifex.model:build_unifex",
}

RESIZE_MODES = ("shortest", "squash")  # short side to size + centre crop | both sides to size
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")

# Keys that a state dict may omit: BatchNorm's batch counter does not change any output.
OPTIONAL_KEY_SUFFIXES = ("num_batches_tracked",)


def register_architecture(name: str, builder: str | Callable[[Mapping[str, Any]], nn.Module], overwrite: bool = False) -> None:
    """Add ``name -> builder`` to :data:`ARCHITECTURES` (``builder`` may be ``"module:function"``)."""
    if name in ARCHITECTURES and not overwrite and ARCHITECTURES[name] != builder:
        raise ValueError(f"architecture {name!r} is already registered; pass overwrite=True to replace it")
    ARCHITECTURES[name] = builder


def get_builder(name: str) -> Callable[[Mapping[str, Any]], nn.Module]:
    """The builder registered as ``name``, importing it if it is given as ``"module:function"``."""
    builder = ARCHITECTURES.get(name)
    if builder is None:
        raise InputError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    if isinstance(builder, str):
        module_name, attribute = builder.split(":")
        builder = getattr(importlib.import_module(module_name), attribute)
    return builder


# ---------------------------------------------------------------------- preprocessing


def _convert_to_rgb(image):
    return image.convert("RGB")


def build_transform(preprocess: Mapping[str, Any]):
    """PIL image -> float32 tensor (3, size, size), from a ``preprocess`` description.

    ``resize_mode`` ``"shortest"``: resize the short side to ``resize_size`` (optional,
    default ``size``; the long side to ``int(resize_size * long / short)``), then centre
    crop ``size``; ``"squash"``: resize both sides to ``size``. Then RGB, values / 255,
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
        resize = [transforms.Resize((size, size), interpolation=interpolation)]
    # Resize before the RGB conversion, as the released models' own preprocessing does.
    return transforms.Compose([*resize, _convert_to_rgb, transforms.ToTensor(), transforms.Normalize(mean, std)])


# ------------------------------------------------------------------------- weights


def _listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … and {len(items) - limit} more" if len(items) > limit else "")


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`InputError` listing missing, unexpected and mis-shaped keys.

    ``expected`` is a module's ``state_dict()`` (meta tensors suffice: only shapes are
    read). Keys ending in :data:`OPTIONAL_KEY_SUFFIXES` may be missing.
    """
    missing = [k for k in expected if k not in given and not k.endswith(OPTIONAL_KEY_SUFFIXES)]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k} {tuple(given[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label}: {_listing(keys)}"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched))
            if keys
        ]
        raise InputError(f"{source}: the weights do not match the architecture; " + "; ".join(problems))


def instantiate(
    builder: Callable[[Mapping[str, Any]], nn.Module],
    settings: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """``builder(settings)`` with ``state_dict`` loaded strictly, floats cast to ``dtype``, in eval mode.

    The module is first built on the meta device, which skips the random initialisation
    of weights that are about to be replaced (up to 900M parameters for L/14@336px).
    A module that keeps tensors outside its state dict is built again normally.
    """
    with torch.device("meta"):
        model = builder(settings)
    expected = model.state_dict()
    check_state_dict(expected, state_dict, source)
    tensors = {}
    for key, reference in expected.items():
        if key not in state_dict:  # an optional counter
            tensors[key] = torch.zeros(reference.shape, dtype=reference.dtype)
            continue
        target = dtype if reference.is_floating_point() else reference.dtype
        tensors[key] = state_dict[key].to(target)
    model.load_state_dict(tensors, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = builder(settings)
        model.load_state_dict(tensors)
    return model.eval()


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
    """Write ``model`` (a module or its state dict) as an exported model folder.

    Args:
        folder: created if needed; an existing model there is replaced.
        arch: a name in :data:`ARCHITECTURES`.
        settings: the builder's argument (a JSON-able dict, or a dataclass).
        preprocess: the eval transform as data (see :func:`build_transform`).
        embedding_dim: D; read from the built module's ``embedding_dim`` when omitted.
        provenance: free-form facts about the origin (source file, checksum, run, data).

    Everything is checked before anything is written: the weights must load strictly
    into ``builder(settings)``. The weights are written first, the JSON last.
    """
    if dataclasses.is_dataclass(settings):
        settings = dataclasses.asdict(settings)
    settings = dict(settings)
    state_dict = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    builder = get_builder(arch)
    with torch.device("meta"):
        reference = builder(settings)
    check_state_dict(reference.state_dict(), state_dict, f"{arch} {settings}")
    embedding_dim = embedding_dim or getattr(reference, "embedding_dim", None)
    if not isinstance(embedding_dim, int) or embedding_dim <= 0:
        raise InputError(f"{arch}: pass embedding_dim= (the module has no integer embedding_dim attribute)")
    build_transform(preprocess)  # validates the description
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": arch,
        "settings": settings,
        "embedding_dim": embedding_dim,
        "preprocess": dict(preprocess),
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

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).unlink(missing_ok=True)  # the folder is incomplete until the JSON is back
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json_atomic(folder / CONFIG_NAME, config)
    return folder


def _version() -> str:
    from unicom import __version__

    return __version__


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The validated ``unicom_model.json`` of an exported model folder."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise InputError(f"{folder}: no {CONFIG_NAME}; not an exported unicom model (or its export did not finish)")
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
    return config


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, as stored."""
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise InputError(f"{folder}: {WEIGHTS_NAME} is missing")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise InputError(f"{path}: not a readable safetensors file ({error})") from error


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(model, transform)`` from an exported folder: the module in eval mode with
    float32 weights on ``device``, and its PIL -> tensor preprocessing."""
    config = read_config(folder)
    builder = get_builder(config["architecture"])
    model = instantiate(builder, config["settings"], read_weights(folder), source=str(Path(folder) / WEIGHTS_NAME))
    return model.to(device), build_transform(config["preprocess"])


# --------------------------------------------------------------------------- encoder


class ModelEncoder(Encoder):
    """An image model ``(B, 3, S, S) -> (B, D)`` with its transform, as an :class:`Encoder`."""

    def __init__(self, model: nn.Module, transform: Callable, embedding_dim: int, name: str):
        super().__init__()
        self.model = model
        self.image_transform = transform
        self.embedding_dim = embedding_dim
        self.name = name

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def accepts_export(spec: str, pretrained: str | None) -> bool:
    """Backend test for :func:`unicom.models.encoders.load_encoder`: a folder holding ``unicom_model.json``."""
    return pretrained is None and (Path(spec).expanduser() / CONFIG_NAME).is_file()


def exported_encoder(spec: str, pretrained: str | None, device: str | torch.device = "cpu") -> ModelEncoder:
    folder = Path(spec).expanduser()
    config = read_config(folder)
    model, transform = load_model(folder, device=device)
    origin = config.get("provenance", {}).get("released_name")
    name = f"{config['architecture']} {origin or ''} ({folder})".replace("  ", " ")
    return ModelEncoder(model, transform, config["embedding_dim"], name)
