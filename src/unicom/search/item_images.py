"""The images of indexed items for ``unicom serve``: where each is, its bytes, JPEG thumbnails.

An item's image is a file named in the index's metadata (``image_path`` or ``path``: a
local path, relative to ``image_root``, or the URL of a remote image folder), or a member
of the webdataset shard it was embedded from (``shard`` and ``key`` columns, the shard a
plain file name inside ``shards``, a local folder or a URL). Clients name items by id,
never by path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unicom.search.batching import ByteBudget

THUMBNAIL_SIZE = 256
HEAD_BYTES = 256 * 1024  # the first bytes of an image at a URL or in a shard, read for its header before the whole is fetched
PATH_COLUMNS = ("image_path", "path")
# the formats of indexed items' files, served and copied as stored: those an image folder may hold
# (unicom.data.lists); Pillow names a JPEG that carries more than one picture (what many cameras and
# phones write) MPO
STORED_MEDIA_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
                      "GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff"}
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


class ImageUnavailable(Exception):
    """An item's image that cannot be given: ``status_code`` 404 (the item has none, it is
    missing or not an image) or 502 (its store failed or it is too long), as the server
    answers it; ``detail`` says which and why."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def _error(status: int, message: str) -> ImageUnavailable:
    return ImageUnavailable(status, message)


def sniff(head: bytes) -> str | None:
    """The format of an indexed item's image file from its first bytes (a key of
    :data:`STORED_MEDIA_TYPES`; a JPEG with more pictures, Pillow's MPO, as JPEG), or None: its
    signature, else what Pillow reads of it."""
    import warnings

    from PIL import Image

    signatures = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF87a": "GIF", b"GIF89a": "GIF",
                  b"II*\0": "TIFF", b"MM\0*": "TIFF"}
    kind = next((kind for signature, kind in signatures.items() if head.startswith(signature)), None)
    if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "WEBP"
    if kind is not None:
        return kind
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(head)) as probe:
                return probe.format if probe.format in STORED_MEDIA_TYPES else None
    except Exception:  # a header Pillow cannot read from the first bytes alone
        return "BMP" if head.startswith(b"BM") else None


