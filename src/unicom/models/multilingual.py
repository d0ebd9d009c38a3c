"""Multilingual text models as an :class:`~unicom.models.encoders.Encoder` of texts: M-CLIP and
sentence-transformers' multilingual CLIP text models.

Both are a multilingual transformer whose token states, averaged over a text and projected
by a linear layer, land where a CLIP model's text tower puts the English text (a student
taught by that tower): texts in about fifty to a hundred languages then search a collection
embedded by that CLIP model. clip-retrieval's back end answers ``use_mclip`` with M-CLIP's,
and its ``inference --use_mclip`` embeds captions with sentence-transformers' one.

A model is a folder, local or ``hf-hub:org/repo[@revision]`` (as published on the Hub), of one of two layouts:

* M-CLIP (Carlsson et al., LREC 2022): ``config.json`` ``{"model_type": "M-CLIP",
  "modelBase": "xlm-roberta-large", "transformerDimensions": 1024, "numDims": 768}``, where
  ``modelBase`` names the transformer's architecture (a Hub name, whose ``config.json`` alone
  is read, or a local folder); the weights ``transformer.*`` and ``LinearTransformation.*``
  (numDims, transformerDimensions) in one file; the tokenizer's files.
* sentence-transformers (``modules.json``): a ``Transformer`` (its ``config.json``, weights
  and tokenizer in the folder or the module's path), a mean ``Pooling``, then optionally a
  ``Dense`` layer (a linear layer, with or without bias, then Identity or Tanh) and a
  ``Normalize``; ``sentence_bert_config.json`` may set ``max_seq_length`` and ``do_lower_case``.

Weights are read from ``model.safetensors`` or ``pytorch_model.bin`` (``torch.load(weights_only=True)``),
every tensor's name and shape checked. :data:`MULTILINGUAL_MODELS` lists the published ones
by the CLIP model whose space they share. Needs ``transformers`` (``pip install 'unicom[multilingual]'``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from unicom.errors import InputError
from unicom.models.encoders import Encoder
from unicom.models.hf_folders import WEIGHTS_SAID, load_checked, read_json, read_weights, require_transformers

# the published models, by the CLIP model (open_clip's names, OpenAI's weights) whose text embeddings they learnt
MULTILINGUAL_MODELS = {
    "ViT-L-14": ("hf-hub:M-CLIP/XLM-Roberta-Large-Vit-L-14",),
    "ViT-B-32": ("hf-hub:M-CLIP/XLM-Roberta-Large-Vit-B-32", "hf-hub:sentence-transformers/clip-ViT-B-32-multilingual-v1"),
    "ViT-B-16-plus-240": ("hf-hub:M-CLIP/XLM-Roberta-Large-Vit-B-16Plus",),
}
MCLIP_TYPE = "M-CLIP"
MODULES_FILE = "modules.json"
SENTENCE_CONFIG = "sentence_bert_config.json"
PROJECTION = "LinearTransformation"  # M-CLIP's names in its one weights file
TRANSFORMER = "transformer."
ACTIVATIONS = {"torch.nn.modules.linear.Identity": nn.Identity, "torch.nn.modules.activation.Tanh": nn.Tanh}
EXAMPLE = MULTILINGUAL_MODELS["ViT-L-14"][0]


class MultilingualText(Encoder):
    """Texts -> (B, embedding_dim) embeddings in a CLIP model's space; it embeds no images.

    ``tokenize`` gives int64 (B, 2, L): each text's token ids and attention mask (a text may
    hold the tokenizer's padding token itself, so the mask is not read from the ids), the
    texts cut to ``max_tokens`` (a batch's rows are its texts, as other models' tokens);
    ``encode_text`` the projection of the mean of the transformer's last states over the
    tokens the mask keeps, not normalised.
    """

    has_text = True
    image_transform = None

    def __init__(self, transformer: nn.Module, projection: nn.Module, embedding_dim: int, tokenizer, max_tokens: int,
                 name: str, lowercase: bool = False):
        super().__init__()
        self.transformer = transformer
        self.projection = projection
        self.embedding_dim = embedding_dim
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.lowercase = lowercase
        self.name = name

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise InputError(f"{self.name} is a multilingual text model: it embeds texts only; query images with the "
                         "collection's own model")

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        texts = [text.lower() for text in texts] if self.lowercase else list(texts)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1).long()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        ids, mask = tokens[:, 0], tokens[:, 1]
        states = self.transformer(input_ids=ids, attention_mask=mask)[0]
        weights = mask.unsqueeze(2).to(states.dtype)
        return self.projection((states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9))


class WithTextModel(Encoder):
    """An image model whose texts another model embeds (a multilingual one, into its space):
    ``unicom embed --text-model``. Its weights' digest is the image model's, the one the
    collection's index checks a query model against."""

    has_text = True

    def __init__(self, image: Encoder, text: Encoder):
        super().__init__()
        if text.embedding_dim != image.embedding_dim:
            raise InputError(f"{text.name} gives {text.embedding_dim}-dimensional text embeddings, {image.name} "
                             f"{image.embedding_dim}-dimensional image embeddings: give the text model trained into "
                             f"{image.name}'s space (for ViT-L/14, {EXAMPLE})")
        self.image, self.text = image, text
        self.embedding_dim = image.embedding_dim
        self.image_transform = image.image_transform
        self.name = image.name

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image.encode_image(images)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text.tokenize(texts)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.encode_text(tokens)

    def weights_sha256(self) -> str:
        return self.image.weights_sha256()


