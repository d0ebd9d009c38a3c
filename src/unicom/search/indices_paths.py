"""clip-retrieval's ``indices_paths.json``: the indexes ``clip-retrieval back`` serves, read for ``unicom serve --indices-paths``.

The file is a JSON object of index names (``/indices-list``'s, the ``indice_name`` of
requests), each either a folder or an object of ``clip back``'s options for that index::

    {"laion5B": {"indice_folder": "laion5B-index", "clip_model": "ViT-L/14",
                 "enable_mclip_option": true, "columns_to_return": ["url", "caption"]},
     "mine": "/data/my_index"}

What each option becomes here (:func:`read_indices_paths`):

* ``indice_folder``: the index folder (clip-retrieval's own, autofaiss', or ``unicom index``'s);
* ``clip_model``: the model that embedded it (:func:`clip_model_spec`: OpenAI's names as
  ``clip.load`` takes them, ``open_clip:ARCH[/TAG]``, ``hf_clip:org/repo``), in place of the
  one the index records;
* ``enable_mclip_option``: ``true`` gives the index M-CLIP's multilingual text model for its
  ``clip_model`` (:func:`mclip_spec`), as ``clip back`` loads it for ``use_mclip``;
* ``columns_to_return``: the metadata columns ``/knn-service``, ``/metadata`` and ``/search``
  answer with (all of them without it);
* ``provide_safety_model``, ``provide_violence_detector``, ``provide_aesthetic_embeddings``:
  what the server's ``--safety-column``, ``--violence-prompts`` and ``--aesthetic-embeddings``
  give (:data:`SERVER_OPTIONS`); ``true`` without that option is named when the server starts;
* ``enable_hdf5``, ``enable_faiss_memory_mapping``, ``use_arrow``,
  ``reorder_metadata_by_ivf_index``, ``use_jit``: how ``clip back`` holds the metadata and
  runs its model (:data:`NOT_APPLICABLE`): this server reads the metadata's row groups in
  place and runs the model as it is, so they are accepted and change nothing.

Any other key, a value of the wrong type or an entry without its folder is refused, named.
Unlike ``clip back``, an entry's options do not carry over to the entries after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from unicom import storage
from unicom.errors import InputError

# the models clip.load knows (clip-retrieval's clip_model without a prefix) -> open_clip's names of them
OPENAI_MODELS = {"RN50": "RN50", "RN101": "RN101", "RN50x4": "RN50x4", "RN50x16": "RN50x16", "RN50x64": "RN50x64",
                 "ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-L/14@336px": "ViT-L-14-336"}
# clip back's load_mclip: the M-CLIP text model of each CLIP model it has one for
MCLIP_MODELS = {"ViT-L/14": "M-CLIP/XLM-Roberta-Large-Vit-L-14", "ViT-B/32": "M-CLIP/XLM-Roberta-Large-Vit-B-32"}
SERVER_OPTIONS = {"provide_safety_model": "--safety-column (the metadata's punsafe or NSFW column)",
                  "provide_violence_detector": "--violence-prompts",
                  "provide_aesthetic_embeddings": "--aesthetic-embeddings"}
NOT_APPLICABLE = ("enable_hdf5", "enable_faiss_memory_mapping", "use_arrow", "reorder_metadata_by_ivf_index", "use_jit")
KEYS = ("indice_folder", "clip_model", "enable_mclip_option", "columns_to_return", *SERVER_OPTIONS, *NOT_APPLICABLE)


@dataclass
class IndexEntry:
    """One index of the file: its folder and what its options ask of the server."""

    folder: str
    model: tuple[str, str | None] | None = None  # (spec, pretrained) of clip_model, for load_encoder
    multilingual: str | None = None  # a multilingual text model's spec (enable_mclip_option)
    columns: tuple[str, ...] | None = None  # columns_to_return
    server_options: tuple[str, ...] = ()  # the provide_* options set to true


def read_indices_paths(path) -> dict[str, IndexEntry]:
    """Index names -> :class:`IndexEntry` of clip-retrieval's ``indices_paths.json`` at ``path``
    (local or a URL), in the file's order; a relative folder is taken from the current folder,
    as ``clip back`` takes it."""
    where = f"--indices-paths {path}"
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise InputError(f"{where}: no such file; give clip-retrieval's indices_paths.json") from None
    try:
        indices = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: not JSON ({error})") from None
    if not isinstance(indices, dict) or not indices:
        raise InputError(f'{where}: expected a JSON object of index names and folders, {{"name": "index_folder"}}, '
                         f"got {json.dumps(indices)[:80]}")
    entries = {}
    for name, value in indices.items():
        at = f"{where}: {name!r}"
        if not name or "/" in name:
            raise InputError(f"{at}: an index name is a word without '/' (it is the indice_name of requests)")
        options = {"indice_folder": value} if isinstance(value, str) else value
        if not isinstance(options, dict):
            raise InputError(f"{at}: give the index folder, or an object of options with its indice_folder; "
                             f"got {json.dumps(value)[:80]}")
        unknown = [key for key in options if key not in KEYS]
        if unknown:
            raise InputError(f"{at}: unknown option {', '.join(map(repr, unknown))}; clip back's options are "
                             f"{', '.join(KEYS)}")
        folder = options.get("indice_folder")
        if not isinstance(folder, str) or not folder:
            raise InputError(f"{at}: no indice_folder; give the folder of the index")
        for key in ("enable_mclip_option", *SERVER_OPTIONS, *NOT_APPLICABLE):
            if key in options and not isinstance(options[key], bool):
                raise InputError(f"{at}: {key} is true or false, got {json.dumps(options[key])[:40]}")
        entry = IndexEntry(folder)
        clip_model = options.get("clip_model")
        if clip_model is not None:
            if not isinstance(clip_model, str) or not clip_model:
                raise InputError(f"{at}: clip_model names a model (ViT-B/32, open_clip:ViT-B-32/laion2b_s34b_b79k)")
            entry.model = clip_model_spec(clip_model, at)
        if options.get("enable_mclip_option"):
            entry.multilingual = mclip_spec(clip_model, at)
        columns = options.get("columns_to_return")
        if columns is not None:
            if not isinstance(columns, list) or not all(isinstance(column, str) and column for column in columns):
                raise InputError(f"{at}: columns_to_return is a list of metadata column names, "
                                 f"got {json.dumps(columns)[:80]}")
            entry.columns = tuple(columns)
        entry.server_options = tuple(key for key in SERVER_OPTIONS if options.get(key))
        entries[name] = entry
    return entries


def clip_model_spec(clip_model: str, where: str = "clip_model") -> tuple[str, str | None]:
    """clip-retrieval's ``clip_model`` -> (open_clip model name, pretrained tag) for
    :func:`~unicom.models.encoders.load_encoder`: OpenAI's names (``ViT-B/32``, ``ViT-L/14@336px``,
    ``RN50``) are open_clip's models of them with the ``openai`` weights; ``open_clip:ARCH/TAG``
    is ``ARCH`` with ``TAG``, and ``open_clip:ARCH`` without a tag takes the tag clip-retrieval
    takes, the one ``dict(open_clip.list_pretrained())`` gives (the last listed for ARCH);
    ``open_clip:hf-hub:org/repo`` and ``open_clip:local-dir:FOLDER`` are open_clip's references
    to a model with its weights, taken whole; ``hf_clip:org/repo`` is transformers' CLIP model
    of that Hub repository (:mod:`unicom.models.hf_clip`)."""
    if clip_model in OPENAI_MODELS:
        return OPENAI_MODELS[clip_model], "openai"
    if clip_model.startswith(("open_clip:hf-hub:", "open_clip:local-dir:")):  # open_clip's references, whole
        return clip_model[len("open_clip:"):], None
    if clip_model.startswith("hf_clip:"):  # transformers' CLIP model of a Hub repository (unicom.models.hf_clip)
        return "hf-hub:" + clip_model[len("hf_clip:"):], None
    if clip_model.startswith("open_clip:"):
        architecture, _, tag = clip_model[len("open_clip:"):].partition("/")
        if tag:
            return architecture, tag
        try:
            import open_clip
        except ImportError as error:
            raise InputError(f"{where}: {clip_model} needs open_clip ({error}); pip install open_clip_torch") from error
        tags = dict(open_clip.list_pretrained())
        if architecture not in tags:
            raise InputError(f"{where}: open_clip has no weights for {architecture!r}; name them "
                             f"(open_clip:{architecture}/TAG)")
        return architecture, tags[architecture]
    raise InputError(f"{where}: clip_model {clip_model!r} is not one this server loads (OpenAI's names: "
                     f"{', '.join(OPENAI_MODELS)}; open_clip:ARCH/TAG; hf_clip:org/repo); leave it out and give the "
                     "model with --model")


def mclip_spec(clip_model: str | None, where: str = "enable_mclip_option") -> str:
    """The multilingual text model ``clip back`` loads for ``clip_model`` (default ViT-B/32, its default), as an ``hf-hub:`` spec."""
    model = clip_model or "ViT-B/32"
    if model not in MCLIP_MODELS:
        raise InputError(f"{where}: enable_mclip_option: M-CLIP has a model for {' and '.join(MCLIP_MODELS)} only, "
                         f"not {model}; leave it out, or give a multilingual model with --multilingual-model")
    return f"hf-hub:{MCLIP_MODELS[model]}"
