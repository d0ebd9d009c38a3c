"""A faiss index over an embedding collection, with its ids and metadata beside it.

``Index.build(EMB, INDEX)`` reads the image embeddings of an embedding folder
(:mod:`unicom.layout`), keeps the first ``dims`` dimensions of each row re-normalised to unit
length, and writes::

    INDEX/index.json                      the configuration (below); written last
    INDEX/index_{generation}.faiss        the faiss index, inner product on unit vectors
    INDEX/metadata/metadata_{i}.parquet   part i's metadata, with the row ids in column ``id``
    INDEX/heldout_ids.npy                 the held-out sample that measured the recall

Ids are row numbers of the collection in part order: part ``i``'s row ``r`` has id
``first_id(i) + r``. ``index.json`` records the index type and its parameters, the search
parameter (``nprobe`` or ``efSearch``), the parts (number, rows, first id) and how the type
was chosen.

Index types (their structure in faiss' factory notation; the metric is the inner product):

* ``flat``  exact search, ``Flat``: 4·d bytes per vector.
* ``hnsw``  a graph, ``HNSW{M}``: the vectors plus about 4·(2M+1) bytes of links and an
  8-byte id per vector; the fastest at high recall, but larger than ``flat``.
* ``ivfpq`` inverted lists of product-quantised residuals, ``PR{d'},IVF{nlist},PQ{m}x{nbits}``:
  m·nbits/8 bytes of code plus an 8-byte id per vector. ``PR{d'}`` (:func:`principal_rotation`)
  projects the vectors on their d' = s·m principal axes (s ≥ 2 dimensions per
  sub-quantizer) and rotates them randomly, spreading the variance over the sub-quantizers.

``type="auto"`` chooses from a memory budget and a recall target: the exact index for
small collections, else the candidates that fit the budget in the order hnsw, ivfpq (the
largest code that fits), flat; each is built, its search parameter raised until recall@k
on the held-out sample reaches the target, and the first that reaches it is kept.

recall@k is measured against exact search on a held-out sample: rows of the collection that
train no quantizer and join the index only after the measurement, so that they are searched
as new queries are. For each held-out row q it is the fraction of q's k exact nearest
neighbours among the other (not held-out) rows that the index returns among its k.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from unicom import __version__
from unicom.errors import InputError
from unicom.files import atomic_path, save_npy_atomic, write_json_atomic, write_parquet_atomic
from unicom.layout import KINDS, EmbeddingFolders, part_path
from unicom.progress import progress

logger = logging.getLogger(__name__)

FORMAT = "unicom-index"
FORMAT_VERSION = 1
CONFIG_FILE = "index.json"
HELDOUT_FILE = "heldout_ids.npy"
METADATA_FOLDER = "metadata"
ID_COLUMN = "id"
TYPES = ("auto", "flat", "hnsw", "ivfpq")

ID_BYTES = 8  # faiss keeps one int64 id per vector in inverted lists
MIN_IVFPQ_ROWS = 39 * 16  # 39 training rows for each of 16 centroids: the smallest IVF-PQ worth training
BLOCK_ROWS = 65536  # rows read, normalised and added at once
NPROBE_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
EF_SEARCH_STEPS = (16, 32, 64, 128, 256, 512, 1024, 2048)


# --------------------------------------------------------------------------- small pieces


def first_dims(embeddings: np.ndarray, dims: int, where: str = "embeddings", rows=0) -> np.ndarray:
    """The first ``dims`` columns of (N, D) ``embeddings``, rows re-normalised: float32 (N, dims).

    Raises :class:`InputError` naming ``where`` and the row for non-finite values or rows
    whose first ``dims`` values are all zero; ``rows`` gives the row numbers to name (an
    offset, or one number per row).
    """
    x = np.array(embeddings[:, :dims], dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(x, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        row = int(rows[position]) if np.ndim(rows) else int(rows) + position
        problem = "holds NaN or infinite values" if not np.isfinite(norms[position]) else (
            f"is zero in its first {dims} dimensions and cannot be normalised")
        raise InputError(f"{where}: row {row} {problem}; re-embed that part or drop the row")
    x /= norms[:, None]
    return x


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """Bytes from ``"512MB"``, ``"2GiB"``, ``"1.5G"`` or a number (decimal units: 1 MB = 10^6 bytes; MiB = 2^20)."""
    if isinstance(text, (int, float)):
        return int(text)
    match = _SIZE.match(text)
    if match is None:
        raise InputError(f"memory size {text!r} not understood: write e.g. 512MB, 2GiB or 1500000000")
    value, prefix, suffix = match.groups()
    power = "kmgt".index(prefix.lower()) + 1 if prefix else 0
    base = 1024 if suffix.lower().startswith("i") else 1000
    return int(float(value) * base**power)


def format_size(num_bytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units up to GiB."""
    if abs(num_bytes) < 1024:
        return f"{num_bytes:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        num_bytes /= 1024
        if abs(num_bytes) < 1024 or unit == "GiB":
            break
    return f"{num_bytes:.1f} {unit}"


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of |found ∩ truth| / |truth|; ``found``, ``truth``: int (Q, k), -1 = none."""
    if len(truth) == 0:
        return float("nan")
    total = 0.0
    for got, want in zip(found, truth):
        want = want[want >= 0]
        if len(want):
            total += len(np.intersect1d(got[got >= 0], want)) / len(want)
        else:
            total += 1.0
    return total / len(truth)


# --------------------------------------------------------------------------- the collection


@dataclass
class Part:
    number: int
    rows: int
    first_id: int

    def as_dict(self) -> dict:
        return {"number": self.number, "rows": self.rows, "first_id": self.first_id}


class Collection:
    """The complete parts of an embedding folder, in part order, with their row ids.

    A part is complete when its metadata file exists (``unicom embed`` writes it last);
    image parts without one are left out with a warning. Without a metadata folder every
    image part counts.
    """

    def __init__(self, root: str | os.PathLike, first_id: int = 0, skip: Sequence[int] = ()):
        self.root = Path(root)
        self.folders = EmbeddingFolders.from_root(root)
        if self.folders.image is None:
            raise InputError(f"{root}: no img_emb/ folder inside; the index is built from image embeddings")
        images = self.folders.files("image")
        self.has_metadata = self.folders.metadata is not None
        numbers = sorted(images)
        if self.has_metadata:
            metadata = dict(self._metadata_files())
            orphans = sorted(set(metadata) - set(images))
            if orphans:
                raise InputError(
                    f"{self.folders.metadata}: metadata parts {orphans[:5]} have no img_emb file beside them; "
                    "re-run `unicom embed` for them or remove them"
                )
            pending = sorted(set(images) - set(metadata))
            if pending:
                logger.warning("%s: parts %s have no metadata yet (unfinished) and are left out", root, pending[:10])
            numbers = sorted(metadata)
        skipped = set(skip)
        self.parts: list[Part] = []
        self.dim: int | None = None
        next_id = first_id
        for number in numbers:
            if number in skipped:
                continue
            shape = self._shape(number)
            if self.dim is None:
                self.dim = shape[1]
            elif shape[1] != self.dim:
                raise InputError(
                    f"{images[number]}: {shape[1]} dimensions, but earlier parts have {self.dim}; "
                    "every part must come from the same model"
                )
            if self.has_metadata:
                meta_rows = self.folders.num_rows("metadata", number)
                if meta_rows != shape[0]:
                    raise InputError(
                        f"{part_path(self.folders.metadata, 'metadata', number)}: {meta_rows} rows, but "
                        f"{images[number].name} has {shape[0]}; re-run `unicom embed` for part {number}"
                    )
            self.parts.append(Part(number, shape[0], next_id))
            next_id += shape[0]
        self.all_numbers = numbers

    def _metadata_files(self):
        from unicom.files import numbered_files

        _, prefix, suffix = KINDS["metadata"]
        return numbered_files(self.folders.metadata, prefix, suffix)

    def _shape(self, number: int) -> tuple[int, int]:
        array = self.folders.load("image", number)
        return int(array.shape[0]), int(array.shape[1])

    @property
    def num_rows(self) -> int:
        return sum(part.rows for part in self.parts)

    def where(self, number: int) -> str:
        return str(part_path(self.folders.image, "image", number))

    def blocks(self, dims: int, desc: str = "") -> Iterator[tuple[int, np.ndarray]]:
        """(first id, float32 (B, dims) unit rows) for consecutive blocks of every part."""
        bar = progress(total=self.num_rows, desc=desc, unit="vec") if desc else None
        for part in self.parts:
            array = self.folders.load("image", part.number)
            for start in range(0, part.rows, BLOCK_ROWS):
                block = first_dims(array[start:start + BLOCK_ROWS], dims, self.where(part.number), start)
                yield part.first_id + start, block
                if bar is not None:
                    bar.update(len(block))
        if bar is not None:
            bar.close()

    def gather(self, ids: np.ndarray, dims: int) -> np.ndarray:
        """Rows ``ids`` (sorted int64) as float32 (len(ids), dims) unit vectors."""
        out = np.empty((len(ids), dims), dtype=np.float32)
        starts = np.array([part.first_id for part in self.parts], dtype=np.int64)
        which = np.searchsorted(starts, ids, side="right") - 1
        for index in np.unique(which):
            part = self.parts[int(index)]
            selected = np.flatnonzero(which == index)
            local = ids[selected] - part.first_id
            array = self.folders.load("image", part.number)
            out[selected] = first_dims(array[local], dims, self.where(part.number), local)
        return out

    def metadata_table(self, part: Part):
        """Part's metadata with the index ids in column ``id`` (a source ``id`` column becomes ``source_id``)."""
        import pyarrow as pa

        ids = pa.array(np.arange(part.first_id, part.first_id + part.rows, dtype=np.int64))
        if not self.has_metadata:
            return pa.table({ID_COLUMN: ids})
        table = self.folders.load("metadata", part.number)
        if ID_COLUMN in table.column_names:
            table = table.rename_columns(["source_id" if name == ID_COLUMN else name for name in table.column_names])
        return table.add_column(0, ID_COLUMN, ids)


