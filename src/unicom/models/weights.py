"""Reading weights safely and loading them strictly.

* :func:`read_state_dict`: the tensors of a checkpoint file (``.safetensors``, or a
  PyTorch file read with ``torch.load(weights_only=True)``: nothing is unpickled);
* :func:`check_state_dict`: every key and shape against a module's, with an error that
  lists what is missing, unexpected or mis-shaped;
* :func:`instantiate`: build a module and load a state dict into it strictly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from unicom.errors import InputError

# Keys that a state dict may omit: BatchNorm's batch counter does not change any output.
OPTIONAL_KEY_SUFFIXES = ("num_batches_tracked",)

# Keys under which a training checkpoint keeps its weights, in order of preference, as
# timm's load_state_dict / load_checkpoint take them by default: the exponential moving
# average (timm's state_dict_ema, DeiT's model_ema), then the trained weights; a bare
# "ema" (which timm does not read) only when nothing else is there.
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "ema")

# Prefixes carried by every key of a wrapped module's state dict: DistributedDataParallel
# or DataParallel (module.), torch.compile (_orig_mod.), a fine-tuning wrapper (model.).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")

# Records that training scripts keep beside the weights and that are read as data: timm's
# train.py saves its arguments as an argparse.Namespace (a bag of attributes, no code).
SAFE_RECORDS = (argparse.Namespace,)


def safe_records():
    """A context in which ``torch.load(weights_only=True)`` also reads :data:`SAFE_RECORDS`
    (PyTorch >= 2.5; before, such files are refused as holding Python objects)."""
    allow = getattr(torch.serialization, "safe_globals", None)
    return allow(list(SAFE_RECORDS)) if allow is not None else contextlib.nullcontext()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, read safely (no arbitrary unpickling).

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``. A dict that wraps the weights under one of
    :data:`WRAPPER_KEYS` is unwrapped (the first present: the moving average when there
    is one, as timm does), and the prefixes of
    :data:`WRAPPER_PREFIXES` carried by every key (``module.`` from
    DistributedDataParallel, ``_orig_mod.`` from torch.compile, ``model.`` from the public
    fine-tuning script) are removed, nested ones too (``module._orig_mod.``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        try:
            with safe_records():
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            with safe_records():
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as error:
        raise unpickling_refused(path, error) from error
    except Exception as error:  # a damaged or foreign file: torch raises many types (EOFError, OSError EINVAL, ...)
        raise InputError(
            f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error}); its {path.stat().st_size} "
            "bytes may be cut short or damaged (copy or download it again), or another format"
        ) from error
    return _tensor_dict(obj, path)


def unpickling_refused(path: str | os.PathLike, error: pickle.UnpicklingError) -> InputError:
    """The error for a file that ``torch.load(weights_only=True)`` refused: one that holds
    pickled Python objects (named so, with how to re-save it), or bytes that are no checkpoint."""
    # the class refused: "Unsupported global: GLOBAL module.Name" (recent PyTorch), "Unsupported class module.Name"
    # (older), "unsupported GLOBAL posix.system whose module posix is blocked" (os, sys: never allowed)
    named = re.search(r"Unsupported (?:global: GLOBAL|class|GLOBAL) (\S+)", str(error), re.IGNORECASE)
    if named is None:  # not pickled objects: bytes that are no checkpoint
        return InputError(f"{path}: not a readable PyTorch checkpoint (damaged, or another format)")
    return InputError(
        f"{path}: holds Python objects besides tensors ({named.group(1)}), which are not unpickled for safety; "
        "re-save its weights as a plain state dict, with the code that wrote it (torch.save(model.state_dict(), "
        "'weights.pt')) or, if you trust the file, torch.save(torch.load(path, weights_only=False)['state_dict'], "
        "'weights.pt') (the key that holds the weights)"
    )


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, as stored."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise InputError(f"{path}: not a readable safetensors file ({error})") from error


def _tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            from unicom.models.export import CONFIG_NAME

            exported = path.parent / "model"  # beside the checkpoint of a unicom probe run: its model
            raise InputError(
                f"{path}: expected a state dict (key -> tensor), or one under {', '.join(WRAPPER_KEYS)}; "
                f"found keys {sorted(map(str, obj))[:10]}"
                + (f"; the model trained from it is the model folder {exported}: give that"
                   if (exported / CONFIG_NAME).is_file() else "")
            )
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path}: expected a non-empty state dict (key -> tensor), got {type(obj).__name__}")
    state_dict = dict(obj)
    while prefix := next((p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in state_dict)), None):
        state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def _listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … and {len(items) - limit} more" if len(items) > limit else "")


def state_dict_problems(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps ``given`` from loading strictly into ``expected`` (a module's
    ``state_dict()``; meta tensors suffice): ``"missing keys: …"``, ``"unexpected keys: …"``,
    ``"wrong shapes: …"``, those that apply. Keys ending in :data:`OPTIONAL_KEY_SUFFIXES`
    may be missing."""
    missing = [k for k in expected if k not in given and not k.endswith(OPTIONAL_KEY_SUFFIXES)]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k} {tuple(given[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    return [
        f"{label}: {_listing(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched))
        if keys
    ]


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`InputError` listing missing, unexpected and mis-shaped keys
    (:func:`state_dict_problems`)."""
    problems = state_dict_problems(expected, given)
    if problems:
        raise InputError(f"{source}: the weights do not match the architecture; " + "; ".join(problems))


def instantiate(
    builder: Callable[[Mapping[str, Any]], nn.Module],
    settings: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    dtype: torch.dtype = torch.float32,
    settings_source: str | None = None,
) -> nn.Module:
    """``builder(settings)`` with ``state_dict`` loaded strictly, floats cast to ``dtype``, in eval mode.

    The module is first built on the meta device, which skips the random initialisation
    of weights that are about to be replaced (up to 900M parameters for L/14@336px).
    A module that keeps tensors outside its state dict is built again normally.
    Settings the builder refuses are an :class:`InputError` naming ``settings_source``
    (default ``source``), where they were read.
    """
    try:
        with torch.device("meta"):
            model = builder(settings)
    except InputError as error:
        raise InputError(f"{settings_source or source}: {error}") from error
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


__all__ = [
    "OPTIONAL_KEY_SUFFIXES", "SAFE_RECORDS", "WRAPPER_KEYS", "WRAPPER_PREFIXES", "check_state_dict", "instantiate",
    "read_safetensors", "read_state_dict", "safe_records", "unpickling_refused",
]
