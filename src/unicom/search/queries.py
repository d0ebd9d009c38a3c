"""Queries of an index: texts, images, stored items and embeddings as vectors of its space.

An :class:`~unicom.search.index.Index` searches unit vectors of its ``dims`` dimensions.
``unicom search`` and ``unicom serve`` turn every kind of query into one:

* an image, embedded by the model that embedded the collection (:func:`image_vectors`);
* a text, embedded by that model's text tower (:func:`text_vectors`), which only models
  whose image and text embeddings share one space have (open_clip models, and model folders
  that keep such a backbone's space); others are refused with the reason;
* a stored item ("more like this"): its vector read back from the index
  (:class:`StoredVectors`; exact for flat and HNSW indexes, the decoded code for IVF-PQ);
* an embedding given as numbers;
* an image (or item, or embedding) and a text together: ``(1 - w)·image + w·text`` of the
  two unit vectors, re-normalised (:func:`combine`; ``w`` is the text weight).

:func:`check_model` refuses a model whose weights are not the ones recorded when the
collection was embedded. :func:`near_duplicates` finds results that repeat an earlier
one (clip-retrieval's rule), :func:`score_digits` how many decimals tell scores apart, and
:func:`json_value` turns metadata values into what JSON carries.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Mapping, Sequence

import numpy as np

from unicom.errors import InputError
from unicom.formats.embeddings import WEIGHTS_CHECKSUM
from unicom.search.collection import QUERY_FIX, first_dims

TEXT_WEIGHT = 0.5  # image and text count equally in a combined query
DUPLICATE_SIMILARITY = 0.94  # clip-retrieval's threshold for near-duplicate results
_SIMILARITIES = 1 << 21  # similarities (and so links) near_duplicates holds at once: 8 MiB of float32
LOOK_FURTHER = 16  # a deduplicated search reads at most this many times k results

_digests: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def weights_digest(encoder) -> str:
    """``encoder.weights_sha256()``, computed once per encoder object."""
    digest = _digests.get(encoder)
    if digest is None:
        digest = _digests[encoder] = encoder.weights_sha256()
    return digest


def check_model(index, encoder) -> None:
    """Raise :class:`InputError` unless ``encoder`` can be the model that embedded ``index``'s collection.

    Its embeddings must have the collection's dimension, and its weights the digest that
    ``unicom embed`` recorded (indexes of folders without one are only checked for the
    dimension). A model without weights is built from a fixed seed (:func:`unicom.models.encoders.load_encoder`),
    so it matches while timm or open_clip build it the same way.
    """
    recorded_model = index.config.get("model") or {}
    expected = source_dims(index)
    if encoder.embedding_dim != expected:
        hint = f" ({recorded_model['spec']})" if recorded_model.get("spec") else ""
        raise InputError(
            f"{encoder.name} gives {encoder.embedding_dim}-dimensional embeddings, but {index.location} was built from "
            f"{expected}-dimensional ones; query with the model that embedded the collection{hint}"
        )
    recorded = recorded_model.get(WEIGHTS_CHECKSUM)
    if not recorded:
        return
    actual = weights_digest(encoder)
    if actual == recorded:
        return
    spec, pretrained = recorded_model.get("spec"), recorded_model.get("pretrained")
    options = f"--model {spec}" + (f" --pretrained {pretrained}" if pretrained else "")
    raise InputError(
        f"{index.location}: the collection was embedded by {spec}{f' ({pretrained})' if pretrained else ''} with weights "
        f"sha256 {recorded[:16]}…, but {encoder.name} has other weights (sha256 {actual[:16]}…), whose embeddings are "
        f"not comparable. Query with the weights that embedded it ({options}); if those were random weights (no "
        "--pretrained), they are not the ones built now (another timm or open_clip version builds them otherwise, "
        "and earlier unicom versions drew them unseeded): save the model's weights, embed the collection with them "
        "and index it again"
    )


def query_encoder(index, encoder):
    """``encoder`` as ``index``'s image queries are embedded: averaged with each image's mirror
    (:class:`unicom.models.encoders.FlipAveraged`) and at several scales
    (:class:`unicom.models.encoders.MultiScale`) where the collection's embeddings were
    (``unicom embed --flip``, ``--scales``, recorded in the index's ``model``), else as it is."""
    from unicom.formats.embeddings import FLIP, SCALES
    from unicom.models.encoders import with_views

    model = index.config.get("model") or {}
    return with_views(encoder, bool(model.get(FLIP)), model.get(SCALES))


def source_dims(index) -> int:
    """The dimensions of the embeddings the index was built from (an index may keep their first ones only)."""
    return index.config.get("source_dims", index.dims)


def check_text_model(index, encoder) -> None:
    """Raise :class:`InputError` unless the text model ``encoder`` (a multilingual one) gives
    embeddings of ``index``'s collection's dimensions. That it shares the collection's space
    is the user's word: a multilingual model is trained into one CLIP model's space."""
    if encoder.embedding_dim != source_dims(index):
        raise InputError(
            f"{encoder.name} gives {encoder.embedding_dim}-dimensional text embeddings, but {index.location} was built from "
            f"{source_dims(index)}-dimensional ones; give the multilingual model trained into the space of the model that "
            "embedded the collection (M-CLIP/XLM-Roberta-Large-Vit-L-14 for ViT-L/14, M-CLIP/XLM-Roberta-Large-Vit-B-32 "
            "for ViT-B/32)"
        )


def recorded_text_model(index) -> tuple[str, str | None] | None:
    """(spec, weights digest) of the multilingual text model that embedded ``index``'s captions
    (``unicom embed --text-model``), or None where it records none."""
    recorded = index.config.get("text_model") or {}
    return (recorded["spec"], recorded.get(WEIGHTS_CHECKSUM)) if recorded.get("spec") else None


def check_recorded_text_model(index, encoder) -> None:
    """Raise :class:`InputError` unless the text model ``encoder``, loaded from the spec that
    ``index`` records (:func:`recorded_text_model`), has the weights that embedded its captions."""
    spec, recorded = recorded_text_model(index)
    actual = weights_digest(encoder)
    if recorded and actual != recorded:
        raise InputError(
            f"{index.location}: its captions were embedded by the text model {spec} with weights sha256 {recorded[:16]}…, "
            f"but {spec} now has other weights (sha256 {actual[:16]}…); give the multilingual model for its queries "
            "with --multilingual-model, or --multilingual-model none to query without one"
        )


def require_text(encoder) -> None:
    """Raise :class:`InputError` naming the model and why, unless it embeds texts into its image space."""
    if encoder is None:
        raise InputError("this index has no model to embed texts; query with an embedding, or give the model (--model)")
    if not encoder.has_text:
        raise InputError(
            f"text queries need a text tower whose embeddings share the collection's space: {encoder.name} has none "
            f"({encoder.no_text_reason}); query with images, item ids or embeddings"
        )


def image_vectors(encoder, images: Sequence, dims: int, batch_size: int = 32) -> np.ndarray:
    """PIL images or paths -> float32 (N, dims) unit rows, in the order given."""
    from unicom.embed import embed_images

    if not images:
        return np.zeros((0, dims), dtype=np.float32)
    return first_dims(embed_images(encoder, list(images), batch_size=batch_size, num_workers=0), dims, "image queries",
                      fix=QUERY_FIX)


def text_vectors(encoder, texts: Sequence[str], dims: int) -> np.ndarray:
    """Texts -> float32 (N, dims) unit rows from the text tower (see :func:`require_text`)."""
    from unicom.embed import embed_texts

    if not texts:
        return np.zeros((0, dims), dtype=np.float32)
    require_text(encoder)
    if encoder.embedding_dim < dims:  # a text tower of another width than the image tower
        raise InputError(f"{encoder.name}: its text embeddings have {encoder.embedding_dim} dimensions, the index {dims}")
    return first_dims(embed_texts(encoder, list(texts)), dims, "text queries", fix=QUERY_FIX)


def combine(vector: np.ndarray, text: np.ndarray, text_weight: float = TEXT_WEIGHT) -> np.ndarray:
    """``(1 - w)·vector + w·text`` of unit rows (N, d) and (N, d) (or (d,)), re-normalised: float32 (N, d)."""
    if not 0 <= text_weight <= 1:
        raise InputError(f"the text weight must be between 0 and 1, got {text_weight}")
    mixed = (1 - text_weight) * np.atleast_2d(vector) + text_weight * np.atleast_2d(text)
    norms = np.linalg.norm(mixed, axis=1, keepdims=True)
    if (norms < 1e-6).any():
        raise InputError("the image and the text point in opposite directions: their weighted sum is zero; change the text weight")
    return (mixed / norms).astype(np.float32)


AESTHETIC_RATINGS = 10  # LAION's aesthetic embeddings: rating0.npy .. rating9.npy
AESTHETIC_WEIGHT = 0.5  # the weight of the rating's embedding when a request gives none (clip-retrieval's front end's)
VIOLENT_PROMPT = 1  # the row of LAION's violence prompts that marks a result violent when it is the nearest
SAFETY_THRESHOLD = 0.5  # a result whose safety probability (LAION-5B's punsafe) is above it is left out
URL_COLUMN = "url"  # the metadata column of an item's web address (img2dataset's, LAION's)
UNSAFE_VALUES = ("NSFW",)  # the values of a text safety column (LAION-400M's NSFW tag) that leave a result out


def _vector_file(location: str, what: str) -> np.ndarray:
    """A float32 array stored as ``.npy`` at ``location`` (a local path or a URL)."""
    import io

    from unicom import storage

    try:
        data = storage.read_bytes(location)
    except OSError as error:
        raise InputError(f"{location}: cannot read {what} ({error})") from error
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as error:
        raise InputError(f"{location}: not a .npy array ({error}); {what} is a float array saved with numpy.save") from error
    if array.dtype.kind != "f" or not np.isfinite(array).all():
        raise InputError(f"{location}: {what} must hold finite floating-point numbers, found {array.dtype}")
    return array.astype(np.float32)


def load_aesthetic_embeddings(folder: str) -> np.ndarray:
    """LAION's aesthetic embeddings (``rating0.npy`` .. ``rating9.npy`` in ``folder``, a local
    folder or a URL, each one row of the model's dimension, as clip-retrieval reads them):
    float32 (10, D), row r the embedding of aesthetic rating r."""
    from unicom import storage

    rows = []
    for rating in range(AESTHETIC_RATINGS):
        location = storage.join(folder, f"rating{rating}.npy")
        array = _vector_file(location, f"the embedding of aesthetic rating {rating}")
        if array.size == 0 or (array.ndim == 2 and array.shape[0] != 1) or array.ndim > 2:
            raise InputError(f"{location}: expected one embedding, a (D,) or (1, D) array; found {array.shape}")
        rows.append(array.reshape(-1))
    sizes = sorted({len(row) for row in rows})
    if len(sizes) > 1:
        raise InputError(f"{folder}: the aesthetic embeddings have different dimensions {sizes}; take all ten from "
                         "one model's folder")
    return np.stack(rows)


def load_violence_prompts(location: str) -> np.ndarray:
    """LAION's violence detector for a CLIP (``violence_detection_vit_b_32.npy``: prompt
    embeddings, one a row): float32 (P, D), P >= 2; a result whose nearest prompt is row
    :data:`VIOLENT_PROMPT` is violent (clip-retrieval's rule)."""
    array = _vector_file(location, "the violence prompts")
    if array.ndim != 2 or array.shape[0] <= VIOLENT_PROMPT:
        raise InputError(f"{location}: expected prompt embeddings, a (P, D) array with P >= {VIOLENT_PROMPT + 1}; "
                         f"found {array.shape}")
    return array


def with_aesthetic(vector: np.ndarray, embedding: np.ndarray, weight: float) -> np.ndarray:
    """``vector + weight·embedding`` (the embedding's first ``len(vector)`` dimensions),
    re-normalised: a query moved towards an aesthetic rating, as clip-retrieval's back end
    moves it. float32 (d,)."""
    moved = np.asarray(vector, np.float32) + np.float32(weight) * embedding[: len(vector)]
    norm = np.linalg.norm(moved)
    if norm < 1e-6:
        raise InputError("the query and the aesthetic embedding cancel out: their weighted sum is zero; change "
                         "aesthetic_weight")
    return (moved / norm).astype(np.float32)


def violent(vectors: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """Bool (N,): which result ``vectors`` (N, d) have prompt :data:`VIOLENT_PROMPT` nearest
    among ``prompts`` (P, >= d; their first d dimensions)."""
    similarities = np.asarray(vectors, np.float32) @ prompts[:, : vectors.shape[1]].T
    return np.argmax(similarities, axis=1) == VIOLENT_PROMPT


def unsafe(values: Sequence, unsafe_values: Sequence[str] = UNSAFE_VALUES) -> np.ndarray:
    """Bool (N,): which results a safety column marks: a probability above
    :data:`SAFETY_THRESHOLD` (LAION-5B's ``punsafe``, the safety model's output, at
    clip-retrieval's threshold), or a text among ``unsafe_values`` (LAION-400M's ``NSFW`` tag).
    A result without a value is kept."""
    marked = np.zeros(len(values), dtype=bool)
    for position, value in enumerate(values):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            marked[position] = value > SAFETY_THRESHOLD
        elif isinstance(value, str):
            marked[position] = value in unsafe_values
    return marked


def aesthetic_rating(value, name: str = "aesthetic_score") -> int:
    """clip-retrieval's ``aesthetic_score``: a whole number 0..9 (as a number or its text);
    else an :class:`InputError` naming ``name``."""
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    rating = int(number) if number.is_integer() else None  # 9, "9" and "9.0" alike; NaN and inf are not whole
    if rating is None or not 0 <= rating < AESTHETIC_RATINGS:
        raise InputError(f"{name} must be a whole number from 0 to {AESTHETIC_RATINGS - 1}, got {value!r}")
    return rating


def aesthetic_weight(value, name: str = "aesthetic_weight") -> float:
    """clip-retrieval's ``aesthetic_weight``: a finite number (absent: :data:`AESTHETIC_WEIGHT`);
    else an :class:`InputError` naming ``name``."""
    if value is None or value == "":
        return AESTHETIC_WEIGHT
    try:
        weight = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        weight = None
    if weight is None or not np.isfinite(weight):
        raise InputError(f"{name} must be a number, got {value!r}")
    return weight


def result_filter(index, violence_prompts: np.ndarray | None, safety_column: str | None,
                  unsafe_values: Sequence[str] = UNSAFE_VALUES, distinct_column: str | None = None):
    """The ``remove`` of :func:`search` that leaves out the results LAION's violence prompts
    mark (:func:`violent`), those the metadata's ``safety_column`` marks (:func:`unsafe`),
    and those whose ``distinct_column`` (:data:`URL_COLUMN`: clip-retrieval's front end's
    "hide duplicate urls") repeats a better result's that the others keep (:func:`repeated`);
    any of them; None without any."""
    if violence_prompts is None and safety_column is None and distinct_column is None:
        return None

    def left_out(ids: np.ndarray, vectors) -> np.ndarray:
        marked = np.zeros(len(ids), dtype=bool)
        if violence_prompts is not None:
            marked |= violent(vectors(), violence_prompts)
        rows = index.metadata(ids) if safety_column is not None or distinct_column is not None else None
        if safety_column is not None:
            marked |= unsafe([row.get(safety_column) for row in rows], unsafe_values)
        if distinct_column is not None:
            kept = np.flatnonzero(~marked)
            marked[kept[repeated([rows[i].get(distinct_column) for i in kept])]] = True
        return marked

    return left_out


def repeated(values: Sequence) -> np.ndarray:
    """Bool (N,): True for each value equal to an earlier one (results best first: the best
    of each value is kept). A missing value (None, NaN, blank text) repeats nothing."""
    seen: set = set()
    out = np.zeros(len(values), dtype=bool)
    for position, value in enumerate(values):
        if value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value.strip()):
            continue
        key = value if isinstance(value, (str, int, float, bytes)) else repr(value)
        out[position] = key in seen
        seen.add(key)
    return out


def check_columns(name: str, index, columns: Sequence[str]) -> None:
    """Refuse ``columns`` (clip-retrieval's ``columns_to_return``) that the metadata of
    ``index`` (by ``name``) lacks, naming them and the columns it has."""
    have = metadata_columns(index)
    missing = [column for column in columns if column not in have]
    if len(index) and missing:
        raise InputError(f"{name}: columns_to_return names {', '.join(map(repr, missing))}, which its metadata lacks (its "
                         f"columns: {', '.join(have)})")


def metadata_columns(index) -> list[str]:
    """The metadata columns of ``index`` but ``id``, read from its first row (none for an empty index)."""
    return [key for key in (index.metadata(0) if len(index) else {}) if key != "id"]


def has_column(index, column: str) -> bool:
    """Whether the metadata of ``index`` has ``column``."""
    return column in metadata_columns(index)


def check_filters(indexes: Mapping[str, Any], aesthetic_embeddings: np.ndarray | None,
                  violence_prompts: np.ndarray | None, safety_column: str | None) -> None:
    """Refuse LAION's files made for another model (fewer dimensions than an index's
    embeddings) and a safety column the metadata of an index (by name) lacks."""
    for what, vectors in (("aesthetic embeddings", aesthetic_embeddings), ("violence prompts", violence_prompts)):
        narrow = [f"{name} ({index.modality_dims(modality)})" for name, index in indexes.items()
                  for modality in index.modalities if vectors is not None and vectors.shape[1] < index.modality_dims(modality)]
        if narrow:
            raise InputError(f"the {what} have {vectors.shape[1]} dimensions, fewer than the embeddings of {', '.join(narrow)}: "
                             "give the files made for the model of the collection")
    if safety_column is not None:
        for name, index in indexes.items():
            columns = metadata_columns(index)
            if len(index) and safety_column not in columns:
                raise InputError(f"--safety-column {safety_column}: the metadata of {name} has no such column (its columns: "
                                 f"{', '.join(columns)}); embed the shards with --metadata-fields {safety_column} to keep it")


def parse_text_weight(value, where: str = "text_weight") -> float:
    """A text weight from a request or option: a number in [0, 1] (default :data:`TEXT_WEIGHT`)."""
    if value is None or value == "":
        return TEXT_WEIGHT
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where} must be a number between 0 and 1, got {value!r}") from None
    if not 0 <= weight <= 1:
        raise InputError(f"{where} must be between 0 and 1, got {weight}")
    return weight


