"""Multilingual text queries: M-CLIP's text models as an :class:`~unicom.models.encoders.Encoder` of texts.

An M-CLIP model (Carlsson et al., "Cross-lingual and Multilingual CLIP", LREC 2022) is a
multilingual transformer (XLM-RoBERTa) trained so that the mean of its token states over a
caption, projected by one linear layer, lands where a CLIP model's text tower puts the
English caption: texts in about a hundred languages then search a collection embedded by
that CLIP model. clip-retrieval's back end answers ``use_mclip`` with them.

A model is a folder, local or ``hf-hub:org/repo[@revision]`` (as published on the Hub):

* ``config.json``: ``{"model_type": "M-CLIP", "modelBase": "xlm-roberta-large",
  "transformerDimensions": 1024, "numDims": 768}``; ``modelBase`` names the transformer's
  architecture (a Hub name, whose ``config.json`` alone is read, or a local folder);
* ``model.safetensors`` or ``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``):
  ``transformer.*``, the transformer's weights, and ``LinearTransformation.weight`` (numDims,
  transformerDimensions) and ``.bias``;
* the tokenizer's files, read by ``transformers.AutoTokenizer``.

:data:`MCLIP_MODELS` lists the published ones by the CLIP model whose space they share.
Needs ``transformers`` (``pip install 'unicom[multilingual]'``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from unicom.errors import InputError
from unicom.models.encoders import Encoder

# the published models, by the CLIP model (open_clip's names) whose embeddings they share
MCLIP_MODELS = {
    "ViT-L-14": "hf-hub:M-CLIP/XLM-Roberta-Large-Vit-L-14",
    "ViT-B-32": "hf-hub:M-CLIP/XLM-Roberta-Large-Vit-B-32",
    "ViT-B-16-plus-240": "hf-hub:M-CLIP/XLM-Roberta-Large-Vit-B-16Plus",
}
MODEL_TYPE = "M-CLIP"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model")
PROJECTION = "LinearTransformation"
TRANSFORMER = "transformer."


class MultilingualText(Encoder):
    """Texts -> (B, numDims) embeddings in a CLIP model's space; it embeds no images.

    ``tokenize`` gives int64 (2, B, L): the token ids and the attention mask (a text may
    hold the tokenizer's padding token itself, so the mask is not read from the ids);
    ``encode_text`` the projected mean of the transformer's last states over the tokens
    the mask keeps, not normalised. A text longer than the transformer's positions is cut
    to them.
    """

    has_text = True
    image_transform = None

    def __init__(self, transformer: nn.Module, projection: nn.Linear, tokenizer, max_tokens: int, name: str):
        super().__init__()
        self.transformer = transformer
        self.projection = projection
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.embedding_dim = projection.out_features
        self.name = name

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise InputError(f"{self.name} is a multilingual text model: it embeds texts only; query images with the "
                         "collection's own model")

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt")
        return torch.stack([batch["input_ids"], batch["attention_mask"]]).long()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        ids, mask = tokens[0], tokens[1]
        states = self.transformer(input_ids=ids, attention_mask=mask)[0]
        weights = mask.unsqueeze(2).to(states.dtype)
        return self.projection((states * weights).sum(dim=1) / weights.sum(dim=1))


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise InputError(f"multilingual text models (M-CLIP) need the transformers package ({error}); "
                         "pip install 'unicom[multilingual]'") from error
    return transformers


def model_folder(spec: str) -> Path:
    """The local folder of an M-CLIP model: ``spec`` itself, or the Hub snapshot of
    ``hf-hub:org/repo`` (its config, weights and tokenizer files, of one commit)."""
    from unicom.models import hub

    if not hub.is_hf_spec(spec):
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise InputError(f"{spec}: no such folder; give an M-CLIP model folder or hf-hub:org/repo "
                             f"(e.g. {MCLIP_MODELS['ViT-L-14']})")
        return folder
    config = hub.hf_file(spec, "config.json")
    commit = config.parent.name  # snapshots/<commit>/config.json: the other files from the same commit
    weights = []
    for name in (*WEIGHT_FILES, *TOKENIZER_FILES):
        if name in WEIGHT_FILES and weights:
            continue
        try:
            hub.hf_file(spec, name, revision=commit)
        except (hub.NotAModelFolder, hub.NotInCache):  # not in the repository (offline: not in the cache)
            continue
        if name in WEIGHT_FILES:
            weights.append(name)
    if not weights:
        raise InputError(f"{spec}: the repository has config.json but no weights ({' or '.join(WEIGHT_FILES)})")
    return config.parent


def _read_config(folder: Path, spec: str) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{spec}: no config.json; an M-CLIP model folder holds config.json, the weights and the "
                         "tokenizer's files") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable JSON file ({error})") from error
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise InputError(f"{path}: model_type {found!r}, not {MODEL_TYPE!r}: not an M-CLIP text model "
                         f"(e.g. {MCLIP_MODELS['ViT-L-14']})")
    missing = [key for key in ("modelBase", "transformerDimensions", "numDims") if key not in config]
    if missing:
        raise InputError(f"{path}: no {', '.join(missing)}; M-CLIP's config names its base model (modelBase) and "
                         "the projection's sizes (transformerDimensions, numDims)")
    return config


def _checked_weights(state: dict[str, torch.Tensor], transformer: nn.Module, config: dict, path: Path) -> dict:
    """The transformer's and the projection's tensors of an M-CLIP checkpoint, every one checked."""
    width, dims = int(config["transformerDimensions"]), int(config["numDims"])
    expected = {f"{PROJECTION}.weight": (dims, width), f"{PROJECTION}.bias": (dims,)}
    expected.update({TRANSFORMER + key: tuple(value.shape) for key, value in transformer.state_dict().items()})
    # positions' ids were saved by older transformers versions: a buffer computed at build, not a weight
    state = {key: value for key, value in state.items() if not key.endswith("embeddings.position_ids")}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = ([f"lacks {len(missing)} tensors ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"] if missing
                 else []) + ([f"has {len(unexpected)} others ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"]
                             if unexpected else [])
        raise InputError(f"{path}: not the weights of M-CLIP with base {config['modelBase']}: it {' and '.join(parts)}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise InputError(f"{path}: {key} has shape {tuple(state[key].shape)}, the model {shape} "
                             "(config.json's sizes or modelBase do not match the weights)")
    return state


def load_multilingual(spec: str | os.PathLike, device: str | torch.device = "cpu") -> MultilingualText:
    """The M-CLIP text model of a folder or ``hf-hub:`` repository (module docstring), in eval mode."""
    from unicom.engine.device import resolve_device
    from unicom.models import hub
    from unicom.models.weights import read_state_dict

    transformers = _transformers()
    spec = os.fspath(spec)
    device = resolve_device(str(device), "device")
    folder = model_folder(spec)
    config = _read_config(folder, spec)
    base = str(config["modelBase"])
    try:
        base_config = transformers.AutoConfig.from_pretrained(base, local_files_only=hub._offline())
    except (OSError, ValueError) as error:
        raise InputError(f"{folder / 'config.json'}: modelBase {base!r}: its configuration could not be read ({error}); "
                         "give a Hub name (xlm-roberta-large) or a local folder holding its config.json") from error
    if getattr(base_config, "hidden_size", None) != int(config["transformerDimensions"]):
        raise InputError(f"{folder / 'config.json'}: transformerDimensions {config['transformerDimensions']}, but "
                         f"{base} has {getattr(base_config, 'hidden_size', None)}-wide states")
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise InputError(f"{spec}: no weights ({' or '.join(WEIGHT_FILES)}) in {folder}")
    transformer = transformers.AutoModel.from_config(base_config)
    projection = nn.Linear(int(config["transformerDimensions"]), int(config["numDims"]))
    state = _checked_weights(read_state_dict(weights), transformer, config, weights)
    transformer.load_state_dict({key[len(TRANSFORMER):]: value for key, value in state.items() if key.startswith(TRANSFORMER)})
    projection.load_state_dict({key[len(PROJECTION) + 1:]: value for key, value in state.items() if key.startswith(PROJECTION)})
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # it reads config.json, whose model type it does not know, and says so
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"{spec}: its tokenizer could not be read from {folder} ({error}); the folder holds the "
                         f"tokenizer's files ({', '.join(TOKENIZER_FILES)})") from error
    finally:
        transformers.logging.set_verbosity(verbosity)
    # RoBERTa's positions start after its padding index: the last usable one is max_position_embeddings - that - 1
    offset = base_config.pad_token_id + 1 if "roberta" in base_config.model_type else 0
    max_tokens = min(base_config.max_position_embeddings - offset, tokenizer.model_max_length)
    encoder = MultilingualText(transformer, projection, tokenizer, max_tokens, f"M-CLIP {spec}")
    return encoder.to(device).eval()
