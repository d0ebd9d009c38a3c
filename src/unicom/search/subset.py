"""Search results as a table: the items of a collection that queries found, written as parquet.

``unicom search --out SUBSET.parquet`` writes one row per indexed item that any query found
(an item several queries found once, with the best of its scores): the columns ``id``,
``score`` (its best score), ``query`` (the query that gave it; the first of them on a tie),
then the item's metadata columns as :meth:`~unicom.search.index.Index.metadata` gives them
(``url``, ``caption``, ``key``, ...; a metadata column named ``score`` or ``query`` comes as
``source_score`` / ``source_query``). Rows are in id order, the collection's order, so that
the metadata files are read once, a row group at a time, however many rows match; sort by
``score`` to rank them. With ``--min-score`` and no ``-k`` the table holds every item scoring
at least that much (:meth:`~unicom.search.index.Index.search_range`): a subset of a
collection that img2dataset downloads as it is (``--input_format parquet --url_col url
--caption_col caption``).

The file is written whole or not at all (a temporary beside it, renamed; uploaded whole to
a URL), a chunk of :data:`CHUNK_ROWS` rows at a time: memory holds one chunk's metadata,
plus some 40 bytes per result while they are merged (ids, scores, queries and their order).

``--copy-images FOLDER`` copies the image file of each item found into a folder, as
clip-retrieval's ``filter`` does (:func:`copy_images`): named by its id (``000001234.jpg``,
joined to the table by its ``id``), as stored (the bytes of its file, its member of a shard,
or the file at its URL in a remote image folder; no decoding), each file whole or absent.
A rerun copies what the folder lacks.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from unicom import storage
from unicom.errors import InputError
from unicom.files import atomic_path, refused_write, remove_killed_writes
from unicom.progress import progress

RESULT_COLUMNS = ("id", "score", "query")
CHUNK_ROWS = 65536  # rows of metadata read and written at a time
SUFFIX = ".parquet"
COPY_THREADS = 16  # images copied at once (each holds one image read from a URL or a shard)
COPY_CHUNK = 1024  # items whose metadata is read at a time while copying
HEAD = 64  # first bytes read of a file for its format
COPIED_NAME = re.compile(r"^(\d+)\.(jpg|png|webp|gif|bmp|tif)$")  # a copied image: its id, zero-padded, and its format

@dataclass
class Subset:
    """The items that the queries found: ids ascending, each with its best score and the
    number of the query that gave it."""

    ids: np.ndarray  # int64 (N,)
    scores: np.ndarray  # float32 (N,)
    queries: np.ndarray  # int64 (N,): the query of each row's score

    def __len__(self) -> int:
        return len(self.ids)


def merge(found: Sequence[tuple[np.ndarray, np.ndarray]]) -> Subset:
    """One row per id of the results ``found`` ((scores, ids) per query): its best score and
    the first query that gave it."""
    if not found:
        return Subset(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
    ids = np.concatenate([np.asarray(query_ids, np.int64) for _, query_ids in found])
    scores = np.concatenate([np.asarray(query_scores, np.float32) for query_scores, _ in found])
    queries = np.concatenate([np.full(len(query_ids), number, np.int64) for number, (_, query_ids) in enumerate(found)])
    order = np.lexsort((queries, -scores, ids))  # by id, then the best score, then the first query
    ids, scores, queries = ids[order], scores[order], queries[order]
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    return Subset(ids[first], scores[first], queries[first])


def check_output(out: str) -> None:
    """Refuse an output that is not a parquet file in a place that can be written, before any search."""
    if not str(out).endswith(SUFFIX):
        raise InputError(f"{out}: the results are written as parquet; give a file name ending in {SUFFIX}")
    if not storage.is_url(out) and os.path.isdir(out):
        raise InputError(f"{out}: a folder; give the file to write, e.g. {os.path.join(out, 'subset' + SUFFIX)}")
    storage.writable_folder(storage.parent(out))  # a read-only scheme, a file for a folder, a missing bucket


def write(index, subset: Subset, labels: Sequence[str], out: str) -> None:
    """Write ``subset`` of ``index`` (queries named by ``labels``) to the parquet file ``out``
    (a path or a URL), as the module docstring says."""
    import pyarrow.parquet as pq

    check_output(out)
    schema = _schema(index, subset, labels)
    remove_killed_writes(out)  # a temporary of a write that was killed, as large as the file it was becoming
    bar = progress(total=len(subset), desc="writing results", unit="rows")
    with refused_write(storage.parent(out), f"the results table {storage.name(out)}", "the same search writes it whole"):
        with atomic_path(out) as staged, pq.ParquetWriter(staged, schema) as writer:
            for start in range(0, len(subset), CHUNK_ROWS):
                stop = min(len(subset), start + CHUNK_ROWS)
                table = _with_results(index.metadata_table(subset.ids[start:stop]), subset, labels, start, stop)
                writer.write_table(_conform(table, schema))
                bar.update(stop - start)
            if not len(subset):
                writer.write_table(schema.empty_table())
    bar.close()


def _with_results(table, subset: Subset, labels: Sequence[str], start: int, stop: int):
    """Metadata rows ``table`` with their score and query beside their id."""
    import pyarrow as pa

    taken = RESULT_COLUMNS[1:]
    table = table.rename_columns([f"source_{name}" if name in taken else name for name in table.column_names])
    query_labels = pa.array([labels[number] for number in subset.queries[start:stop]], pa.string())
    table = table.add_column(1, RESULT_COLUMNS[1], pa.array(subset.scores[start:stop], pa.float32()))
    return table.add_column(2, RESULT_COLUMNS[2], query_labels)


def _schema(index, subset: Subset, labels: Sequence[str]):
    """The columns of the table: those of every part a result comes from (one row of each read)."""
    if not len(subset):
        return _with_results(index.metadata_table(np.zeros(0, np.int64)), subset, labels, 0, 0).schema
    starts = np.array([part.first_id for part in index.parts], dtype=np.int64)
    which = np.searchsorted(starts, subset.ids, side="right") - 1
    firsts = np.flatnonzero(np.r_[True, which[1:] != which[:-1]])  # ids ascend: a part's rows are together
    sample = Subset(subset.ids[firsts], subset.scores[firsts], subset.queries[firsts])
    return _with_results(index.metadata_table(sample.ids), sample, labels, 0, len(sample)).schema


def _conform(table, schema):
    """``table`` with the columns of ``schema``, in its order and types (null where it has none)."""
    import pyarrow as pa

    if table.schema.equals(schema):
        return table
    columns = [table[field.name].cast(field.type) if field.name in table.column_names else pa.nulls(len(table), field.type)
               for field in schema]
    return pa.Table.from_arrays(columns, schema=schema)


@dataclass
class Copied:
    """What :func:`copy_images` did: images copied, found there from an earlier run, and
    ``(id, why)`` of the items whose image could not be copied."""

    copied: int = 0
    present: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)


def image_name(item_id: int, kind: str) -> str:
    """The file name of item ``item_id``'s image of format ``kind`` (a key of
    :data:`~unicom.search.item_images.EXTENSIONS`) in a copy folder: its id in at least 9
    digits, as img2dataset names its samples, so that names sort as ids."""
    from unicom.search.item_images import EXTENSIONS

    return f"{item_id:09d}{EXTENSIONS[kind]}"


def check_copy_folder(folder) -> None:
    """Refuse a copy folder that cannot be written, before any search."""
    storage.writable_folder(folder)


def copy_images(index, ids: np.ndarray, folder, images, threads: int = COPY_THREADS) -> Copied:
    """Copy the image of each item of ``ids`` (as ``images``, an
    :class:`~unicom.search.item_images.ItemImages`, finds it) into ``folder`` (a path or a
    URL) as :func:`image_name`. Items with a file there already are left as they are, and
    the temporaries of a killed run are removed; an item without an image (none named, a
    missing file, one that is no image) is listed in the result, not an error. A write the
    disk refuses is an :class:`InputError`."""
    from concurrent.futures import ThreadPoolExecutor

    check_copy_folder(folder)
    there = storage.list_files(folder)
    for name in there:  # a killed run's temporaries (atomic_path's, beside a copy)
        if not storage.is_url(folder) and name.startswith(".") and name.endswith(".tmp"):
            if COPIED_NAME.match(name[1:].rsplit(".", 2)[0]):
                os.unlink(os.path.join(folder, name))
    done = {int(match.group(1)) for match in map(COPIED_NAME.match, there) if match}
    result = Copied()
    bar = progress(total=len(ids), desc="copying images", unit="images")
    with refused_write(folder, "an image", "the copies already made are kept"), \
            ThreadPoolExecutor(threads, thread_name_prefix="unicom-copy") as pool:
        for start in range(0, len(ids), COPY_CHUNK):
            chunk = np.asarray(ids[start:start + COPY_CHUNK], np.int64)
            todo = [int(item_id) for item_id in chunk if int(item_id) not in done]
            result.present += len(chunk) - len(todo)
            rows = index.metadata_table(np.asarray(todo, np.int64)).to_pylist() if todo else []
            for item_id, why in zip(todo, pool.map(lambda pair: _copy_one(images, folder, *pair), zip(todo, rows))):
                if why is None:
                    result.copied += 1
                else:
                    result.failed.append((item_id, why))
            bar.update(len(chunk))
    bar.close()
    return result


def _copy_one(images, folder, item_id: int, row: dict) -> str | None:
    """Copy item ``item_id``'s image into ``folder``; None, or why it could not be."""
    from unicom.search.item_images import ImageUnavailable, sniff

    source = None
    try:
        source = images.source(row, item_id)
        if isinstance(source, bytes):
            head, handle = source[:HEAD], None
        else:
            handle = open(source, "rb")  # noqa: SIM115 - closed below, after the copy
            head = handle.read(HEAD)
    except ImageUnavailable as error:
        return error.detail
    except OSError as error:  # a local file
        return f"the image file of item {item_id}, {source}, cannot be read ({storage.describe(error)})"
    try:
        kind = sniff(head)
        if kind is None:
            return f"the image file of item {item_id} is not an image"
        with atomic_path(storage.join(folder, image_name(item_id, kind))) as staged, open(staged, "wb") as out:
            if handle is None:
                out.write(source)
            else:
                out.write(head)
                shutil.copyfileobj(handle, out)
    finally:
        if handle is not None:
            handle.close()
    return None