def _transformers():
    return require_transformers("multilingual text models (M-CLIP, sentence-transformers)", "multilingual")


def _tokenizer(folder: Path, spec: str):
    from unicom.models.hf_folders import tokenizer

    return tokenizer(folder, spec, _transformers())


def _transformer(base_config, state: dict[str, torch.Tensor], path: Path, what: str) -> nn.Module:
    """The transformer of ``base_config`` with the weights ``state`` (its own names, or under
    the architecture's prefix: ``bert.``), every one checked."""
    transformers = _transformers()
    model = transformers.AutoModel.from_config(base_config)
    # positions' ids were saved by older transformers versions: a buffer computed at build, not a weight
    state = {key: value for key, value in state.items() if not key.endswith("embeddings.position_ids")}
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if prefix == "." or not state or not all(key.startswith(prefix) for key in state):
        prefix = ""
    load_checked(model, state, prefix, path, what)
    return model


def _max_tokens(base_config, tokenizer, limit: int | None = None) -> int:
    # RoBERTa's positions start after its padding index: the last usable one is max_position_embeddings - that - 1
    offset = base_config.pad_token_id + 1 if "roberta" in base_config.model_type else 0
    positions = getattr(base_config, "max_position_embeddings", None)
    candidates = [value for value in (limit, tokenizer.model_max_length, positions and positions - offset) if value]
    return int(min(candidates))


