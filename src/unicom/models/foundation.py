"""Frozen foundation models as :class:`~unicom.models.encoders.Encoder`: open_clip and timm.

Specs (see :func:`unicom.models.encoders.load_encoder`):

* open_clip: a model name from ``open_clip.list_models()`` (``ViT-B-32``) or an
  ``hf-hub:``/``local-dir:`` reference; ``pretrained`` is a tag (``laion400m_e32``, fetched
  by open_clip into its cache) or a local checkpoint file (``.pt``/``.pth``/``.bin`` state
  dict, also inside ``{"state_dict": ...}``, or ``.safetensors``). Files are read with
  ``torch.load(weights_only=True)`` or safetensors, never by unpickling code. A
  ``hf-hub:``/``local-dir:`` reference holds its weights: ``pretrained`` is refused with it.
* timm: ``timm/<name>`` or ``timm:<name>`` (``timm/vit_base_patch16_224``); ``pretrained`` is
  a tag (``augreg_in21k``), a local checkpoint file, or ``None``/``"none"`` for random
  weights. A tag written into the name (``timm/convnext_tiny.fb_in1k``) also loads weights.
  ``timm/local-dir:FOLDER`` and ``timm/hf-hub:org/repo`` are timm model folders (``config.json``
  and the weights, as ``timm.create_model`` reads them); they hold their weights, so
  ``pretrained`` is left out. The classifier is removed: the encoder returns the pooled
  features (``num_classes=0``).
"""

from __future__ import annotations

import os
import pickle
import warnings
from typing import Sequence

import torch

from unicom.errors import InputError
from unicom.models.encoders import Encoder

_NO_WEIGHTS = (None, "", "none", "random")
_TIMM_PREFIXES = ("timm/", "timm:")
_OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")


def local_folder(spec: str) -> str | None:
    """The local folder of ``local-dir:FOLDER`` (open_clip) or ``timm/local-dir:FOLDER`` (timm); None otherwise."""
    for prefix in ("", *_TIMM_PREFIXES):
        if spec.startswith(prefix + "local-dir:"):
            return spec[len(prefix + "local-dir:"):]
    return None


def recorded_spec(spec):
    """What a configuration record keeps of a model spec: a local folder or file, also the
    folder of a ``local-dir:`` spec, by its absolute path (so that ``unicom search`` or a
    model folder finds it from any working folder); anything else as it is."""
    from unicom import storage

    folder = local_folder(spec) if isinstance(spec, str) else None
    if folder and not storage.is_url(folder) and os.path.isdir(folder):
        return spec[: len(spec) - len(folder)] + os.path.abspath(folder)
    return storage.recorded(spec)


def _is_random(pretrained: str | None) -> bool:
    return pretrained is None or str(pretrained).lower() in _NO_WEIGHTS


def _refuse_other_weights(spec: str, pretrained: str | None) -> None:
    """A model folder or Hub repository (``local-dir:``, ``hf-hub:``) holds its weights:
    weights given besides would be ignored, so they are refused."""
    if not _is_random(pretrained):
        raise InputError(f"{spec}: the model folder holds its weights; leave out --pretrained {pretrained}")


# --------------------------------------------------------------------------- open_clip