def exact_neighbours(collection: Collection, queries: np.ndarray, k: int, dims: int, exclude: np.ndarray) -> np.ndarray:
    """The exact k nearest neighbours (inner product) of each query among the collection's
    rows, leaving out the ids ``exclude`` (sorted int64: the held-out rows, queries included).

    Returns int64 (Q, k) ids, -1 where fewer rows remain. One pass over the collection: each
    block's top k is merged into the running top k, equal scores ranking the lower id first.
    """
    import torch

    from unicom.evaluate.metrics import knn_search, ranked_top_k

    best_scores = np.zeros((len(queries), 0), dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for first_id, block in collection.blocks(dims, desc="exact search"):
        ids = np.arange(first_id, first_id + len(block), dtype=np.int64)
        kept = ~np.isin(ids, exclude, assume_unique=True)
        if not kept.any():
            continue
        block, ids = block[kept], ids[kept]
        scores, local = knn_search(queries, block, min(k, len(block)))
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, ids[local]], axis=1)
        # earlier columns hold lower ids, so ranked_top_k's tie rule ranks lower ids first
        best_scores, order = (t.numpy() for t in ranked_top_k(torch.from_numpy(scores), k))
        best_ids = np.take_along_axis(ids, order, axis=1)
    out = np.full((len(queries), k), -1, dtype=np.int64)
    out[:, : best_ids.shape[1]] = best_ids
    return out


