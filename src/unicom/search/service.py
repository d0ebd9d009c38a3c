"""The HTTP service of ``unicom serve``: a FastAPI app over an :class:`~unicom.search.index.Index`.

Routes:

* ``GET /``                 the search page (``static/``: plain HTML, CSS and JavaScript);
* ``GET /healthz``          ``{"status": "ok", "count", "dims", "type", "model", ...}``;
* ``POST /search``          an image as the multipart field ``image``, or JSON
  ``{"embedding": [floats]}``; ``k`` as a form field, JSON key or query parameter.
  Answers ``{"results": [{"rank", "id", "score", "thumbnail", <metadata>...}], "k", "took_ms"}``;
* ``GET /thumbnail/{id}``   a JPEG thumbnail of indexed item ``id``, read from the image path
  in the index's metadata, or from its webdataset shard (``shard`` and ``key`` columns) in
  the folder given as ``shards``. The client names an id, never a path.

Errors are JSON ``{"detail": "..."}`` with 400 (malformed request), 404, 413 (too large),
415 (not a supported image, or not multipart/JSON), 503 (no model, or too many queries
waiting).

Concurrent queries are batched: each waits at most ``max_wait_ms`` for others, then up to
``batch_size`` of them go through the model and the index together, in one worker thread.
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from unicom.errors import InputError
from unicom.search.collection import first_dims
from unicom.search.index import Index

STATIC = Path(__file__).parent / "static"
IMAGE_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP"}
MAX_PIXELS = 40_000_000
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small fields around the file
THUMBNAIL_SIZE = 256
PATH_COLUMNS = ("image_path", "path")


# --------------------------------------------------------------------------- batching


class QueryBatcher:
    """Runs ``fn(items) -> results`` (one result per item) over batches of concurrent submissions.

    The first waiting item opens a batch; items that arrive within ``max_wait`` seconds
    join it, up to ``max_batch``. Batches run one at a time in a worker thread, so the event
    loop keeps accepting requests (which form the next batch) while the model works.
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
                if not future.done():
                    future.set_result(result)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)


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


# --------------------------------------------------------------------------- requests


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


def _open_image(data: bytes, name: str, max_upload: int):
    """Decode an uploaded image to RGB, answering 413/415 for oversized or unsupported files."""
    from PIL import Image

    from unicom.data.transforms import DecodeError, decode_image

    if len(data) > max_upload:
        raise _error(413, f"{name}: {len(data)} bytes, larger than the limit of {max_upload} bytes")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            kind, (width, height) = probe.format, probe.size
    except Exception:  # Pillow raises several types for data it cannot identify
        raise _error(415, f"{name}: not an image; upload a {', '.join(IMAGE_FORMATS.values())} file") from None
    if kind not in IMAGE_FORMATS:
        raise _error(415, f"{name}: {kind} images are not accepted; upload a {', '.join(IMAGE_FORMATS.values())} file")
    if width * height > MAX_PIXELS:
        raise _error(413, f"{name}: {width}x{height} pixels, more than the limit of {MAX_PIXELS}")
    try:
        return decode_image(data)[0]
    except DecodeError as error:
        raise _error(415, f"{name}: {error}") from None


def _parse_k(value: Any, default: int, max_k: int) -> int:
    if value is None or value == "":
        return default
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise _error(400, f"k must be an integer, got {value!r}") from None
    if not 1 <= k <= max_k:
        raise _error(400, f"k must be between 1 and {max_k}, got {k}")
    return k


def _parse_embedding(payload: Any, dims: int) -> np.ndarray:
    if not isinstance(payload, dict) or "embedding" not in payload:
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise _error(400, f'expected a JSON object {{"embedding": [numbers], "k": 10}}, got {keys}')
    vector = payload["embedding"]
    if not isinstance(vector, list) or not vector or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vector):
        raise _error(400, '"embedding" must be a non-empty list of numbers')
    if len(vector) < dims:
        raise _error(400, f'"embedding" has {len(vector)} numbers, the index needs at least {dims}')
    array = np.asarray(vector, dtype=np.float32)[None, :]
    try:
        return first_dims(array, dims, '"embedding"')[0]
    except InputError as error:
        raise _error(400, str(error)) from None


# --------------------------------------------------------------------------- the app


