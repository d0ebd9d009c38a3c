"""The HTTP service of ``unicom serve``: a FastAPI app over one or more :class:`~unicom.search.index.Index`.

Routes (described with their request and reply models at ``/docs`` and ``/openapi.json``):

* ``GET /``                 the search page (``static/``: plain HTML, CSS and JavaScript);
* ``GET /healthz``          the indexes, their models and the limits;
* ``POST /search``          JSON ``{"text", "image" (base64), "like" (an id), "embedding",
  "text_weight", "k", "min_score", "deduplicate", "hide_duplicate_urls", "safe", "index", "modality",
  "aesthetic_score", "aesthetic_weight", "multilingual"}``, or multipart/form-data with the image as
  the file field ``image`` and the other keys as fields. One of ``image``/``like``/
  ``embedding`` and/or a ``text``; given both, the query is their weighted sum
  (:func:`unicom.search.queries.combine`). Answers ``{"results": [{"rank", "id", "score",
  "thumbnail", "link", <metadata>...}], "k", "index", "score_digits", "took_ms"}``, the
  ``thumbnail`` and ``link`` paths under ASGI's ``root_path`` (``unicom serve --root-path``:
  the prefix a proxy serves the app at);
* ``GET /thumbnail/{id}``   a JPEG thumbnail (aspect ratio kept) of item ``id``;
  ``GET /image/{id}`` the full image. Both read the image path in the index's metadata
  (relative to ``image_root``), or the webdataset shard (``shard`` and ``key`` columns) in
  the folder ``shards``; ``?index=NAME`` for an index but the first. The client names an
  id, never a path;
* clip-retrieval's back-end API, so its front end and ``ClipClient`` work unchanged:
  ``POST /knn-service``, ``GET /indices-list``, ``POST /metadata`` (see :class:`KnnRequest`).

Errors are JSON ``{"detail": "..."}`` with 400 (malformed request, or a query the model
cannot answer, such as a text for a model without a text tower), 404, 413 (too large: bytes
or pixels), 415 (not a supported image, or not multipart/JSON), 500 (an unexpected failure,
named by its type; the traceback goes to the log), 503 (no model, or too many queries waiting).

Uploaded images are decoded straight to the model's input (:mod:`unicom.search.uploads`)
before they wait for a batch; decoding uploads and thumbnails of items may hold at most
``max_decode_bytes`` of pixels (and the fetched images of items at URLs or in shards, for thumbnails and
``/image``) at a time. Concurrent queries are batched
(:mod:`unicom.search.batching`): each waits at most ``max_wait_ms`` for others, then up to
``batch_size`` of them go through the model and the index together, in one worker thread. Images of items come from
:mod:`unicom.search.item_images`; the request and reply models are in
:mod:`unicom.search.schemas`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
import urllib.parse
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from unicom import storage
from unicom.errors import FolderError, InputError
from unicom.search import queries, uploads
from unicom.search.batching import ByteBudget, HeldBodies, QueryBatcher
from unicom.search.index import Index, source_columns
from unicom.search.item_images import STORED_MEDIA_TYPES, ImageUnavailable, ItemImages, recorded_shard_columns
from unicom.search.metadata_rows import RebuiltIndexError
from unicom.search.schemas import Health, KnnRequest, KnnResult, MetadataItem, MetadataRequest, SearchReply, SearchRequest
from unicom.search.uploads import MAX_PIXELS, ModelInput

STATIC = Path(__file__).parent / "static"
logger = logging.getLogger(__name__)
MAX_DECODE_BYTES = 256 * 2**20  # pixels being decoded at once, in bytes
MAX_BODY_BYTES = 256 * 2**20  # request bodies held at once, in bytes (each counted BODY_COPIES times)
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small fields around the file
# ids per /metadata request, and images per /knn-service answer (each decodes a thumbnail); clip-retrieval's
# front end asks for tens, its download button for 10,000 results (it keeps their urls and captions)
MAX_METADATA_IDS = 1000
REPLY_CHUNK = 64 * 1024  # a reply made while it is sent goes out in pieces of about this many bytes
UNSUPPORTED_HEADER = "X-Unsupported-Options"
HIT_KEYS = ("rank", "score", "id", "thumbnail", "link")  # what a /search hit has besides the item's metadata
FORM_FIELDS = ("image", "text", "like", "text_weight", "k", "min_score", "deduplicate", "hide_duplicate_urls", "safe",
               "index", "modality", "aesthetic_score", "aesthetic_weight", "multilingual")  # /search as multipart/form-data


def _inline_scripts_allowed(page: Path) -> str:
    """The Content-Security-Policy sources that allow the inline scripts of ``page`` by their
    SHA-256 (the page's one: opened without its trailing slash, at ``/PREFIX`` behind a proxy that
    does not redirect, the page reloads itself at ``/PREFIX/`` so that its relative URLs resolve)."""
    scripts = re.findall(r"<script>(.*?)</script>", page.read_text(encoding="utf-8"), flags=re.S)
    return "".join(f" 'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)


PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob: http: https:; style-src 'self'; script-src 'self'"
               + _inline_scripts_allowed(STATIC / "index.html"))
DOCS_POLICY = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self' 'unsafe-inline'"


# --------------------------------------------------------------------------- requests


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


async def _read_body(request: Request, limit: int, why: str = "") -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes; ``why``: where
    the limit comes from, said in the answer."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _error(413, f"request body of {int(length)} bytes is larger than the limit of {limit} bytes{why}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _error(413, f"request body is larger than the limit of {limit} bytes{why}")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_k(value: Any, default: int, max_k: int, name: str = "k", limit: str = "") -> int:
    """``value`` as a number of results in 1..``max_k`` (``default`` when absent); ``limit``: where
    ``max_k`` comes from, said in the error."""
    if value is None or value == "":
        return default
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise _error(400, f"{name} must be an integer, got {value!r}") from None
    if not 1 <= k <= max_k:
        raise _error(400, f"{name} must be between 1 and {max_k}{limit}, got {k}")
    return k


def _parse_min_score(value: Any) -> float | None:
    """``value`` as the lowest score a result may have (a cosine similarity, -1..1), or None when absent."""
    if value is None or value == "":
        return None
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise _error(400, f"min_score must be a number, got {value!r}") from None
    if not -1 <= score <= 1:  # NaN too
        raise _error(400, f"min_score is a cosine similarity, from -1 to 1; got {value!r}")
    return score


def _parse_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value is None or value == "":
        return False
    if str(value).lower() in ("1", "true", "on", "yes"):
        return True
    if str(value).lower() in ("0", "false", "off", "no"):
        return False
    raise _error(400, f"{name} must be true or false, got {value!r}")


def _validation_message(error: ValidationError) -> str:
    parts = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "body"
        message = "unknown key; the keys are " + ", ".join(SearchRequest.model_fields) if problem["type"] == "extra_forbidden" \
            else problem["msg"]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


# The most values (numbers, strings, lists, objects) a JSON body may hold: an embedding needs
# its index's dims numbers, /metadata at most MAX_METADATA_IDS ids. Parsed, each value takes
# 30 to 60 bytes (a body of numbers would otherwise take about 16 times its length).
MAX_JSON_VALUES = 65_536
# The longest text query, in characters: a model reads the first few dozen tokens of a text
# (CLIP: 77), but its tokenizer reads the whole text first (open_clip: ~0.4 s a megabyte, in
# the thread that runs every query's batch)
MAX_TEXT_CHARS = 10_000
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def json_values(body: bytes) -> int:
    """At least the number of values in the JSON ``body``: its commas and openings outside
    strings, plus one (strings are skipped only when the quick count, strings included, is
    over :data:`MAX_JSON_VALUES`)."""
    def count(text: bytes) -> int:
        return text.count(b",") + text.count(b"[") + text.count(b"{") + 1

    values = count(body)
    return count(_JSON_STRING.sub(b'""', body)) if values > MAX_JSON_VALUES else values


def _json_text(body: bytes) -> str:
    """The text of a JSON body (UTF-8, -16 or -32, as :func:`json.loads` reads bytes), refused
    with 413 when it holds more than :data:`MAX_JSON_VALUES` values."""
    values = json_values(body)
    if values > MAX_JSON_VALUES:
        raise _error(413, f"the JSON body holds {values:,} values, more than the {MAX_JSON_VALUES:,} a request may "
                          f"have (an embedding needs as many numbers as its index's dims, /metadata at most "
                          f"{MAX_METADATA_IDS:,} ids); send fewer")
    try:
        return body.decode(json.detect_encoding(body), "surrogatepass")
    except UnicodeDecodeError as error:
        raise _error(400, f"the body is not valid JSON ({error})") from None


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise _error(400, f"the body is not valid JSON ({error})") from None
    except RecursionError:
        raise _error(400, "the body is JSON nested too deeply; send a flat JSON object") from None


async def _read_json(request: Request, limit: int, why: str = "", empty: str | None = None) -> Any:
    """The JSON value of the request's body (:func:`_read_body`; ``empty``: the 400 answer to an
    empty body, when it is not left to the parser). The body is held beside its text, then the
    text beside what it parses to: at most twice the body. Parsed in the event loop: a worker
    thread would not let the loop in sooner, each step being one call into C that holds
    Python's lock (13 MB of base64 in JSON: text 4 ms, value 8 ms); a base64 image in it is
    decoded in pieces by :func:`uploads.take_base64`, the loop let in between."""
    body = await _read_body(request, limit, why)
    if not body and empty is not None:
        raise _error(400, empty)
    text = _json_text(body)
    del body
    return _json_value(text)


# --------------------------------------------------------------------------- the app


class HeldResponse(Response):
    """A response whose body stays counted in ``budget`` (``held`` bytes) until it has been sent
    to the client, or the sending failed: a slow client holds the image's share of the decoding
    budget for as long as its bytes are in memory, not only while they were fetched."""

    def __init__(self, content: bytes, budget: ByteBudget, held: int, **options):
        super().__init__(content, **options)
        self.budget, self.held = budget, held

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            held, self.held = self.held, 0
            await self.budget.release(held)


@dataclass
class Served:
    """One index of the service, with the model of its collection."""

    name: str
    index: Index
    encoder: Any = None
    multilingual: Any = None  # a multilingual text model into the collection's space, or None
    columns: tuple[str, ...] | None = None  # the metadata columns its results carry (None: all)
    stored: dict[str, queries.StoredVectors] = field(init=False)
    model_input: ModelInput | None = field(init=False, default=None)
    _urls: bool | None = field(init=False, default=None)

    def __post_init__(self):
        # the vectors of each searched modality, read back for "more like this" and deduplication
        self.stored = {modality: queries.StoredVectors(self.index, modality) for modality in self.index.modalities}
        if self.encoder is not None:
            self.model_input = ModelInput(self.encoder.image_transform)

    @property
    def urls(self) -> bool:
        """Whether the metadata has a url column (``/search``'s ``hide_duplicate_urls``): read
        when first asked, so that starting the server reads no metadata."""
        if self._urls is None:
            try:
                self._urls = queries.has_column(self.index, queries.URL_COLUMN)
            except (InputError, OSError) as error:  # unreadable metadata: said by the requests that need it, not here
                logger.warning("%s: its metadata could not be read to see whether it has urls (%s)", self.name, error)
                return False
        return self._urls

    @property
    def text_reason(self) -> str | None:
        try:
            self.text_model(False)
        except InputError as error:
            return str(error)
        return None

    def text_model(self, multilingual: bool):
        """The model that embeds a text query: the multilingual one when asked for, or when the
        collection's model embeds no texts; else the collection's."""
        if multilingual and self.multilingual is None:
            raise InputError(f"multilingual: {self.name} has no multilingual text model (start the server with "
                             "--multilingual-model, a multilingual model of the collection's CLIP model); leave it out")
        if self.multilingual is not None and (multilingual or self.encoder is None or not self.encoder.has_text):
            return self.multilingual
        queries.require_text(self.encoder)
        return self.encoder


@dataclass
class Search:
    """One query waiting for its batch. ``vector``: an embedding or stored item, in the index's space."""

    served: Served
    k: int
    image: Any = None
    text: str | None = None
    text_encoder: Any = None  # the model of the text (default: the collection's)
    vector: np.ndarray | None = None
    text_weight: float = queries.TEXT_WEIGHT
    deduplicate: bool = False
    min_score: float | None = None  # results scoring below it are left out (fewer than k then)
    modality: str | None = None  # the index searched: image or text embeddings (default: the first)
    aesthetic: np.ndarray | None = None  # the embedding of an aesthetic rating the query moves towards
    aesthetic_weight: float = 0.0  # how far: query + weight x embedding, re-normalised
    remove: Any = None  # (result ids, their vectors) -> which to leave out (violence detector, safety column)


def _query_vectors(batch: list[Search]) -> list[np.ndarray | Exception]:
    """One query vector per search: one model call per model for the images, one for the texts."""
    images: dict[int, list[int]] = {}
    texts: dict[int, list[int]] = {}
    encoders: dict[int, Any] = {}
    for position, search in enumerate(batch):
        if search.image is not None:
            encoders[id(search.served.encoder)] = search.served.encoder
            images.setdefault(id(search.served.encoder), []).append(position)
        if search.text is not None:
            text_encoder = search.served.encoder if search.text_encoder is None else search.text_encoder
            encoders[id(text_encoder)] = text_encoder
            texts.setdefault(id(text_encoder), []).append(position)
    image_rows: dict[int, np.ndarray] = {}
    text_rows: dict[int, np.ndarray] = {}
    for key, positions in images.items():
        # the index's dims are applied below, per search (indexes sharing a model may keep different dims)
        embedded = queries.image_vectors(encoders[key], [batch[p].image for p in positions], encoders[key].embedding_dim,
                                         batch_size=len(positions))
        image_rows.update(zip(positions, embedded))
    for key, positions in texts.items():
        embedded = queries.text_vectors(encoders[key], [batch[p].text for p in positions], encoders[key].embedding_dim)
        text_rows.update(zip(positions, embedded))
    vectors: list[np.ndarray | Exception] = []
    for position, search in enumerate(batch):
        dims = search.served.index.modality_dims(search.modality)
        try:
            base = search.vector if search.vector is not None else image_rows.get(position)
            if base is not None and base.shape[-1] != dims:
                base = queries.first_dims(base[None, :], dims, "the query", fix=queries.QUERY_FIX)[0]
            text = text_rows.get(position)
            if text is not None:
                text = queries.first_dims(text[None, :], dims, "the text query", fix=queries.QUERY_FIX)[0]
            vector = queries.combine(base, text, search.text_weight)[0] if base is not None and text is not None \
                else (base if base is not None else text)
            if search.aesthetic is not None:
                vector = queries.with_aesthetic(vector, search.aesthetic, search.aesthetic_weight)
            vectors.append(vector)
        except InputError as error:
            vectors.append(error)
    return vectors


def run_searches(batch: list[Search]) -> list[Any]:
    """(scores, ids) of each search of a batch, or its error: one model call per model and kind, one
    index search per index. The results are turned into replies outside, so that reading
    metadata and thumbnails never holds up the model."""
    vectors = _query_vectors(batch)
    answers: list[Any] = [None] * len(batch)
    by_index: dict[tuple[str, str], list[int]] = {}
    for position, vector in enumerate(vectors):
        if isinstance(vector, Exception):
            answers[position] = vector
        else:
            search = batch[position]
            modality = search.modality or search.served.index.modalities[0]
            by_index.setdefault((search.served.name, modality), []).append(position)
    for (_, modality), positions in by_index.items():
        served = batch[positions[0]].served
        found = queries.search(served.index, np.stack([vectors[p] for p in positions]), [batch[p].k for p in positions],
                               deduplicate=[batch[p].deduplicate for p in positions], stored=served.stored[modality],
                               modality=modality, remove=[batch[p].remove for p in positions],
                               min_score=[batch[p].min_score for p in positions])
        for position, result in zip(positions, found):
            answers[position] = result
    return answers


def _shard_columns(served: Mapping[str, "Served"]):
    """The columns of the parquet shards the collections were embedded from (recorded by
    ``unicom embed``, kept by ``unicom index``): one set for the one ``--shards`` folder."""
    from unicom.formats.embeddings import SHARD_COLUMNS

    named = {name: item.index.config.get(SHARD_COLUMNS) or {} for name, item in served.items()}
    if len({json.dumps(columns, sort_keys=True) for columns in named.values()}) > 1:
        shown = "; ".join(f"{name}: {columns or 'the usual names'}" for name, columns in named.items())
        raise InputError(f"the indexes were embedded from parquet shards by other columns ({shown}), and --shards is "
                         "one folder read one way: serve them apart")
    return recorded_shard_columns(next(iter(served.values())).index)


def create_app(
    index: Index | Mapping[str, Index],
    encoder=None,
    *,
    batch_size: int = 32,
    max_wait_ms: float = 10.0,
    max_upload_bytes: int = 10 * 2**20,
    max_pixels: int = MAX_PIXELS,
    max_decode_bytes: int = MAX_DECODE_BYTES,
    max_body_bytes: int = MAX_BODY_BYTES,
    default_k: int = 10,
    max_k: int = 100,
    max_result_ids: int = 10_000,
    image_root: str | Path | None = None,
    shards: str | Path | None = None,
    thumbnail_cache: int = 1024,
    cors_origins: list[str] | tuple[str, ...] = (),
    allow_image_urls: bool = False,
    aesthetic_embeddings: np.ndarray | None = None,
    violence_prompts: np.ndarray | None = None,
    safety_column: str | None = None,
    unsafe_values: Sequence[str] = queries.UNSAFE_VALUES,
    multilingual=None,
    columns: Mapping[str, Sequence[str]] | None = None,
) -> FastAPI:
    """The FastAPI app of ``unicom serve`` (see the module docstring).

    index: an :class:`Index`, or names -> indexes (the first is the default; the names are
    clip-retrieval's ``indice_name``). encoder: the :class:`~unicom.models.encoders.Encoder`
    of the collections (or names -> encoders), or None to accept embeddings and item ids
    only; each is checked against its index (:func:`unicom.search.queries.check_model`).
    image_root: folder that relative image paths of the metadata are read from (default:
    the current folder). shards: folder of the webdataset shards the collections were
    embedded from. max_decode_bytes: what images being decoded may hold at once (uploads'
    and thumbnails' pixels, fetched files of items). max_body_bytes: what the bodies of
    requests being answered may hold at once (:class:`~unicom.search.batching.HeldBodies`), and
    the files fetched for ``image_url`` queries, in a budget of their own
    (:func:`~unicom.search.uploads.fetch_held`).
    cors_origins: origins whose pages may call the API (``"*"``: any), as
    clip-retrieval's front end served from elsewhere does. allow_image_urls: let
    ``/knn-service`` fetch ``image_url`` queries (the server then makes requests a client chose).
    aesthetic_embeddings (10, D) and violence_prompts (P, D): LAION's files for the model
    (:func:`~unicom.search.queries.load_aesthetic_embeddings`,
    :func:`~unicom.search.queries.load_violence_prompts`), with which ``/knn-service``
    honours ``aesthetic_score``/``aesthetic_weight`` and ``use_violence_detector``.
    safety_column: the metadata column (LAION-5B's ``punsafe``, LAION-400M's ``NSFW``) by
    which ``use_safety_model`` leaves results out (:func:`~unicom.search.queries.unsafe`,
    with ``unsafe_values`` for a text column). ``/search`` with ``"safe": true`` applies both
    filters the server has (``/healthz``'s ``safe_search`` says whether it has one).
    multilingual: a multilingual text model into the collections' space
    (:func:`unicom.models.multilingual.load_multilingual`; or names -> models), which embeds
    the texts of ``/knn-service``'s ``use_mclip`` and ``/search``'s ``multilingual`` (and
    every text of an index whose own model embeds none).
    columns: names -> the metadata columns that index's results carry (clip-retrieval's
    ``columns_to_return``; every column of the others), each checked against its metadata.
    """
    indexes = dict(index) if isinstance(index, Mapping) else {storage.name(index.location) or "index": index}
    if not indexes:
        raise InputError("no index to serve")
    if not 1 <= default_k <= max_k:
        raise InputError(f"default_k {default_k} (-k) must be between 1 and max_k {max_k} (--max-k)")
    encoders = dict(encoder) if isinstance(encoder, Mapping) else {name: encoder for name in indexes}
    multilinguals = dict(multilingual) if isinstance(multilingual, Mapping) else {name: multilingual for name in indexes}
    served: dict[str, Served] = {}
    for name, item in indexes.items():
        model = encoders.get(name)
        if model is not None:
            queries.check_model(item, model)
        if multilinguals.get(name) is not None:
            queries.check_text_model(item, multilinguals[name])
        returned = (columns or {}).get(name)
        if returned is not None:
            queries.check_columns(name, item, returned)
        served[name] = Served(name, item, model, multilinguals.get(name), None if returned is None else tuple(returned))
    queries.check_filters({name: item.index for name, item in served.items()}, aesthetic_embeddings, violence_prompts,
                          safety_column)
    default = next(iter(served))
    images = ItemImages(image_root, shards, thumbnail_cache, _shard_columns(served) if shards is not None else None)
    batcher = QueryBatcher(run_searches, max_batch=batch_size, max_wait=max_wait_ms / 1000)
    decoding = ByteBudget(max_decode_bytes)

    # a JSON body carries its image as base64, a third larger than the file
    base64_body_limit = (max_upload_bytes * 4 // 3 + MULTIPART_OVERHEAD,
                         f": an image of at most {max_upload_bytes} bytes (--max-upload-mb) as base64")

    def pick(name: str | None, key: str = "index") -> Served:
        if name is None or name == "":
            return served[default]
        if name not in served:
            raise _error(404, f"{key} {name!r}: no such index; the indexes are {', '.join(served)}")
        return served[name]

    def item_url(route: str, target: Served, item_id: int, root_path: str) -> str:
        """The path of an item's image, under the path prefix a proxy serves this app at (``root_path``)."""
        query = "" if target.name == default else f"?index={urllib.parse.quote(target.name)}"
        return f"{root_path}/{route}/{item_id}{query}"

    async def decode_upload(data: bytes, name: str, target: Served):
        if target.encoder is None:
            raise _error(503, 'this server has no model for image queries; send {"embedding": [...]} or {"like": id} instead')
        kind, size, mode = uploads.probe_image(data, name, max_upload_bytes, max_pixels)
        held = target.model_input.held_bytes(size, mode, kind)
        return await decoding.run(held, uploads.decode_for_model, data, name, target.model_input, size[0] * size[1])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await batcher.close()

    app = FastAPI(
        title="unicom search",
        description="Search an image collection by text, image, item or embedding; clip-retrieval's back-end API.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.batcher = batcher
    app.state.index = served[default].index
    app.state.decoding = decoding

    @app.exception_handler(ImageUnavailable)
    async def image_unavailable(request: Request, error: ImageUnavailable):
        return JSONResponse({"detail": error.detail}, status_code=error.status_code)

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError):
        if isinstance(error, FolderError):  # the served index's files, not the request: the server failed
            logger.error("%s %s: %s", request.method, request.url.path, error)
            rebuilt = [name for name, item in served.items() if isinstance(error, RebuiltIndexError)
                       and item.index.config.get("build") == error.loaded]
            if rebuilt:  # the client can be told which index and what to do, without the server's paths
                return JSONResponse({"detail": f"index {rebuilt[0]!r} was rebuilt since this server loaded it; restart "
                                               "`unicom serve` to serve the rebuilt index"}, status_code=503)
            return server_failure(error)
        return JSONResponse({"detail": str(error)}, status_code=400)

    def server_failure(error: Exception) -> JSONResponse:
        # JSON as every other error, so that clients can show it; the message goes to the server's log.
        # It may hold server paths: not sent.
        return JSONResponse({"detail": f"the server failed on this request ({type(error).__name__}); its log says why"},
                            status_code=500)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        return server_failure(error)  # Starlette raises the error again after this answer: its traceback is logged

    # inside the next middleware, whose headers its own answers (408, 413) take too
    app.state.bodies = ByteBudget(max_body_bytes)
    app.state.fetches = ByteBudget(max_body_bytes)  # image_url files: a budget of their own, taken while a body's is held
    app.add_middleware(HeldBodies, budget=app.state.bodies, limit=base64_body_limit[0], why=base64_body_limit[1])  # the largest

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Content-Security-Policy", PAGE_POLICY)
        return response

    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=[UNSUPPORTED_HEADER])

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _mount_docs(app)

    @app.get("/healthz", response_model=Health, summary="The indexes, their models and the limits")
    async def healthz():
        described = [
            {"name": s.name, "count": len(s.index), "dims": s.index.dims, "type": s.index.type,
             "model": None if s.encoder is None else s.encoder.name, "image_search": s.encoder is not None,
             "text_search": s.text_reason is None, "text_search_reason": s.text_reason,
             "modalities": list(s.index.modalities), "multilingual": s.multilingual is not None,
             "multilingual_model": None if s.multilingual is None else s.multilingual.name, "urls": s.urls}
            for s in served.values()
        ]
        return {
            "status": "ok",
            **described[0],
            "indices": described,
            "default_k": default_k,
            "max_k": max_k,
            "max_upload_bytes": max_upload_bytes,
            "max_pixels": max_pixels,
            "safe_search": violence_prompts is not None or safety_column is not None,
            "aesthetic": aesthetic_embeddings is not None,
            "queries": batcher.queries,
            "batches": batcher.batches,
        }

    # ------------------------------------------------------------------ our search

    def search_answer(scores: np.ndarray, ids: np.ndarray, target: Served, root_path: str) -> dict:
        found = target.index.hits(scores[None, :], ids[None, :])[0]
        hits = [queries.json_value(source_columns(hit, ("thumbnail", "link"))) for hit in found]
        for hit in hits:
            local = images.has_image(hit)
            hit["thumbnail"] = item_url("thumbnail", target, hit["id"], root_path) if local else None
            url = hit.get("url")
            hit["link"] = item_url("image", target, hit["id"], root_path) if local else (
                url if isinstance(url, str) and url.startswith(("http://", "https://")) else None)
        if target.columns is not None:  # columns_to_return: the others left out, once the links are made
            hits = [{key: value for key, value in hit.items() if key in HIT_KEYS or key in target.columns} for hit in hits]
        return {"results": hits, "score_digits": queries.score_digits(scores)}

    def _parse_id(value: Any, target: Served) -> int:
        try:
            item_id = int(value)
        except (TypeError, ValueError):
            raise _error(400, f"like must be an item id (an integer), got {value!r}") from None
        if not 0 <= item_id < len(target.index):
            raise _error(404, f"no item {item_id} in this index (ids 0..{len(target.index) - 1})")
        return item_id

    def check_modality(target: Served, modality: str | None, key: str = "modality") -> str:
        """The embeddings searched: ``modality`` (image or text), refused where the index holds none of it."""
        if modality is None:
            return target.index.modalities[0]
        if modality not in target.index.modalities:
            how = (", or build the index with `unicom index --layout clip-retrieval` from embeddings with captions "
                   "(text_emb/) to search their captions") if modality == "text" else ""
            raise _error(400, f"{key} {modality!r}: {target.name} searches {' and '.join(target.index.modalities)} "
                              f"embeddings only; search {key} {target.index.modalities[0]!r}{how}")
        return modality

    async def build_search(target: Served, *, text, image_data, image_name, like, embedding, text_weight, k, deduplicate,
                           min_score: float | None = None, embedding_name: str = "embedding",
                           modality: str | None = None, multilingual: bool = False) -> Search:
        given = [name for name, value in (("image", image_data), ("like", like), ("embedding", embedding)) if value is not None]
        if len(given) > 1:
            raise _error(400, f"give one of image, like and embedding (with a text, if you like), not {' and '.join(given)}")
        if text is not None and not text.strip():
            text = None
        if text is not None and len(text) > MAX_TEXT_CHARS:
            raise _error(400, f"text: {len(text):,} characters, more than the {MAX_TEXT_CHARS:,} a query may have (the "
                              "model reads only its first words); send a shorter text")
        if not given and text is None:
            raise _error(400, 'nothing to search for: send a "text", an "image", a "like" item id or an "embedding"')
        text_encoder = None
        if text is not None or multilingual:  # asked for where there is none: refused, even without a text
            try:
                text_encoder = target.text_model(multilingual)
            except InputError as error:
                raise _error(400, str(error)) from None
        modality = check_modality(target, modality)
        search = Search(target, k, text=text, text_encoder=text_encoder, text_weight=queries.parse_text_weight(text_weight),
                        deduplicate=deduplicate, min_score=min_score, modality=modality)
        if embedding is not None:
            search.vector = _embedding_vector(embedding, target.index.modality_dims(modality), embedding_name)
        elif like is not None:  # the item's vector in the embeddings searched: its caption's for text
            search.vector = (await asyncio.to_thread(target.stored[modality], [like]))[0]
        elif image_data is not None:
            search.image = await decode_upload(image_data, image_name, target)
        return search

    @app.post(
        "/search",
        response_model=SearchReply,
        summary="Search by text, image, item id or embedding (or an image/item/embedding with a text)",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": SearchRequest.model_json_schema()},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "image": {"type": "string", "format": "binary"},
                **{key: {"type": "string"} for key in FORM_FIELDS if key != "image"}}}},
        }}},
    )
    async def search(request: Request):
        start = time.perf_counter()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        k_query = request.query_params.get("k")
        if content_type == "multipart/form-data":
            body = await _read_body(request, max_upload_bytes + MULTIPART_OVERHEAD,
                                    f": an image of at most {max_upload_bytes} bytes (--max-upload-mb) and the form")
            if not body:
                raise _error(400, "empty request body; send an image as the multipart field 'image', or a field 'text'")
            form = uploads.parse_form(body, request.headers["content-type"])
            del body  # the image is copied out of it: a query waiting for its turn holds the image alone
            repeated = sorted({key for key in form.keys() if len(form.getlist(key)) > 1})
            if repeated:  # one would be searched and the others dropped unseen
                raise _error(400, f"form field {', '.join(map(repr, repeated))} given more than once; give each field once "
                                  "(one query per request)")
            upload = form.get("image")
            if upload is None and not str(form.get("text") or "").strip() and not form.get("like"):
                fields = sorted(set(form.keys()))
                empty = [key for key in ("like", "text") if key in fields]  # the page's text box, sent empty or blank
                if empty:
                    raise _error(400, f"nothing to search for: the field{'s' if len(empty) > 1 else ''} {', '.join(empty)} "
                                      "came empty; send a text, an image as the field 'image', or an item id as 'like'")
                raise _error(400, f"no field 'image' in the form (got {fields}); send the image as the field 'image'")
            image_data, image_name = None, None
            if upload is not None:
                if isinstance(upload, str):
                    raise _error(400, "the field 'image' must be a file upload, not text")
                image_name = upload.filename or "upload"
                declared = upload.content_type
                if declared and not declared.startswith("image/") and declared != "application/octet-stream":
                    raise _error(415, f"{image_name}: content type {declared} is not an image")
                image_data = upload.data
                if not image_data:
                    raise _error(400, f"{image_name}: the uploaded file is empty")
            unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
            if unknown:
                raise _error(400, f"unknown form field {', '.join(map(repr, unknown))}; the fields are "
                                  f"{', '.join(FORM_FIELDS)} (an embedding is sent as JSON)")
            target = pick(form.get("index") or request.query_params.get("index"))
            if upload is not None and target.encoder is None:
                raise _error(503, 'this server has no model for image queries; POST JSON {"embedding": [...]} instead')
            like = form.get("like")
            like = None if like in (None, "") else _parse_id(like, target)
            values = dict(text=form.get("text"), like=like, embedding=None, text_weight=form.get("text_weight"),
                          k=_parse_k(form.get("k", k_query), default_k, max_k), min_score=_parse_min_score(form.get("min_score")),
                          deduplicate=_parse_bool(form.get("deduplicate"), "deduplicate"),
                          modality=form.get("modality") or None,
                          multilingual=_parse_bool(form.get("multilingual"), "multilingual"))
            safe = _parse_bool(form.get("safe"), "safe")
            distinct_urls = _parse_bool(form.get("hide_duplicate_urls"), "hide_duplicate_urls")
            rating = (form.get("aesthetic_score"), form.get("aesthetic_weight"))
        elif content_type == "application/json":
            payload = await _read_json(request, *base64_body_limit,
                                       empty='empty request body; send JSON {"text": "..."} or {"embedding": [numbers]}')
            if not isinstance(payload, dict):
                raise _error(400, f'expected a JSON object such as {{"text": "a red car", "k": 10}}, got {type(payload).__name__}')
            try:
                request_model = SearchRequest.model_validate(payload)
            except ValidationError as error:
                raise _error(400, _validation_message(error)) from None
            del payload
            target = pick(request_model.index or request.query_params.get("index"))
            image_data = None
            if request_model.image is not None:  # decoded, the base64 text is not held while the query waits
                image_data = await uploads.take_base64(request_model, "image")
            image_name = "image"
            values = dict(text=request_model.text, like=None if request_model.like is None else _parse_id(request_model.like, target),
                          embedding=request_model.embedding, text_weight=request_model.text_weight,
                          k=_parse_k(request_model.k if request_model.k is not None else k_query, default_k, max_k),
                          min_score=_parse_min_score(request_model.min_score), deduplicate=request_model.deduplicate,
                          modality=request_model.modality, multilingual=request_model.multilingual)
            safe = request_model.safe
            distinct_urls = request_model.hide_duplicate_urls
            rating = (request_model.aesthetic_score, request_model.aesthetic_weight)
        else:
            raise _error(
                415,
                f"content type {content_type or 'none'} not accepted: send an image as multipart/form-data "
                'field \'image\', or application/json {"text": "..."} or {"embedding": [numbers]}',
            )
        if safe and violence_prompts is None and safety_column is None:
            raise _error(400, "safe: this server has no safety filter to apply (start it with --safety-column for the "
                              "metadata's safety column, or --violence-prompts); leave safe out")
        if distinct_urls and not target.urls:
            raise _error(400, f"hide_duplicate_urls: the metadata of {target.name} has no {queries.URL_COLUMN} column to "
                              "compare (/healthz's urls); leave it out")
        aesthetic = None
        if rating[0] not in (None, ""):  # refused, not ignored, where the server cannot honour it
            if aesthetic_embeddings is None:
                raise _error(400, "aesthetic_score: this server has no aesthetic embeddings to move the query towards "
                                  "(start it with --aesthetic-embeddings); leave aesthetic_score out")
            aesthetic = (aesthetic_embeddings[queries.aesthetic_rating(rating[0])], queries.aesthetic_weight(rating[1]))
        elif rating[1] not in (None, ""):
            raise _error(400, "aesthetic_weight says how far the query moves towards aesthetic_score's rating: give "
                              "aesthetic_score too, or leave it out")
        item = await build_search(target, image_data=image_data, image_name=image_name, **values)
        if aesthetic is not None:
            item.aesthetic, item.aesthetic_weight = aesthetic
        if safe or distinct_urls:
            item.remove = queries.result_filter(target.index, violence_prompts if safe else None,
                                                safety_column if safe else None, unsafe_values,
                                                queries.URL_COLUMN if distinct_urls else None)
        scores, ids = await batcher.submit(item)
        answer = await asyncio.to_thread(search_answer, scores, ids, target, request.scope.get("root_path", "").rstrip("/"))
        return JSONResponse({**answer, "k": item.k, "index": target.name,
                             "took_ms": round((time.perf_counter() - start) * 1000, 2)})

    # ------------------------------------------------------------------ images of items

    async def row_of(item_id: int, name: str | None) -> tuple[Served, dict]:
        target = pick(name)
        if not 0 <= item_id < len(target.index):
            raise _error(404, f"no item {item_id} in this index (ids 0..{len(target.index) - 1})")
        return target, await asyncio.to_thread(target.index.metadata, item_id)

    @app.get("/thumbnail/{item_id:int}", summary="A JPEG thumbnail of an item (aspect ratio kept)",
             responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(item_id: int, index: str | None = Query(None, description="the index (default: the first)")):
        target, row = await row_of(item_id, index)
        data = await images.thumbnail(target.name, row, item_id, decoding)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/image/{item_id:int}", summary="The full image of an item", responses={200: {"content": {"image/*": {}}}})
    async def full_image(item_id: int, index: str | None = Query(None, description="the index (default: the first)")):
        _, row = await row_of(item_id, index)
        source, kind, held = await images.stored(row, item_id, decoding)
        headers = {"Cache-Control": "max-age=3600"}
        media_type = STORED_MEDIA_TYPES[kind]
        if isinstance(source, bytes):  # an image fetched from a URL or a shard: held until sent to the client
            return HeldResponse(source, decoding, held, media_type=media_type, headers=headers)
        return FileResponse(source, media_type=media_type, headers=headers)

    # ------------------------------------------------------------------ clip-retrieval's back-end API

    def knn_metadata(row: dict, target: Served) -> dict:
        """clip-retrieval's metadata of one item: its columns, or those of ``columns_to_return``
        (:func:`pictured_reply` adds its image)."""
        return {key: queries.json_value(value) for key, value in row.items()
                if key != "id" and (target.columns is None or key in target.columns)}

    def pictured_reply(items: list[dict], metas: list[dict], rows: list[dict], ids: list[int], target: Served,
                       headers: dict | None = None) -> StreamingResponse:
        """The JSON list ``items`` (as :class:`JSONResponse` writes it), sent while it is made:
        the thumbnail of item i, added to ``metas[i]`` as base64 JPEG (``image``) when
        ``rows[i]`` has an image, is made just before the item is sent and dropped after, so
        that a client reading slowly holds up its own reply and holds no more than a few
        items of it in the server's memory (every picture at once was about 50 KB a result:
        40 clients that did not read replies of 400 pictures took +1.4 GB)."""
        async def body():
            parts, size = [b"["], 1
            for position, item in enumerate(items):
                meta = metas[position] if position < len(rows) else None
                if meta is not None and images.has_image(rows[position]):
                    try:
                        thumbnail = await images.thumbnail(target.name, rows[position], ids[position], decoding)
                        meta["image"] = base64.b64encode(thumbnail).decode()
                    except (ImageUnavailable, HTTPException):
                        pass  # a missing or unreadable file: no picture, as clip-retrieval does
                part = (b"," if position else b"") + json.dumps(
                    item, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
                if meta is not None:
                    meta.pop("image", None)
                parts.append(part)
                size += len(part)
                if size >= REPLY_CHUNK:
                    yield b"".join(parts)
                    parts, size = [], 0
            parts.append(b"]")
            yield b"".join(parts)

        return StreamingResponse(body(), media_type="application/json", headers=headers)

    def knn_answer(scores: np.ndarray, ids: np.ndarray, target: Served, num_images: int) -> tuple[list[dict], list[dict]]:
        """The results without their pictures, and the metadata rows of the first ``num_images``."""
        rows = target.index.metadata(ids[:num_images]) if num_images > 0 else []
        results = []
        for position, (score, item_id) in enumerate(zip(scores.tolist(), ids.tolist())):
            result = knn_metadata(rows[position], target) if position < len(rows) else {}
            result.update(id=item_id, similarity=score)
            results.append(result)
        return results, rows


    @app.post(
        "/knn-service",
        summary="clip-retrieval's k-NN query: text, image (base64), image_url or embedding_input",
        responses={200: {"model": list[KnnResult], "description": f"results, best first; options this server cannot honour "
                                                                  f"are named in the {UNSUPPORTED_HEADER} header"}},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": KnnRequest.model_json_schema()}}}},
    )
    async def knn_service(request: Request):
        # clip-retrieval's front end posts JSON without a JSON content type: read any body as JSON
        payload = await _read_json(request, *base64_body_limit)
        try:
            knn = KnnRequest.model_validate(payload)
        except ValidationError as error:
            raise _error(400, _validation_message(error)) from None
        del payload
        target = pick(knn.indice_name, "indice_name")
        check_modality(target, knn.modality)
        num_result_ids = knn.num_result_ids if knn.num_result_ids is not None else knn.num_images
        # ClipClient sends num_result_ids equal to num_images: name the key its user set
        k = _parse_k(num_result_ids, knn.num_images, max_result_ids,
                     "num_images" if num_result_ids == knn.num_images else "num_result_ids", " (the server's --max-result-ids)")
        unsupported = []
        if knn.use_safety_model and safety_column is None:
            unsupported.append("use_safety_model (no safety model: results are not filtered; --safety-column names the "
                               "metadata column that marks them)")
        if knn.use_violence_detector and violence_prompts is None:
            unsupported.append("use_violence_detector (no violence detector: results are not filtered; "
                               "--violence-prompts gives one)")
        aesthetic, aesthetic_weight = None, 0.0
        if knn.aesthetic_score not in (None, "") and aesthetic_embeddings is None:
            unsupported.append("aesthetic_score (no aesthetic embeddings: the query is not re-weighted; "
                               "--aesthetic-embeddings gives them)")
        elif knn.aesthetic_score not in (None, ""):
            aesthetic = aesthetic_embeddings[queries.aesthetic_rating(knn.aesthetic_score)]
            aesthetic_weight = queries.aesthetic_weight(knn.aesthetic_weight)
        if knn.num_images > MAX_METADATA_IDS:
            unsupported.append(f"num_images above {MAX_METADATA_IDS} (results past the {MAX_METADATA_IDS}th carry their "
                               "metadata without an image)")
        if knn.use_mclip and knn.text and target.multilingual is None:
            unsupported.append("use_mclip (no multilingual model: the text is embedded by the model's own text tower; "
                               "--multilingual-model gives one)")
        unknown = sorted(knn.model_extra or {})  # accepted, as clip-retrieval does, but not unseen (a misspelt num_images)
        if unknown:
            shown = ", ".join(json.dumps(key[:40]) for key in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            unsupported.append(f"{shown} (unknown key{'s' if len(unknown) > 1 else ''}: ignored)")
        # clip-retrieval's order: a text first, then an image or its URL, then an embedding
        values = dict(text=None, image_data=None, image_name="image", like=None, embedding=None)
        fetched = 0  # the bytes of a fetched image_url held in the fetches budget
        if knn.text and knn.text.strip():  # a blank text gives way to the query that follows, as an absent one
            values["text"] = knn.text
        elif knn.image:
            values["image_data"] = await uploads.take_base64(knn, "image")
        elif knn.image_url:
            if not allow_image_urls:
                raise _error(400, "image_url: this server does not fetch URLs; send the image itself as base64 in "
                                  "'image' (or start the server with --allow-image-urls)")
            values["image_data"], fetched = await uploads.fetch_held(knn.image_url, max_upload_bytes, app.state.fetches)
            values["image_name"] = knn.image_url
        elif knn.embedding_input is not None:
            values["embedding"] = knn.embedding_input
        else:
            raise _error(400, "must fill one of text, image, image_url and embedding_input")
        try:
            item = await build_search(target, text_weight=None, k=k, deduplicate=knn.deduplicate,
                                      embedding_name="embedding_input", modality=knn.modality,
                                      multilingual=knn.use_mclip and target.multilingual is not None, **values)
        finally:
            values["image_data"] = None
            await app.state.fetches.release(fetched)
        item.aesthetic, item.aesthetic_weight = aesthetic, aesthetic_weight
        item.remove = queries.result_filter(
            target.index, violence_prompts if knn.use_violence_detector else None,
            safety_column if knn.use_safety_model else None, unsafe_values)
        scores, ids = await batcher.submit(item)
        results, rows = await asyncio.to_thread(knn_answer, scores, ids, target, max(0, knn.num_images))
        pictured = min(len(rows), MAX_METADATA_IDS)
        headers = {UNSUPPORTED_HEADER: ", ".join(unsupported)} if unsupported else None
        return pictured_reply(results, results, rows[:pictured], ids[:pictured].tolist(), target, headers)

    @app.get("/indices-list", response_model=list[str], summary="clip-retrieval's list of index names")
    async def indices_list():
        return list(served)

    @app.post(
        "/metadata",
        response_model=list[MetadataItem],
        summary="clip-retrieval's metadata of items by id",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": MetadataRequest.model_json_schema()}}}},
    )
    async def metadata(request: Request):
        payload = await _read_json(request, 1 << 20)
        try:
            wanted = MetadataRequest.model_validate(payload)
        except ValidationError as error:
            raise _error(400, _validation_message(error)) from None
        if len(wanted.ids) > MAX_METADATA_IDS:
            raise _error(400, f"ids: {len(wanted.ids)} ids, more than the limit of {MAX_METADATA_IDS} per request; ask for "
                              "them in several requests")
        target = pick(wanted.indice_name, "indice_name")
        bad = [item_id for item_id in wanted.ids if not 0 <= item_id < len(target.index)]
        if bad:
            raise _error(404, f"no item {bad[0]} in {target.name} (ids 0..{len(target.index) - 1})")

        def read() -> tuple[list[dict], list[dict]]:
            rows = target.index.metadata(np.asarray(wanted.ids, dtype=np.int64)) if wanted.ids else []
            return [{"id": item_id, "metadata": knn_metadata(row, target)} for item_id, row in zip(wanted.ids, rows)], rows

        items, rows = await asyncio.to_thread(read)
        return pictured_reply(items, [item["metadata"] for item in items], rows, wanted.ids, target)

    return app


def _embedding_vector(values: list[float], dims: int, name: str = "embedding") -> np.ndarray:
    """The first ``dims`` numbers of a query embedding as a unit float32 vector; ``name``: its key, said in errors."""
    if not values:
        raise _error(400, f'"{name}" must be a non-empty list of numbers')
    if len(values) < dims:
        raise _error(400, f'"{name}" has {len(values)} numbers, the index needs at least {dims}')
    with np.errstate(over="ignore"):
        vector = np.asarray(values[:dims], dtype=np.float32)
    if not np.isfinite(vector).all():
        position = int(np.flatnonzero(~np.isfinite(vector))[0])
        raise _error(400, f'"{name}": number {position} ({values[position]!r}) is not a finite float32 number')
    if not vector.any():
        raise _error(400, f'"{name}" is zero in its first {dims} numbers: it has no direction to search')
    try:
        return queries.first_dims(vector[None, :], dims, f'"{name}"', fix=queries.QUERY_FIX)[0]
    except InputError as error:
        raise _error(400, str(error)) from None


def _mount_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI over ``/openapi.json``, from the swagger-ui-bundle-v2 package (no CDN).
    The page names both by relative URLs, so that it works under any path prefix of a proxy."""
    from fastapi.openapi.docs import get_swagger_ui_html

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # the page then loads Swagger UI from its CDN
        swagger_ui_path = None
    if swagger_ui_path is not None:
        app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")
        assets = {"swagger_js_url": "docs-assets/swagger-ui-bundle.js", "swagger_css_url": "docs-assets/swagger-ui.css",
                  "swagger_favicon_url": "docs-assets/favicon-32x32.png"}
        policy = DOCS_POLICY
    else:
        assets, policy = {}, None

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        page = get_swagger_ui_html(openapi_url=app.openapi_url.lstrip("/"), title=f"{app.title}: API", **assets)
        if policy is not None:
            page.headers["Content-Security-Policy"] = policy
        else:  # the CDN's scripts and styles
            page.headers["Content-Security-Policy"] = "default-src 'self' https:; script-src 'self' 'unsafe-inline' https:"
        return page
