"""Released checkpoints to and from model folders (``unicom convert``).

:func:`released_to_unicom` writes a released checkpoint (a registered name or a
released-format file) as a model folder, storing the tensors unchanged;
:func:`unicom_to_released` writes a ``unicom_vit`` model folder back as a plain state dict
with the official key names. A file converted there and back is identical, tensor for
tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from unicom.errors import InputError
from unicom.files import atomic_path, file_sha256, remove_killed_writes, save_torch
from unicom.models.registry import clip_preprocess, released_name
from unicom.models.unicom_vit import ARCHITECTURE, ViTSettings, build_unicom_vit


def released_to_unicom(
    name_or_path: str | os.PathLike,
    folder: str | os.PathLike,
    arch: str | ViTSettings | Mapping[str, Any] | None = None,
    download_root: str | os.PathLike | None = None,
) -> Path:
    """Write a released checkpoint (name or file) as a model folder.

    The tensors are stored unchanged (same keys, dtypes and values), so
    :func:`unicom_to_released` gives back an identical state dict.
    """
    from unicom.models.export import save_model
    from unicom.models.factory import load_state

    state_dict, settings, path = load_state(name_or_path, download_root, arch)
    provenance = {"source": path.name, "sha256": file_sha256(path), "released_name": released_name(ARCHITECTURE, settings.to_dict())}
    return save_model(folder, state_dict, ARCHITECTURE, settings.to_dict(), clip_preprocess(settings.image_size), provenance=provenance)


def unicom_to_released(folder: str | os.PathLike, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write a ``unicom_vit`` model folder as a released-format ``.pt`` state dict.

    ``dtype`` casts the floating-point tensors (``torch.float16`` like the released
    files); None keeps the stored dtypes. Keys follow the module's order.
    """
    from unicom.models.export import local_output, read_config, read_weights

    path = local_output(path, "a released-format file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; the released format is one file, give a file path (e.g. {path / 'model.pt'})")
    config = read_config(folder)
    if config["architecture"] != ARCHITECTURE:
        raise InputError(
            f"{folder}: architecture {config['architecture']!r} has no released-checkpoint form (only {ARCHITECTURE!r} has)"
        )
    tensors = read_weights(folder)
    with torch.device("meta"):
        order = list(build_unicom_vit(config["settings"]).state_dict())
    keys = [k for k in order if k in tensors] + [k for k in tensors if k not in order]
    state_dict = {k: tensors[k].to(dtype) if dtype is not None and tensors[k].is_floating_point() else tensors[k] for k in keys}
    overflowed = [k for k in keys if not state_dict[k].isfinite().all() and tensors[k].isfinite().all()] if dtype else []
    if overflowed:
        raise InputError(
            f"{folder}: values of {', '.join(overflowed[:10])} exceed the range of {dtype} (they would become inf); "
            "keep the stored dtypes (--dtype keep) or write float32"
        )
    remove_killed_writes(path)
    with atomic_path(path) as tmp:
        save_torch(state_dict, tmp)
    return path


__all__ = ["released_to_unicom", "unicom_to_released"]
