"""The HTTP service of ``unicom serve``: a FastAPI app over one or more :class:`~unicom.search.index.Index`.

Routes (described with their request and reply models at ``/docs`` and ``/openapi.json``):

* ``GET /``                 the search page (``static/``: plain HTML, CSS and JavaScript);
* ``GET /healthz``          the indexes, their models and the limits;
* ``POST /search``          JSON ``{"text", "image" (base64), "like" (an id), "embedding",
  "text_weight", "k", "deduplicate", "index"}``, or multipart/form-data with the image as
  the file field ``image`` and the other keys as fields. One of ``image``/``like``/
  ``embedding`` and/or a ``text``; given both, the query is their weighted sum
  (:func:`unicom.search.queries.combine`). Answers ``{"results": [{"rank", "id", "score",
  "thumbnail", "link", <metadata>...}], "k", "index", "score_digits", "took_ms"}``;
* ``GET /thumbnail/{id}``   a JPEG thumbnail (aspect ratio kept) of item ``id``;
  ``GET /image/{id}`` the full image. Both read the image path in the index's metadata
  (relative to ``image_root``), or the webdataset shard (``shard`` and ``key`` columns) in
  the folder ``shards``; ``?index=NAME`` for an index but the first. The client names an
  id, never a path;
* clip-retrieval's back-end API, so its front end and ``ClipClient`` work unchanged:
  ``POST /knn-service``, ``GET /indices-list``, ``POST /metadata`` (see :class:`KnnRequest`).

Errors are JSON ``{"detail": "..."}`` with 400 (malformed request, or a query the model
cannot answer, such as a text for a model without a text tower), 404, 413 (too large: bytes
or pixels), 415 (not a supported image, or not multipart/JSON), 503 (no model, or too many
queries waiting).

Uploaded images are decoded straight to the model's input (JPEG draft mode, then the
model's own resize and crop) before they wait for a batch; decoding itself may hold at
most ``max_decode_bytes`` of pixels at a time. Concurrent queries are batched: each waits
at most ``max_wait_ms`` for others, then up to ``batch_size`` of them go through the model
and the index together, in one worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import tarfile
import threading
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unicom.errors import InputError
from unicom.search import queries
from unicom.search.index import Index

STATIC = Path(__file__).parent / "static"
IMAGE_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP"}
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}
MAX_PIXELS = 40_000_000  # the largest image accepted, in pixels (the documented limit)
MAX_DECODE_BYTES = 256 * 2**20  # pixels being decoded at once, in bytes
TRIM_PIXELS = 4_000_000  # after decoding an image this large, freed memory goes back to the system
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small fields around the file
THUMBNAIL_SIZE = 256
PATH_COLUMNS = ("image_path", "path")
UNSUPPORTED_HEADER = "X-Unsupported-Options"
PAGE_POLICY = "default-src 'self'; img-src 'self' data: blob: http: https:; style-src 'self'; script-src 'self'"
DOCS_POLICY = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self' 'unsafe-inline'"


# --------------------------------------------------------------------------- request and reply models


class SearchRequest(BaseModel):
    """The JSON body of ``POST /search`` (multipart forms take the same keys as fields)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="a text, embedded by the model's text tower")
    image: str | None = Field(None, description="an image file, base64-encoded")
    like: int | None = Field(None, description="an item id: more like this item")
    embedding: list[float] | None = Field(None, description="a query embedding (at least the index's dimensions)")
    text_weight: float | None = Field(None, description="with a text and an image/item/embedding: the text's share, 0..1 "
                                                        f"(default {queries.TEXT_WEIGHT})")
    k: int | None = Field(None, description="number of results")
    deduplicate: bool = Field(False, description="drop results that nearly repeat a better one")
    index: str | None = Field(None, description="the index to search (default: the first)")


class Hit(BaseModel):
    """One result, with the item's metadata columns beside these."""

    model_config = ConfigDict(extra="allow")

    rank: int
    id: int
    score: float = Field(description="inner product of unit vectors (cosine similarity)")
    thumbnail: str | None = Field(description="URL of a thumbnail, when the image is on this server")
    link: str | None = Field(description="URL of the full image, or the item's own http(s) url")


class SearchReply(BaseModel):
    results: list[Hit]
    k: int
    index: str
    score_digits: int = Field(description="decimals that tell the scores apart")
    took_ms: float