def _mclip(folder: Path, spec: str) -> MultilingualText:
    from unicom.models import hub
    transformers = _transformers()
    path = folder / "config.json"
    config = read_json(path, spec, "an M-CLIP model folder holds config.json, the weights and the tokenizer's files; "
                                    "a sentence-transformers one modules.json")
    if config.get("model_type") != MCLIP_TYPE:
        raise InputError(f"{path}: model_type {config.get('model_type')!r}, not {MCLIP_TYPE!r}, and no {MODULES_FILE}: "
                         f"neither an M-CLIP nor a sentence-transformers text model (e.g. {EXAMPLE})")
    missing = [key for key in ("modelBase", "transformerDimensions", "numDims") if key not in config]
    if missing:
        raise InputError(f"{path}: no {', '.join(missing)}; M-CLIP's config names its base model (modelBase) and "
                         "the projection's sizes (transformerDimensions, numDims)")
    sizes = {key: config[key] for key in ("transformerDimensions", "numDims")}
    if not all(isinstance(value, int) and not isinstance(value, bool) and value > 0 for value in sizes.values()):
        raise InputError(f"{path}: {sizes}: the projection's sizes are whole numbers above 0")
    base = str(config["modelBase"])
    try:
        base_config = transformers.AutoConfig.from_pretrained(base, local_files_only=hub.offline())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: modelBase {base!r}: its configuration could not be read ({error}); give a Hub "
                         "name (xlm-roberta-large) or a local folder holding its config.json") from error
    width, dims = sizes["transformerDimensions"], sizes["numDims"]
    if getattr(base_config, "hidden_size", None) != width:
        raise InputError(f"{path}: transformerDimensions {width}, but {base} has "
                         f"{getattr(base_config, 'hidden_size', None)}-wide states")
    state, weights = read_weights(folder, spec)
    what = f"M-CLIP with base {base}"
    projection = {key: value for key, value in state.items() if key.startswith(PROJECTION + ".")}
    linear = nn.Linear(width, dims)
    load_checked(linear, projection, PROJECTION + ".", weights, what)
    # the transformer's tensors, by their names in it (a tensor outside transformer. is named unexpected there)
    rest = {key.removeprefix(TRANSFORMER): value for key, value in state.items() if key not in projection}
    transformer = _transformer(base_config, rest, weights, what)
    tokenizer = _tokenizer(folder, spec)
    return MultilingualText(transformer, linear, dims, tokenizer, _max_tokens(base_config, tokenizer), f"M-CLIP {spec}")


def _module_kind(entry: dict) -> str:
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def _pooling_mode(config: dict, path: Path) -> None:
    mode = config.get("pooling_mode")
    if mode is None:  # the boolean keys of sentence-transformers before 5
        modes = [key[len("pooling_mode_"):] for key, value in config.items() if key.startswith("pooling_mode_") and value]
        mode = modes[0] if len(modes) == 1 else modes
    if mode not in ("mean", "mean_tokens"):
        raise InputError(f"{path}: pooling {mode!r}; only the mean of the token states is read (as the multilingual "
                         "CLIP models pool)")


def _dense(folder: Path, entry: dict, spec: str, width: int) -> tuple[nn.Module, int]:
    module = folder / entry.get("path", "")
    path = module / "config.json"
    config = read_json(path, spec, "a Dense module's configuration")
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")  # sentence-transformers' default
    if activation not in ACTIVATIONS:
        raise InputError(f"{path}: activation_function {activation!r}; read are {', '.join(ACTIVATIONS)}")
    if config.get("use_residual"):
        raise InputError(f"{path}: use_residual is not read; only a linear layer and its activation")
    if config.get("in_features") != width or not isinstance(config.get("out_features"), int):
        raise InputError(f"{path}: in_features {config.get('in_features')!r} and out_features "
                         f"{config.get('out_features')!r}; the module before gives {width} numbers")
    linear = nn.Linear(width, config["out_features"], bias=bool(config.get("bias", True)))
    state, weights = read_weights(module, spec)
    load_checked(linear, state, "linear.", weights, "a Dense module of these sizes")
    return nn.Sequential(linear, ACTIVATIONS[activation]()), linear.out_features


