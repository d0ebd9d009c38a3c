"""Parquet shards: parquet files that hold the images themselves, one row per sample.

Two writers make them: img2dataset with ``--output_format parquet`` (``00012.parquet``: the
encoded image in a ``jpg`` column, ``key``, ``caption``, ``url``, ``status``, ``width``, …)
and Hugging Face datasets (``train-00012-of-00100.parquet``: an ``image`` column of
``{bytes, path}`` structs, a ``text`` or ``caption`` column). A parquet shard is read
where it is, row group by row group (a URL by ranged requests), and gives the same samples
a tar shard does (:class:`unicom.data.shards.TarSample`), so every reader of shards takes
both.

The columns are read by name (:func:`parquet_layout`): the image is the first non-null of
``jpg``, ``jpeg``, ``png``, ``webp`` and ``image`` (binary, or a struct with a ``bytes``
field); the caption ``txt``, ``caption``, ``text`` or ``TEXT``; the url ``url`` or ``URL``;
the key ``key`` (as text), else the row's number in the file. Other names are given as
:class:`ShardColumns` (``unicom embed --image-column img --caption-column prompt``). A row
img2dataset could not download (``status`` other than ``success``, no image) is not a
sample, as in its tar shards, which leave such rows out.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

from unicom import storage
from unicom.data.transforms import MAX_IMAGE_BYTES, DecodeError, ImageTooLarge
from unicom.errors import InputError

PARQUET_SUFFIX = ".parquet"
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")
CAPTION_COLUMNS = ("txt", "caption", "text", "TEXT")
URL_COLUMNS = ("url", "URL")
KEY_COLUMN, STATUS_COLUMN = "key", "status"
BATCH_ROWS = 64  # rows converted to Python at once
# The most bytes one row group may hold: a reader holds the row group it gives samples of and
# the next one or two (more when they are small: unicom.storage.READ_AHEAD bytes), whole
MAX_ROW_GROUP_BYTES = MAX_IMAGE_BYTES
_MAGIC = b"PAR1"
_SAID: set = set()  # (column, type) warned of, this process
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardColumns:
    """The columns of parquet shards named by the user, each None to be found by its usual
    names: ``image`` (encoded bytes, or ``{bytes, path}`` structs), ``caption`` (text) and
    ``key`` (text or whole numbers). A named column must be in every shard, of its type."""

    image: str | None = None
    caption: str | None = None
    key: str | None = None
    # other columns read as each sample's fields (ParquetSample.json), as a tar's json gives
    # them: these names, or ALL_FIELDS for every column but those of images
    fields: tuple[str, ...] = ()

    def named(self) -> dict[str, str]:
        """``{"image": ..., ...}``: the columns named, as a configuration records them."""
        return {role: name for role, name in (("image", self.image), ("caption", self.caption), ("key", self.key))
                if name is not None}

    @classmethod
    def from_named(cls, named: dict | None, where: str = "") -> "ShardColumns":
        """The columns :meth:`named` recorded (None: none); other roles or values are an
        :class:`InputError` naming ``where``."""
        named = dict(named or {})
        wrong = {role: name for role, name in named.items()
                 if role not in ("image", "caption", "key") or not isinstance(name, str) or not name}
        if wrong:
            raise InputError(f"{where}: the shard columns {wrong} are not column names of image, caption or key; "
                             "write them as unicom embed does ({\"image\": \"img\", \"caption\": \"prompt\"})")
        return cls(**named)


DEFAULT_COLUMNS = ShardColumns()
ALL_FIELDS = ("all",)


@dataclass(frozen=True)
class ParquetLayout:
    """The columns of a parquet shard that make its samples (None: the shard has none)."""

    images: tuple[str, ...]
    caption: str | None = None
    url: str | None = None
    key: str | None = None
    status: str | None = None
    fields: tuple[str, ...] = ()  # other columns read as the samples' fields

    @property
    def columns(self) -> list[str]:
        found = [c for c in (*self.images, self.caption, self.url, self.key, self.status) if c is not None]
        return found + [c for c in self.fields if c not in found]


def _is_image_type(kind) -> bool:
    import pyarrow as pa

    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return pa.types.is_struct(kind) and any(
        field.name == "bytes" and (pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)) for field in kind)


def _is_integer(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(kind)


def _is_text_type(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _check_named(types: dict, columns: ShardColumns, where: str) -> None:
    """Refuse a named column that the file lacks or holds of another type."""
    kinds = {"image": (_is_image_type, "encoded images (binary, or structs with a 'bytes' field)"),
             "caption": (_is_text_type, "text (one caption a row)"),
             "key": (lambda kind: _is_text_type(kind) or _is_integer(kind), "text or whole numbers")}
    for role, name in columns.named().items():
        if name not in types:
            raise InputError(f"{where}no column {name!r} (the {role} column named); its columns are "
                             f"{', '.join(types)}: name one of them")
        test, wanted = kinds[role]
        if not test(types[name]):
            raise InputError(f"{where}the column {name!r} (the {role} column named) holds {types[name]}, where the "
                             f"{role} column holds {wanted}: name another column")


def parquet_layout(schema, location=None, columns: ShardColumns = DEFAULT_COLUMNS) -> ParquetLayout | None:
    """The sample columns of a parquet file's arrow ``schema``, or None when no column holds
    encoded images (a list of paths, or img2dataset's metadata beside its tars); ``columns``:
    the columns named instead of the usual names, each of which must be there, of its type
    (else an :class:`InputError`). A key column that is neither text nor integers is an
    :class:`InputError` (``location``: the file, for the message); a caption, url or status
    column that is not text (a list of captions) is not read, with a warning once."""
    types = {field.name: field.type for field in schema}
    where = f"{storage.text(location)}: " if location is not None else ""
    images = tuple(name for name in IMAGE_COLUMNS if name in types and _is_image_type(types[name]))
    if not images and columns.image is None:
        return None
    _check_named(types, columns, where)
    images = images if columns.image is None else (columns.image,)
    key = columns.key or KEY_COLUMN
    if key in types and not (_is_text_type(types[key]) or _is_integer(types[key])):
        raise InputError(f"{where}the column {key!r} holds {types[key]}, where a parquet shard's keys are text or "
                         "whole numbers; write it as text (or rename it: the rows' numbers are then the keys)")
    for name in (*([] if columns.caption else CAPTION_COLUMNS), *URL_COLUMNS, STATUS_COLUMN):
        if name in types and not _is_text_type(types[name]) and (name, str(types[name])) not in _SAID:
            _SAID.add((name, str(types[name])))
            logger.warning("%sthe column %r holds %s, not text: it is not read as the samples' %s", where, name,
                           types[name], "url" if name in URL_COLUMNS else name if name == STATUS_COLUMN else "caption")

    def first(names) -> str | None:
        return next((name for name in names if name in types and _is_text_type(types[name])), None)

    caption = columns.caption or first(CAPTION_COLUMNS)
    url = first(URL_COLUMNS)
    return ParquetLayout(images, caption, url, key if key in types else None, first((STATUS_COLUMN,)),
                         _fields(types, columns.fields, (caption, url), where))


def _fields(types: dict, wanted: tuple[str, ...], kept: tuple, where: str) -> tuple[str, ...]:
    """The columns read as the samples' fields: ``wanted`` (those of the file; a missing one
    is warned of once), or with :data:`ALL_FIELDS` every column but those of encoded images
    and those ``kept`` as the caption and url. A column of images named is an
    :class:`InputError`: metadata keeps values, not images."""
    if tuple(wanted) == ALL_FIELDS:
        return tuple(name for name in types if name not in kept and not _is_image_type(types[name]))
    for name in wanted:
        if name in types and _is_image_type(types[name]):
            raise InputError(f"{where}the column {name!r} holds encoded images ({types[name]}), which metadata does not "
                             "keep: leave it out of the metadata fields")
        if name not in types and (name, "missing") not in _SAID:
            _SAID.add((name, "missing"))
            logger.warning("%sno column %r (a metadata field named): its values are left empty; its columns are %s",
                           where, name, ", ".join(types))
    return tuple(name for name in wanted if name in types)


def image_columns(schema) -> list[str]:
    """The columns of a parquet file's arrow ``schema`` that hold encoded images, whatever
    their names (bytes, or structs with a ``bytes`` field)."""
    return [field.name for field in schema if _is_image_type(field.type)]


def no_images_error(location, schema) -> InputError:
    names = ", ".join(field.name for field in schema)
    found = image_columns(schema)
    if found:
        return InputError(f"{storage.text(location)}: its images are in a column of another name than "
                          f"{', '.join(IMAGE_COLUMNS)} ({', '.join(repr(name) for name in found)} holds encoded "
                          f"images; its columns are {names}): name it, unicom embed --image-column {found[0]} (and "
                          f"data.image_column={found[0]} to train on the shards)")
    return InputError(f"{storage.text(location)}: a parquet file without images (no {', '.join(IMAGE_COLUMNS)} column of "
                      f"encoded bytes; its columns are {names}); give the shards that hold the images (img2dataset's "
                      "tars, or its parquet output), name the column of encoded images (unicom embed --image-column), "
                      "or give a list whose 'path' column names image files")


def read_schema(location):
    """The arrow schema of the parquet file at ``location`` (its footer only is read)."""
    import pyarrow.parquet as pq

    with _opened(location) as source:
        return pq.read_schema(source)


class _opened:
    """The parquet file at ``location`` as pyarrow reads it: a local path (pyarrow's own
    reads), or a URL read by ranged requests (:class:`unicom.storage.RangedFile`, closed
    after the block)."""

    def __init__(self, location):
        self.location, self.handle = location, None

    def __enter__(self):
        if storage.is_pipe(self.location):
            raise InputError(f"{storage.text(self.location)}: a parquet shard is read by parts, from its footer on, "
                             "which a command's output cannot give: give its path or URL")
        if not storage.is_url(self.location):
            return os.fspath(self.location)
        self.handle = storage.RangedFile(self.location, storage.size(self.location))
        return self.handle

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()


def not_a_parquet(path) -> str | None:
    """Why the local file ``path`` cannot be a parquet file (its first and last 4 bytes are
    not ``PAR1``), or None when it may be one."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(4)
            handle.seek(max(0, size - 4))
            tail = handle.read(4)
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if size < 12 or head != _MAGIC or tail != _MAGIC:
        shown = head.decode("ascii", "replace")
        return (f"not a parquet file: it is {size:,} bytes and does not start and end with {_MAGIC.decode()} "
                f"(it starts with {shown!r}; a truncated download?)")
    return None