# --------------------------------------------------------------------------- index types


@dataclass
class Candidate:
    """An index type with its build parameters and its estimated memory in bytes."""

    type: str
    params: dict
    memory: int

    def structure(self) -> str:
        """The index in faiss' factory notation (``PR`` is :func:`principal_rotation`)."""
        p = self.params
        if self.type == "flat":
            return "Flat"
        if self.type == "hnsw":
            return f"HNSW{p['M']}"
        return f"PR{p['rotated_dims']},IVF{p['nlist']},PQ{p['m']}x{p['nbits']}"

    def describe(self) -> str:
        shown = ", ".join(f"{key}={value}" for key, value in self.params.items())
        return f"{self.type}({shown})" if shown else self.type


def flat_memory(n: int, d: int) -> int:
    return 4 * n * d


def hnsw_memory(n: int, d: int, M: int) -> int:
    # vectors + links (2M at level 0, about 1 more on the levels above) as int32
    # + per-vector offset (int64), level (int32) and id (int64)
    return n * (4 * d + 4 * (2 * M + 1) + 12 + ID_BYTES)


def ivfpq_memory(n: int, d: int, nlist: int, m: int, nbits: int, rotated_dims: int) -> int:
    codes = n * (math.ceil(m * nbits / 8) + ID_BYTES)
    centroids = 4 * rotated_dims * (nlist + 2**nbits)
    rotation = 4 * d * rotated_dims
    return codes + centroids + rotation + 48 * nlist  # two std::vectors per inverted list