class OpenClipEncoder(Encoder):
    """An open_clip CLIP model: image tower and text tower.

    ``encode_image``: float (B, 3, H, W) -> (B, D); ``encode_text``: int64 tokens (B, L) ->
    (B, D). Outputs are the projected embeddings, not normalised. The tokenizer is built on
    the first :meth:`tokenize`: image features never need it (SigLIP's is a Hugging Face
    tokenizer, which needs the ``transformers`` package and its files).
    """

    has_text = True

    def __init__(self, model: torch.nn.Module, image_transform, tokenizer_spec: str, name: str):
        super().__init__()
        self.model = model
        self.image_transform = image_transform
        self.tokenizer_spec = tokenizer_spec
        self._tokenizer = None
        self.name = name
        self.embedding_dim = visual_output_dim(model.visual)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if self._tokenizer is None:
            import open_clip

            try:
                self._tokenizer = open_clip.get_tokenizer(self.tokenizer_spec)
            except ImportError as error:
                raise InputError(
                    f"{self.name}: its tokenizer needs the {error.name or 'transformers'} package "
                    f"(pip install {error.name or 'transformers'}); image embeddings do not need it"
                ) from error
        return self._tokenizer(list(texts))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def visual_output_dim(visual: torch.nn.Module) -> int:
    """The size of an open_clip image tower's output.

    open_clip's own towers state it (``output_dim``); a timm tower (``TimmModel``: SigLIP,
    ConvNeXt, EVA ...) does not: its output is the last layer of its head (a projection,
    an MLP, an attention pool), or, with no head, the trunk's classifier when open_clip uses
    it as the projection, else the trunk's pooled features.
    """
    dim = getattr(visual, "output_dim", None)
    if dim is not None:
        return int(dim)
    head = getattr(visual, "head", None)
    for layer in reversed(list(head.modules()) if head is not None else []):
        if isinstance(layer, torch.nn.Linear):
            return int(layer.out_features)
        if getattr(layer, "out_features", None) is not None:  # timm's attention pools
            return int(layer.out_features)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        return int(getattr(trunk, "num_classes", 0) or getattr(trunk, "head_hidden_size", None) or trunk.num_features)
    raise InputError(f"cannot tell the output size of the image tower {type(visual).__name__}")


def _tag_preprocessing(spec: str) -> dict:
    """The preprocessing that every pretrained tag of open_clip model ``spec`` shares
    (``image_mean``, ``image_std``, ``image_interpolation``, ``image_resize_mode``), or {}.

    open_clip knows a model's preprocessing from its tag only: a local checkpoint file (or
    random weights) would otherwise get CLIP's mean and a centre crop, which is wrong for
    SigLIP (mean 0.5, squash). When all tags agree, their preprocessing is the model's.
    """
    import open_clip

    keys = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
            "resize_mode": "image_resize_mode"}
    found = None
    for tag in open_clip.list_pretrained_tags_by_model(spec):
        cfg = open_clip.get_pretrained_cfg(spec, tag)
        values = {arg: (tuple(cfg[key]) if isinstance(cfg.get(key), (list, tuple)) else cfg.get(key))
                  for key, arg in keys.items() if cfg.get(key) is not None}
        if found is None:
            found = values
        elif values != found:
            return {}
    return found or {}


def accepts_open_clip(spec: str, pretrained: str | None = None) -> bool:
    """True for an open_clip model name (``ViT-B-32``) or an ``hf-hub:``/``local-dir:`` spec."""
    if spec.startswith(_OPEN_CLIP_SCHEMAS):
        return True
    import open_clip

    return spec in open_clip.list_models()


_STATE_DICT_ERROR = "Error(s) in loading state_dict"  # how torch's load_state_dict begins a key/shape mismatch


def _refuse_open_clip_file(spec: str, weights: str) -> None:
    """The :class:`InputError` that names what a checkpoint file open_clip could not load
    into ``spec`` lacks or has too many (keys, shapes), read without building its weights."""
    import open_clip

    from unicom.models.weights import read_state_dict, state_dict_problems

    given = read_state_dict(weights)
    with torch.device("meta"):  # shapes only: no initialisation of weights
        expected = open_clip.create_model(spec, pretrained=None, device="meta").state_dict()
    problems = state_dict_problems(expected, given)
    if problems:
        tower = all(key.startswith("visual.") for key in given) and not all(key.startswith("visual.") for key in expected)
        raise InputError(f"{weights}: does not hold {spec} weights; " + "; ".join(problems) + (
            f" ({spec} is a whole CLIP, and the file holds its image tower alone: open_clip loads both towers; "
            "save the whole model's state_dict)" if tower else ""))