def thumbnail_bytes(size: tuple[int, int]) -> int:
    """Bytes that making the thumbnail of an RGB image of ``size`` (width, height) holds
    beside it, at most: Pillow first reduces an image over twice the thumbnail's size by a
    whole factor of 2 or more (a quarter of its pixels at most), then resizes its rows (a
    first pass of at most the thumbnail's width by the height) and its columns."""
    from unicom.search.uploads import pixel_bytes

    width, height = size
    return pixel_bytes("RGB") * (width * height // 4 + THUMBNAIL_SIZE * height + THUMBNAIL_SIZE**2)


def sample_occurrence(row: dict) -> int | None:
    """Which sample of its key in its shard a metadata row is (None for metadata without the column)."""
    value = row.get("occurrence")
    return value if isinstance(value, int) else None


class ShardImages:
    """Image bytes of webdataset samples by (shard file name, key), read from the shards
    (tars, or parquet files holding the images) in ``root``: a local folder or a URL
    (``s3://bucket/shards``, ``https://host/shards``).

    The first read of a shard lists its image members once (kept for ``cache`` shards): a
    local tar by its headers, a remote one by streaming it once. An uncompressed tar is then
    read at the member's offset (a ranged request for a URL); a compressed one is
    decompressed up to the member.
    """

    def __init__(self, root, cache: int = 16, columns=None):
        from unicom import storage

        self.root = storage.text(root) if storage.is_url(root) else Path(root)
        self.cache = cache
        self.columns = columns  # of parquet shards (a ShardColumns; None: the usual names)
        self._members: OrderedDict[str, dict] = OrderedDict()
        self._parquet: OrderedDict[str, object] = OrderedDict()  # parquet shard -> its ShardRows
        self._listing: dict[str, threading.Lock] = {}  # shard -> held while it is being listed
        self._lock = threading.Lock()

    def location(self, shard: str):
        """Where the shard file ``shard`` is: a path, or a URL inside the root's."""
        from unicom import storage

        return storage.join(self.root, shard) if isinstance(self.root, str) else self.root / shard

    @staticmethod
    @contextlib.contextmanager
    def _tar(location):
        """The tar at ``location``, read from the start: random access locally; for a URL a
        stream, closed with the tar (its download thread stops)."""
        from unicom import storage

        if not storage.is_url(location):
            with tarfile.open(location, "r:*") as tar:
                yield tar
            return
        with storage.open_stream(location, missing_is_final=True) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            yield tar

    def _list(self, location) -> dict:
        """``{key: (offset, size)}`` of each sample's image (None: a sample without one); a key
        that several samples carry (see :func:`unicom.data.shards.read_tar_samples`) maps to
        the list of theirs in tar order, its ``occurrence``-th sample's at that index. In a
        parquet shard the offset is the sample's row."""
        from unicom.data.shards import IMAGE_EXTENSIONS, is_parquet, member_extension, read_shard_samples, split_member_name

        members: dict = {}
        key, extensions, images = None, set(), {}
        named = None if self.columns is None or self.columns.image is None else self.columns.image
        image_extensions = IMAGE_EXTENSIONS if named is None else (member_extension(named, "--image-column"),)

        def close() -> None:  # the sample of ``key``: its image member (``images``: extension -> offset, size)
            if key is None:
                return
            image = next((images[ext] for ext in image_extensions if ext in images), None)
            if key not in members:
                members[key] = image
            elif isinstance(members[key], list):
                members[key].append(image)
            else:
                members[key] = [members[key], image]

        if is_parquet(location):  # read once, whole (as a remote tar is), its rows' image lengths kept
            for sample in read_shard_samples(location, columns=self.columns):
                key = sample.key  # its image: the row's, under the extension close() looks for first
                images = {image_extensions[0]: (sample.row, len(sample.image))} if isinstance(sample.image, bytes) else {}
                close()
            return members

        with self._tar(location) as tar:
            for member in tar:
                split = split_member_name(member.name) if member.isfile() else None
                if split is None:
                    continue
                if split[0] != key or split[1] in extensions:  # a new sample, as read_tar_samples groups them
                    close()
                    key, extensions, images = split[0], set(), {}
                extensions.add(split[1])
                if split[1] in image_extensions:
                    images[split[1]] = (member.offset_data, member.size)
            close()
        return members

    def _listed(self, shard: str) -> dict:
        """``{key: (offset, size)}`` of the images in ``shard``, listed once (kept for ``cache`` shards)."""
        with self._lock:
            members = self._members.get(shard)
            if members is not None:
                self._members.move_to_end(shard)
                return members
            listing = self._listing.setdefault(shard, threading.Lock())
        with listing:  # listed outside the main lock (a remote shard takes a while), once for all who ask at once
            with self._lock:
                members = self._members.get(shard)
            if members is None:
                try:
                    members = self._list(self.location(shard))
                finally:
                    with self._lock:
                        self._listing.pop(shard, None)
                with self._lock:
                    self._members[shard] = members
                    if len(self._members) > self.cache:
                        self._members.popitem(last=False)
        return members

    def _rows(self, shard: str):
        """The :class:`unicom.data.parquet_shards.ShardRows` of a parquet shard, its footer read
        once (kept for ``cache`` shards)."""
        from unicom.data.parquet_shards import DEFAULT_COLUMNS, ShardRows

        with self._lock:
            rows = self._parquet.get(shard)
            if rows is not None:
                self._parquet.move_to_end(shard)
        if rows is None:
            rows = ShardRows(self.location(shard), self.columns or DEFAULT_COLUMNS)
            with self._lock:
                self._parquet[shard] = rows
                if len(self._parquet) > self.cache:
                    self._parquet.popitem(last=False)
        return rows

    def _member(self, shard: str, key: str, occurrence: int | None) -> tuple[int, int] | None:
        found = self._listed(shard).get(key)
        if isinstance(found, list):
            if occurrence is None:  # which sample is unknown: the key's first with an image, as before the column
                return next((image for image in found if image is not None), None)
            return found[occurrence] if 0 <= occurrence < len(found) else None
        return found if occurrence in (0, None) else None

    def reads_members(self, shard: str) -> bool:
        """Whether an image of ``shard`` is read on its own (a local uncompressed tar: its
        headers listed once, then each member at its offset); else :meth:`samples`, one pass
        over the shard, reads many at the least cost (a tar at a URL is streamed to be listed
        anyway, a compressed one decompressed up to each member, a parquet shard read whole)."""
        return not isinstance(self.root, str) and shard.endswith(".tar")

    def samples(self, shard: str):
        """Every sample of ``shard`` (a file name inside the root), front to back
        (:func:`unicom.data.shards.read_shard_samples`): ``.key`` and ``.image_bytes()``."""
        from unicom.data.shards import read_shard_samples

        if not shard or Path(shard).name != shard:  # a file name inside root, nothing else
            raise FileNotFoundError(f"{shard}: not a file name inside the shards folder")
        return read_shard_samples(self.location(shard), columns=self.columns)

    def size(self, shard: str, key: str, occurrence: int | None = None) -> int | None:
        """The length of the image of the ``occurrence``-th sample with ``key`` in ``shard``
        (the metadata's ``occurrence``; None, for metadata without it: the key's first sample
        with an image); None when the shard has no such image."""
        if not shard or Path(shard).name != shard:
            return None
        found = self._member(shard, key, occurrence)
        return None if found is None else found[1]

    def read(self, shard: str, key: str, first: int | None = None, occurrence: int | None = None) -> bytes | None:
        """The bytes of the image of the ``occurrence``-th sample with ``key`` in ``shard`` (as
        :meth:`size`), or its ``first`` bytes only (a compressed tar is decompressed up to
        them); None when the shard has no such image."""
        from unicom import storage

        if not shard or Path(shard).name != shard:  # a file name inside root, nothing else
            return None
        location = self.location(shard)
        found = self._member(shard, key, occurrence)
        if found is None:
            return None
        offset, size = found
        if shard.endswith(".parquet"):  # the offset is the sample's row
            image = self._rows(shard).image(offset)
            return (image if first is None else image[:first]) if isinstance(image, bytes) else None
        if shard.endswith(".tar"):
            stop = offset + (size if first is None else min(size, first))
            return storage.read_range(location, offset, stop, missing_is_final=True)
        with self._tar(location) as tar:  # compressed: decompress up to the member
            for member in tar:
                if member.offset_data == offset:
                    return tar.extractfile(member).read(-1 if first is None else first)
        return None


def _fetch(url: str, what: str, first: int | None = None, length: int | None = None) -> bytes:
    """The bytes at ``url`` (with the store's retries), or its ``first`` bytes only: 404 at
    once when it has no such file (not retried: a page waits for it), 502 when it cannot be
    reached or is longer than an image may be, or than the ``length`` its server gave before
    (the bytes held for it)."""
    from unicom import storage
    from unicom.data.transforms import MAX_IMAGE_BYTES

    most = MAX_IMAGE_BYTES if length is None else min(length, MAX_IMAGE_BYTES)
    try:
        if first is not None:
            return storage.read_range(url, 0, first, exact=False, missing_is_final=True)
        return storage.read_bytes(url, max_bytes=most, missing_is_final=True)
    except storage.TooLarge:
        if most < MAX_IMAGE_BYTES:
            raise _error(502, f"{what} is longer than the {most:,} bytes its server gave as its length (it changed "
                              f"meanwhile, or the server's answers disagree); try again") from None
        raise _error(502, f"{what} is longer than the {MAX_IMAGE_BYTES:,} bytes an image may have") from None
    except storage.FetchError as error:
        raise _error(404 if error.missing else 502, f"{what} cannot be fetched ({error.reason})") from None
    except FileNotFoundError:
        raise _error(404, f"{what} cannot be fetched (not found: {url})") from None
    except OSError as error:
        raise _error(502, f"{what} cannot be fetched ({storage.describe(error)})") from None


def _fetched_size(url: str, what: str) -> int:
    """The length of the file at ``url``, before it is fetched (the bytes fetching it holds)."""
    from unicom import storage
    from unicom.data.transforms import MAX_IMAGE_BYTES

    try:
        size = storage.size(url)
    except TypeError:  # a server that sends no Content-Length: held as the longest image
        return MAX_IMAGE_BYTES
    except FileNotFoundError:
        raise _error(404, f"{what} cannot be fetched (not found: {url})") from None
    except OSError as error:
        raise _error(502, f"{what} cannot be fetched ({storage.describe(error)})") from None
    if size > MAX_IMAGE_BYTES:
        raise _error(502, f"{what} is longer than the {MAX_IMAGE_BYTES:,} bytes an image may have")
    return size


def _first_bytes(path: Path, item_id: int, count: int = 64) -> bytes:
    """The first bytes of a local image file (its format); 404 when it is missing."""
    try:
        with open(path, "rb") as f:
            return f.read(count)
    except OSError:
        raise _error(404, f"the image file of item {item_id} is missing") from None


def recorded_shard_columns(index):
    """The columns of the parquet shards ``index``'s collection was embedded from, as
    ``unicom embed`` recorded them (the usual names when it recorded none)."""
    from unicom import storage
    from unicom.data.parquet_shards import ShardColumns
    from unicom.formats.embeddings import SHARD_COLUMNS

    return ShardColumns.from_named(index.config.get(SHARD_COLUMNS) or {},
                                   f"{storage.text(index.location)} (its {SHARD_COLUMNS})")


class ItemImages:
    """The images of indexed items: where each is, its bytes, and cached JPEG thumbnails."""

    def __init__(self, image_root: str | Path | None, shards, cache: int, shard_columns=None):
        self.image_root = Path(image_root) if image_root is not None else Path.cwd()
        self.shards = ShardImages(shards, columns=shard_columns) if shards is not None else None
        self.cache = cache
        self._thumbnails: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def file(self, row: dict) -> Path | str | None:
        """The item's image file: a local path, or the URL of a collection embedded from a
        remote folder (``s3://…``, ``https://…``); None when the metadata names none."""
        from unicom import storage

        for column in PATH_COLUMNS:
            value = row.get(column)
            if isinstance(value, str) and value:
                if storage.is_url(value):
                    return None if storage.is_pipe(value) else value  # a command is never run
                path = storage.path(value)  # a local path; file:///data/x.jpg is /data/x.jpg
                return path if path.is_absolute() else self.image_root / path
        return None

    def in_shard(self, row: dict) -> bool:
        return self.shards is not None and isinstance(row.get("shard"), str) and isinstance(row.get("key"), str)

    def has_image(self, row: dict) -> bool:
        return self.file(row) is not None or self.in_shard(row)

    def source(self, row: dict, item_id: int, first: int | None = None, length: int | None = None):
        """A local path or the bytes of item ``item_id``'s image (with ``first``, of an image
        at a URL or in a shard only its first bytes, or more); 404 when there is none. With
        ``length`` (:meth:`_length`, the bytes held for it), an image at a URL that turns out
        longer is 502, not held beyond its share."""
        path = self.file(row)
        if isinstance(path, str):
            return _fetch(path, f"the image of item {item_id}", first=first, length=length)
        if path is not None:
            return path
        if self.in_shard(row):
            with self._shard_errors(row, item_id):
                data = self.shards.read(row["shard"], row["key"], first=first, occurrence=sample_occurrence(row))
            if data is None:
                raise _error(404, f"the image of item {item_id} is not in its shard {row['shard']}")
            return data
        raise _error(404, f"item {item_id} has no local image in the index metadata")

    def _length(self, row: dict, item_id: int) -> int:
        """The length of item ``item_id``'s image at a URL or in a shard, before it is fetched."""
        path = self.file(row)
        if isinstance(path, str):
            return _fetched_size(path, f"the image of item {item_id}")
        with self._shard_errors(row, item_id):
            return self.shards.size(row["shard"], row["key"], sample_occurrence(row)) or 0

    @staticmethod
    @contextlib.contextmanager
    def _shard_errors(row: dict, item_id: int):
        """A shard that cannot be fetched or read, as the HTTP error that names it."""
        from unicom.storage import FetchError, describe

        try:
            yield
        except FetchError as error:  # a remote shard that could not be fetched (after the retries)
            status = 404 if error.missing else 502
            raise _error(status, f"the shard {row['shard']} of item {item_id} cannot be fetched ({error.reason})") from None
        except FileNotFoundError:
            raise _error(404, f"the shard {row['shard']} of item {item_id} is not in the shards folder") from None
        except (OSError, tarfile.TarError) as error:
            raise _error(404, f"the shard {row['shard']} of item {item_id} cannot be read ({describe(error)})") from None

    async def stored(self, row: dict, item_id: int, budget: ByteBudget) -> tuple[Path | bytes, str, int]:
        """Item ``item_id``'s image file as stored, for ``/image``: ``(a local path or the bytes
        of an image at a URL or in a shard, its format (a key of
        :data:`STORED_MEDIA_TYPES`), the bytes held in ``budget``)``.

        Read in worker threads. Of a remote image the first :data:`HEAD_BYTES` are read for its
        format (404 when it is not an image), then an image longer than that is fetched while
        its length is held in ``budget``, so that concurrent requests fetch at most that much at
        once; it stays held, and the caller gives it back (:meth:`ByteBudget.release`) once the
        bytes have been sent. A local file is streamed by the caller from disk.
        """
        source = await asyncio.to_thread(self.source, row, item_id, HEAD_BYTES)
        head = source if isinstance(source, bytes) else await asyncio.to_thread(_first_bytes, source, item_id)
        kind = sniff(head)
        if kind is None:
            raise _error(404, f"the image file of item {item_id} is not an image")
        if not isinstance(source, bytes) or len(source) < HEAD_BYTES:
            return source, kind, 0
        length = await asyncio.to_thread(self._length, row, item_id)
        if length <= len(source):
            return source, kind, 0
        data, held = await budget.run(length, self.source, row, item_id, None, length, kept=True)
        return data, kind, held

    async def thumbnail(self, name: str, row: dict, item_id: int, budget: ByteBudget) -> bytes:
        """A JPEG of at most THUMBNAIL_SIZE pixels a side, aspect ratio kept (cached). The
        image is fetched (from a URL or a shard) and decoded in a worker thread while holding
        its fetched bytes and its decoded size (read from its header; a JPEG's in draft mode)
        in ``budget``, the bytes that decoding may hold at once (:meth:`_sized_source`)."""
        with self._lock:
            cached = self._thumbnails.get((name, item_id))
            if cached is not None:
                self._thumbnails.move_to_end((name, item_id))
                return cached
        source, size = await asyncio.to_thread(self._sized_source, row, item_id)
        data = await budget.run(size, self._render, source, item_id)
        with self._lock:
            self._thumbnails[(name, item_id)] = data
            if len(self._thumbnails) > self.cache:
                self._thumbnails.popitem(last=False)
        return data

    def _sized_source(self, row: dict, item_id: int):
        """The item's image (a local path, its bytes, or a call that fetches it) and the bytes
        its thumbnail holds: its decoding, from its header (0 when the header cannot be read:
        decoding then fails at once; the most Pillow decodes when the header lies beyond the
        first bytes read), and for an image at a URL or in a shard its fetched
        bytes. Of those only the first :data:`HEAD_BYTES` are read here (the whole image when
        it is no longer); a longer image is fetched by :meth:`_render`, within the budget."""
        from unicom.search.uploads import decoding_bytes, read_header

        source = head = self.source(row, item_id, first=HEAD_BYTES)
        fetched = len(head) if isinstance(head, bytes) else 0
        if fetched == HEAD_BYTES:
            fetched = self._length(row, item_id)
            if fetched > HEAD_BYTES:
                source = functools.partial(self.source, row, item_id, length=fetched)
        try:
            kind, size, mode = read_header(head, draft=(THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        except Exception:  # noqa: BLE001 - missing, unreadable or not an image: _render names the reason
            if callable(source):  # a header beyond the first bytes (a JPEG's large ICC profile, a TIFF's
                # directory at its end): its size is unknown, so it holds the most Pillow decodes (the
                # whole budget: it is decoded alone)
                from PIL import Image

                return source, fetched + decoding_bytes((2 * (Image.MAX_IMAGE_PIXELS or 2**31), 1), "RGBA", None)
            return source, fetched
        return source, fetched + decoding_bytes(size, mode, kind) + thumbnail_bytes(size)

    @staticmethod
    def _render(source, item_id: int) -> bytes:
        from unicom.data.transforms import DecodeError, decode_image
        from unicom.search.uploads import return_free_memory

        if callable(source):  # an image longer than its head, fetched while its bytes are held
            source = source()
        try:
            image, _ = decode_image(source, draft=(THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        except DecodeError as error:
            if isinstance(error.__cause__, FileNotFoundError):
                raise _error(404, f"the image file of item {item_id} is missing") from None
            raise _error(404, f"the image file of item {item_id} cannot be read ({error})") from None
        pixels = image.width * image.height  # as decoded (a JPEG at its draft size)
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        image = None
        return_free_memory(pixels)
        return buffer.getvalue()
