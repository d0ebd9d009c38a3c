"""Rows of an index's metadata files, read a parquet row group at a time through a bounded cache.

An index's metadata (one parquet file per part) may be far larger than memory: LAION's is
hundreds of files of a million rows. :class:`MetadataRows` reads only the row groups that
hold the rows asked for, and keeps the decoded row groups used last, at most
``cache_bytes`` of them (:data:`CACHE_BYTES` by default); a single row group larger than
that is kept alone, until another is read. ``unicom index`` writes its metadata files in
row groups of :data:`ROW_GROUP_ROWS` rows, so a lookup decodes at most that many rows per
row group it touches.

Files written by other tools come in their own row groups: clip-retrieval's metadata
holds a million rows in one (pyarrow's default), 0.3 to 0.5 s and 150 to 225 MB decoded
for a single row of LAION-like captions and URLs, so every lookup of a search would read whole files
and the cache would hold one of them. Given a ``copies`` folder, a file with row groups
larger than :data:`RECHUNK_ABOVE` rows is copied there once, on its first lookup, in row
groups of :data:`ROW_GROUP_ROWS` (about 0.7 s per million rows; as much disk as the file),
and read from the copy: a lookup then decodes ~16k rows (a few ms). A copy belongs to the
file's path, size and modification time; a file written again gets a new copy and the old
one is removed. One process makes a copy while the others that need it wait (a lock file
beside it); a copy killed halfway leaves a temporary that the next copy of the file removes,
and is never read. Where the folder cannot be written, the file is read as it is.

A file may be a URL (s3://, gs://, http(s)://, hf://): it is read in place, without a
download of the file. Opening it asks the store for its size and version (ETag or
modification time) and reads its footer (one ranged request, 64 KiB); a row group is
then read with ranged requests for its column chunks alone (:class:`unicom.storage.RangedFile`,
each request retried as every read of :mod:`unicom.storage` is). A remote file in coarse
row groups is copied once, row group by row group from the store, into the ``copies``
folder: it is on local disk once, in small row groups. The copy belongs to the URL, size
and version; a file written again gets a new copy, as a local one does. A file whose
server ignores Range requests (it answers the footer's request with the whole file) is
copied there whole, once, rather than downloaded again for every row group; so is a file
whose server gives no size (chunked answers without Content-Length), which no ranged read can
find the footer of (a server that gives no version either, no ETag or modification time, has
it fetched again at every load: a copy of it could not be told from a stale one). A remote file that
changes while it is read (its row groups no longer match the footer read at opening) is
named in the error, which says to load the index again; when its new footer (read then, and only
then) records another build of the index, it is refused as rebuilt (below).

Each build of an index has an id (``build`` in ``index.json``) that ``unicom index`` also writes
into the key-value metadata of each of its metadata files (:data:`BUILD_KEY`); given that id,
a file of another build (the index was rebuilt since it was loaded, with the same row counts
per part) is refused with an error that says to load the index again. Indexes written before
build ids were recorded have none, and their files are not checked; nor is a file that records
no build (rewritten by another tool, such as pandas, that keeps no key-value metadata).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from unicom import storage
from unicom.errors import FolderError, InputError

ROW_GROUP_ROWS = 16384  # rows per row group of the metadata files unicom index writes
CACHE_BYTES = 256 * 2**20  # decoded row groups kept, in bytes (Table.nbytes)
RECHUNK_ABOVE = 4 * ROW_GROUP_ROWS  # files with a larger row group are read from a copy in smaller ones
COPY_READ_BYTES = 8 * 2**20  # a coarse file is copied reading its column chunks in pieces this large
COPIES = "metadata"  # folder of the cache root that holds the copies, unless a caller gives another
BUILD_KEY = b"unicom.index_build"  # parquet key-value metadata: the id of the index build that wrote the file
STALE_SECONDS = 3600  # a temporary of a copy this old belongs to a killed process (a copy takes seconds)

logger = logging.getLogger(__name__)


class RebuiltIndexError(FolderError):
    """A metadata file of another build of the index than the one loaded (``loaded``: that build's id)."""

    def __init__(self, message: str, loaded: str):
        super().__init__(message)
        self.loaded = loaded


class ChangedFileError(FolderError):
    """A remote metadata file that changed since its footer was read (its row groups are elsewhere now)."""


@dataclass(frozen=True)
class Footer:
    """A parquet file as opened: where it is (a local path or a URL), its size and version
    (:func:`unicom.storage.file_version`) and its footer (``pyarrow.parquet.FileMetaData``)."""

    location: Path | str
    size: int
    version: str | None
    metadata: Any

    @property
    def remote(self) -> bool:
        return isinstance(self.location, str)

    @property
    def row_group_rows(self) -> list[int]:
        return [self.metadata.row_group(group).num_rows for group in range(self.metadata.num_row_groups)]

    def open(self, **options):
        """A ``pyarrow.parquet.ParquetFile`` of the file, with the footer read at opening
        (a remote file reads only the bytes its reader asks for)."""
        import pyarrow.parquet as pq

        if self.remote:
            return pq.ParquetFile(storage.RangedFile(self.location, self.size), metadata=self.metadata, **options)
        return _parquet(self.location, **options)


def read_footer(location: str | os.PathLike, copies: str | os.PathLike | None = None) -> Footer:
    """The parquet file ``location`` (a path or a URL) opened: its size, version and footer.

    A URL whose server gives no size (a chunked answer) is fetched whole into ``copies``
    (default: :data:`COPIES` of the cache root), once, and that copy is opened instead."""
    location = storage.text(location) if storage.is_url(location) else Path(location)
    try:
        size, version = storage.file_version(location)
    except (FileNotFoundError, storage.FetchError) as error:
        if isinstance(error, storage.FetchError) and not error.missing:
            raise
        raise FolderError(f"{location}: file not found; the index folder is incomplete, rebuild it") from error
    try:
        if isinstance(location, str):
            import pyarrow.parquet as pq

            if size <= 0:  # no size, so no footer at a known offset: read from a whole copy
                return read_footer(_unsized_copy(location, version, Path(copies or storage.cache_root() / COPIES)))
            metadata = pq.ParquetFile(storage.RangedFile(location, size)).metadata
        else:
            with _parquet(location) as parquet:
                metadata = parquet.metadata
    except (InputError, storage.FetchError):
        raise
    except Exception as error:  # pyarrow raises several types for damaged files
        raise FolderError(f"{storage.text(location)}: not a readable parquet file ({error}); the index folder is "
                          "damaged: copy its metadata folder again, or rebuild it") from error
    return Footer(location, size, version, metadata)


class MetadataRows:
    """Rows by number from parquet files ``files``: (path or URL, rows the file must hold) in file order.

    ``cache_bytes``: the most decoded row groups kept (one larger row group is kept alone).
    ``copies``: a folder for copies of files with coarse row groups (module docstring);
    None reads every file as it is. ``build``: the id of the index build the files must
    belong to (:data:`BUILD_KEY`); None checks nothing. Safe to call from several threads.
    """

    def __init__(self, files: Sequence[tuple[str | os.PathLike, int]], cache_bytes: int = CACHE_BYTES,
                 copies: str | os.PathLike | None = None, build: str | None = None):
        self.files = [(storage.text(path) if storage.is_url(path) else Path(path), int(rows)) for path, rows in files]
        self.cache_bytes = cache_bytes
        self.copies = Path(copies) if copies is not None else None
        self.build = build
        self._starts: dict[int, np.ndarray] = {}  # file -> first row of each row group, then the row count
        self._read_from: dict[int, Footer] = {}  # file -> the file its row groups are read from
        self._cache: OrderedDict[tuple[int, int], object] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._file_locks: dict[int, threading.Lock] = {}

    @property
    def cached_bytes(self) -> int:
        """Bytes of the decoded row groups held now."""
        return self._cached_bytes

    @property
    def cached_row_groups(self) -> list[tuple[int, int]]:
        """(file, row group) of each row group held now, least recently used first."""
        with self._lock:
            return list(self._cache)

    def take(self, file: int, rows: np.ndarray) -> list[dict]:
        """Rows ``rows`` (int64 row numbers within file ``file``) as dicts, in the order given."""
        return self.take_table(file, rows).to_pylist()

    def take_table(self, file: int, rows: np.ndarray):
        """Rows ``rows`` (int64 row numbers within file ``file``) as a ``pyarrow.Table``, in the
        order given, without the file's key-value metadata."""
        import pyarrow as pa

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        starts = self._row_group_starts(file)
        groups = np.searchsorted(starts, rows, side="right") - 1
        tables, positions = [], []
        for group in np.unique(groups):
            selected = np.flatnonzero(groups == group)
            tables.append(self._row_group(file, int(group)).take(rows[selected] - starts[group]))
            positions.append(selected)
        if not tables:
            return self._footer(file).metadata.schema.to_arrow_schema().empty_table().replace_schema_metadata(None)
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        if len(tables) > 1:  # back in the order asked for
            table = table.take(np.argsort(np.concatenate(positions), kind="stable"))
        return table.replace_schema_metadata(None)

    def read_from(self, file: int) -> Path | str:
        """The parquet file that file ``file``'s rows are read from: itself (a path or a URL), or
        its local copy in smaller row groups."""
        return self._footer(file).location

    def _footer(self, file: int) -> Footer:
        self._row_group_starts(file)
        return self._read_from[file]

    def _row_group_starts(self, file: int) -> np.ndarray:
        starts = self._starts.get(file)
        if starts is not None:
            return starts
        with self._lock:
            file_lock = self._file_locks.setdefault(file, threading.Lock())
        with file_lock:  # one thread opens (and copies) a file; the others wait for it
            starts = self._starts.get(file)
            if starts is None:
                path, expected = self.files[file]
                source = read_footer(path, self.copies)
                counts = source.row_group_rows
                if sum(counts) != expected:
                    raise FolderError(f"{path}: {sum(counts)} rows, but the index holds {expected} of this part; the "
                                      "folder was changed after the index was built or loaded: rebuild it, or if it was "
                                      "rebuilt since, load it again (restart `unicom serve`)")
                self._check_build(path, source.metadata.metadata)
                whole = source.remote and not storage.serves_ranges(source.location)
                if self.copies is not None and (whole or max(counts, default=0) > RECHUNK_ABOVE):
                    copy = self._local_copy(source, max(counts, default=0), whole)
                    if copy is not None:
                        source = read_footer(copy)
                        counts = source.row_group_rows
                self._read_from[file] = source
                starts = self._starts[file] = np.cumsum([0, *counts], dtype=np.int64)
        return starts

    def _local_copy(self, source: Footer, largest: int, whole: bool) -> Path | None:
        """The local copy of ``source`` that its rows are read from (made now if missing): in row
        groups of :data:`ROW_GROUP_ROWS` when its own are larger than :data:`RECHUNK_ABOVE`
        rows, copied straight from the file a row group at a time; ``whole``: the file's server
        ignores Range requests, so it is fetched once, whole, rather than once per row group.
        None when the copy cannot be written."""
        from unicom import files

        path = source.location
        copy, owner = _copy_path(self.copies, path, source.size, source.version)
        if copy.is_file():
            return copy
        began = time.perf_counter()
        coarse = largest > RECHUNK_ABOVE
        try:
            self.copies.mkdir(parents=True, exist_ok=True)
            if whole:
                _fetch_whole(path, copy)
            else:
                with _copying(copy) as done:
                    if not done:
                        with files.atomic_path(copy) as temporary:
                            _rechunk(source, temporary)
        except storage.FetchError:  # the file could not be read, not the copy written
            raise
        except OSError as error:
            if coarse:
                logger.warning("%s: row groups of up to %s rows, read as they are: no copy in smaller ones could be "
                               "written to %s (%s)", path, f"{largest:,}", self.copies, error)
            else:
                logger.warning("%s: read in place, a whole download per row group (its server ignores Range "
                               "requests): no copy could be written to %s (%s)", path, self.copies, error)
            return None
        made = (f"row groups of up to {largest:,} rows, copied into row groups of {ROW_GROUP_ROWS:,}" if coarse
                else "its server ignores Range requests: fetched whole")
        logger.info("%s: %s once (%s, %.1f s)", path, made, copy, time.perf_counter() - began)
        _remove_stale(self.copies, owner, copy.name)
        return copy

    def _row_group(self, file: int, group: int):
        key = (file, group)
        with self._lock:
            table = self._cache.get(key)
            if table is not None:
                self._cache.move_to_end(key)
                return table
        try:
            table = _read_row_group(self._read_from[file], group)  # read outside the lock: other lookups go on
        except ChangedFileError as error:
            self._check_rebuilt(file, error)
            raise
        # a local file is opened again for each row group: one rebuilt since its footer was read is refused too
        self._check_build(self.files[file][0], table.schema.metadata)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = table
                self._cached_bytes += table.nbytes
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                _, dropped = self._cache.popitem(last=False)
                self._cached_bytes -= dropped.nbytes
        return table

    def _check_rebuilt(self, file: int, changed: ChangedFileError) -> None:
        """A remote file that changed since its footer was read: refused as rebuilt when its footer
        now records another build (a rebuild, not an edit); nothing said when it cannot be read."""
        if self.build is None:
            return
        path = self.files[file][0]
        try:
            metadata = read_footer(path).metadata.metadata
        except (InputError, storage.FetchError):  # the change is what is reported
            return
        try:
            self._check_build(path, metadata)
        except RebuiltIndexError as rebuilt:
            raise rebuilt from changed

    def _check_build(self, path, metadata: dict | None) -> None:
        """Refuse a file whose key-value ``metadata`` records another build than :attr:`build`
        (a file that records none, rewritten by another tool, is read as it is)."""
        if self.build is None:
            return
        written_by = (metadata or {}).get(BUILD_KEY, b"").decode() or None
        if written_by is not None and written_by != self.build:
            raise RebuiltIndexError(f"{path}: written by another build of the index ({written_by}) than the "
                                    f"one loaded ({self.build}); the index was rebuilt since it was loaded: load it "
                                    "again (restart `unicom serve`)", self.build)


def _copy_path(copies: Path, location: Path | str, size: int, version: str | None) -> tuple[Path, str]:
    """(the copy, its owner): a copy belongs to the file's location (its owner) and to its size and version."""
    owner = hashlib.sha256((location if isinstance(location, str) else str(location.resolve())).encode()).hexdigest()[:16]
    tag = hashlib.sha256(f"{size} {version}".encode()).hexdigest()[:16]
    return copies / f"{owner}-{tag}.parquet", owner


def _fetch_whole(location: str, copy: Path, again: bool = False) -> None:
    """The remote file fetched whole (one download) into ``copy``, written whole or not at all; in
    row groups of :data:`ROW_GROUP_ROWS` where its own are larger than :data:`RECHUNK_ABOVE` rows.
    ``again``: fetched even when ``copy`` exists (a file without a version cannot be told unchanged)."""
    from unicom import files

    with _copying(copy, again) as done:
        if done:
            return
        with files.atomic_path(copy) as temporary:
            fetched = copy.parent / storage.temporary_name(copy.name)
            try:
                storage.download(location, fetched)
                footer = read_footer(fetched)
                if max(footer.row_group_rows, default=0) > RECHUNK_ABOVE:
                    _rechunk(footer, temporary)
                else:
                    os.replace(fetched, temporary)
            finally:
                fetched.unlink(missing_ok=True)


def _unsized_copy(location: str, version: str | None, copies: Path) -> Path:
    """The local copy of a remote file whose server gives no size (module docstring), fetched whole
    now unless a copy of this version is there."""
    copy, owner = _copy_path(copies, location, 0, version)
    if version is not None and copy.is_file():
        return copy
    began = time.perf_counter()
    try:
        copies.mkdir(parents=True, exist_ok=True)
        _fetch_whole(location, copy, again=version is None)
    except OSError as error:
        if isinstance(error, storage.FetchError):
            raise
        raise InputError(f"{location}: its server gives no file size (no Content-Length), so the file is fetched whole "
                         f"into {copies} to be read, but that folder cannot be written ({error}); set UNICOM_CACHE to a "
                         "writable folder, or serve the file with its size") from error
    logger.info("%s: its server gives no size: fetched whole once (%s, %.1f s)", location, copy, time.perf_counter() - began)
    _remove_stale(copies, owner, copy.name)
    return copy


@contextlib.contextmanager
def _copying(copy: Path, again: bool = False) -> Iterator[bool]:
    """Held while ``copy`` is made: one process makes it, the others wait for it and then read
    its copy. Yields True when the copy was made meanwhile (nothing to do; never when
    ``again``); the process making it first removes the temporaries of its name, which only a
    killed copy can have left."""
    from unicom import files

    with files.exclusive(copy.parent / f".{copy.name}.lock") as alone:
        if copy.is_file() and not again:
            yield True
            return
        if alone:
            storage.sweep_temporaries(copy.parent, [copy.name])
        yield False


def _remove_stale(copies: Path, owner: str, current: str) -> None:
    """Copies of earlier versions of the same file (and their locks), and temporaries that
    killed copies of other files left."""
    now = time.time()
    for entry in copies.iterdir():
        try:
            if entry.name.lstrip(".").startswith(f"{owner}-") and current not in entry.name and (
                    entry.suffix == ".parquet" or entry.name.endswith(".parquet.lock")):
                entry.unlink()
            elif storage.is_temporary(entry.name) and now - entry.stat().st_mtime > STALE_SECONDS:
                entry.unlink()
        except OSError:  # removed by another process meanwhile
            pass


def _rechunk(source: Footer, out: Path) -> None:
    """``source`` written to ``out`` in row groups of :data:`ROW_GROUP_ROWS`, a batch at a time."""
    import pyarrow.parquet as pq

    # column chunks are read in pieces, not whole: memory stays at a piece per column and a batch
    with source.open(buffer_size=COPY_READ_BYTES) as parquet:
        with pq.ParquetWriter(out, parquet.schema_arrow) as writer:
            for batch in parquet.iter_batches(batch_size=ROW_GROUP_ROWS):
                writer.write_batch(batch, row_group_size=ROW_GROUP_ROWS)


def _read_row_group(source: Footer, group: int):
    """Row group ``group`` of ``source``; a remote file that changed since its footer was read
    is named as such (its row groups are elsewhere now), and one removed since as missing."""
    try:
        with source.open(pre_buffer=True) as parquet:  # pre_buffer: the column chunks in few ranged requests
            return parquet.read_row_group(group)
    except InputError:
        raise
    except Exception as error:
        if not source.remote:
            raise
        failed = error
        # a file that the store said it no longer has is not asked for again (its version); any other failure,
        # a range past a shorter file's end too, is checked against the version read at opening
        if not (isinstance(error, storage.FetchError) and error.missing):
            try:
                changed = storage.file_version(source.location) != (source.size, source.version)
            except storage.FetchError as version_failed:
                failed = version_failed
            else:
                if changed:
                    raise ChangedFileError(f"{source.location}: changed since the index was loaded (its row groups are not "
                                      "where its footer said); load the index again (restart `unicom serve`) to read "
                                      "it as it is now") from error
                raise
        if failed.missing:
            raise FolderError(f"{source.location}: no longer in the store (removed since the index was loaded); the "
                              "index folder is incomplete: put the file back or rebuild the index, then load it again "
                              "(restart `unicom serve`)") from error
        if failed is error:
            raise
        raise failed from error


def _parquet(path: Path, **options):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path, **options)
    except FileNotFoundError as error:
        raise FolderError(f"{path}: file not found; the index folder is incomplete, rebuild it") from error


def with_build(table, build: str | None):
    """``table`` (pyarrow) with ``build`` recorded in its schema's key-value metadata (:data:`BUILD_KEY`);
    as it is when ``build`` is None."""
    if build is None:
        return table
    return table.replace_schema_metadata({**(table.schema.metadata or {}), BUILD_KEY: build.encode()})