def default_nlist(n: int) -> int:
    """A power of two near 4·sqrt(n), with at least 39 training rows per list."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return nlist


def default_nbits(n: int) -> int:
    """8 bits per sub-quantizer when there are 39 training rows per centroid, fewer otherwise."""
    return int(min(8, max(4, math.floor(math.log2(max(n, 1) / 39)))))


def ivfpq_candidate(n: int, d: int, budget: int | None, *, nlist: int | None = None, m: int | None = None,
                    nbits: int | None = None, trainable: int | None = None) -> Candidate | None:
    """IVF-PQ with the largest code that fits ``budget``, or with ``m`` sub-quantizers.

    Each sub-quantizer codes s = floor(d/m) ≥ 2 dimensions of the rotated vector (d' = s·m
    dimensions, at most d). With neither ``budget`` nor ``m``, m = d/4 (a code 16 times
    smaller than the float32 vector). ``trainable``: rows available for training (default n),
    which bound ``nlist`` and ``nbits``. None when no code fits.
    """
    trainable = n if trainable is None else trainable
    nlist = nlist or default_nlist(trainable)
    nbits = nbits or default_nbits(trainable)
    if m is None:
        if budget is None:
            m = max(1, d // 4)
        else:
            fixed = ivfpq_memory(0, d, nlist, 0, nbits, d)
            per_vector = (budget - fixed) // max(n, 1) - ID_BYTES
            m = min(d // 2, int(per_vector * 8 // nbits))
            m = m // 4 * 4 if m >= 8 else m  # multiples of 4 keep the rotated dimension tidy
            if m < 1:
                return None
    if not 1 <= m <= d // 2:
        raise InputError(f"--pq-m {m}: use 1 to {d // 2} sub-quantizers for {d} dimensions (at least 2 dimensions each)")
    params = {"nlist": nlist, "m": m, "nbits": nbits, "rotated_dims": d // m * m}
    memory = ivfpq_memory(n, d, nlist, m, nbits, params["rotated_dims"])
    if budget is not None and memory > budget:
        return None
    return Candidate("ivfpq", params, memory)


def plan(n: int, d: int, *, index_type: str = "auto", memory_budget: int | None = None, exact_max_rows: int = 100_000,
         nlist: int | None = None, pq_m: int | None = None, nbits: int | None = None, hnsw_m: int = 32,
         trainable: int | None = None) -> list[Candidate]:
    """The index types to try, in order (see the module docstring); ``trainable``: rows not held out."""
    if index_type not in TYPES:
        raise InputError(f"index type {index_type!r} unknown: use one of {', '.join(TYPES)}")
    flat = Candidate("flat", {}, flat_memory(n, d))
    hnsw = Candidate("hnsw", {"M": hnsw_m, "efConstruction": 40}, hnsw_memory(n, d, hnsw_m))
    if index_type == "flat":
        return [flat]
    if index_type == "hnsw":
        return [hnsw]
    ivfpq = ivfpq_candidate(n, d, None if pq_m else memory_budget, nlist=nlist, m=pq_m, nbits=nbits, trainable=trainable)
    if index_type == "ivfpq":
        if ivfpq is None:
            raise InputError(
                f"no IVF-PQ code fits {format_size(memory_budget)} for {n} vectors: raise --memory "
                f"(about {format_size(n * (ID_BYTES + 8))} gives 8-byte codes)"
            )
        if n < max(MIN_IVFPQ_ROWS, 39 * ivfpq.params["nlist"]):
            raise InputError(f"{n} vectors are too few to train IVF-PQ (at least {max(MIN_IVFPQ_ROWS, 39 * ivfpq.params['nlist'])}); "
                             "use --type flat")
        return [ivfpq]

    def fits(candidate: Candidate | None) -> bool:
        return candidate is not None and (memory_budget is None or candidate.memory <= memory_budget)

    if n <= exact_max_rows and fits(flat):
        return [flat]
    chosen = [c for c in (hnsw, ivfpq if n >= MIN_IVFPQ_ROWS else None, flat) if fits(c)]
    if not chosen:
        raise InputError(
            f"no index type fits {format_size(memory_budget)} for {n} vectors of {d} dimensions "
            f"(exact: {format_size(flat.memory)}); raise --memory or index fewer --dims"
        )
    return chosen


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
    return transform


def _new_faiss_index(candidate: Candidate, dims: int, sample: np.ndarray | None = None):
    """An empty faiss index for ``candidate``; IVF-PQ fits its rotation on ``sample`` (and still needs training)."""
    import faiss

    if candidate.type == "flat":
        return faiss.IndexFlatIP(dims)
    if candidate.type == "hnsw":
        graph = faiss.IndexHNSWFlat(dims, candidate.params["M"], faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = candidate.params["efConstruction"]
        return faiss.IndexIDMap(graph)  # explicit ids: the held-out rows join the graph last
    p = candidate.params
    quantizer = faiss.IndexFlatIP(p["rotated_dims"])
    ivf = faiss.IndexIVFPQ(quantizer, p["rotated_dims"], p["nlist"], p["m"], p["nbits"], faiss.METRIC_INNER_PRODUCT)
    ivf.do_polysemous_training = False  # polysemous codes serve Hamming filtering, unused here
    return faiss.IndexPreTransform(principal_rotation(sample, p["rotated_dims"]), ivf)


def train_rows(candidate: Candidate) -> int:
    """Rows sampled to train ``candidate``'s quantizers (0: nothing to train)."""
    if candidate.type != "ivfpq":
        return 0
    return max(50 * candidate.params["nlist"], 64 * 2 ** candidate.params["nbits"])