def _image(value, row: int) -> Any:
    """A cell of an image column as the sample's image: bytes, a DecodeError, or None."""
    if isinstance(value, dict):  # Hugging Face's Image: {"bytes": ..., "path": ...}
        data, path = value.get("bytes"), value.get("path")
        if data is None and path:
            return DecodeError(f"row {row} names its image by path ({path!r}) without its bytes; embed such a dataset "
                               "as a list (a CSV or parquet with a 'path' column) where the files are")
        value = data
    if value is not None and len(value) > MAX_IMAGE_BYTES:
        return ImageTooLarge(f"row {row}'s image of {len(value):,} bytes, longer than the {MAX_IMAGE_BYTES:,} bytes a "
                             "sample's file may have")
    return value


# (URL, its columns) -> (its samples, the future of the first): opened ahead of its reader, this process
_AHEAD: dict[tuple[str, ShardColumns], Any] = {}


@functools.cache
def _starter():
    """The thread that opens shards ahead (one per process)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(1, thread_name_prefix="parquet-shard-ahead")


def prefetch(location, columns: ShardColumns = DEFAULT_COLUMNS) -> None:
    """Open the remote parquet shard at ``location`` now and start reading its row groups (a
    thread takes its first sample), for the :func:`read_parquet_samples` call that reads it
    next, whole: what :func:`unicom.storage.prefetch` does for the next tar. Nothing for a
    local file."""
    if location is None or not storage.is_url(location) or storage.is_pipe(location) or (storage.text(location), columns) in _AHEAD:
        return
    samples = _samples(location, None, columns)
    _AHEAD[storage.text(location), columns] = (samples, _starter().submit(lambda: list(itertools.islice(samples, 1))))


def drop_prefetched() -> None:
    """Close the shards opened ahead and never read (their read-ahead threads stop)."""
    while _AHEAD:
        samples, first = _AHEAD.popitem()[1]
        first.cancel()
        try:
            first.result()
        except BaseException:  # noqa: BLE001 - a shard nobody reads: its failure is nobody's
            pass
        samples.close()


def _taken(samples, first) -> Iterator:
    yield from first.result()
    yield from samples


def read_parquet_samples(location, keys=None, columns: ShardColumns = DEFAULT_COLUMNS) -> Iterator:
    """Samples of a parquet shard in row order, as :func:`unicom.data.shards.read_tar_samples`
    gives a tar's (``keys``: only the first sample of each of these keys, stopping once all
    are read; ``columns``: see :func:`parquet_layout`). A file that cannot be read as parquet (or fetched) yields the samples before
    the damage, then raises :class:`unicom.data.shards.ShardReadError`; a parquet file
    without images, or with a row group over :data:`MAX_ROW_GROUP_BYTES`, is an
    :class:`InputError`."""
    ahead = _AHEAD.pop((storage.text(location), columns), None) if keys is None and storage.is_url(location) else None
    return _samples(location, keys, columns) if ahead is None else _taken(*ahead)


def _samples(location, keys, columns: ShardColumns) -> Iterator:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unicom.data.shards import ShardReadError, _fetch_error

    count = 0
    try:
        with _opened(location) as source, pq.ParquetFile(source) as parquet:
            layout = parquet_layout(parquet.schema_arrow, location, columns)
            if layout is None:
                raise no_images_error(location, parquet.schema_arrow)
            starts = _row_starts(parquet, location)
            groups = list(range(len(starts)))
            remaining = None if keys is None else {str(k) for k in keys}
            if remaining is not None and layout.key is not None:  # only the row groups that hold a wanted key
                found = parquet.read(columns=[layout.key]).column(0).to_pylist()
                rows = [row for row, key in enumerate(found) if key is not None and str(key) in remaining]
                groups = sorted({bisect.bisect_right(starts, row) - 1 for row in rows})
            for group, table in _read_ahead(parquet, source, groups, layout.columns):
                row = starts[group]
                for batch in table.to_batches(max_chunksize=BATCH_ROWS):
                    values = batch.to_pydict()
                    for i in range(batch.num_rows):
                        index, row = row, row + 1
                        cell = {name: values[name][i] for name in values}
                        image = next((found for found in (_image(cell[name], index) for name in layout.images)
                                      if found is not None), None)
                        status = cell.get(layout.status) if layout.status else None
                        if image is None and status is not None and status != "success":
                            continue  # a row img2dataset could not download: not a sample
                        key = cell.get(layout.key) if layout.key else None
                        key = str(index) if key is None else str(key)
                        if remaining is not None:
                            if key not in remaining:
                                continue
                            remaining.discard(key)
                        yield ParquetSample(key, index, image, cell.get(layout.caption) if layout.caption else None,
                                            cell.get(layout.url) if layout.url else None,
                                            {name: cell[name] for name in layout.fields})
                        count += 1
                        if remaining is not None and not remaining:
                            return
    except InputError:
        raise
    except (pa.ArrowException, OSError) as error:
        fetch = _fetch_error(error)
        if fetch is not None:
            tries = f" (after {fetch.attempts} attempts)" if fetch.attempts > 1 else ""
            raise ShardReadError(location, count, f"fetch failed: {fetch.reason}{tries}", True) from error
        why = not_a_parquet(location) if count == 0 and not storage.is_url(location) else None
        raise ShardReadError(location, count, why or f"{type(error).__name__}: {error}") from error


def _read_ahead(parquet, source, groups: list[int], columns: list[str]) -> Iterator:
    """``(group, table)`` of each row group of ``groups`` in turn, read by threads ahead of
    the caller as far as :data:`unicom.storage.READ_AHEAD` bytes of row groups allow, and at
    least the next ones: what a tar's stream reads ahead. A local file is read by one thread
    (pyarrow's reads and decompression); a remote one (``source`` a
    :class:`unicom.storage.RangedFile`) by two, each row group over its own ranged request,
    as a link that caps each response's rate gives two of them twice the bytes."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    remote = isinstance(source, storage.RangedFile)

    def read(group: int):
        if not remote:
            return parquet.read_row_group(group, columns=columns)
        return _read_group(source.location, source.size, parquet.metadata, group, columns)

    threads = 2 if remote else 1
    sizes = {group: parquet.metadata.row_group(group).total_byte_size for group in groups}
    pending = deque(groups)
    ahead: deque = deque()  # (group, future) submitted, in order
    pool = ThreadPoolExecutor(threads, thread_name_prefix="parquet-shard")
    try:
        while pending or ahead:
            while pending and (len(ahead) <= threads or sum(sizes[g] for g, _ in ahead) + sizes[pending[0]] <= storage.READ_AHEAD):
                group = pending.popleft()
                ahead.append((group, pool.submit(read, group)))
            group, future = ahead.popleft()
            yield group, future.result()
    finally:  # a reader that stops early (keys all found, a closed generator) waits for the reads under way only
        pool.shutdown(wait=True, cancel_futures=True)


