"""Rows of an index's metadata files, read a parquet row group at a time through a bounded cache.

An index's metadata (one parquet file per part) may be far larger than memory: LAION's is
hundreds of files of a million rows. :class:`MetadataRows` reads only the row groups that
hold the rows asked for, and keeps the decoded row groups used last, at most
``cache_bytes`` of them (:data:`CACHE_BYTES` by default); a single row group larger than
that is kept alone, until another is read. ``unicom index`` writes its metadata files in
row groups of :data:`ROW_GROUP_ROWS` rows, so a lookup decodes at most that many rows per
row group it touches; files written by other tools are read in their own row groups
(pyarrow writes up to 1,048,576 rows in one).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from unicom.errors import InputError

ROW_GROUP_ROWS = 16384  # rows per row group of the metadata files unicom index writes
CACHE_BYTES = 256 * 2**20  # decoded row groups kept, in bytes (Table.nbytes)


class MetadataRows:
    """Rows by number from parquet files ``files``: (path, rows the file must hold) in file order.

    ``cache_bytes``: the most decoded row groups kept (one larger row group is kept alone).
    Safe to call from several threads.
    """

    def __init__(self, files: Sequence[tuple[Path, int]], cache_bytes: int = CACHE_BYTES):
        self.files = [(Path(path), int(rows)) for path, rows in files]
        self.cache_bytes = cache_bytes
        self._starts: dict[int, np.ndarray] = {}  # file -> first row of each row group, then the row count
        self._cache: OrderedDict[tuple[int, int], object] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

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
        rows = np.asarray(rows, dtype=np.int64)
        starts = self._row_group_starts(file)
        groups = np.searchsorted(starts, rows, side="right") - 1
        out: list = [None] * len(rows)
        for group in np.unique(groups):
            selected = np.flatnonzero(groups == group)
            table = self._row_group(file, int(group))
            for position, row in zip(selected, table.take(rows[selected] - starts[group]).to_pylist()):
                out[position] = row
        return out

    def _row_group_starts(self, file: int) -> np.ndarray:
        starts = self._starts.get(file)
        if starts is None:
            path, expected = self.files[file]
            with self._open(path) as parquet:
                meta = parquet.metadata
                counts = [meta.row_group(group).num_rows for group in range(meta.num_row_groups)]
            if sum(counts) != expected:
                raise InputError(f"{path}: {sum(counts)} rows, but the index holds {expected} of this part; the folder "
                                 "was changed after the index was built: rebuild it")
            starts = self._starts[file] = np.cumsum([0, *counts], dtype=np.int64)
        return starts

    def _row_group(self, file: int, group: int):
        key = (file, group)
        with self._lock:
            table = self._cache.get(key)
            if table is not None:
                self._cache.move_to_end(key)
                return table
        with self._open(self.files[file][0]) as parquet:  # read outside the lock: other lookups go on
            table = parquet.read_row_group(group)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = table
                self._cached_bytes += table.nbytes
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                _, dropped = self._cache.popitem(last=False)
                self._cached_bytes -= dropped.nbytes
        return table

    @staticmethod
    def _open(path: Path):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path)
        except FileNotFoundError as error:
            raise InputError(f"{path}: file not found; the index folder is incomplete, rebuild it") from error
