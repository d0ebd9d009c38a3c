"""Model folders in Hugging Face transformers' layouts: what their loaders share.

A folder holds a ``config.json``, its weights (``model.safetensors``, or ``pytorch_model.bin``
read with ``torch.load(weights_only=True)``; either whole or in shards with transformers'
index, ``model.safetensors.index.json``, as it saves a model over its ``max_shard_size``) and
the tokenizer's files. Every tensor's name and shape is checked against the network built from
the configuration, never the file's own code: by :func:`load_checked` after
:func:`read_weights` (layouts transformers does not read, M-CLIP's), or by
:func:`load_pretrained`, where transformers reads the files itself (under the names its version
gives older checkpoints). :func:`hub_folder` brings one commit's files of an
``hf-hub:org/repo`` repository into the Hugging Face cache. Used by
:mod:`unicom.models.multilingual` (M-CLIP, sentence-transformers) and
:mod:`unicom.models.hf_clip` (transformers' CLIP-like and DINOv2 models).
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

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
INDEX_SUFFIX = ".index.json"  # transformers' index of a model saved in shards: {"weight_map": {tensor: shard file}}
WEIGHTS_SAID = "model.safetensors or pytorch_model.bin, whole or in shards with their .index.json"
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
    """The weights file of ``folder`` (:data:`WEIGHT_FILES`, safetensors first): one file, or
    the index of its shards."""
    found = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if found is None:
        raise InputError(f"{spec}: no weights ({WEIGHTS_SAID}) in {folder}")
    return found


def shard_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of transformers' index of shards (tensor name -> shard file beside it), checked."""
    weight_map = read_json(index, str(index), "the index of the weights' shards").get("weight_map") \
        if index.is_file() else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in weight_map.items()):
        raise InputError(f"{index}: no weight_map ({{tensor name: shard file}}) in this index of shards")
    outside = sorted({name for name in weight_map.values() if Path(name).name != name or name in ("", ".", "..")})
    if outside:
        raise InputError(f"{index}: shard {outside[0]!r} is not a file name beside the index; read are shards in "
                         "the index's own folder")
    return weight_map


def shards_present(index: Path) -> dict[str, str]:
    """:func:`shard_map` of ``index``, each shard checked to be beside it."""
    weight_map = shard_map(index)
    for shard in sorted(set(weight_map.values())):
        if not (index.parent / shard).is_file():
            raise InputError(f"{index}: its shard {shard} is not in {index.parent}; copy or download the model's "
                             "every file")
    return weight_map


def read_weights(folder: Path, spec: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of ``folder``'s weights (:func:`weights_file`) and the file they came from;
    shards are read one by one, each holding the tensors the index gives it."""
    from unicom.models.weights import read_state_dict

    path = weights_file(folder, spec)
    if not path.name.endswith(INDEX_SUFFIX):
        return read_state_dict(path), path
    weight_map = shards_present(path)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = read_state_dict(folder / shard)
        listed = sorted(key for key, value in weight_map.items() if value == shard)
        missing = [key for key in listed if key not in tensors]
        if missing:
            raise InputError(f"{folder / shard}: no tensor {missing[0]}, which {path.name} places there "
                             f"({len(missing)} missing); the shard is not the one the index was written with")
        state.update((key, tensors[key]) for key in listed)
    return state, path


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


def _dtype_option(transformers) -> str:
    """The name ``from_pretrained`` takes the weights' dtype by: ``dtype`` from transformers 4.56,
    ``torch_dtype`` before."""
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def load_pretrained(model_class, config, folder: Path, spec: str, transformers) -> nn.Module:
    """``model_class`` (a transformers model class) built from ``config`` with the weights of
    ``folder``, read by transformers itself (``from_pretrained``: safetensors, or ``.bin`` with
    ``torch.load(weights_only=True)``, whole or in shards, under the names its version gives
    the checkpoints it reads), in float32; a tensor missing, left over or of another shape is
    refused, named, where transformers would only warn."""
    weights = weights_file(folder, spec)
    if weights.name.endswith(INDEX_SUFFIX):
        shards_present(weights)  # named here, before transformers reads them
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with errors_only(transformers):
            model, info = model_class.from_pretrained(
                str(folder), config=config, output_loading_info=True, local_files_only=True,
                ignore_mismatched_sizes=True, trust_remote_code=False, **{_dtype_option(transformers): torch.float32})
    except (OSError, ValueError, RuntimeError, KeyError, AttributeError, TypeError) as error:
        raise InputError(f"{weights}: transformers' {model_class.__name__} could not read these weights "
                         f"({type(error).__name__}: {error})") from error
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    problems = []
    for key, said in (("missing_keys", "missing"), ("unexpected_keys", "unexpected")):
        if info.get(key):
            names = sorted(info[key])
            problems.append(f"{said} keys: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}")
    if info.get("mismatched_keys"):
        shapes = [f"{name} ({tuple(given)} in the file, {tuple(expected)} in the model)"
                  for name, given, expected in sorted(info["mismatched_keys"], key=lambda entry: entry[0])]
        problems.append(f"wrong shapes: {', '.join(shapes[:10])}")
    if problems:
        raise InputError(f"{weights} ({model_class.__name__} of {folder / 'config.json'}): the weights do not match "
                         "the architecture; " + "; ".join(problems))
    return model


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


def hub_file(spec: str, name: str, revision: str | None) -> bool:
    """Bring ``name`` of one ``revision`` (None: the one ``spec`` names) of the ``hf-hub:``
    repository ``spec`` into the cache: False where the repository has no such file (offline:
    where the cache has none)."""
    from unicom.models import hub

    try:
        hub.hf_file(spec, name, revision=revision)
    except (hub.NotAModelFolder, hub.NotInCache):
        return False
    return True


def hub_weights(spec: str, snapshot: Path, folder: str, commit: str) -> bool:
    """Bring the weights of ``folder`` (a path in the repository, "" its root) of one commit of
    the ``hf-hub:`` repository ``spec`` into the cache (``snapshot``): the first of
    :data:`WEIGHT_FILES` it has and, for an index, every shard it names. False where it has none."""
    within = f"{folder}/" if folder else ""
    for name in WEIGHT_FILES:
        if hub_file(spec, within + name, commit):
            if name.endswith(INDEX_SUFFIX):
                for shard in sorted(set(shard_map(snapshot / (within + name)).values())):
                    if not hub_file(spec, within + shard, commit):
                        raise InputError(f"{spec}: {within + name} names the shard {shard}, which the repository "
                                         "does not hold (offline: the cache does not)")
            return True
    return False


def hub_folder(spec: str, names: Iterable[str] = ()) -> Path:
    """The snapshot folder of the ``hf-hub:`` repository ``spec`` with its ``config.json``,
    weights (every shard), tokenizer files and ``names`` (each if the repository has it), all of
    the commit that ``config.json`` came from."""
    from unicom.models import hub

    config = hub.hf_file(spec, "config.json")
    commit = hub.hf_commit(config, spec)  # the other files from the same commit
    if not hub_weights(spec, config.parent, "", commit):
        raise InputError(f"{spec}: the repository has no weights ({WEIGHTS_SAID})")
    for name in (*TOKENIZER_FILES, *names):
        hub_file(spec, name, commit)
    return config.parent