class KnnRequest(BaseModel):
    """clip-retrieval's ``/knn-service`` request. The first of ``text``, ``image``/``image_url``,
    ``embedding_input`` that is given is the query, as in clip-retrieval."""

    model_config = ConfigDict(extra="allow")

    text: str | None = None
    image: str | None = Field(None, description="an image file, base64-encoded")
    image_url: str | None = Field(None, description="an http(s) URL of an image (only when the server allows it)")
    embedding_input: list[float] | None = None
    modality: str = Field("image", description="the embeddings searched: 'image'")
    num_images: int = Field(100, description="results that come with their metadata")
    num_result_ids: int | None = Field(None, description="results searched (default: num_images)")
    indice_name: str | None = Field(None, description="a name from /indices-list (default: the first)")
    deduplicate: bool = False
    use_mclip: bool = Field(False, description="unsupported: there is no multilingual text model; answered with the model's own")
    use_safety_model: bool = Field(False, description="unsupported: there is no safety model; results are not filtered")
    use_violence_detector: bool = Field(False, description="unsupported: there is no violence detector; results are not filtered")
    aesthetic_score: int | str | None = Field(None, description="unsupported: there are no aesthetic embeddings")
    aesthetic_weight: float | str | None = None


class KnnResult(BaseModel):
    """One result of ``/knn-service``: the item's metadata (the first ``num_images``), its
    thumbnail as base64 JPEG in ``image`` when the image is on this server, ``id`` and ``similarity``."""

    model_config = ConfigDict(extra="allow")

    id: int
    similarity: float


class MetadataRequest(BaseModel):
    ids: list[int]
    indice_name: str | None = None


class MetadataItem(BaseModel):
    id: int
    metadata: dict[str, Any]


class IndexHealth(BaseModel):
    name: str
    count: int
    dims: int
    type: str
    model: str | None
    image_search: bool
    text_search: bool
    text_search_reason: str | None = Field(description="why text queries are refused, when they are")


class Health(IndexHealth):
    """The first index's description, all the indexes, the limits and the query counters."""

    model_config = ConfigDict(extra="allow")

    status: str
    indices: list[IndexHealth]
    default_k: int
    max_k: int
    max_upload_bytes: int
    max_pixels: int
    queries: int
    batches: int


# --------------------------------------------------------------------------- batching


class QueryBatcher:
    """Runs ``fn(items) -> results`` (one result per item) over batches of concurrent submissions.

    The first waiting item opens a batch; items that arrive within ``max_wait`` seconds
    join it, up to ``max_batch``. Batches run one at a time in a worker thread, so the event
    loop keeps accepting requests (which form the next batch) while the model works. A
    result that is an exception is raised to that item's caller only.
    """

    def __init__(self, fn: Callable[[list], list], max_batch: int = 32, max_wait: float = 0.01, max_pending: int = 1024):
        self.fn = fn
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait)
        self.max_pending = max_pending
        self.queries = 0
        self.batches = 0
        self.largest_batch = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unicom-search")
        self._queue: asyncio.Queue | None = None
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._arrived = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, item: Any) -> Any:
        self._start()
        if self._queue.qsize() >= self.max_pending:
            raise HTTPException(503, f"{self._queue.qsize()} queries are waiting; try again shortly")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        self._arrived.set()
        return await future

    async def _collect(self) -> list:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            while not self._queue.empty() and len(batch) < self.max_batch:
                batch.append(self._queue.get_nowait())
            remaining = deadline - loop.time()
            if len(batch) >= self.max_batch or remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(item, future) for item, future in await self._collect() if not future.cancelled()]
            if not batch:
                continue
            self.batches += 1
            self.queries += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self.fn, [item for item, _ in batch])
            except Exception as error:  # the callers answer with it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)


class ByteBudget:
    """At most ``limit`` bytes held at once by the holders (asyncio); a larger request waits
    until it is alone, so one image over the budget is still decoded."""

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self.used = 0
        self.peak = 0
        self._changed: asyncio.Condition | None = None

    async def acquire(self, size: int) -> int:
        size = min(max(0, int(size)), self.limit)
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + size <= self.limit)
            self.used += size
            self.peak = max(self.peak, self.used)
        return size

    async def release(self, size: int) -> None:
        async with self._changed:
            self.used -= size
            self._changed.notify_all()


# --------------------------------------------------------------------------- indexed images