def _read_group(location, size: int | None, metadata, group: int, columns: list[str]):
    """The ``columns`` of row group ``group`` of the parquet file at ``location`` whose footer
    was read before (``metadata``): a local path, or a URL of ``size`` bytes over a ranged
    request of its own, so that threads read at once."""
    import pyarrow.parquet as pq

    if size is None:
        with pq.ParquetFile(os.fspath(location), metadata=metadata) as parquet:
            return parquet.read_row_group(group, columns=columns)
    with storage.RangedFile(location, size) as handle, pq.ParquetFile(handle, metadata=metadata) as parquet:
        return parquet.read_row_group(group, columns=columns)


def _row_starts(parquet, location) -> list[int]:
    """The number of the first row of each row group of ``parquet``; a row group over
    :data:`MAX_ROW_GROUP_BYTES` is an :class:`InputError`."""
    meta, starts, start = parquet.metadata, [], 0
    for group in range(meta.num_row_groups):
        starts.append(start)
        start += meta.row_group(group).num_rows
        if meta.row_group(group).total_byte_size > MAX_ROW_GROUP_BYTES:
            raise InputError(f"{storage.text(location)}: row group {group} holds {meta.row_group(group).total_byte_size:,} "
                             f"bytes, over the {MAX_ROW_GROUP_BYTES:,} read at once; write the file with smaller row "
                             "groups (pyarrow.parquet.write_table(..., row_group_size=1000))")
    return starts