class StoredVectors:
    """The vectors an index holds, by id: float32 (N, dims), re-normalised.

    Flat and HNSW indexes hold the vectors themselves; IVF indexes (their direct map is
    built on first use: 8 bytes per vector) give the decoded code, and a leading
    dimension-reducing rotation is undone, so the result lives in the index's space.
    """

    def __init__(self, index, modality: str | None = None):
        self.index = index
        self.modality = modality or index.modalities[0]
        self._lock = threading.Lock()
        self._ready = False
        self._base = None
        self._positions: np.ndarray | None = None  # position of each id in an id-mapped index

    def _prepare(self) -> None:
        import faiss

        base = self.index.faiss_indexes[self.modality]
        if isinstance(base, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            external = faiss.vector_to_array(base.id_map)
            positions = np.full(int(external.max()) + 1 if len(external) else 0, -1, dtype=np.int64)
            positions[external] = np.arange(len(external), dtype=np.int64)
            self._positions = positions
            base = faiss.downcast_index(base.index)
        ivf = faiss.try_extract_index_ivf(base)
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.make_direct_map()
        self._base = base
        self._ready = True

    def __call__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.index)):
            bad = ids[(ids < 0) | (ids >= len(self.index))][0]
            raise InputError(f"no item {int(bad)} in this index (ids 0..{len(self.index) - 1})")
        with self._lock:
            if not self._ready:
                self._prepare()
            positions = ids if self._positions is None else self._positions[ids]
            vectors = self._base.reconstruct_batch(positions) if len(positions) else np.zeros((0, self.index.dims), np.float32)
        return first_dims(vectors, self.index.dims, "stored vectors", rows=ids,
                          fix="the index holds a vector it cannot search: rebuild it")


