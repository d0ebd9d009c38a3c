"""The index: faiss indexes over an embedding collection, with ids and metadata beside them.

``Index.build(EMB, INDEX)`` reads the embeddings of an embedding folder as rows
(:mod:`unicom.search.collection`), keeps the first ``dims`` dimensions of each row
re-normalised to unit length, chooses and tunes the index type (:mod:`unicom.search.planner`)
and writes the folder in one of two layouts. unicom's own (``layout="unicom"``)::

    INDEX/index.json                      the configuration (below); written last
    INDEX/index_{generation}.faiss        the faiss index of the image embeddings, inner product
    INDEX/metadata/metadata_{i}.parquet   part i's metadata, with the row ids in column ``id``
    INDEX/heldout_ids.npy                 the held-out sample that measured the recall

or clip-retrieval's (``layout="clip-retrieval"``, :mod:`unicom.search.clip_layout`):
``image.index`` and, when the folder has text embeddings, ``text.index``, autofaiss'
``image.json`` / ``text.json``, ``metadata/metadata_{i:0Nd}.parquet`` (the collection's
metadata as it is), plus ``index.json`` and ``heldout_ids.npy``, which clip-retrieval ignores.
:meth:`Index.load` opens both, and also a folder written by clip-retrieval / autofaiss.

Ids are row numbers of the collection in part order: part ``i``'s row ``r`` has id
``first_id(i) + r``. ``index.json`` records the index type and its parameters, the search
parameter (``nprobe`` or ``efSearch``, also stored in the faiss file), the parts (number,
rows, first id), how the type was chosen, and ``build``: an id new at every build (kept when
parts are added) that each metadata file also records, so that an index loaded before a
rebuild refuses the rebuilt metadata. This module owns both layouts through
:mod:`~unicom.search.clip_layout`: it writes them, and :meth:`Index.load` reads and checks
them. Compressed indexes start with :func:`principal_rotation`.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from unicom import __version__, storage
from unicom.errors import InputError
from unicom.files import atomic_path, process_alive, save_npy_atomic, sweep_temporaries, write_json_atomic, write_parquet_atomic
from unicom.formats.embeddings import CONFIG_FILE as EMBEDDINGS_CONFIG
from unicom.formats.embeddings import (
    FLIP,
    KINDS,
    SHARD_COLUMNS,
    WEIGHTS_CHECKSUM,
    EmbeddingFolders,
    part_name,
    part_path,
    read_config,
    recorded_scales,
    views_record,
)
from unicom.search import clip_layout
from unicom.search.collection import QUERY_FIX, Collection, Part, exact_neighbours, first_dims
from unicom.search.metadata_rows import CACHE_BYTES as METADATA_CACHE_BYTES
from unicom.search.metadata_rows import COPIES as METADATA_COPIES
from unicom.search.metadata_rows import ROW_GROUP_ROWS, MetadataRows, with_build
from unicom.search.planner import (
    BUILD_RANGES,
    DEFAULT_RECALL,
    Candidate,
    choose_heldout,
    format_size,
    heldout_size,
    objective,
    parse_size,
    plan,
    train_rows,
    tune,
)

logger = logging.getLogger(__name__)

FORMAT = "unicom-index"
FORMAT_VERSION = 2  # 2: layouts (clip-retrieval's beside unicom's), modalities, ivfsq, objectives
LAYOUTS = ("unicom", clip_layout.LAYOUT)
CONFIG_FILE = "index.json"
HELDOUT_FILE = "heldout_ids.npy"
METADATA_FOLDER = "metadata"
ID_COLUMN = "id"


# --------------------------------------------------------------------------- faiss


def principal_rotation(sample: np.ndarray, out_dims: int, seed: int = 0):
    """A faiss ``LinearTransform`` x -> R·P·x, fitted on ``sample`` (N, d) float32.

    P (out_dims, d): the leading eigenvectors of the second moment sampleᵀ·sample / N, not
    centred (PCA's centring would change the order of inner products); R: a random rotation
    of out_dims dimensions, which spreads the variance evenly over the sub-quantizers.
    """
    import faiss

    moment = sample.T.astype(np.float64) @ sample.astype(np.float64) / len(sample)
    _, vectors = np.linalg.eigh(moment)  # ascending eigenvalues
    projection = vectors[:, ::-1][:, :out_dims].T
    rotation = np.linalg.qr(np.random.default_rng(seed).standard_normal((out_dims, out_dims)))[0]
    transform = faiss.LinearTransform(sample.shape[1], out_dims, False)
    faiss.copy_array_to_vector(np.ascontiguousarray(rotation @ projection, dtype=np.float32).ravel(), transform.A)
    transform.is_trained = True
    transform.set_is_orthonormal()  # orthonormal rows: reconstruct() maps codes back (faiss re-checks on reading)
    return transform


RANGE_FIRST_K = 1024  # an HNSW range search asks first for this many results,
RANGE_GROWTH = 4  # then for this many times more while more than 1/RANGE_GROWTH of them reach the threshold

IVF_TYPES = ("ivfpq", "ivfsq", "ivf")  # "ivf": other inverted lists, in indexes from elsewhere


def _new_faiss_index(candidate: Candidate, dims: int, sample: np.ndarray | None = None, *, reconstructible: bool = False):
    """An empty faiss index for ``candidate``; compressed types fit their rotation on ``sample``
    (and still need training). reconstructible: ids that ``reconstruct`` can map back (clip-retrieval's
    back end calls ``search_and_reconstruct``)."""
    import faiss

    if candidate.type == "flat":
        return faiss.IndexFlatIP(dims)
    if candidate.type == "hnsw":
        graph = faiss.IndexHNSWFlat(dims, candidate.params["M"], faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = candidate.params["efConstruction"]
        # explicit ids: the held-out rows join the graph last
        return faiss.IndexIDMap2(graph) if reconstructible else faiss.IndexIDMap(graph)
    p = candidate.params
    quantizer = faiss.IndexFlatIP(p["rotated_dims"])
    if candidate.type == "ivfsq":
        kind = faiss.ScalarQuantizer.QT_fp16 if p["bits"] == 16 else faiss.ScalarQuantizer.QT_8bit
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, p["rotated_dims"], p["nlist"], kind, faiss.METRIC_INNER_PRODUCT)
    else:
        ivf = faiss.IndexIVFPQ(quantizer, p["rotated_dims"], p["nlist"], p["m"], p["nbits"], faiss.METRIC_INNER_PRODUCT)
        ivf.do_polysemous_training = False  # polysemous codes serve Hamming filtering, unused here
    return faiss.IndexPreTransform(principal_rotation(sample, p["rotated_dims"]), ivf)


def search_parameters(index_type: str, search: dict):
    """faiss SearchParameters for ``search`` (``{"nprobe": p}`` or ``{"efSearch": e}``), or None
    (the parameters stored in the index)."""
    import faiss

    if index_type in IVF_TYPES and "nprobe" in search:
        return faiss.SearchParametersIVF(nprobe=int(search["nprobe"]))
    if index_type == "hnsw" and "efSearch" in search:
        return faiss.SearchParametersHNSW(efSearch=int(search["efSearch"]))
    return None


def _store_search(index, search: dict) -> None:
    """Set ``search`` as the index's own parameters, saved with it (what other tools search with)."""
    import faiss

    if search:
        faiss.ParameterSpace().set_index_parameters(index, ",".join(f"{key}={value}" for key, value in search.items()))


def _parameters(index, index_type: str, search: dict):
    """:func:`search_parameters` for the faiss ``index`` itself (wrapped for a leading transform)."""
    import faiss

    params = search_parameters(index_type, search)
    if params is not None and isinstance(index, faiss.IndexPreTransform):
        params = faiss.SearchParametersPreTransform(index_params=params)
    return params


def _search(index, index_type: str, search: dict, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    params = _parameters(index, index_type, search)
    # faiss.contrib.torch_utils (imported by other libraries, e.g. pytorch-metric-learning)
    # replaces Index.search with a version without `params`; it keeps faiss's own numpy
    # search as `search_numpy`
    search_numpy = getattr(index, "search_numpy", index.search)
    return search_numpy(queries, k, params=params)


def _range_search(index, index_type: str, search: dict, queries: np.ndarray, threshold) -> tuple[np.ndarray, ...]:
    """faiss' range search for scores of at least ``threshold``: (limits, scores, ids)."""
    params = _parameters(index, index_type, search)
    # faiss keeps inner products strictly above its radius: the float32 just below the threshold keeps it too
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    range_numpy = getattr(index, "range_search_numpy", index.range_search)  # as for search, past torch_utils
    return range_numpy(queries, radius, params=params)


def _add(index, index_type: str, block: np.ndarray, ids: np.ndarray) -> None:
    """Add rows with their ids (the exact index only ever receives them in id order)."""
    if index_type == "flat":
        index.add(block)
    else:
        index.add_with_ids(block, ids)


def _add_and_tune(index, candidate: Candidate, blocks, heldout_ids: np.ndarray, queries: np.ndarray,
                  truth: np.ndarray | None, k: int, target: float | None, capped: bool) -> tuple[dict, float, list[dict]]:
    """Add ``blocks`` ((first id, rows)) but the held-out rows, tune on those, then add them too.

    The held-out rows join the index only after the measurement, so that they are measured
    as new queries are: an HNSW graph, in particular, finds its own nodes' neighbours more
    easily than those of a vector it has never seen.
    """
    measured = truth is not None and len(truth) > 0 and candidate.type != "flat"
    for first_id, block in blocks:
        ids = np.arange(first_id, first_id + len(block), dtype=np.int64)
        if measured:
            kept = ~np.isin(ids, heldout_ids, assume_unique=True)
            block, ids = block[kept], ids[kept]
        _add(index, candidate.type, block, ids)
    if not measured:
        return {}, 1.0, []
    result = tune(lambda search: _search(index, candidate.type, search, queries, k)[1], candidate, truth, k, target, capped)
    _add(index, candidate.type, queries, heldout_ids)
    return result


# --------------------------------------------------------------------------- the index


@dataclass
class _Built:
    index: Any
    candidate: Candidate
    search: dict
    recall: float
    steps: list[dict]
    seconds: float


def _faiss_file(generation: int) -> str:
    return f"index_{generation}.faiss"


class Index:
    """A searchable index folder (see the module docstring).

    ``Index.load(path)``, ``index.search(embeddings, k) -> (scores, ids)``,
    ``index.metadata(ids)``, ``Index.build(emb, out, ...)``, ``index.add_parts(emb)``.
    ``index.modalities``: the embeddings it can search, ``("image",)`` or, in clip-retrieval's
    layout, ``("image", "text")`` (either alone too); ``index.faiss_indexes[modality]``.
    """

    def __init__(self, path: str | os.PathLike, config: dict, faiss_indexes: dict[str, Any] | Any, location=None):
        self.path = Path(path)
        self.location = storage.text(location) if location is not None and storage.is_url(location) else self.path
        self.faiss_indexes = dict(faiss_indexes) if isinstance(faiss_indexes, dict) else {"image": faiss_indexes}
        self.metadata_rows: MetadataRows | None = None
        self._set_config(config)

    def _set_config(self, config: dict) -> None:
        self.config = config
        self.parts = [Part(p["number"], p["rows"], p["first_id"], p.get("file")) for p in config["parts"]]
        self._starts = np.array([p.first_id for p in self.parts], dtype=np.int64)
        # the metadata files, read a row group at a time through a bounded cache (kept across a reload);
        # files in coarse row groups (clip-retrieval's: a million rows in one) through a copy in smaller ones
        cache_bytes = self.metadata_rows.cache_bytes if self.metadata_rows is not None else METADATA_CACHE_BYTES
        self.metadata_rows = MetadataRows([(self._metadata_path(part), part.rows) for part in self.parts], cache_bytes,
                                          copies=storage.cache_root() / METADATA_COPIES, build=config.get("build"))

    def _metadata_path(self, part: Part):
        """Part's metadata file: in the index folder, read in place where that is a URL."""
        folder = self.location if isinstance(self.location, str) else self.path
        return storage.join(folder, part.file) if part.file else part_path(storage.join(folder, METADATA_FOLDER),
                                                                           "metadata", part.number)

    # ------------------------------------------------------------------ reading

    @classmethod
    def load(cls, path) -> "Index":
        """Open the index folder ``path``: written by :meth:`build` in either layout, or by
        clip-retrieval / autofaiss (``image.index``, ``text.index``, ``metadata/``). Of a URL, the
        faiss file(s), ``index.json``, autofaiss' descriptions and the held-out ids are copied
        into a local cache first (and fetched again only when they changed); the metadata files
        are read in place, a row group at a time (:mod:`unicom.search.metadata_rows`)."""
        import faiss

        location = path
        path = _cached(path) if storage.is_url(path) else Path(path)
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            if (path / HELDOUT_FILE).is_file():  # unicom index writes it, and index.json last: a build that did not finish
                raise InputError(
                    f"{storage.text(location)}: holds the {HELDOUT_FILE} of `unicom index` but no {CONFIG_FILE} inside: a "
                    "build or rebuild that did not finish, whose files may belong to two indexes; run it again with "
                    f"--rebuild (or, to open the folder as clip-retrieval would, delete {HELDOUT_FILE})"
                )
            if clip_layout.is_clip_folder(path):
                return cls._open_clip_folder(path, location)
            if _is_embedding_folder(path):
                raise _embedding_folder_error(path)
            raise InputError(
                f"{path}: no {CONFIG_FILE} inside (unicom's layout), nor image.index / text.index (clip-retrieval's); "
                f"build an index with `unicom index --emb EMB --out {path}`"
            )
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise InputError(f"{config_path}: not valid JSON ({error})") from error
        if config.get("format") != FORMAT:
            raise InputError(f"{config_path}: not a unicom index configuration (format {config.get('format')!r})")
        if config.get("format_version", 0) > FORMAT_VERSION:
            raise InputError(f"{config_path}: written by a newer unicom (format {config['format_version']}); upgrade unicom")
        if config.get("layout", "unicom") == clip_layout.LAYOUT:
            opened = clip_layout.open_folder(path, location)
            listed = [(file.file, file.rows) for file in opened.files]
            recorded = [(part["file"], part["rows"]) for part in config["parts"]] if config.get("has_metadata") else []
            if listed != recorded or set(opened.faiss_indexes) != set(config["modalities"]):
                raise InputError(f"{path}: its files differ from what {CONFIG_FILE} records (another tool rewrote them?); "
                                 "rebuild the index with --rebuild, or delete index.json and heldout_ids.npy to open the "
                                 "folder as it is")
            indexes = opened.faiss_indexes
        else:
            faiss_path = path / config["file"]
            if not faiss_path.is_file():
                raise InputError(f"{faiss_path}: file not found; the index folder is incomplete, rebuild it")
            indexes = {"image": faiss.read_index(str(faiss_path))}
        for modality, faiss_index in indexes.items():
            if faiss_index.ntotal != config["count"]:
                raise InputError(f"{path}: the {modality} index holds {faiss_index.ntotal} vectors but {CONFIG_FILE} says "
                                 f"{config['count']}; rebuild the index")
        return cls(path, config, indexes, location)

    @classmethod
    def _open_clip_folder(cls, path: Path, location=None) -> "Index":
        """An index folder written by clip-retrieval / autofaiss: a configuration read from its files."""
        opened = clip_layout.open_folder(path, location)
        modalities = {}
        for modality, faiss_index in opened.faiss_indexes.items():
            kind, stored = clip_layout.describe(faiss_index)
            infos = opened.infos.get(modality, {})
            modalities[modality] = {
                "file": clip_layout.index_file(modality), "type": kind, "structure": infos.get("index_key") or kind,
                "params": {}, "search": {}, "stored_search": stored, "dims": int(faiss_index.d), "infos": infos,
            }
        first = next(iter(modalities.values()))
        count = int(next(iter(opened.faiss_indexes.values())).ntotal)
        parts = [Part(_file_number(file.file, position), file.rows, file.first_id, file.file)
                 for position, file in enumerate(opened.files)]
        if not parts:
            parts = [Part(0, count, 0)]
        config = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "layout": clip_layout.LAYOUT, "written_by": "another tool",
            "type": first["type"], "structure": first["structure"], "metric": "inner_product", "params": {},
            "search": {}, "dims": first["dims"], "source_dims": first["dims"], "count": count,
            "parts": [part.as_dict() for part in parts], "has_metadata": bool(opened.files), "model": None,
            "modalities": modalities, "file": first["file"], "bytes": (path / first["file"]).stat().st_size,
            "selection": None, "generation": 0,
        }
        return cls(path, config, opened.faiss_indexes, location)

    def __len__(self) -> int:
        return int(self.config["count"])

    def __repr__(self) -> str:
        return (f"Index({str(self.location)!r}, layout={self.layout!r}, modalities={self.modalities}, type={self.type!r}, "
                f"count={len(self)}, dims={self.dims})")

    @property
    def layout(self) -> str:
        """``"unicom"`` or ``"clip-retrieval"``."""
        return str(self.config.get("layout", "unicom"))

    @property
    def modalities(self) -> tuple[str, ...]:
        """The embeddings this index searches: ``"image"``, ``"text"``; the first is the default."""
        return tuple(self.faiss_indexes)

    @property
    def faiss_index(self):
        """The faiss index of the first modality."""
        return self.faiss_indexes[self.modalities[0]]

    def _modality(self, modality: str | None) -> tuple[str, dict]:
        modality = modality or self.modalities[0]
        if modality not in self.faiss_indexes:
            raise InputError(f"{self.location} holds no {modality} index (it searches {', '.join(self.modalities)} embeddings)")
        recorded = (self.config.get("modalities") or {}).get(modality)
        return modality, recorded if recorded is not None else self.config

    @property
    def dims(self) -> int:
        return int(self.config["dims"])

    def modality_dims(self, modality: str | None = None) -> int:
        """The dimensions the ``modality`` index searches (default: the first modality's)."""
        return int(self._modality(modality)[1]["dims"])

    @property
    def type(self) -> str:
        return str(self.config["type"])

    def modality_type(self, modality: str | None = None) -> str:
        """The index type (``flat``, ``hnsw``, ``ivfpq``, ...) of the ``modality`` index (default: the first's)."""
        return str(self._modality(modality)[1]["type"])

    def modality_search(self, modality: str | None = None) -> dict:
        """The search parameter the ``modality`` index searches with unless told otherwise
        (``{"nprobe": n}``, ``{"efSearch": n}``, or ``{}`` for a flat index)."""
        return dict(self._modality(modality)[1].get("search") or {})

    def _prepared(self, embeddings, modality: str | None, nprobe: int | None, ef_search: int | None):
        """(modality, its record, unit query rows (Q, dims), search parameters) for ``embeddings``."""
        modality, recorded = self._modality(modality)
        dims = int(recorded["dims"])
        if hasattr(embeddings, "detach"):  # a model's output as it is: a torch tensor of any dtype, device, autograd
            embeddings = embeddings.detach().float().cpu().numpy()
        x = np.asarray(embeddings)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2:
            raise InputError(f"query embeddings: expected (queries, dimension), got shape {x.shape}")
        if x.shape[1] < dims:
            raise InputError(f"query embeddings have {x.shape[1]} dimensions, the index needs at least {dims}")
        queries = first_dims(x, dims, "query embeddings", fix=QUERY_FIX)
        search = dict(recorded.get("search", {}))
        if nprobe is not None:
            search["nprobe"] = nprobe
        if ef_search is not None:
            search["efSearch"] = ef_search
        return modality, recorded, queries, search

    def search(self, embeddings, k: int = 10, *, modality: str | None = None, nprobe: int | None = None,
               ef_search: int | None = None):
        """The k nearest indexed rows of each query.

        embeddings: (Q, D) or (D,) floats with D ≥ ``dims`` (the first ``dims`` are used,
        re-normalised): an array, or a torch tensor as a model gives it (any float dtype or
        device, with autograd). Returns (scores float32 (Q, k), ids int64 (Q, k)), best first;
        scores are inner products (cosine similarities, approximate for compressed types);
        ids are -1 (score -inf) past the end of a small index. ``modality``: which index
        (default: the first of :attr:`modalities`). ``nprobe`` / ``ef_search`` override the
        recorded search parameter; an HNSW index searches with ``efSearch`` at least k.
        """
        try:
            k = operator.index(k)  # faiss takes Python ints only: numpy integers too, floats not
        except TypeError:
            raise InputError(f"k must be an integer, got {k!r}") from None
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        modality, recorded, queries, search = self._prepared(embeddings, modality, nprobe, ef_search)
        if recorded["type"] == "hnsw" and ef_search is None:
            # the graph walk keeps efSearch candidates: with fewer than k it stops short of k results
            stored = search.get("efSearch", (recorded.get("stored_search") or {}).get("efSearch", 0))
            search["efSearch"] = max(int(stored), k)
        scores, ids = _search(self.faiss_indexes[modality], recorded["type"], search, queries, k)
        scores[ids < 0] = -np.inf  # faiss gives -FLT_MAX past the end
        return scores, ids.astype(np.int64, copy=False)

    def search_range(self, embeddings, min_score: float, *, modality: str | None = None, nprobe: int | None = None,
                     ef_search: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every indexed row scoring at least ``min_score`` for each query: (scores float32,
        ids int64) per query, best first (equal scores: the lower id first).

        ``embeddings``, ``modality``, ``nprobe`` and ``ef_search`` as for :meth:`search`, and
        the scores are the ones it gives. Exact for a flat index; an IVF index scans the
        ``nprobe`` lists its search scans (faiss' ``range_search``); an HNSW graph (and an index of
        another kind, from elsewhere) is searched as :meth:`search` searches it, for ever more
        results (``k``, and with it ``efSearch``, growing by :data:`RANGE_GROWTH`) until at most
        1/:data:`RANGE_GROWTH` of them reach ``min_score`` or the index gives no more. Memory: 12 bytes per result
        (an HNSW search holds its last ``k`` of them), whatever the index holds.
        """
        try:
            threshold = float(min_score)
        except (TypeError, ValueError):
            raise InputError(f"min_score must be a number, got {min_score!r}") from None
        if not np.isfinite(threshold):
            raise InputError(f"min_score must be a finite number, got {min_score!r}")
        modality, recorded, queries, search = self._prepared(embeddings, modality, nprobe, ef_search)
        threshold = np.float32(threshold)
        faiss_index = self.faiss_indexes[modality]
        if recorded["type"] not in ("flat", *IVF_TYPES):  # a graph, or an index faiss has no range search for
            found = [self._grown_range(query, threshold, modality, nprobe, ef_search) for query in queries]
        else:
            limits, scores, ids = _range_search(faiss_index, recorded["type"], search, queries, threshold)
            found = [(scores[start:stop], ids[start:stop]) for start, stop in zip(limits[:-1], limits[1:])]
        out = []
        for scores, ids in found:
            kept = (ids >= 0) & (scores >= threshold)
            scores, ids = scores[kept].astype(np.float32, copy=False), ids[kept].astype(np.int64, copy=False)
            order = np.lexsort((ids, -scores))
            out.append((scores[order], ids[order]))
        return out

    def _grown_range(self, query: np.ndarray, threshold, modality: str, nprobe, ef_search):
        """One query's results of an HNSW graph down to ``threshold``: searches for ever more."""
        k = min(len(self), RANGE_FIRST_K)
        while True:
            scores, ids = self.search(query[None, :], k, modality=modality, nprobe=nprobe,
                                      ef_search=None if ef_search is None else max(ef_search, k))
            scores, ids = scores[0], ids[0]
            given = int((ids >= 0).sum())
            # the walk kept k candidates: when fewer than 1/RANGE_GROWTH of them reach the threshold, the
            # results above it were among many more below, as a top-k search finds its own
            if given < k or k >= len(self) or int((scores[:given] >= threshold).sum()) * RANGE_GROWTH <= k:
                return scores[:given], ids[:given]
            k = min(len(self), k * RANGE_GROWTH)

    def search_images(self, encoder, images: Sequence[Any], k: int = 10, *, batch_size: int = 32):
        """Embed ``images`` (PIL images or paths) with ``encoder`` and search: (scores, ids) as :meth:`search`.
        The encoder must be the collection's model (:meth:`check_encoder`); each image is averaged
        with its mirror where the collection's were (:func:`unicom.search.queries.query_encoder`)."""
        from unicom.embed import embed_images
        from unicom.search.queries import query_encoder

        self.check_encoder(encoder)
        return self.search(embed_images(query_encoder(self, encoder), images, batch_size=batch_size), k, modality="image")

    def check_encoder(self, encoder) -> None:
        """Raise :class:`InputError` unless ``encoder`` can be the model that embedded the collection:
        its embedding size and weights digest (:func:`unicom.search.queries.check_model`)."""
        from unicom.search.queries import check_model

        check_model(self, encoder)

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[dict]]:
        """Results per query: dicts with ``rank`` (1-based), ``id``, ``score`` and the row's metadata
        (metadata columns named ``rank`` or ``score`` are given as ``source_rank``, ``source_score``)."""
        rows = self.metadata(ids)
        return [
            [{"rank": rank + 1, "score": float(score), **source_columns(row, ("rank", "score"))}
             for rank, (score, row) in enumerate(zip(query_scores, query_rows)) if row is not None]
            for query_scores, query_rows in zip(scores, rows)
        ]

    def metadata(self, ids) -> list:
        """The metadata rows of ``ids`` as dicts (with ``id``), nested like ``ids``; None for -1.

        ``ids``: an int, or an int array of any shape (e.g. the (Q, k) ids of :meth:`search`).
        A column of the source named ``id`` is given as ``source_id``. Only the parquet row
        groups holding ``ids`` are read; :attr:`metadata_rows` keeps those used last, at most
        ``index.metadata_rows.cache_bytes`` of them (:mod:`unicom.search.metadata_rows`).
        """
        array = np.asarray(ids, dtype=np.int64)
        flat = array.reshape(-1)
        out: list[dict | None] = [None] * len(flat)
        valid = np.flatnonzero(self._checked_ids(flat, allow_missing=True) >= 0)
        for positions, table in self._part_tables(flat[valid]):
            for position, row in zip(valid[positions], table.to_pylist()):
                out[position] = row
        if array.ndim == 0:
            return out[0]
        nested = np.empty(len(out), dtype=object)
        nested[:] = out
        return nested.reshape(array.shape).tolist()

    def metadata_table(self, ids):
        """The metadata rows of ``ids`` (int64 (N,), no -1) as a ``pyarrow.Table``, in the order
        given: the columns of :meth:`metadata` (``id`` first), read a row group at a time as
        :meth:`metadata` reads them. Parts whose files differ in columns give each column of
        any (null where a part has none); a column of two types is refused, naming it."""
        import pyarrow as pa

        flat = self._checked_ids(np.asarray(ids, dtype=np.int64).reshape(-1), allow_missing=False)
        positions, tables = [], []
        for selected, table in self._part_tables(flat):
            positions.append(selected)
            tables.append(table)
        if not tables:
            return pa.table({ID_COLUMN: pa.array([], pa.int64())})
        try:
            table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise InputError(f"{self.location}: the metadata files of its parts hold a column of different types "
                             f"({error}); make them agree, or take the rows of one part at a time") from error
        if len(tables) > 1:
            table = table.take(np.argsort(np.concatenate(positions), kind="stable"))
        return table

    def _checked_ids(self, flat: np.ndarray, allow_missing: bool) -> np.ndarray:
        """``flat`` ids, refused (the first named) outside the index; -1 taken with ``allow_missing``."""
        bad = flat[(flat < (-1 if allow_missing else 0)) | (flat >= len(self))]
        if len(bad):
            raise InputError(f"id {int(bad[0])} is not in this index (ids 0..{len(self) - 1})")
        return flat

    def _part_tables(self, flat: np.ndarray):
        """(positions in ``flat``, their rows as a ``pyarrow.Table``, ``id`` first) for each part
        that ids ``flat`` (valid, any order) fall in."""
        import pyarrow as pa

        which = np.searchsorted(self._starts, flat, side="right") - 1
        with_ids = self.layout == "unicom"  # unicom's metadata copies carry the ids; clip-retrieval's are the source's
        for index in np.unique(which):
            selected = np.flatnonzero(which == index)
            if not (self.config.get("has_metadata", True) or with_ids):
                yield selected, pa.table({ID_COLUMN: pa.array(flat[selected])})
                continue
            table = self.metadata_rows.take_table(int(index), flat[selected] - self.parts[int(index)].first_id)
            if not with_ids:
                table = table.rename_columns([f"source_{name}" if name == ID_COLUMN else name for name in table.column_names])
                table = table.add_column(0, ID_COLUMN, pa.array(flat[selected]))
            yield selected, table

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        emb: str | os.PathLike,
        out: str | os.PathLike,
        *,
        dims: int | None = None,
        index_type: str = "auto",
        memory_budget: int | str | None = None,
        recall_target: float | None = None,
        k: int = 10,
        heldout: int = 1000,
        exact_max_rows: int = 100_000,
        nlist: int | None = None,
        pq_m: int | None = None,
        nbits: int | None = None,
        hnsw_m: int = 32,
        seed: int = 0,
        overwrite: bool = False,
        layout: str = "unicom",
    ) -> "Index":
        """Build an index of the embedding folder ``emb`` into the folder ``out``.

        dims: keep the first ``dims`` dimensions (re-normalised); default all.
        memory_budget: bytes (or ``"2GB"``) the index may take in memory; default no limit.
        recall_target: recall@k on the held-out sample to reach; with ``index_type="auto"``
        the smallest index that reaches it is kept. Without a target, a budget is spent on
        recall, and without either the index is tuned to recall 0.9 (the objectives of
        :mod:`unicom.search.planner`).
        layout: ``"unicom"`` or ``"clip-retrieval"`` (``image.index`` and, when ``emb`` has
        text embeddings, ``text.index``: what clip-retrieval's back end serves).
        overwrite: replace an index already in ``out`` (otherwise an error: use :meth:`add_parts`).
        ``out`` may be a URL (``s3://…``): the index is written in a local folder of its own,
        then uploaded file by file, ``index.json`` last (:func:`publish`).
        """
        if layout not in LAYOUTS:
            raise InputError(f"layout {layout!r} unknown: use one of {', '.join(LAYOUTS)}")
        if _same_folder(emb, out):
            raise InputError(f"--out {storage.text(out)} is the embedding folder itself: the index's metadata/ would "
                             "replace the collection's; write the index to a folder of its own (e.g. --out INDEX/)")
        if storage.is_url(out):
            storage.writable(out)  # before the build, not after it
        if holds_index(out) and not overwrite:
            raise InputError(f"{storage.text(out)}: already holds an index; add new parts to it, or rebuild it with --rebuild")
        if recall_target is not None and not 0 < recall_target <= 1:
            raise InputError(f"the recall target must be in (0, 1], got {recall_target}")
        if k < 1:
            raise InputError(f"-k {k}: the k of recall@k must be at least 1")
        if heldout < 0:
            raise InputError(f"--heldout {heldout}: the number of held-out rows cannot be negative")
        if exact_max_rows < 0:
            raise InputError(f"--exact-max-rows {exact_max_rows}: give 0 (never exact) or more rows, or leave the option out")
        if seed < 0:
            raise InputError(f"--seed {seed}: the seed of the samples is a number from 0 up")
        for option, value in (("--nlist", nlist), ("--nbits", nbits), ("--hnsw-m", hnsw_m)):
            least, least_said, most, most_said = BUILD_RANGES[option]
            if value is not None and value < least:
                raise InputError(f"{option} {value}: give at least {least_said}, or leave the option out")
            if value is not None and most is not None and value > most:
                raise InputError(f"{option} {value}: give at most {most_said}, or leave the option out")
        budget = None if memory_budget is None else parse_size(memory_budget)
        modalities = ("image",)
        if layout == clip_layout.LAYOUT and EmbeddingFolders.from_root(emb).text is not None:
            modalities = ("image", "text")
        collection = Collection(emb, modalities=modalities)
        n = collection.num_rows
        if n == 0:
            raise InputError(f"{emb}: the collection has no rows to index")
        if layout == clip_layout.LAYOUT and dims not in (None, collection.dim):
            raise InputError(f"--dims {dims}: clip-retrieval's back end searches whole embeddings ({collection.dim} "
                             "dimensions); leave --dims out with --layout clip-retrieval")
        dims = collection.dim if dims is None else dims
        if not 1 <= dims <= collection.dim:
            raise InputError(f"--dims {dims}: the embeddings have {collection.dim} dimensions")
        heldout_ids = choose_heldout(np.random.default_rng(seed), 0, n, heldout_size(n, heldout))
        choice = dict(index_type=index_type, budget=budget, recall_target=recall_target, k=k, exact_max_rows=exact_max_rows,
                      nlist=nlist, pq_m=pq_m, nbits=nbits, hnsw_m=hnsw_m, seed=seed,
                      reconstructible=layout == clip_layout.LAYOUT)
        built: dict[str, tuple[_Built, dict]] = {}
        for modality in modalities:
            rows = collection.with_modality(modality)
            modality_dims = dims if modality == modalities[0] else rows.dim
            built[modality] = _choose(rows, modality_dims, heldout_ids, **choice)
        first, selection = built[modalities[0]]
        recorded = _embedding_config(emb)
        text_model = _text_model(recorded)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "layout": layout,
            **_describe(first, dims),
            "metric": "inner_product",
            "source_dims": collection.dim,
            "count": n,
            "parts": [part.as_dict() for part in collection.parts],
            "source": storage.text(emb) if storage.is_url(emb) else str(Path(emb).resolve()),
            "has_metadata": collection.has_metadata,
            "model": _embedding_model(recorded),
            # the multilingual model that embedded the captions (`unicom embed --text-model`): `unicom serve` loads it
            **({"text_model": text_model} if text_model else {}),
            # the columns of the parquet shards the items were read from: where `unicom serve --shards` finds their images
            **({SHARD_COLUMNS: recorded[SHARD_COLUMNS]} if recorded.get(SHARD_COLUMNS) else {}),
            "selection": selection,
            "generation": 0,
            # a new id for every build (kept when parts are added), also in each metadata file: a server that
            # loaded an earlier build tells its files from this one's even where the row counts are the same
            "build": uuid.uuid4().hex,
            "unicom_version": __version__,
        }
        location = out
        previous = _read_config(out) if overwrite else None
        if previous is not None:
            config["generation"] = previous.get("generation", 0) + 1
        out = _staging(out)
        indexes = {modality: attempt.index for modality, (attempt, _) in built.items()}
        if layout == clip_layout.LAYOUT:
            width = len(str(max(part.number for part in collection.parts)))
            parts = [Part(part.number, part.rows, part.first_id, clip_layout.metadata_name(part.number, width))
                     for part in collection.parts] if collection.has_metadata else collection.parts
            config["parts"] = [part.as_dict() for part in parts]
            config["modalities"] = {modality: {**_describe(attempt, dims if modality == modalities[0] else attempt.index.d),
                                               "file": clip_layout.index_file(modality), "selection": chosen}
                                    for modality, (attempt, chosen) in built.items()}
            _write_clip(out, config, indexes, heldout_ids, collection, parts, previous,
                        published=storage.text(location) if storage.is_url(location) else None)
        else:
            if previous is not None:
                # the metadata files are rewritten under the names the previous index reads: without its
                # index.json a failed rebuild leaves no index, not the previous vectors with the new metadata
                (out / CONFIG_FILE).unlink(missing_ok=True)
            _write(out, config, indexes["image"], heldout_ids, collection, collection.parts, previous)
        if storage.is_url(location):
            publish(out, location, config)
        return cls(out, config, indexes, location)

    def add_parts(self, emb: str | os.PathLike | None = None) -> list[int]:
        """Add the parts of ``emb`` (default: the folder the index was built from) that it
        does not hold yet; returns their numbers.

        New parts must come after the indexed ones (ids are row numbers in part order), and
        the indexed parts must be unchanged. They are encoded with the quantizers trained at
        build time. For the compressed types a held-out sample of the new rows (added after
        the measurement) measures recall@k again, and the search parameter is tuned again as
        at build time. An index in clip-retrieval's layout is rebuilt instead.
        """
        emb = emb or self.config.get("source")
        if emb is None:
            raise InputError(f"{self.location}: the index does not record the embedding folder it was built from; "
                             "name it (`unicom index --emb EMB`)")
        indexed = {part.number: part for part in self.parts}
        collection = Collection(emb)
        current = {part.number: part for part in collection.parts}
        for number, part in indexed.items():
            if number not in current:
                raise InputError(f"{emb}: indexed part {number} is missing; point at the collection this index was built from")
            if current[number].rows != part.rows:
                raise InputError(
                    f"{collection.where(number)}: {current[number].rows} rows, but the index holds {part.rows} of "
                    "this part; the collection changed, rebuild the index with --rebuild"
                )
        if collection.dim < self.dims:
            raise InputError(f"{emb}: {collection.dim} dimensions, the index uses {self.dims}")
        new = sorted(set(current) - set(indexed))
        if not new:
            return []
        if self.layout != "unicom":
            raise InputError(
                f"{self.location}: an index in clip-retrieval's layout is not grown in place (its metadata files are "
                f"numbered for the parts it holds); rebuild it: `unicom index --emb EMB --out {self.location} "
                "--layout clip-retrieval --rebuild`"
            )
        last = max(indexed)
        early = [number for number in new if number < last]
        if early:
            raise InputError(
                f"{emb}: new parts {early[:5]} come before indexed part {last}; ids are row numbers in part order, "
                "so rebuild the index with --rebuild"
            )
        count = len(self)
        additions = Collection(emb, first_id=count, skip=sorted(indexed))
        selection = self.config["selection"]
        k, target = selection["k"], selection["recall_target"]
        config = dict(self.config)
        parts = self.parts + additions.parts
        config.update(count=count + additions.num_rows, parts=[part.as_dict() for part in parts],
                      generation=self.config["generation"] + 1)
        index, heldout_ids = self.faiss_index, None
        try:
            if self.type == "flat":
                for first_id, block in additions.blocks(self.dims, desc="adding"):
                    index.add(block)
            else:
                # a fresh held-out sample from the new rows measures the grown index
                rng = np.random.default_rng(len(parts))
                heldout_ids = choose_heldout(rng, count, additions.num_rows,
                                              heldout_size(additions.num_rows, selection.get("heldout", 1000)))
                queries = additions.gather(heldout_ids, self.dims)
                truth = exact_neighbours(collection, queries, k, self.dims, heldout_ids) if len(heldout_ids) else None
                candidate = Candidate(self.type, self.config["params"], 0)
                blocks = additions.blocks(self.dims, desc="adding")
                search, recall, steps = _add_and_tune(index, candidate, blocks, heldout_ids, queries, truth, k, target,
                                                      selection.get("index_type") == "auto")
                if len(heldout_ids):  # else too few new rows to measure: the search parameter and recall stay
                    if target is not None and recall < target:
                        logger.warning("after adding parts %s recall@%d is %.4f, below the target %s; rebuild with "
                                       "--rebuild to train the quantizers on the grown collection", new, k, recall, target)
                    _store_search(index, search)
                    config["search"] = search
                    config["selection"] = {**selection, "recall": round(recall, 4),
                                           "heldout_after_add": int(len(heldout_ids)), "steps_after_add": steps}
                else:
                    heldout_ids = None
            _write(self.path, config, index, heldout_ids, additions, additions.parts, self.config)
            if isinstance(self.location, str):
                written = {config["file"], *(f"{METADATA_FOLDER}/{part_name('metadata', part.number)}"
                                             for part in additions.parts)}
                publish(self.path, self.location, config, written | ({HELDOUT_FILE} if heldout_ids is not None else set()))
        except BaseException:
            # the in-memory index may hold part of the new rows: take the stored one again
            try:
                stored = Index.load(self.location)
            except Exception:  # the store cannot be read either: this object is not usable; the error below says why
                self.faiss_indexes = {}
            else:
                self.path, self.faiss_indexes = stored.path, stored.faiss_indexes
                self._set_config(stored.config)
            raise
        self._set_config(config)
        return [part.number for part in additions.parts]