class ShardImages:
    """Image bytes of webdataset samples by (shard file name, key), read from the tars in ``root``.

    The first read of a shard lists its image members once (kept for ``cache`` shards);
    uncompressed tars are then read at the member's offset.
    """

    def __init__(self, root: str | Path, cache: int = 16):
        self.root = Path(root)
        self.cache = cache
        self._members: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()

    def _list(self, path: Path) -> dict:
        from unicom.data.shards import IMAGE_EXTENSIONS, split_member_name

        members = {}
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                split = split_member_name(member.name) if member.isfile() else None
                if split is not None and split[1] in IMAGE_EXTENSIONS:
                    members.setdefault(split[0], (member.offset_data, member.size))
        return members

    def read(self, shard: str, key: str) -> bytes | None:
        if not shard or Path(shard).name != shard:  # a file name inside root, nothing else
            return None
        path = self.root / shard
        with self._lock:
            members = self._members.get(shard)
            if members is None:
                members = self._list(path)
                self._members[shard] = members
                if len(self._members) > self.cache:
                    self._members.popitem(last=False)
            else:
                self._members.move_to_end(shard)
        found = members.get(key)
        if found is None:
            return None
        offset, size = found
        if path.suffix == ".tar":
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(size)
        with tarfile.open(path, "r:*") as tar:  # compressed: decompress up to the member
            for member in tar:
                if member.offset_data == offset:
                    return tar.extractfile(member).read()
        return None


class ItemImages:
    """The images of indexed items: where each is, its bytes, and cached JPEG thumbnails."""

    def __init__(self, image_root: str | Path | None, shards: str | Path | None, cache: int):
        self.image_root = Path(image_root) if image_root is not None else Path.cwd()
        self.shards = ShardImages(shards) if shards is not None else None
        self.cache = cache
        self._thumbnails: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def file(self, row: dict) -> Path | None:
        for column in PATH_COLUMNS:
            value = row.get(column)
            if isinstance(value, str) and value:
                path = Path(value)
                return path if path.is_absolute() else self.image_root / path
        return None

    def in_shard(self, row: dict) -> bool:
        return self.shards is not None and isinstance(row.get("shard"), str) and isinstance(row.get("key"), str)

    def has_image(self, row: dict) -> bool:
        return self.file(row) is not None or self.in_shard(row)

    def source(self, row: dict, item_id: int):
        """A local path or the bytes of item ``item_id``'s image; 404 when there is none."""
        path = self.file(row)
        if path is not None:
            return path
        if self.in_shard(row):
            try:
                data = self.shards.read(row["shard"], row["key"])
            except (OSError, tarfile.TarError):
                data = None
            if data is None:
                raise _error(404, f"the image of item {item_id} is not in its shard {row['shard']}")
            return data
        raise _error(404, f"item {item_id} has no local image in the index metadata")

    def thumbnail(self, name: str, row: dict, item_id: int) -> bytes:
        """A JPEG of at most THUMBNAIL_SIZE pixels a side, aspect ratio kept (cached)."""
        from PIL import Image

        with self._lock:
            cached = self._thumbnails.get((name, item_id))
            if cached is not None:
                self._thumbnails.move_to_end((name, item_id))
                return cached
        source = self.source(row, item_id)
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                image.draft("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE))
                image = image.convert("RGB")
                image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=85)
        except FileNotFoundError:
            raise _error(404, f"the image file of item {item_id} is missing") from None
        except Exception:  # a damaged file: Pillow raises several types
            raise _error(404, f"the image file of item {item_id} cannot be read") from None
        data = buffer.getvalue()
        with self._lock:
            self._thumbnails[(name, item_id)] = data
            if len(self._thumbnails) > self.cache:
                self._thumbnails.popitem(last=False)
        return data