def _sentence_transformer(folder: Path, spec: str) -> MultilingualText:
    transformers = _transformers()
    path = folder / MODULES_FILE
    modules = read_json(path, spec, "the modules of a sentence-transformers model")
    if not isinstance(modules, list) or not all(isinstance(entry, dict) for entry in modules):
        raise InputError(f"{path}: expected a list of modules ({{\"path\", \"type\"}} each)")
    kinds = [_module_kind(entry) for entry in modules]
    readable = kinds[:2] == ["Transformer", "Pooling"] and kinds[2:] in ([], ["Dense"], ["Normalize"], ["Dense", "Normalize"])
    if not readable:
        raise InputError(f"{path}: modules {kinds}; read are a Transformer, a mean Pooling, then a Dense layer and a "
                         "Normalize, each if present (the multilingual CLIP models' modules)")
    transformer_folder = folder / modules[0].get("path", "")
    settings = {}
    if (transformer_folder / SENTENCE_CONFIG).is_file():
        settings = read_json(transformer_folder / SENTENCE_CONFIG, spec, "the transformer's settings")
    try:
        base_config = transformers.AutoConfig.from_pretrained(str(transformer_folder))
    except (OSError, ValueError) as error:
        raise InputError(f"{transformer_folder / 'config.json'}: the transformer's configuration could not be read "
                         f"({error})") from error
    state, weights = read_weights(transformer_folder, spec)
    transformer = _transformer(base_config, state, weights, f"its {base_config.model_type} transformer")
    _pooling_mode(read_json(folder / modules[1].get("path", "") / "config.json", spec, "the Pooling module's "
                             "configuration"), folder / modules[1].get("path", "") / "config.json")
    width = base_config.hidden_size
    projection, dims = (_dense(folder, modules[2], spec, width) if kinds[2:3] == ["Dense"] else (nn.Identity(), width))
    tokenizer = _tokenizer(transformer_folder, spec)
    limit = settings.get("max_seq_length")
    return MultilingualText(transformer, projection, dims, tokenizer, _max_tokens(base_config, tokenizer, limit),
                            f"sentence-transformers {spec}", lowercase=bool(settings.get("do_lower_case")))


def model_folder(spec: str) -> Path:
    """The local folder of a multilingual text model: ``spec`` itself, or the Hub snapshot of
    ``hf-hub:org/repo`` (its configuration, weights and tokenizer files, of one commit)."""
    from unicom.models import hub
    from unicom.models.hf_folders import TOKENIZER_FILES, hub_file, hub_weights

    if not hub.is_hf_spec(spec):
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise InputError(f"{spec}: no such folder; give a multilingual text model's folder or hf-hub:org/repo "
                             f"(e.g. {EXAMPLE})")
        return folder
    config = hub.hf_file(spec, "config.json")
    commit = hub.hf_commit(config, spec)  # the other files from the same commit

    def fetch(name: str) -> bool:  # False: not in the repository (offline: not in the cache)
        return hub_file(spec, name, commit)

    def within(folder: str, name: str) -> str:
        return f"{folder}/{name}" if folder else name

    weighted = [""]  # the folders that hold weights: the root, or a sentence-transformers model's transformer and Dense
    if fetch(MODULES_FILE):
        modules = read_json(config.parent / MODULES_FILE, spec, "the modules of a sentence-transformers model")
        paths = [entry.get("path", "") for entry in modules if isinstance(entry, dict)] if isinstance(modules, list) else []
        for path in paths:
            if path:
                fetch(within(path, "config.json"))
        weighted = paths[:1] + [path for path, entry in zip(paths[1:], modules[1:]) if _module_kind(entry) == "Dense"]
        fetch(within(weighted[0] if weighted else "", SENTENCE_CONFIG))
    for folder in weighted:
        if not hub_weights(spec, config.parent, folder, commit):
            raise InputError(f"{spec}: the repository has no weights ({WEIGHTS_SAID}) in "
                             f"{folder or 'its root'}")
    for name in TOKENIZER_FILES:
        fetch(within(weighted[0] if weighted else "", name))
    return config.parent


def load_multilingual(spec: str | os.PathLike, device: str | torch.device = "cpu") -> MultilingualText:
    """The multilingual text model of a folder or ``hf-hub:`` repository (module docstring), in eval mode."""
    from unicom.engine.device import resolve_device

    _transformers()
    spec = os.fspath(spec)
    device = resolve_device(str(device), "device")
    folder = model_folder(spec)
    encoder = _sentence_transformer(folder, spec) if (folder / MODULES_FILE).is_file() else _mclip(folder, spec)
    return encoder.to(device).eval()