def search(index, vectors: np.ndarray, k: int | Sequence[int], *, deduplicate: bool | Sequence[bool] = False,
           stored: StoredVectors | None = None, modality: str | None = None,
           threshold: float = DUPLICATE_SIMILARITY,
           remove: Sequence | None = None,
           min_score: float | None | Sequence[float | None] = None, nprobe: int | None = None,
           ef_search: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Search ``index`` (its ``modality`` index: image or text embeddings, default the first)
    for query rows ``vectors`` (Q, ≥ dims): (scores, ids) per query, best first.

    ``k`` and ``deduplicate`` are one value for all queries or one per query. Results past
    the end of a small index are left out. With ``deduplicate``, near duplicates of better
    results (:func:`near_duplicates`, on the vectors ``stored`` reads back) are left out, and
    the search looks further until ``k`` results remain, the index is exhausted or
    ``LOOK_FURTHER``·k results were read (fewer than ``k`` are then returned: a collection may
    hold thousands of copies of one placeholder image, and reading them all costs without bound).
    ``remove``: per query, None or a function ``(ids (N,), vectors)`` that says (bool (N,))
    which results to leave out, ``vectors()`` giving their stored vectors (N, dims) when it
    needs them (:func:`violent`, :func:`unsafe`), after the near duplicates; the search looks
    further for them in the same way. ``min_score`` (one for all queries, or one per query;
    None: none): results scoring below it are left out too, and the search looks no further
    once they come (fewer than ``k`` are then returned; every result above it, however many:
    :meth:`~unicom.search.index.Index.search_range`).
    ``nprobe`` / ``ef_search``: the index's search parameter for these queries (as
    :meth:`~unicom.search.index.Index.search` takes them; default: the recorded one).
    """
    count = len(vectors)
    ks = [int(k)] * count if np.ndim(k) == 0 else [int(value) for value in k]
    unique = [bool(deduplicate)] * count if np.ndim(deduplicate) == 0 else [bool(value) for value in deduplicate]
    removers = list(remove) if remove is not None else [None] * count
    floors = [min_score] * count if min_score is None or np.ndim(min_score) == 0 else list(min_score)
    floors = [None if floor is None else np.float32(floor) for floor in floors]
    filtered = [dedup or remover is not None for dedup, remover in zip(unique, removers)]
    if any(filtered) and stored is None:
        stored = StoredVectors(index, modality)
    total = len(index)
    fetch = [min(total, wanted * (2 if more else 1)) for wanted, more in zip(ks, filtered)]
    if not count:
        return []
    tuning = {"nprobe": nprobe, "ef_search": ef_search}
    scores, ids = index.search(vectors, max(1, max(fetch)), modality=modality, **tuning)

    def kept(query_scores, query_ids, dedup, remover, floor):
        valid = query_ids >= 0
        if floor is not None:
            valid &= query_scores >= floor
        query_scores, query_ids = query_scores[valid], query_ids[valid]
        if (dedup or remover is not None) and len(query_ids):
            read: list[np.ndarray] = []

            def results() -> np.ndarray:  # read back once, and only when a filter needs them
                if not read:
                    read.append(stored(query_ids))
                return read[0]

            left_out = near_duplicates(results(), threshold) if dedup else np.zeros(len(query_ids), dtype=bool)
            if remover is not None:
                left_out |= remover(query_ids, results)
            query_scores, query_ids = query_scores[~left_out], query_ids[~left_out]
        return query_scores, query_ids

    found = []
    for row in range(count):
        floor = floors[row]
        query_scores, query_ids = kept(scores[row], ids[row], unique[row], removers[row], floor)
        wanted = fetch[row]
        limit = min(total, LOOK_FURTHER * ks[row])
        below = floor is not None and bool((scores[row] < floor).any())
        while len(query_ids) < ks[row] and wanted < limit and not below:  # the filters left out too many: look further
            wanted = min(limit, wanted * 4)
            more_scores, more_ids = index.search(vectors[row:row + 1], wanted, modality=modality, **tuning)
            below = floor is not None and bool((more_scores[0] < floor).any())
            query_scores, query_ids = kept(more_scores[0], more_ids[0], unique[row], removers[row], floor)
        found.append((query_scores[:ks[row]], query_ids[:ks[row]]))
    return found


def near_duplicates(vectors: np.ndarray, threshold: float = DUPLICATE_SIMILARITY) -> np.ndarray:
    """Bool (N,): True for each row that repeats an earlier one.

    Rows (unit vectors, best result first) are linked when their inner product is at least
    ``threshold``; in each connected group only the first row is kept, as clip-retrieval's
    back end deduplicates its results. The similarities are computed a block of rows at a
    time; once ``_SIMILARITIES`` links are held they are merged into groups, and a row's
    links to one group then count once: N copies of one image (N² links) take the memory of
    a block, not of every link.
    """
    n = len(vectors)
    if n < 2:
        return np.zeros(n, dtype=bool)
    x = np.asarray(vectors, dtype=np.float32)
    everyone = np.arange(n)
    group = everyone.copy()  # each row's group as merged so far, named by its first row
    sources, targets, held = [], [], 0
    step = max(1, _SIMILARITIES // n)
    for start in range(0, n, step):
        linked = x[start:start + step] @ x.T >= threshold  # (rows, n)
        if (group != everyone).any():  # groups were merged: a row's links to one group are one link
            order = np.argsort(group, kind="stable")
            names, bounds = np.unique(group[order], return_index=True)
            rows, columns = np.nonzero(np.logical_or.reduceat(linked[:, order], bounds, axis=1))
            columns = names[columns]
        else:
            rows, columns = np.nonzero(linked)
        sources.append(rows + start)
        targets.append(columns)
        held += len(rows)
        if held >= _SIMILARITIES:
            group, sources, targets, held = _merged_groups(group, sources, targets), [], [], 0
    return _merged_groups(group, sources, targets) != everyone


def _merged_groups(group: np.ndarray, sources: list[np.ndarray], targets: list[np.ndarray]) -> np.ndarray:
    """Each row's group (its first row) once rows ``group`` puts together and the links
    ``sources[i] - targets[i]`` are joined: connected components."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(group)
    everyone = np.arange(n)
    sources, targets = np.concatenate([everyone, *sources]), np.concatenate([group, *targets])
    graph = coo_matrix((np.ones(len(sources), dtype=np.int8), (sources, targets)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, labels, everyone)
    return first[labels]


def json_value(value):
    """A metadata value as JSON carries it: bytes as UTF-8 text, numpy scalars as numbers,
    NaN and infinities as None, dates and times as ISO 8601 text, durations as seconds,
    decimals as floats; lists and dicts value by value. Parquet metadata holds all of these
    (LAION's has NaN for missing numbers), and JSON has none of them."""
    import datetime
    import decimal

    if isinstance(value, dict):
        return {key: json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_value(item) for item in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, decimal.Decimal):
        value = float(value)
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def score_digits(scores, least: int = 3, most: int = 6) -> int:
    """Decimals (``least``..``most``) with which every two different ``scores`` print differently."""
    values = sorted({float(s) for s in np.asarray(scores, dtype=np.float64).reshape(-1) if np.isfinite(s)})
    for digits in range(least, most + 1):
        if len({round(v, digits) for v in values}) == len(values):
            return digits
    return most