def search_parameters(index_type: str, search: dict):
    """faiss SearchParameters for ``search`` (``{"nprobe": p}`` or ``{"efSearch": e}``), or None."""
    import faiss

    if index_type == "ivfpq":
        return faiss.SearchParametersIVF(nprobe=int(search["nprobe"]))
    if index_type == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=int(search["efSearch"]))
    return None


def _search(index, index_type: str, search: dict, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    params = search_parameters(index_type, search)
    if params is not None and isinstance(index, faiss.IndexPreTransform):
        params = faiss.SearchParametersPreTransform(index_params=params)
    # faiss.contrib.torch_utils (imported by other libraries, e.g. pytorch-metric-learning)
    # replaces Index.search with a version without `params`; it keeps faiss's own numpy
    # search as `search_numpy`
    search_numpy = getattr(index, "search_numpy", index.search)
    return search_numpy(queries, k, params=params)


def _search_steps(candidate: Candidate, k: int) -> list[dict]:
    if candidate.type == "ivfpq":
        return [{"nprobe": p} for p in NPROBE_STEPS if p <= candidate.params["nlist"]]
    if candidate.type == "hnsw":
        return [{"efSearch": e} for e in EF_SEARCH_STEPS if e >= k]
    return [{}]


def tune(index, candidate: Candidate, queries: np.ndarray, truth: np.ndarray, k: int,
         target: float) -> tuple[dict, float, list[dict]]:
    """The smallest search parameter whose recall@k on the held-out queries reaches ``target``.

    ``index`` holds every row but the held-out ones; ``truth`` (Q, k) are their exact
    neighbours among those rows. Returns (search parameter, its recall, every step measured:
    parameter, recall, queries/s); without a step reaching the target, the best step.
    """
    if candidate.type == "flat":
        return {}, 1.0, []
    steps = []
    for search in _search_steps(candidate, k):
        start = time.perf_counter()
        _, ids = _search(index, candidate.type, search, queries, k)
        seconds = time.perf_counter() - start
        recall = recall_at_k(ids, truth)
        steps.append({**search, "recall": round(recall, 4), "queries_per_s": round(len(queries) / max(seconds, 1e-9), 1)})
        logger.info("%s %s: recall@%d %.4f", candidate.describe(), search, k, recall)
        if recall >= target:
            return search, recall, steps
    best = max(steps, key=lambda step: step["recall"])
    return {key: best[key] for key in ("nprobe", "efSearch") if key in best}, best["recall"], steps


def _add(index, index_type: str, block: np.ndarray, ids: np.ndarray) -> None:
    """Add rows with their ids (the exact index only ever receives them in id order)."""
    if index_type == "flat":
        index.add(block)
    else:
        index.add_with_ids(block, ids)


def _add_and_tune(index, candidate: Candidate, blocks, heldout_ids: np.ndarray, queries: np.ndarray,
                  truth: np.ndarray | None, k: int, target: float) -> tuple[dict, float, list[dict]]:
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
    result = tune(index, candidate, queries, truth, k, target)
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


def _choose_heldout(rng: np.random.Generator, first_id: int, rows: int, count: int) -> np.ndarray:
    return np.sort(rng.choice(rows, size=min(count, rows), replace=False).astype(np.int64) + first_id)


def _heldout_size(n: int, heldout: int) -> int:
    # at most a tenth of a small collection, so the quantizers still see most of it
    return int(min(heldout, max(1, n // 10))) if n > 1 else 0


class Index:
    """A searchable index folder (see the module docstring).

    ``Index.load(path)``, ``index.search(embeddings, k) -> (scores, ids)``,
    ``index.metadata(ids)``, ``Index.build(emb, out, ...)``, ``index.add_parts(emb)``.
    """

    def __init__(self, path: str | os.PathLike, config: dict, faiss_index):
        self.path = Path(path)
        self.faiss_index = faiss_index
        self._tables: dict[int, Any] = {}
        self._set_config(config)

    def _set_config(self, config: dict) -> None:
        self.config = config
        self.parts = [Part(p["number"], p["rows"], p["first_id"]) for p in config["parts"]]
        self._starts = np.array([p.first_id for p in self.parts], dtype=np.int64)

    # ------------------------------------------------------------------ reading

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Index":
        """Open the index folder ``path`` written by :meth:`build`."""
        import faiss

        path = Path(path)
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise InputError(f"{path}: no {CONFIG_FILE} inside; build an index with `unicom index --emb EMB --out {path}`")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise InputError(f"{config_path}: not valid JSON ({error})") from error
        if config.get("format") != FORMAT:
            raise InputError(f"{config_path}: not a unicom index configuration (format {config.get('format')!r})")
        if config.get("format_version", 0) > FORMAT_VERSION:
            raise InputError(f"{config_path}: written by a newer unicom (format {config['format_version']}); upgrade unicom")
        faiss_path = path / config["file"]
        if not faiss_path.is_file():
            raise InputError(f"{faiss_path}: file not found; the index folder is incomplete, rebuild it")
        faiss_index = faiss.read_index(str(faiss_path))
        if faiss_index.ntotal != config["count"]:
            raise InputError(
                f"{faiss_path}: holds {faiss_index.ntotal} vectors but {CONFIG_FILE} says {config['count']}; rebuild the index"
            )
        return cls(path, config, faiss_index)

    def __len__(self) -> int:
        return int(self.config["count"])

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, type={self.type!r}, count={len(self)}, dims={self.dims})"

    @property
    def dims(self) -> int:
        return int(self.config["dims"])

    @property
    def type(self) -> str:
        return str(self.config["type"])

    def search(self, embeddings, k: int = 10, *, nprobe: int | None = None, ef_search: int | None = None):
        """The k nearest indexed rows of each query.

        embeddings: (Q, D) or (D,) floats with D ≥ ``dims`` (the first ``dims`` are used,
        re-normalised). Returns (scores float32 (Q, k), ids int64 (Q, k)), best first;
        scores are inner products (cosine similarities, approximate for compressed types);
        ids are -1 (score -inf) past the end of a small index. ``nprobe`` / ``ef_search``
        override the recorded search parameter.
        """
        x = np.asarray(embeddings)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2:
            raise InputError(f"query embeddings: expected (queries, dimension), got shape {x.shape}")
        if x.shape[1] < self.dims:
            raise InputError(f"query embeddings have {x.shape[1]} dimensions, the index needs at least {self.dims}")
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        queries = first_dims(x, self.dims, "query embeddings")
        search = dict(self.config.get("search", {}))
        if nprobe is not None:
            search["nprobe"] = nprobe
        if ef_search is not None:
            search["efSearch"] = ef_search
        scores, ids = _search(self.faiss_index, self.type, search, queries, k)
        return scores, ids.astype(np.int64, copy=False)

    def search_images(self, encoder, images: Sequence[Any], k: int = 10, *, batch_size: int = 32):
        """Embed ``images`` (PIL images or paths) with ``encoder`` and search: (scores, ids) as :meth:`search`."""
        from unicom.embed import embed_images

        self.check_encoder(encoder)
        return self.search(embed_images(encoder, images, batch_size=batch_size), k)

    def check_encoder(self, encoder) -> None:
        """Raise :class:`InputError` if ``encoder``'s embeddings cannot be the collection's."""
        expected = self.config.get("source_dims", self.dims)
        if encoder.embedding_dim != expected:
            built_with = self.config.get("model") or {}
            hint = f" ({built_with.get('spec')})" if built_with.get("spec") else ""
            raise InputError(
                f"{encoder.name} gives {encoder.embedding_dim}-dimensional embeddings, but {self.path} was built from "
                f"{expected}-dimensional ones; query with the model that embedded the collection{hint}"
            )

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[dict]]:
        """Results per query: dicts with ``rank`` (1-based), ``id``, ``score`` and the row's metadata."""
        rows = self.metadata(ids)
        return [
            [{"rank": rank + 1, "score": float(score), **{key: value for key, value in row.items() if key not in ("rank", "score")}}
             for rank, (score, row) in enumerate(zip(query_scores, query_rows)) if row is not None]
            for query_scores, query_rows in zip(scores, rows)
        ]

    def _table(self, index: int):
        table = self._tables.get(index)
        if table is None:
            import pyarrow.parquet as pq

            path = part_path(self.path / METADATA_FOLDER, "metadata", self.parts[index].number)
            try:
                table = pq.read_table(path)
            except FileNotFoundError as error:
                raise InputError(f"{path}: file not found; the index folder is incomplete, rebuild it") from error
            self._tables[index] = table
        return table

    def metadata(self, ids) -> list:
        """The metadata rows of ``ids`` as dicts (with ``id``), nested like ``ids``; None for -1.

        ``ids``: an int, or an int array of any shape (e.g. the (Q, k) ids of :meth:`search`).
        """
        array = np.asarray(ids, dtype=np.int64)
        flat = array.reshape(-1)
        out: list[dict | None] = [None] * len(flat)
        bad = flat[(flat < -1) | (flat >= len(self))]
        if len(bad):
            raise InputError(f"id {int(bad[0])} is not in this index (ids 0..{len(self) - 1})")
        valid = np.flatnonzero(flat >= 0)
        which = np.searchsorted(self._starts, flat[valid], side="right") - 1
        for index in np.unique(which):
            positions = valid[which == index]
            rows = flat[positions] - self.parts[int(index)].first_id
            for position, row in zip(positions, self._table(int(index)).take(rows).to_pylist()):
                out[position] = row
        if array.ndim == 0:
            return out[0]
        nested = np.empty(len(out), dtype=object)
        nested[:] = out
        return nested.reshape(array.shape).tolist()

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
        recall_target: float = 0.9,
        k: int = 10,
        heldout: int = 1000,
        exact_max_rows: int = 100_000,
        nlist: int | None = None,
        pq_m: int | None = None,
        nbits: int | None = None,
        hnsw_m: int = 32,
        seed: int = 0,
        overwrite: bool = False,
    ) -> "Index":
        """Build an index of the embedding folder ``emb`` into the folder ``out``.

        dims: keep the first ``dims`` dimensions (re-normalised); default all.
        memory_budget: bytes (or ``"2GB"``) the index may take in memory; default no limit.
        recall_target: recall@k on the held-out sample that the search parameter must reach.
        overwrite: replace an index already in ``out`` (otherwise an error: use :meth:`add_parts`).
        """
        out = Path(out)
        if (out / CONFIG_FILE).exists() and not overwrite:
            raise InputError(f"{out}: already holds an index; add new parts to it, or rebuild it with --rebuild")
        if not 0 < recall_target <= 1:
            raise InputError(f"the recall target must be in (0, 1], got {recall_target}")
        budget = None if memory_budget is None else parse_size(memory_budget)
        collection = Collection(emb)
        n = collection.num_rows
        if n == 0:
            raise InputError(f"{emb}: the collection has no rows to index")
        dims = dims or collection.dim
        if not 1 <= dims <= collection.dim:
            raise InputError(f"--dims {dims}: the embeddings have {collection.dim} dimensions")
        heldout_rows = _heldout_size(n, heldout)
        candidates = plan(n, dims, index_type=index_type, memory_budget=budget, exact_max_rows=exact_max_rows,
                          nlist=nlist, pq_m=pq_m, nbits=nbits, hnsw_m=hnsw_m, trainable=n - heldout_rows)
        rng = np.random.default_rng(seed)
        heldout_ids = _choose_heldout(rng, 0, n, heldout_rows)
        measured = not (len(candidates) == 1 and candidates[0].type == "flat")
        queries = collection.gather(heldout_ids, dims)
        truth = exact_neighbours(collection, queries, k, dims, heldout_ids) if measured else None
        tried, built = [], None
        for candidate in candidates:
            attempt = _build_one(collection, candidate, dims, rng, heldout_ids, queries, truth, k, recall_target)
            tried.append({"type": candidate.type, "params": candidate.params, "estimated_bytes": candidate.memory,
                          "search": attempt.search, "recall": round(attempt.recall, 4), "build_seconds": round(attempt.seconds, 1),
                          "steps": attempt.steps})
            if attempt.recall >= recall_target or index_type != "auto":
                built = attempt
                break
        if built is None:
            summary = "; ".join(f"{t['type']} {t['params']}: recall@{k} {t['recall']}" for t in tried)
            raise InputError(
                f"no index within {format_size(budget) if budget else 'any memory'} reaches recall@{k} "
                f"{recall_target} on the held-out sample ({summary}); raise --memory or lower --recall"
            )
        if built.recall < recall_target:
            logger.warning("%s reaches recall@%d %.4f only, below the target %s", built.candidate.describe(), k,
                           built.recall, recall_target)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "type": built.candidate.type,
            "structure": built.candidate.structure(),
            "metric": "inner_product",
            "params": built.candidate.params,
            "search": built.search,
            "dims": dims,
            "source_dims": collection.dim,
            "count": n,
            "parts": [part.as_dict() for part in collection.parts],
            "source": str(Path(emb).resolve()),
            "has_metadata": collection.has_metadata,
            "model": _embedding_model(Path(emb)),
            "selection": {
                "index_type": index_type,
                "memory_budget": budget,
                "recall_target": recall_target,
                "k": k,
                "heldout": int(len(heldout_ids)),
                "recall": round(built.recall, 4),
                "tried": tried,
            },
            "generation": 0,
            "unicom_version": __version__,
        }
        previous = _read_config(out) if overwrite else None
        if previous is not None:
            config["generation"] = previous["generation"] + 1
        _write(out, config, built.index, heldout_ids, collection, collection.parts, previous)
        return cls(out, config, built.index)

    def add_parts(self, emb: str | os.PathLike | None = None) -> list[int]:
        """Add the parts of ``emb`` (default: the folder the index was built from) that it
        does not hold yet; returns their numbers.

        New parts must come after the indexed ones (ids are row numbers in part order), and
        the indexed parts must be unchanged. They are encoded with the quantizers trained at
        build time. For the compressed types a held-out sample of the new rows (added after
        the measurement) measures recall@k again, and the search parameter is raised if
        needed to keep the recall target.
        """
        emb = Path(emb or self.config["source"])
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
                heldout_ids = _choose_heldout(rng, count, additions.num_rows,
                                              _heldout_size(additions.num_rows, selection.get("heldout", 1000)))
                queries = additions.gather(heldout_ids, self.dims)
                truth = exact_neighbours(collection, queries, k, self.dims, heldout_ids)
                candidate = Candidate(self.type, self.config["params"], 0)
                blocks = additions.blocks(self.dims, desc="adding")
                search, recall, steps = _add_and_tune(index, candidate, blocks, heldout_ids, queries, truth, k, target)
                if recall < target:
                    logger.warning("after adding parts %s recall@%d is %.4f, below the target %s; rebuild with --rebuild "
                                   "to train the quantizers on the grown collection", new, k, recall, target)
                config["search"] = search
                config["selection"] = {**selection, "recall": round(recall, 4), "heldout_after_add": int(len(heldout_ids)),
                                       "steps_after_add": steps}
            _write(self.path, config, index, heldout_ids, additions, additions.parts, self.config)
        except BaseException:
            # the in-memory index may hold part of the new rows: take the one on disk again
            self.faiss_index = Index.load(self.path).faiss_index
            raise
        self._set_config(config)
        return [part.number for part in additions.parts]