# --------------------------------------------------------------------------- uploads


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _error(413, f"request body of {int(length)} bytes is larger than the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _error(413, f"request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _probe_image(data: bytes, name: str, max_upload: int, max_pixels: int) -> tuple[int, int, int]:
    """(width, height, bands) from the image header, answering 413/415 for oversized or unsupported files."""
    from PIL import Image

    if len(data) > max_upload:
        raise _error(413, f"{name}: {len(data)} bytes, larger than the limit of {max_upload} bytes")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            kind, (width, height), bands = probe.format, probe.size, len(probe.getbands())
    except Image.DecompressionBombError as error:  # Pillow's own limit, far above ours
        found = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise _error(413, f"{name}: {size}, more than the limit of {max_pixels:,} pixels") from None
    except Exception:  # Pillow raises several types for data it cannot identify
        raise _error(415, f"{name}: not an image; upload a {', '.join(IMAGE_FORMATS.values())} file") from None
    if kind not in IMAGE_FORMATS:
        raise _error(415, f"{name}: {kind} images are not accepted; upload a {', '.join(IMAGE_FORMATS.values())} file")
    if width * height > max_pixels:
        raise _error(413, f"{name}: {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,} pixels")
    return width, height, bands


def _decode_for_model(data: bytes, name: str, prepare: "ModelInput", pixels: int):
    """Decode to RGB at about the model's input size (JPEG draft mode, then the model's resize)."""
    from unicom.data.transforms import DecodeError, decode_image

    try:
        image = decode_image(data, draft=prepare.draft)[0]
        small = prepare(image)
    except DecodeError as error:
        raise _error(415, f"{name}: {error}") from None
    finally:
        image = None
    if pixels >= TRIM_PIXELS:
        _return_free_memory()
    return small


def _return_free_memory() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    A large image is decoded in blocks that the C allocator keeps once freed, spread over
    the arenas of the threads that decoded; without this, a burst of large uploads leaves
    the process gigabytes larger than it needs to be.
    """
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


class ModelInput:
    """The leading resize of a model's transform, run where an upload is decoded, so that a
    query waits for its batch at about the model's input size. The transform resizes again
    to the same size, which is a copy: the model sees the pixels it would have seen."""

    def __init__(self, transform: Callable):
        from torchvision import transforms as T

        from unicom.data.transforms import draft_size

        steps = getattr(transform, "transforms", [transform])
        self.resize = steps[0] if steps and isinstance(steps[0], T.Resize) else None
        self.draft = draft_size(transform)

    def __call__(self, image):
        return image if self.resize is None else self.resize(image)


def _decode_base64(text: str, name: str) -> bytes:
    if text.startswith("data:"):  # a data URL: data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise _error(400, f"{name}: not valid base64") from None
    if not data:
        raise _error(400, f"{name}: empty")
    return data


def _fetch_url(url: str, limit: int) -> bytes:
    """GET an http(s) URL (at most ``limit`` bytes, 10 s)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise _error(400, f"image_url: only http and https URLs are fetched, got {url!r}")
    request = urllib.request.Request(url, headers={"User-Agent": "unicom-serve"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            data = response.read(limit + 1)
    except Exception as error:  # urllib raises many types: refused, timeouts, HTTP errors
        raise _error(400, f"image_url: {url} could not be fetched ({error})") from None
    if len(data) > limit:
        raise _error(413, f"image_url: {url} is larger than the limit of {limit} bytes")
    return data


def _parse_k(value: Any, default: int, max_k: int, name: str = "k") -> int:
    if value is None or value == "":
        return default
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise _error(400, f"{name} must be an integer, got {value!r}") from None
    if not 1 <= k <= max_k:
        raise _error(400, f"{name} must be between 1 and {max_k}, got {k}")
    return k


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


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as error:
        raise _error(400, f"the body is not valid JSON ({error})") from None


def _plain(value: Any) -> Any:
    """A metadata value as JSON can carry it (bytes as text, numpy scalars as numbers)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


# --------------------------------------------------------------------------- the app


@dataclass
class Served:
    """One index of the service, with the model of its collection."""

    name: str
    index: Index
    encoder: Any = None
    stored: queries.StoredVectors = field(init=False)
    model_input: ModelInput | None = field(init=False, default=None)

    def __post_init__(self):
        self.stored = queries.StoredVectors(self.index)
        if self.encoder is not None:
            self.model_input = ModelInput(self.encoder.image_transform)

    @property
    def text_reason(self) -> str | None:
        try:
            queries.require_text(self.encoder)
        except InputError as error:
            return str(error)
        return None


@dataclass
class Search:
    """One query waiting for its batch. ``vector``: an embedding or stored item, in the index's space."""

    served: Served
    k: int
    image: Any = None
    text: str | None = None
    vector: np.ndarray | None = None
    text_weight: float = queries.TEXT_WEIGHT
    deduplicate: bool = False


def _query_vectors(batch: list[Search]) -> list[np.ndarray | Exception]:
    """One query vector per search: one model call per model for the images, one for the texts."""
    images: dict[int, list[int]] = {}
    texts: dict[int, list[int]] = {}
    encoders: dict[int, Any] = {}
    for position, search in enumerate(batch):
        key = id(search.served.encoder)
        encoders[key] = search.served.encoder
        if search.image is not None:
            images.setdefault(key, []).append(position)
        if search.text is not None:
            texts.setdefault(key, []).append(position)
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
        dims = search.served.index.dims
        try:
            base = search.vector if search.vector is not None else image_rows.get(position)
            if base is not None and base.shape[-1] != dims:
                base = queries.first_dims(base[None, :], dims, "the query")[0]
            text = text_rows.get(position)
            if text is not None:
                text = queries.first_dims(text[None, :], dims, "the text query")[0]
            if base is not None and text is not None:
                vectors.append(queries.combine(base, text, search.text_weight)[0])
            else:
                vectors.append(base if base is not None else text)
        except InputError as error:
            vectors.append(error)
    return vectors


def run_searches(batch: list[Search]) -> list[Any]:
    """(scores, ids) of each search of a batch, or its error: one model call per model and kind, one
    index search per index. The results are turned into replies outside, so that reading
    metadata and thumbnails never holds up the model."""
    vectors = _query_vectors(batch)
    answers: list[Any] = [None] * len(batch)
    by_index: dict[str, list[int]] = {}
    for position, vector in enumerate(vectors):
        if isinstance(vector, Exception):
            answers[position] = vector
        else:
            by_index.setdefault(batch[position].served.name, []).append(position)
    for positions in by_index.values():
        served = batch[positions[0]].served
        found = queries.search(served.index, np.stack([vectors[p] for p in positions]), [batch[p].k for p in positions],
                               deduplicate=[batch[p].deduplicate for p in positions], stored=served.stored)
        for position, result in zip(positions, found):
            answers[position] = result
    return answers


def create_app(
    index: Index | Mapping[str, Index],
    encoder=None,
    *,
    batch_size: int = 32,
    max_wait_ms: float = 10.0,
    max_upload_bytes: int = 10 * 2**20,
    max_pixels: int = MAX_PIXELS,
    max_decode_bytes: int = MAX_DECODE_BYTES,
    default_k: int = 10,
    max_k: int = 100,
    max_result_ids: int = 10_000,
    image_root: str | Path | None = None,
    shards: str | Path | None = None,
    thumbnail_cache: int = 1024,
    cors_origins: list[str] | tuple[str, ...] = (),
    allow_image_urls: bool = False,
) -> FastAPI:
    """The FastAPI app of ``unicom serve`` (see the module docstring).

    index: an :class:`Index`, or names -> indexes (the first is the default; the names are
    clip-retrieval's ``indice_name``). encoder: the :class:`~unicom.models.encoders.Encoder`
    of the collections (or names -> encoders), or None to accept embeddings and item ids
    only; each is checked against its index (:func:`unicom.search.queries.check_model`).
    image_root: folder that relative image paths of the metadata are read from (default:
    the current folder). shards: folder of the webdataset shards the collections were
    embedded from. cors_origins: origins whose pages may call the API (``"*"``: any), as
    clip-retrieval's front end served from elsewhere does. allow_image_urls: let
    ``/knn-service`` fetch ``image_url`` queries (the server then makes requests a client chose).
    """
    indexes = dict(index) if isinstance(index, Mapping) else {index.path.name or "index": index}
    if not indexes:
        raise InputError("no index to serve")
    encoders = dict(encoder) if isinstance(encoder, Mapping) else {name: encoder for name in indexes}
    served: dict[str, Served] = {}
    for name, item in indexes.items():
        model = encoders.get(name)
        if model is not None:
            queries.check_model(item, model)
        served[name] = Served(name, item, model)
    default = next(iter(served))
    images = ItemImages(image_root, shards, thumbnail_cache)
    batcher = QueryBatcher(run_searches, max_batch=batch_size, max_wait=max_wait_ms / 1000)
    decoding = ByteBudget(max_decode_bytes)

    def pick(name: str | None, key: str = "index") -> Served:
        if name is None or name == "":
            return served[default]
        if name not in served:
            raise _error(404, f"{key} {name!r}: no such index; the indexes are {', '.join(served)}")
        return served[name]

    def item_url(route: str, target: Served, item_id: int) -> str:
        return f"/{route}/{item_id}" if target.name == default else f"/{route}/{item_id}?index={urllib.parse.quote(target.name)}"

    async def decode_upload(data: bytes, name: str, target: Served):
        if target.encoder is None:
            raise _error(503, 'this server has no model for image queries; send {"embedding": [...]} or {"like": id} instead')
        width, height, bands = _probe_image(data, name, max_upload_bytes, max_pixels)
        held = await decoding.acquire(width * height * (bands + (3 if bands != 3 else 0)))  # decoded, and as RGB
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(None, _decode_for_model, data, name, target.model_input, width * height)
        # the budget is released when decoding ends, even if this request is cancelled before
        job.add_done_callback(lambda _: asyncio.ensure_future(decoding.release(held), loop=loop))
        return await job

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

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError):
        return JSONResponse({"detail": str(error)}, status_code=400)

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
             "text_search": s.text_reason is None, "text_search_reason": s.text_reason}
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
            "queries": batcher.queries,
            "batches": batcher.batches,
        }

    # ------------------------------------------------------------------ our search

    def search_answer(scores: np.ndarray, ids: np.ndarray, target: Served) -> dict:
        hits = target.index.hits(scores[None, :], ids[None, :])[0]
        for hit in hits:
            local = images.has_image(hit)
            hit["thumbnail"] = item_url("thumbnail", target, hit["id"]) if local else None
            url = hit.get("url")
            hit["link"] = item_url("image", target, hit["id"]) if local else (
                url if isinstance(url, str) and url.startswith(("http://", "https://")) else None)
        return {"results": hits, "score_digits": queries.score_digits(scores)}

    def _parse_id(value: Any, target: Served) -> int:
        try:
            item_id = int(value)
        except (TypeError, ValueError):
            raise _error(400, f"like must be an item id (an integer), got {value!r}") from None
        if not 0 <= item_id < len(target.index):
            raise _error(404, f"no item {item_id} in this index (ids 0..{len(target.index) - 1})")
        return item_id

    async def build_search(target: Served, *, text, image_data, image_name, like, embedding, text_weight, k, deduplicate,
                           ) -> Search:
        given = [name for name, value in (("image", image_data), ("like", like), ("embedding", embedding)) if value is not None]
        if len(given) > 1:
            raise _error(400, f"give one of image, like and embedding (with a text, if you like), not {' and '.join(given)}")
        if text is not None and not text.strip():
            text = None
        if not given and text is None:
            raise _error(400, 'nothing to search for: send a "text", an "image", a "like" item id or an "embedding"')
        if text is not None:
            try:
                queries.require_text(target.encoder)
            except InputError as error:
                raise _error(400, str(error)) from None
        search = Search(target, k, text=text, text_weight=queries.parse_text_weight(text_weight), deduplicate=deduplicate)
        if embedding is not None:
            search.vector = _embedding_vector(embedding, target.index.dims)
        elif like is not None:
            search.vector = (await asyncio.to_thread(target.stored, [like]))[0]
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
                **{key: {"type": "string"} for key in ("text", "like", "text_weight", "k", "deduplicate", "index")}}}},
        }}},
    )
    async def search(request: Request):
        start = time.perf_counter()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        k_query = request.query_params.get("k")
        if content_type == "multipart/form-data":
            body = await _read_body(request, max_upload_bytes + MULTIPART_OVERHEAD)
            if not body:
                raise _error(400, "empty request body; send an image as the multipart field 'image', or a field 'text'")
            form = await _parse_form(request, body)
            upload = form.get("image")
            if upload is None and not form.get("text") and not form.get("like"):
                fields = sorted(set(form.keys()))
                raise _error(400, f"no field 'image' in the form (got {fields}); send the image as the field 'image'")
            image_data, image_name = None, None
            if upload is not None:
                if isinstance(upload, str):
                    raise _error(400, "the field 'image' must be a file upload, not text")
                image_name = upload.filename or "upload"
                declared = (upload.content_type or "").lower()
                if declared and not declared.startswith("image/") and declared != "application/octet-stream":
                    raise _error(415, f"{image_name}: content type {declared} is not an image")
                image_data = await upload.read()
                if not image_data:
                    raise _error(400, f"{image_name}: the uploaded file is empty")
            target = pick(form.get("index") or request.query_params.get("index"))
            if upload is not None and target.encoder is None:
                raise _error(503, 'this server has no model for image queries; POST JSON {"embedding": [...]} instead')
            like = form.get("like")
            like = None if like in (None, "") else _parse_id(like, target)
            values = dict(text=form.get("text"), like=like, embedding=None, text_weight=form.get("text_weight"),
                          k=_parse_k(form.get("k", k_query), default_k, max_k),
                          deduplicate=_parse_bool(form.get("deduplicate"), "deduplicate"))
        elif content_type == "application/json":
            body = await _read_body(request, max_upload_bytes * 4 // 3 + MULTIPART_OVERHEAD)
            if not body:
                raise _error(400, 'empty request body; send JSON {"text": "..."} or {"embedding": [numbers]}')
            payload = _json_body(body)
            if not isinstance(payload, dict):
                raise _error(400, f'expected a JSON object such as {{"text": "a red car", "k": 10}}, got {type(payload).__name__}')
            try:
                request_model = SearchRequest.model_validate(payload)
            except ValidationError as error:
                raise _error(400, _validation_message(error)) from None
            target = pick(request_model.index or request.query_params.get("index"))
            image_data = None if request_model.image is None else _decode_base64(request_model.image, "image")
            image_name = "image"
            values = dict(text=request_model.text, like=None if request_model.like is None else _parse_id(request_model.like, target),
                          embedding=request_model.embedding, text_weight=request_model.text_weight,
                          k=_parse_k(request_model.k if request_model.k is not None else k_query, default_k, max_k),
                          deduplicate=request_model.deduplicate)
        else:
            raise _error(
                415,
                f"content type {content_type or 'none'} not accepted: send an image as multipart/form-data "
                'field \'image\', or application/json {"text": "..."} or {"embedding": [numbers]}',
            )
        item = await build_search(target, image_data=image_data, image_name=image_name, **values)
        scores, ids = await batcher.submit(item)
        answer = await asyncio.to_thread(search_answer, scores, ids, target)
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
        data = await asyncio.to_thread(images.thumbnail, target.name, row, item_id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/image/{item_id:int}", summary="The full image of an item", responses={200: {"content": {"image/*": {}}}})
    async def full_image(item_id: int, index: str | None = Query(None, description="the index (default: the first)")):
        _, row = await row_of(item_id, index)
        source = images.source(row, item_id)
        data = source if isinstance(source, bytes) else None
        if data is None:
            try:
                with open(source, "rb") as f:
                    head = f.read(64)
            except OSError:
                raise _error(404, f"the image file of item {item_id} is missing") from None
        kind = _sniff(data if data is not None else head)
        if kind is None:
            raise _error(404, f"the image file of item {item_id} is not an image")
        if data is not None:
            return Response(data, media_type=MEDIA_TYPES[kind], headers={"Cache-Control": "max-age=3600"})
        return FileResponse(source, media_type=MEDIA_TYPES[kind], headers={"Cache-Control": "max-age=3600"})

    # ------------------------------------------------------------------ clip-retrieval's back-end API

    def knn_metadata(target: Served, row: dict, item_id: int) -> dict:
        """clip-retrieval's metadata of one item: its columns, and its image as base64 JPEG."""
        meta = {key: _plain(value) for key, value in row.items() if key != "id"}
        if images.has_image(row):
            try:
                meta["image"] = base64.b64encode(images.thumbnail(target.name, row, item_id)).decode()
            except HTTPException:
                pass  # a missing or unreadable file: no picture, as clip-retrieval does
        return meta

    def knn_answer(scores: np.ndarray, ids: np.ndarray, target: Served, num_images: int) -> list[dict]:
        rows = target.index.metadata(ids[:num_images]) if num_images > 0 else []
        results = []
        for position, (score, item_id) in enumerate(zip(scores.tolist(), ids.tolist())):
            result = knn_metadata(target, rows[position], item_id) if position < len(rows) else {}
            result.update(id=item_id, similarity=score)
            results.append(result)
        return results


    @app.post(
        "/knn-service",
        summary="clip-retrieval's k-NN query: text, image (base64), image_url or embedding_input",
        responses={200: {"model": list[KnnResult], "description": f"results, best first; options this server cannot honour "
                                                                  f"are named in the {UNSUPPORTED_HEADER} header"}},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": KnnRequest.model_json_schema()}}}},
    )
    async def knn_service(request: Request):
        # clip-retrieval's front end posts JSON without a JSON content type: read any body as JSON
        payload = _json_body(await _read_body(request, max_upload_bytes * 4 // 3 + MULTIPART_OVERHEAD))
        try:
            knn = KnnRequest.model_validate(payload)
        except ValidationError as error:
            raise _error(400, _validation_message(error)) from None
        target = pick(knn.indice_name, "indice_name")
        if knn.modality != "image":
            raise _error(400, f"modality {knn.modality!r}: {target.name} holds image embeddings only; search modality 'image'")
        num_result_ids = knn.num_result_ids if knn.num_result_ids is not None else knn.num_images
        k = _parse_k(num_result_ids, knn.num_images, max_result_ids, "num_result_ids")
        unsupported = []
        if knn.use_safety_model:
            unsupported.append("use_safety_model (no safety model: results are not filtered)")
        if knn.use_violence_detector:
            unsupported.append("use_violence_detector (no violence detector: results are not filtered)")
        if knn.aesthetic_score not in (None, ""):
            unsupported.append("aesthetic_score (no aesthetic embeddings: the query is not re-weighted)")
        if knn.use_mclip and knn.text:
            unsupported.append("use_mclip (no multilingual model: the text is embedded by the model's own text tower)")
        # clip-retrieval's order: a text first, then an image or its URL, then an embedding
        values = dict(text=None, image_data=None, image_name="image", like=None, embedding=None)
        if knn.text:
            values["text"] = knn.text
        elif knn.image:
            values["image_data"] = _decode_base64(knn.image, "image")
        elif knn.image_url:
            if not allow_image_urls:
                raise _error(400, "image_url: this server does not fetch URLs; send the image itself as base64 in "
                                  "'image' (or start the server with --allow-image-urls)")
            values["image_data"] = await asyncio.to_thread(_fetch_url, knn.image_url, max_upload_bytes)
            values["image_name"] = knn.image_url
        elif knn.embedding_input is not None:
            values["embedding"] = knn.embedding_input
        else:
            raise _error(400, "must fill one of text, image, image_url and embedding_input")
        item = await build_search(target, text_weight=None, k=k, deduplicate=knn.deduplicate, **values)
        scores, ids = await batcher.submit(item)
        results = await asyncio.to_thread(knn_answer, scores, ids, target, max(0, knn.num_images))
        headers = {UNSUPPORTED_HEADER: ", ".join(unsupported)} if unsupported else None
        return JSONResponse(results, headers=headers)

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
        payload = _json_body(await _read_body(request, 1 << 20))
        try:
            wanted = MetadataRequest.model_validate(payload)
        except ValidationError as error:
            raise _error(400, _validation_message(error)) from None
        target = pick(wanted.indice_name, "indice_name")
        bad = [item_id for item_id in wanted.ids if not 0 <= item_id < len(target.index)]
        if bad:
            raise _error(404, f"no item {bad[0]} in {target.name} (ids 0..{len(target.index) - 1})")

        def read() -> list[dict]:
            rows = target.index.metadata(np.asarray(wanted.ids, dtype=np.int64)) if wanted.ids else []
            return [{"id": item_id, "metadata": knn_metadata(target, row, item_id)} for item_id, row in zip(wanted.ids, rows)]

        return JSONResponse(await asyncio.to_thread(read))

    return app


def _embedding_vector(values: list[float], dims: int) -> np.ndarray:
    if not values:
        raise _error(400, '"embedding" must be a non-empty list of numbers')
    if len(values) < dims:
        raise _error(400, f'"embedding" has {len(values)} numbers, the index needs at least {dims}')
    try:
        return queries.first_dims(np.asarray(values, dtype=np.float32)[None, :], dims, '"embedding"')[0]
    except InputError as error:
        raise _error(400, str(error)) from None


def _sniff(head: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(head)) as probe:
            return probe.format if probe.format in MEDIA_TYPES else None
    except Exception:  # a header Pillow cannot read from the first bytes alone
        signatures = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP"}
        for signature, kind in signatures.items():
            if head.startswith(signature):
                return kind
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return "WEBP"
        return None


def _mount_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI over ``/openapi.json``, from the swagger-ui-bundle-v2 package (no CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # the page then loads Swagger UI from its CDN
        swagger_ui_path = None
    if swagger_ui_path is not None:
        app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")
        assets = {"swagger_js_url": "/docs-assets/swagger-ui-bundle.js", "swagger_css_url": "/docs-assets/swagger-ui.css",
                  "swagger_favicon_url": "/docs-assets/favicon-32x32.png"}
        policy = DOCS_POLICY
    else:
        assets, policy = {}, None

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        page = get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title}: API", **assets)
        if policy is not None:
            page.headers["Content-Security-Policy"] = policy
        else:  # the CDN's scripts and styles
            page.headers["Content-Security-Policy"] = "default-src 'self' https:; script-src 'self' 'unsafe-inline' https:"
        return page


async def _parse_form(request: Request, body: bytes):
    """Parse a multipart body already read (and size-checked) by :func:`_read_body`."""
    from starlette.formparsers import MultiPartException

    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, receive).form(max_files=1, max_fields=16)
    except MultiPartException as error:
        raise _error(400, f"malformed multipart body: {error.message}") from None
    except ValueError as error:
        raise _error(400, f"malformed multipart body: {error}") from None