def open_clip_encoder(spec: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> OpenClipEncoder:
    """Build an open_clip model with its evaluation transform and tokenizer.

    ``pretrained`` is a tag known to open_clip, a local checkpoint file, or None for random
    weights (a warning says so: embeddings of random weights are only useful for tests).
    """
    import open_clip

    if spec.startswith(_OPEN_CLIP_SCHEMAS):
        _refuse_other_weights(spec, pretrained)
        weights = None  # the schema names the weights
    elif _is_random(pretrained):
        warnings.warn(f"{spec}: no --pretrained given, the model has random weights", stacklevel=2)
        weights = None
    else:
        weights = str(pretrained)
        is_tag = open_clip.get_pretrained_cfg(spec, weights) != {}
        if not is_tag and not os.path.isfile(weights):
            tags = open_clip.list_pretrained_tags_by_model(spec)
            raise InputError(
                f"{weights}: not a file and not a pretrained tag of {spec}; "
                f"give a local checkpoint file or one of the tags {tags}"
            )
    # a tag brings its own preprocessing; a file or random weights take the one all tags share
    preprocessing = {} if spec.startswith(_OPEN_CLIP_SCHEMAS) or (weights is not None and not os.path.isfile(weights)) \
        else _tag_preprocessing(spec)
    try:
        model, _, transform = open_clip.create_model_and_transforms(
            spec, pretrained=weights, device=device, weights_only=True, **preprocessing
        )
    except RuntimeError as error:
        message = str(error)
        if "download" in message.lower():
            raise InputError(
                f"{spec} {weights}: the weights could not be fetched ({message}); "
                "download them where there is a network and pass the file with --pretrained"
            ) from error
        # only load_state_dict's key/shape check says the file holds other weights; any other error (out of
        # memory, a device's failure) is not the file's, and passes through as it is
        if weights is not None and os.path.isfile(weights) and not isinstance(error, torch.cuda.OutOfMemoryError):
            _refuse_open_clip_file(spec, weights)  # names the keys and shapes that do not fit, if any
            if _STATE_DICT_ERROR in message:
                raise InputError(f"{weights}: does not hold {spec} weights ({message})") from error
        raise
    except pickle.UnpicklingError as error:  # weights_only refused the file
        from unicom.models.weights import unpickling_refused

        raise unpickling_refused(weights or spec, error) from error
    except (OSError, ValueError) as error:  # unreadable files
        raise InputError(f"{weights or spec}: cannot be loaded as {spec} weights ({error})") from error
    label = spec if weights is None else f"{spec} ({weights})"
    return OpenClipEncoder(model, transform, spec, label)


# --------------------------------------------------------------------------- timm


class TimmEncoder(Encoder):
    """A timm image model without its classifier: float (B, 3, H, W) -> pooled features (B, D)."""

    no_text_reason = "timm's image models have no text tower"

    def __init__(self, model: torch.nn.Module, image_transform, name: str):
        super().__init__()
        self.model = model
        self.image_transform = image_transform
        self.name = name
        self.embedding_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def accepts_timm(spec: str, pretrained: str | None = None) -> bool:
    """True for ``timm/<name>`` and ``timm:<name>``."""
    return spec.startswith(_TIMM_PREFIXES)


def timm_conversion(model: torch.nn.Module):
    """The function with which timm converts a checkpoint for ``model``'s architecture when it
    loads one (``checkpoint_filter_fn(state_dict, model)`` of the model's module: other projects'
    layouts of the same network, position embeddings resampled to the model's grid), or None
    where its module has none."""
    import sys

    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _load_timm_file(model: torch.nn.Module, path: str) -> None:
    """Load a timm checkpoint file into ``model`` (built with ``num_classes=0``), strictly.

    The file is first converted as timm converts the checkpoints of the model's architecture
    (:func:`timm_conversion`: another project's layout of the same network, such as Meta's
    DINOv2 or an open_clip tower, and position embeddings of another image size, resampled).
    The classifier weights of the file are dropped; every other tensor must match.
    """
    from timm.models import load_state_dict

    from unicom.models.weights import safe_records

    try:
        with safe_records():
            state_dict = load_state_dict(path, use_ema=True, weights_only=True)
    except Exception as error:  # torch/safetensors raise many types for foreign files
        refused = error if isinstance(error, pickle.UnpicklingError) else error.__cause__  # timm wraps it
        if isinstance(refused, pickle.UnpicklingError):
            from unicom.models.weights import unpickling_refused

            raise unpickling_refused(path, refused) from error
        raise InputError(f"{path}: not a readable checkpoint file ({error})") from error
    convert = timm_conversion(model)
    if convert is not None:
        try:
            state_dict = convert(state_dict, model)
        except Exception as error:  # a file of another network: the strict load below would refuse it too
            raise InputError(f"{path}: does not fit {model.pretrained_cfg.get('architecture')} (timm's conversion "
                             f"of its checkpoints failed: {type(error).__name__}: {error})") from error
    classifiers = model.pretrained_cfg.get("classifier") or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    own = model.state_dict()
    for name in classifiers:
        for suffix in (".weight", ".bias"):
            if name + suffix not in own:
                state_dict.pop(name + suffix, None)
    missing, unexpected = [], []
    try:
        result = model.load_state_dict(state_dict, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    except RuntimeError as error:  # shape mismatches
        raise InputError(f"{path}: does not fit {model.pretrained_cfg.get('architecture')} ({error})") from error
    if missing or unexpected:
        raise InputError(
            f"{path}: does not fit {model.pretrained_cfg.get('architecture')}: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )


def timm_encoder(spec: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> TimmEncoder:
    """Build ``timm/<name>`` with ``num_classes=0`` and its evaluation transform."""
    import timm

    name = spec[len("timm/"):] if spec.startswith("timm/") else spec[len("timm:"):]
    if name.startswith(_OPEN_CLIP_SCHEMAS):  # a timm model folder (config.json + weights), or one on the Hub
        return _timm_folder_encoder(spec, name, pretrained, device)
    base, _, tag = name.partition(".")
    if not timm.is_model(base):
        raise InputError(f"{spec}: timm has no model {base!r}; see timm.list_models()")
    weights_file = None
    if not _is_random(pretrained) and os.path.isfile(str(pretrained)):
        weights_file, download = str(pretrained), False
    elif not _is_random(pretrained):
        from unicom.models.factory import CHECKPOINT_SUFFIXES

        if os.sep in str(pretrained) or str(pretrained).endswith(CHECKPOINT_SUFFIXES):
            raise InputError(f"{pretrained}: file not found (the --pretrained checkpoint for {spec})")
        name, download = f"{base}.{pretrained}", True
    else:
        download = bool(tag)
    try:
        model = timm.create_model(name, pretrained=download, num_classes=0)
    except RuntimeError as error:
        raise InputError(
            f"{spec}: no weights for {name!r} could be loaded ({error}); check the tag in "
            "timm.list_pretrained(), or pass a local checkpoint file with --pretrained"
        ) from error
    except Exception as error:  # network errors come from huggingface_hub / urllib
        if not download:
            raise
        raise InputError(
            f"{spec}: the weights of {name!r} could not be fetched ({error}); download them where "
            "there is a network and pass the file with --pretrained"
        ) from error
    if weights_file is not None:
        _load_timm_file(model, weights_file)
    elif not download:
        warnings.warn(f"{spec}: no --pretrained given, the model has random weights", stacklevel=2)
    label = spec if weights_file is None else f"{spec} ({weights_file})"
    return _timm_model_encoder(model, label, device)


def _timm_model_encoder(model: torch.nn.Module, label: str, device: str | torch.device) -> TimmEncoder:
    from timm.data import create_transform, resolve_model_data_config

    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    return TimmEncoder(model.to(device), transform, label)


def _timm_folder_encoder(spec: str, name: str, pretrained: str | None, device: str | torch.device) -> TimmEncoder:
    """``timm/local-dir:FOLDER`` or ``timm/hf-hub:org/repo``: the model, preprocessing and
    weights that timm reads from the folder's ``config.json`` and weights file."""
    import timm

    _refuse_other_weights(spec, pretrained)
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as error:  # missing files, foreign configs and network errors come in many types
        raise InputError(
            f"{spec}: timm cannot load it as a model folder ({type(error).__name__}: {error}); "
            "a timm model folder holds config.json and model.safetensors (or pytorch_model.bin)"
        ) from error
    return _timm_model_encoder(model, spec, device)