def _build_one(collection: Collection, candidate: Candidate, dims: int, rng: np.random.Generator, heldout_ids: np.ndarray,
               queries: np.ndarray, truth: np.ndarray | None, k: int, target: float) -> _Built:
    start = time.perf_counter()
    wanted = train_rows(candidate)
    if wanted:
        pool = np.setdiff1d(np.arange(collection.num_rows, dtype=np.int64), heldout_ids, assume_unique=True)
        rows = np.sort(rng.choice(pool, size=min(wanted, len(pool)), replace=False))
        logger.info("training %s on %d rows", candidate.describe(), len(rows))
        sample = collection.gather(rows, dims)
        index = _new_faiss_index(candidate, dims, sample)
        index.train(sample)
    else:
        index = _new_faiss_index(candidate, dims)
    blocks = collection.blocks(dims, desc=f"adding ({candidate.type})")
    search, recall, steps = _add_and_tune(index, candidate, blocks, heldout_ids, queries, truth, k, target)
    return _Built(index, candidate, search, recall, steps, time.perf_counter() - start)


def _embedding_model(emb: Path) -> dict | None:
    """The model that embedded the collection, from ``unicom embed``'s configuration file, if any."""
    path = emb / "embed_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        return None
    return {"spec": config["model"], "pretrained": config.get("pretrained")}