class ShardRows:
    """Rows of one parquet shard read one at a time (``unicom serve``'s images): its size and
    footer are read once, then each :meth:`image` reads its row group's image columns only
    (one ranged request for a URL). Safe to call from several threads."""

    def __init__(self, location, columns: ShardColumns = DEFAULT_COLUMNS):
        import pyarrow.parquet as pq

        self.location = location
        with _opened(location) as source, pq.ParquetFile(source) as parquet:
            self.metadata = parquet.metadata
            self.layout = parquet_layout(parquet.schema_arrow, location, columns)
            if self.layout is None:
                raise no_images_error(location, parquet.schema_arrow)
            self.starts = _row_starts(parquet, location)
            self.size = source.size if isinstance(source, storage.RangedFile) else None

    def image(self, row: int):
        """The image of row ``row`` (as :attr:`ParquetSample.image`)."""
        group = bisect.bisect_right(self.starts, row) - 1
        table = _read_group(self.location, self.size, self.metadata, group, list(self.layout.images))
        cell = table.slice(row - self.starts[group], 1).to_pylist()[0]
        return next((found for found in (_image(cell[name], row) for name in self.layout.images) if found is not None), None)


class ParquetSample:
    """One row of a parquet shard, read as a tar's sample is (``key``, :meth:`image_bytes`,
    :meth:`caption`, :meth:`json` with its ``url`` and the ``fields`` read)."""

    __slots__ = ("key", "row", "image", "text", "url", "fields")

    def __init__(self, key: str, row: int, image, text: str | None, url: str | None, fields: dict | None = None):
        self.key, self.row, self.image, self.text, self.url = key, row, image, text, url
        self.fields = fields or {}

    def image_bytes(self):
        return self.image

    def caption(self) -> str | None:
        return None if self.text is None else self.text.strip()

    def json(self) -> dict:
        return {**self.fields, **({} if self.url is None else {"url": self.url})}


__all__ = ["PARQUET_SUFFIX", "IMAGE_COLUMNS", "CAPTION_COLUMNS", "URL_COLUMNS", "ShardColumns", "DEFAULT_COLUMNS", "ALL_FIELDS", "ParquetLayout", "ParquetSample",
           "ShardRows", "parquet_layout", "image_columns", "read_schema", "read_parquet_samples", "prefetch", "drop_prefetched",
           "not_a_parquet", "no_images_error"]
