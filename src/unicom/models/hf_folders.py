"""Model folders in Hugging Face transformers' layouts: what their loaders share.

A folder holds a ``config.json``, its weights (``model.safetensors``, or ``pytorch_model.bin``
read with ``torch.load(weights_only=True)``; every tensor's name and shape checked against the
network built from the configuration, never the file's own code) and the tokenizer's files.
:func:`hub_folder` brings one commit's files of an ``hf-hub:org/repo`` repository into the
Hugging Face cache. Used by :mod:`unicom.models.multilingual` (M-CLIP, sentence-transformers)
and :mod:`unicom.models.hf_clip` (transformers' CLIP and SigLIP models).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from unicom.errors import InputError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model",
                   "spiece.model", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json")


def require_transformers(what: str, extra: str):
    """The ``transformers`` module, or an :class:`InputError` saying that ``what`` needs it and how to install it."""
    try:
        import transformers
    except ImportError as error:
        raise InputError(f"{what} need the transformers package ({error}); pip install 'unicom[{extra}]'") from error
    return transformers


def read_json(path: Path, spec: str, what: str) -> dict:
    """The JSON object (or list) of ``path``; a missing file is named with ``what`` it should hold."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{spec}: no {path.name} ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable JSON file ({error})") from error
    if not isinstance(value, (dict, list)):
        raise InputError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def weights_file(folder: Path, spec: str) -> Path:
    """The weights file of ``folder`` (:data:`WEIGHT_FILES`, safetensors first)."""
    found = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if found is None:
        raise InputError(f"{spec}: no weights ({' or '.join(WEIGHT_FILES)}) in {folder}")
    return found


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, path: Path, what: str) -> None:
    """Load ``state`` (the module's tensors under ``prefix``, as the file names them) into
    ``module``, every name and shape checked first (:func:`unicom.models.weights.check_state_dict`)."""
    from unicom.models.weights import check_state_dict

    expected = {prefix + key: value for key, value in module.state_dict().items()}
    check_state_dict(expected, state, f"{path} ({what})")
    module.load_state_dict({key[len(prefix):]: value for key, value in state.items()})


@contextlib.contextmanager
def errors_only(transformers):
    """transformers' warnings silenced inside (its errors still said)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def tokenizer(folder: Path, spec: str, transformers):
    """The tokenizer saved in ``folder`` (``transformers.AutoTokenizer``)."""
    # the tokenizer's threads, once started here, do not survive the fork into data loading workers (each would
    # say so): it tokenizes a batch of captions on one thread, unless the user says otherwise
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with errors_only(transformers):  # it reads config.json, whose model type it may not know, and says so
            return transformers.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"{spec}: its tokenizer could not be read from {folder} ({error}); the folder holds the "
                         f"tokenizer's files ({', '.join(TOKENIZER_FILES[:3])}, ...)") from error


def hub_file(spec: str, name: str, revision: str) -> bool:
    """Bring ``name`` of one ``revision`` of the ``hf-hub:`` repository ``spec`` into the cache:
    False where the repository has no such file (offline: where the cache has none)."""
    from unicom.models import hub

    try:
        hub.hf_file(spec, name, revision=revision)
    except (hub.NotAModelFolder, hub.NotInCache):
        return False
    return True


def hub_folder(spec: str, names: Iterable[str] = ()) -> Path:
    """The snapshot folder of the ``hf-hub:`` repository ``spec`` with its ``config.json``,
    weights, tokenizer files and ``names`` (each if the repository has it), all of the commit
    that ``config.json`` came from."""
    from unicom.models import hub

    config = hub.hf_file(spec, "config.json")
    commit = config.parent.name  # snapshots/<commit>/config.json: the other files from the same commit
    if not any(hub_file(spec, name, commit) for name in WEIGHT_FILES):
        raise InputError(f"{spec}: the repository has no weights ({' or '.join(WEIGHT_FILES)})")
    for name in (*TOKENIZER_FILES, *names):
        hub_file(spec, name, commit)
    return config.parent