def source_columns(row: dict, taken: Sequence[str]) -> dict:
    """``row`` with its keys that a result sets itself (``taken``) renamed ``source_<key>``, as
    a source column ``id`` becomes ``source_id``."""
    return {(f"source_{key}" if key in taken else key): value for key, value in row.items()}


def _same_folder(a, b) -> bool:
    """Whether ``a`` and ``b`` (local paths or URLs) name the same folder."""
    if storage.is_url(a) or storage.is_url(b):
        return storage.text(a).rstrip("/") == storage.text(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _file_number(file: str, position: int) -> int:
    """The part number in a metadata file name (``metadata_0007.parquet``), else its position."""
    match = re.search(r"(\d+)\.parquet$", file)
    return int(match.group(1)) if match else position


def _describe(built: _Built, dims: int) -> dict:
    """The configuration keys that describe one built index."""
    return {"type": built.candidate.type, "structure": built.candidate.structure(), "params": built.candidate.params,
            "search": built.search, "dims": int(dims)}


def _choose(collection: Collection, dims: int, heldout_ids: np.ndarray, *, index_type: str, budget: int | None,
            recall_target: float | None, k: int, exact_max_rows: int, nlist: int | None, pq_m: int | None,
            nbits: int | None, hnsw_m: int, seed: int, reconstructible: bool) -> tuple[_Built, dict]:
    """Plan, build and tune the candidates for ``collection``'s rows until one is kept
    (module docstring of :mod:`unicom.search.planner`); returns it and the selection record."""
    n = collection.num_rows
    goal = objective(budget, recall_target)
    target = recall_target if goal == "size" else (DEFAULT_RECALL if goal == "speed" else None)
    capped = index_type == "auto"
    candidates = plan(n, dims, index_type=index_type, memory_budget=budget, recall_target=recall_target,
                      exact_max_rows=exact_max_rows, nlist=nlist, pq_m=pq_m, nbits=nbits, hnsw_m=hnsw_m,
                      trainable=n - len(heldout_ids))
    rng = np.random.default_rng(seed + 1)
    measured = not (len(candidates) == 1 and candidates[0].type == "flat")
    if measured and not len(heldout_ids):
        raise InputError(f"no held-out rows to measure recall@{k} on ({n} rows, --heldout 0?): an approximate index would "
                         "be kept unmeasured and untuned; hold out rows (--heldout 1000), or build the exact index (--type flat)")
    if measured and k >= n - len(heldout_ids):
        logger.warning("recall@%d is measured among the %d rows that are not held out: every index that returns them all "
                       "reaches 1.0, so the recall reported says nothing of this one (give -k below %d)",
                       k, n - len(heldout_ids), n - len(heldout_ids))
    queries = collection.gather(heldout_ids, dims)
    truth = exact_neighbours(collection, queries, k, dims, heldout_ids) if measured else None
    tried, built = [], None
    for candidate in candidates:
        attempt = _build_one(collection, candidate, dims, rng, heldout_ids, queries, truth, k, target, capped,
                             reconstructible)
        tried.append({"type": candidate.type, "structure": candidate.structure(), "params": candidate.params,
                      "estimated_bytes": candidate.memory, "search": attempt.search, "recall": round(attempt.recall, 4),
                      "build_seconds": round(attempt.seconds, 1), "steps": attempt.steps})
        if target is None or attempt.recall >= target or index_type != "auto":
            built = attempt
            break
    if built is None:
        summary = "; ".join(f"{t['structure']} ({format_size(t['estimated_bytes'])}): recall@{k} {t['recall']}" for t in tried)
        raise InputError(
            f"no index within {format_size(budget) if budget else 'any memory'} reaches recall@{k} "
            f"{target} on the held-out sample of {collection.modality} embeddings ({summary}); raise --memory or lower "
            "--target-recall"
        )
    if target is not None and built.recall < target:
        logger.warning("%s reaches recall@%d %.4f only, below the target %s", built.candidate.describe(), k,
                       built.recall, target)
    _store_search(built.index, built.search)
    selection = {
        "index_type": index_type,
        "objective": goal,
        "memory_budget": budget,
        "recall_target": target,
        "k": k,
        "heldout": int(len(heldout_ids)),
        "recall": round(built.recall, 4),
        "tried": tried,
    }
    return built, selection


def _build_one(collection: Collection, candidate: Candidate, dims: int, rng: np.random.Generator, heldout_ids: np.ndarray,
               queries: np.ndarray, truth: np.ndarray | None, k: int, target: float | None, capped: bool,
               reconstructible: bool = False) -> _Built:
    start = time.perf_counter()
    wanted = train_rows(candidate)
    if wanted:
        pool = np.setdiff1d(np.arange(collection.num_rows, dtype=np.int64), heldout_ids, assume_unique=True)
        rows = np.sort(rng.choice(pool, size=min(wanted, len(pool)), replace=False))
        logger.info("training %s on %d rows", candidate.describe(), len(rows))
        sample = collection.gather(rows, dims)
        index = _new_faiss_index(candidate, dims, sample, reconstructible=reconstructible)
        index.train(sample)
    else:
        index = _new_faiss_index(candidate, dims, reconstructible=reconstructible)
    blocks = collection.blocks(dims, desc=f"adding ({candidate.type})")
    search, recall, steps = _add_and_tune(index, candidate, blocks, heldout_ids, queries, truth, k, target, capped)
    return _Built(index, candidate, search, recall, steps, time.perf_counter() - start)


def _cached(url) -> Path:
    """A local copy of what a search needs at hand of the index folder at ``url``
    (:func:`unicom.storage.cached_copy`): ``index.json`` and the faiss file it names, or for a
    folder clip-retrieval / autofaiss wrote (no ``index.json``) its faiss indexes, and their
    descriptions; the held-out ids. The metadata files stay where they are (read in place,
    :mod:`unicom.search.metadata_rows`). Index files of the cache that the folder no longer
    holds are removed (metadata copied whole by earlier versions too), so the copy is the
    folder as it is now."""
    config_url = storage.join(url, CONFIG_FILE)
    if storage.is_file(config_url):
        try:
            config = json.loads(storage.read_text(config_url))
        except ValueError as error:
            raise InputError(f"{storage.text(config_url)}: not valid JSON ({error})") from error
        names = [CONFIG_FILE, *(name for name in _file_names(config) if not name.startswith(f"{METADATA_FOLDER}/"))]
    else:
        names = _clip_folder_files(url)
    # optional: a search does not need it (a folder published without it); without index.json:
    # Index.load names the unfinished build
    if storage.is_file(storage.join(url, HELDOUT_FILE), optional=True):
        names.append(HELDOUT_FILE)
    if not names:
        if _is_embedding_folder(url):
            raise _embedding_folder_error(url)
        raise InputError(
            f"{storage.text(url)}: no {CONFIG_FILE} inside (unicom's layout), nor image.index / text.index "
            "(clip-retrieval's): not an index folder, or one whose build did not finish; build it (again) with "
            f"`unicom index --emb EMB --out {storage.text(url)} --rebuild`"
        )
    local = storage.cached_copy(url, names, refresh=[CONFIG_FILE])
    for folder in (local, local / METADATA_FOLDER):
        for file in folder.glob("*"):
            name = file.relative_to(local).as_posix()
            if (name == CONFIG_FILE or _INDEX_FILES.fullmatch(name)) and name not in names:
                file.unlink()
    return local


def _is_embedding_folder(folder) -> bool:
    """Whether ``folder`` (a path or URL) holds what `unicom embed` (or clip-retrieval's
    inference) writes rather than an index; a store that will not say is a no (an HTTP server
    that lists no folders)."""
    if storage.is_file(storage.join(folder, EMBEDDINGS_CONFIG), optional=True):
        return True
    try:
        return storage.is_dir(storage.join(folder, KINDS["image"][0]))
    except storage.FetchError:
        return False


def _embedding_folder_error(folder) -> InputError:
    where = storage.text(folder)
    return InputError(f"{where}: an embedding folder, not an index; build an index of it with "
                      f"`unicom index --emb {where} --out INDEX/` and search that")


def _clip_folder_files(url) -> list[str]:
    """The faiss indexes and autofaiss' descriptions of clip-retrieval's index folder at ``url``,
    relative to it; empty when it holds neither ``image.index`` nor ``text.index``."""
    present = storage.list_files(url)
    indexes = [clip_layout.index_file(modality) for modality in clip_layout.MODALITIES
               if clip_layout.index_file(modality) in present]
    if not indexes:
        return []
    infos = [clip_layout.infos_file(modality) for modality in clip_layout.MODALITIES
             if clip_layout.infos_file(modality) in present]
    return indexes + infos


def _file_names(config: dict) -> list[str]:
    """The files of the index that ``config`` describes, relative to its folder (``index.json``
    and the held-out ids aside): its faiss file(s), autofaiss' descriptions, its metadata."""
    if config.get("layout", "unicom") == clip_layout.LAYOUT:
        names = []
        for modality in config.get("modalities", {}):
            names += [clip_layout.index_file(modality), clip_layout.infos_file(modality)]
        names += [p["file"] for p in config.get("parts", []) if p.get("file")]
    else:
        # unicom's metadata files carry the ids: written for every part, with or without the source's metadata
        names = [str(config.get("file", ""))]
        names += [f"{METADATA_FOLDER}/{part_name('metadata', p['number'])}" for p in config.get("parts", [])]
    return [name for name in names if name]


def _embedding_config(emb) -> dict:
    """``unicom embed``'s configuration file of the collection (empty when there is none)."""
    try:
        return read_config(emb) or {}
    except InputError as error:  # only hints: the index does not need it
        logger.warning("%s; the index will not record the model nor the shards' columns", error)
        return {}


def _embedding_model(config: dict) -> dict | None:
    """The model that embedded the collection, from ``unicom embed``'s configuration, if any."""
    if not isinstance(config.get("model"), str):
        return None
    model = {"spec": config["model"], "pretrained": config.get("pretrained"), WEIGHTS_CHECKSUM: config.get(WEIGHTS_CHECKSUM)}
    # `unicom embed --flip`, `--scales`: image queries are embedded so too
    model.update(views_record(bool(config.get(FLIP)), recorded_scales(config)))
    return model


def _text_model(config: dict) -> dict | None:
    """The multilingual text model that embedded the collection's captions, from ``unicom embed``'s configuration, if any."""
    if not isinstance(config.get("text_model"), str):
        return None
    return {"spec": config["text_model"], WEIGHTS_CHECKSUM: config.get("text_model_sha256")}


def _read_config(path) -> dict | None:
    config_path = storage.join(path, CONFIG_FILE) if storage.is_url(path) else Path(path) / CONFIG_FILE
    if not storage.is_file(config_path):
        return None
    try:
        return json.loads(storage.read_text(config_path))
    except ValueError as error:
        raise InputError(f"{storage.text(config_path)}: not valid JSON ({error}); delete it, or build elsewhere") from error


def holds_index(location) -> bool:
    """Whether the folder ``location`` (local or a URL) holds an index, in either layout."""
    names = [CONFIG_FILE, *(clip_layout.index_file(modality) for modality in clip_layout.MODALITIES)]
    if storage.is_url(location):
        present = storage.list_files(location)
        return any(name in present for name in names)
    return any((Path(location) / name).is_file() for name in names)


_STAGING_PREFIX = ".build-"


def _staging(location) -> Path:
    """The local folder an index for ``location`` is written in: the folder itself, or for a
    URL a folder of this process's own in the cache (``.build-<pid>-…``, removed when the
    process ends), so that a ``unicom serve`` of the same URL keeps reading its own copy.
    Folders of processes that are gone (killed builds) are removed first."""
    if not storage.is_url(location):
        return Path(location)
    import atexit
    import tempfile

    root = storage.cache_folder(location).parent
    for left in root.glob(f"{_STAGING_PREFIX}*"):
        pid = left.name[len(_STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}-", dir=root))
    atexit.register(shutil.rmtree, folder, True)
    return folder


# the files of an index folder, in either layout, relative to it: what publish may replace or delete
_INDEX_FILES = re.compile(r"(index_\d+\.faiss|(image|text)\.(index|json)|" + re.escape(HELDOUT_FILE) + "|"
                          + re.escape(METADATA_FOLDER) + r"/[^/]+\.parquet)")


def publish(local: Path, location: str, config: dict, written: set[str] | None = None) -> None:
    """Make the remote index folder ``location`` hold the index ``config`` written in ``local``.

    The files ``config`` names (and the held-out ids) are uploaded whole
    (:func:`unicom.storage.upload_atomic`): those in ``written`` and those the remote folder
    lacks, or all of them when ``written`` is None; ``index.json`` goes last. When parts are
    added every file that changes has a new name, so a reader sees the previous index or the
    new one. A rebuild rewrites files under names the previous index uses (metadata, and
    clip-retrieval's ``image.index``), so its ``index.json`` is removed first: a reader then
    finds no index rather than a mix of two. After the commit the index files the new one
    does not name (the previous generation's faiss file, metadata of parts that are gone)
    are deleted. A killed publish leaves temporaries that the next one sweeps.
    """
    remote = {}
    for folder in ("", METADATA_FOLDER):
        where = storage.join(location, folder) if folder else location
        storage.sweep_temporaries(where)  # what a killed publish left: the folder is this index's alone
        remote.update({f"{folder}/{name}".lstrip("/"): entry for name, entry in storage.list_files(where).items()})
    names = _file_names(config) + ([HELDOUT_FILE] if (local / HELDOUT_FILE).is_file() else [])
    changed = [name for name in names if written is None or name in written or name not in remote]
    replaced = [name for name in changed if name in remote and name != HELDOUT_FILE]
    if CONFIG_FILE in remote and replaced:
        storage.remove(storage.join(location, CONFIG_FILE))  # files of the previous index are replaced
    logger.info("uploading %d files of the index to %s", len(changed) + 1, location)
    storage.make_folder(location)
    uploads = {storage.text(storage.join(location, name)): local / name for name in changed}
    storage.gather(lambda url: storage.upload_atomic(uploads[url], url), uploads, threads=8)
    storage.upload_atomic(local / CONFIG_FILE, storage.join(location, CONFIG_FILE))
    for name in sorted(set(remote) - set(names)):
        if _INDEX_FILES.fullmatch(name):
            storage.remove(storage.join(location, name))


def _metadata_with_ids(collection: Collection, part: Part):
    """Part's metadata with the index ids in column ``id`` (a source ``id`` column becomes ``source_id``)."""
    import pyarrow as pa

    ids = pa.array(np.arange(part.first_id, part.first_id + part.rows, dtype=np.int64))
    table = collection.metadata(part)
    if table is None:
        return pa.table({ID_COLUMN: ids})
    if ID_COLUMN in table.column_names:
        table = table.rename_columns(["source_id" if name == ID_COLUMN else name for name in table.column_names])
    return table.add_column(0, ID_COLUMN, ids)


def _write(out: Path, config: dict, faiss_index, heldout_ids: np.ndarray | None, collection: Collection, parts: list[Part],
           previous: dict | None) -> None:
    """Write metadata parts, the faiss file, the held-out ids, then ``index.json`` (the commit).

    The faiss file has a new name per generation, so a reader or a killed job sees either the
    old configuration with its file or the new one with its file.
    """
    import faiss

    out.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out)  # what a killed build or update left: the folder is this index's alone
    sweep_temporaries(out / METADATA_FOLDER)
    for part in parts:
        table = with_build(_metadata_with_ids(collection, part), config.get("build"))
        write_parquet_atomic(part_path(out / METADATA_FOLDER, "metadata", part.number), table, row_group_size=ROW_GROUP_ROWS)
    config["file"] = _faiss_file(config["generation"])
    with atomic_path(out / config["file"]) as tmp:
        faiss.write_index(faiss_index, str(tmp))
    config["bytes"] = (out / config["file"]).stat().st_size
    if heldout_ids is not None:
        save_npy_atomic(out / HELDOUT_FILE, heldout_ids)
    write_json_atomic(out / CONFIG_FILE, config)
    _remove_previous(out, config, previous)
    kept = {part["number"] for part in config["parts"]}
    for stale in (out / METADATA_FOLDER).glob("*.parquet"):
        match = re.fullmatch(r"metadata_(\d+)\.parquet", stale.name)
        if match is None or int(match.group(1)) not in kept or stale.name != f"metadata_{int(match.group(1))}.parquet":
            stale.unlink()
    for stale in out.glob("index_*.faiss"):  # of generations before a rebuild that did not finish
        if re.fullmatch(r"index_\d+\.faiss", stale.name) and stale.name != config["file"]:
            stale.unlink()


def _write_clip(out: Path, config: dict, indexes: dict, heldout_ids: np.ndarray, collection: Collection, parts: list[Part],
                previous: dict | None, published: str | None = None) -> None:
    """clip-retrieval's layout: the collection's metadata as it is (zero-padded names), one
    faiss file and autofaiss' description per modality, the held-out ids, then ``index.json``.
    ``published``: the URL the folder is uploaded to, recorded as the faiss files' place."""
    out.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out)  # what a killed build left: the folder is this index's alone
    sweep_temporaries(out / clip_layout.METADATA_FOLDER)
    if collection.has_metadata:
        for part in parts:
            clip_layout.write_metadata(out, part.file, collection.metadata(part), config.get("build"))
    for modality, faiss_index in indexes.items():
        path = clip_layout.write_index(out, modality, faiss_index)
        described = config["modalities"][modality]
        described["bytes"] = path.stat().st_size
        extra = {"unicom": {"recall@k": described["selection"]["recall"], "k": described["selection"]["k"],
                            "heldout": described["selection"]["heldout"], "structure": described["structure"]}}
        where = f"{published.rstrip('/')}/{path.name}" if published else None
        clip_layout.write_infos(out, modality, clip_layout.infos(faiss_index, described["structure"], described["search"],
                                                                 path, extra, where))
    for modality in clip_layout.MODALITIES:
        if modality not in indexes:  # left from an earlier build with text embeddings
            (out / clip_layout.index_file(modality)).unlink(missing_ok=True)
            (out / clip_layout.infos_file(modality)).unlink(missing_ok=True)
    config["file"] = clip_layout.index_file(next(iter(indexes)))
    config["bytes"] = (out / config["file"]).stat().st_size
    save_npy_atomic(out / HELDOUT_FILE, heldout_ids)
    write_json_atomic(out / CONFIG_FILE, config)
    _remove_previous(out, config, previous)
    for stale in clip_layout.stale_metadata(out, {part.file for part in parts if part.file}):
        stale.unlink()


def _remove_previous(out: Path, config: dict, previous: dict | None) -> None:
    """The previous generation's faiss file, once the new configuration is in place."""
    if previous is None:
        return
    if previous.get("layout", "unicom") == "unicom":
        if previous.get("file") and previous["file"] != config["file"]:
            (out / previous["file"]).unlink(missing_ok=True)
    elif config["layout"] == "unicom":  # clip-retrieval's files, replaced by unicom's layout
        for modality in previous.get("modalities", {}):
            (out / clip_layout.index_file(modality)).unlink(missing_ok=True)
            (out / clip_layout.infos_file(modality)).unlink(missing_ok=True)