def _read_config(path: Path) -> dict | None:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        return None
    return json.loads(config_path.read_text())


def _write(out: Path, config: dict, faiss_index, heldout_ids: np.ndarray | None, collection: Collection, parts: list[Part],
           previous: dict | None) -> None:
    """Write metadata parts, the faiss file, the held-out ids, then ``index.json`` (the commit).

    The faiss file has a new name per generation, so a reader or a killed job sees either the
    old configuration with its file or the new one with its file.
    """
    import faiss

    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        write_parquet_atomic(part_path(out / METADATA_FOLDER, "metadata", part.number), collection.metadata_table(part))
    config["file"] = _faiss_file(config["generation"])
    with atomic_path(out / config["file"]) as tmp:
        faiss.write_index(faiss_index, str(tmp))
    config["bytes"] = (out / config["file"]).stat().st_size
    if heldout_ids is not None:
        save_npy_atomic(out / HELDOUT_FILE, heldout_ids)
    write_json_atomic(out / CONFIG_FILE, config)
    if previous is not None and previous.get("file") and previous["file"] != config["file"]:
        (out / previous["file"]).unlink(missing_ok=True)
    kept = {part["number"] for part in config["parts"]}
    for stale in (out / METADATA_FOLDER).glob("metadata_*.parquet"):
        match = re.fullmatch(r"metadata_(\d+)\.parquet", stale.name)
        if match and int(match.group(1)) not in kept:
            stale.unlink()