def create_app(
    index: Index,
    encoder=None,
    *,
    batch_size: int = 32,
    max_wait_ms: float = 10.0,
    max_upload_bytes: int = 10 * 2**20,
    default_k: int = 10,
    max_k: int = 100,
    image_root: str | Path | None = None,
    shards: str | Path | None = None,
    thumbnail_cache: int = 1024,
) -> FastAPI:
    """The FastAPI app of ``unicom serve`` (see the module docstring).

    encoder: an :class:`~unicom.models.encoders.Encoder` for image queries, or None to accept
    embeddings only. image_root: folder that relative image paths of the metadata are read from
    (default: the current folder). shards: folder of the webdataset shards the collection was
    embedded from; items with ``shard`` and ``key`` metadata get their thumbnails from there.
    """
    if encoder is not None:
        index.check_encoder(encoder)
    image_root = Path(image_root) if image_root is not None else Path.cwd()
    shard_images = ShardImages(shards) if shards is not None else None
    thumbnails: OrderedDict[int, bytes] = OrderedDict()

    def run_batch(items: list[tuple[str, Any, int]]) -> list[list[dict]]:
        """(kind, image or vector, k) per query -> hits per query: one model call, one index search."""
        vectors: list[np.ndarray | None] = [item if kind == "embedding" else None for kind, item, _ in items]
        images = [item for kind, item, _ in items if kind == "image"]
        if images:
            from unicom.embed import embed_images

            embedded = first_dims(embed_images(encoder, images, batch_size=len(images), num_workers=0), index.dims)
            rows = iter(embedded)
            vectors = [vector if vector is not None else next(rows) for vector in vectors]
        scores, ids = index.search(np.stack(vectors), max(k for _, _, k in items))
        hits = index.hits(scores, ids)
        for query_hits in hits:
            for hit in query_hits:
                hit["thumbnail"] = f"/thumbnail/{hit['id']}" if _has_image(hit) else None
        return [query_hits[:k] for query_hits, (_, _, k) in zip(hits, items)]

    batcher = QueryBatcher(run_batch, max_batch=batch_size, max_wait=max_wait_ms / 1000)

    def _image_file(row: dict) -> Path | None:
        for column in PATH_COLUMNS:
            value = row.get(column)
            if isinstance(value, str) and value:
                path = Path(value)
                return path if path.is_absolute() else image_root / path
        return None

    def _in_shard(row: dict) -> bool:
        return shard_images is not None and isinstance(row.get("shard"), str) and isinstance(row.get("key"), str)

    def _has_image(row: dict) -> bool:
        return _image_file(row) is not None or _in_shard(row)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await batcher.close()

    app = FastAPI(title="unicom search", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.index = index

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob: http: https:; style-src 'self'; script-src 'self'",
        )
        return response

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz")
    async def healthz():
        return {
            "status": "ok",
            "count": len(index),
            "dims": index.dims,
            "type": index.type,
            "model": None if encoder is None else encoder.name,
            "image_search": encoder is not None,
            "default_k": default_k,
            "max_k": max_k,
            "max_upload_bytes": max_upload_bytes,
            "queries": batcher.queries,
            "batches": batcher.batches,
        }

    @app.post("/search")
    async def search(request: Request):
        start = time.perf_counter()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        k_query = request.query_params.get("k")
        if content_type == "multipart/form-data":
            body = await _read_body(request, max_upload_bytes + MULTIPART_OVERHEAD)
            if not body:
                raise _error(400, "empty request body; send an image as the multipart field 'image'")
            form = await _parse_form(request, body)
            upload = form.get("image")
            if upload is None:
                fields = sorted(set(form.keys()))
                raise _error(400, f"no field 'image' in the form (got {fields}); send the image as the field 'image'")
            if isinstance(upload, str):
                raise _error(400, "the field 'image' must be a file upload, not text")
            if encoder is None:
                raise _error(503, 'this server has no model for image queries; POST JSON {"embedding": [...]} instead')
            k = _parse_k(form.get("k", k_query), default_k, max_k)
            name = upload.filename or "upload"
            declared = (upload.content_type or "").lower()
            if declared and not declared.startswith("image/") and declared != "application/octet-stream":
                raise _error(415, f"{name}: content type {declared} is not an image")
            data = await upload.read()
            if not data:
                raise _error(400, f"{name}: the uploaded file is empty")
            # decoding takes up to a second for large images: off the event loop
            image = await asyncio.to_thread(_open_image, data, name, max_upload_bytes)
            item = ("image", image, k)
        elif content_type == "application/json":
            body = await _read_body(request, max_upload_bytes)
            if not body:
                raise _error(400, 'empty request body; send JSON {"embedding": [numbers]}')
            try:
                payload = json.loads(body)
            except ValueError as error:
                raise _error(400, f"the body is not valid JSON ({error})") from None
            vector = _parse_embedding(payload, index.dims)
            k = _parse_k(payload.get("k", k_query), default_k, max_k)
            item = ("embedding", vector, k)
        else:
            raise _error(
                415,
                f"content type {content_type or 'none'} not accepted: send an image as multipart/form-data "
                'field \'image\', or application/json {"embedding": [numbers]}',
            )
        results = await batcher.submit(item)
        return {"results": results, "k": k, "took_ms": round((time.perf_counter() - start) * 1000, 2)}

    @app.get("/thumbnail/{item_id:int}")
    async def thumbnail(item_id: int):
        if not 0 <= item_id < len(index):
            raise _error(404, f"no item {item_id} in this index (ids 0..{len(index) - 1})")
        cached = thumbnails.get(item_id)
        if cached is None:
            cached = await asyncio.get_running_loop().run_in_executor(None, _make_thumbnail, item_id)
            thumbnails[item_id] = cached
            if len(thumbnails) > thumbnail_cache:
                thumbnails.popitem(last=False)
        else:
            thumbnails.move_to_end(item_id)
        return Response(cached, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    def _make_thumbnail(item_id: int) -> bytes:
        from PIL import Image

        row = index.metadata(item_id)
        path = _image_file(row)
        if path is None and _in_shard(row):
            try:
                data = shard_images.read(row["shard"], row["key"])
            except (OSError, tarfile.TarError):
                data = None
            if data is None:
                raise _error(404, f"the image of item {item_id} is not in its shard {row['shard']}")
            path = io.BytesIO(data)
        elif path is None:
            raise _error(404, f"item {item_id} has no local image in the index metadata")
        try:
            with Image.open(path) as image:
                image.draft("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE))
                image = image.convert("RGB")
                image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=85)
        except FileNotFoundError:
            raise _error(404, f"the image file of item {item_id} is missing") from None
        except Exception:  # a damaged file: Pillow raises several types
            raise _error(404, f"the image file of item {item_id} cannot be read") from None
        return buffer.getvalue()

    return app


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
