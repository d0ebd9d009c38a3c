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
A rerun copies what the folder lacks. With ``--with-metadata`` each image has beside it its
caption (``000001234.txt``, where the item has one) and its metadata row
(``000001234.json``), as img2dataset's ``files`` output has them: a folder that ``unicom
embed`` reads with its captions and ``--metadata-fields``.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
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
GROUP_ROWS = 262144  # items sorted into shards at a time while copying (a shard across two groups is read twice)
HEAD = 64  # first bytes read of a file for its format
COPIED_NAME = re.compile(r"^(\d+)\.(jpg|png|webp|gif|bmp|tif)$")  # a copied image: its id, zero-padded, and its format
BESIDE_NAME = re.compile(r"^(\d+)\.(txt|json)$")  # its caption and metadata, with --with-metadata

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


def copy_images(index, ids: np.ndarray, folder, images, threads: int = COPY_THREADS,
                with_metadata: bool = False) -> Copied:
    """Copy the image of each item of ``ids`` (as ``images``, an
    :class:`~unicom.search.item_images.ItemImages`, finds it) into ``folder`` (a path or a
    URL) as :func:`image_name`. Items with a file there already are left as they are, and
    the temporaries of a killed run are removed; an item without an image (none named, a
    missing file, a key its shard lacks, one that is no image) is listed in the result, not
    an error. A write the disk refuses is an :class:`InputError`.

    Samples of shards are copied a shard at a time, in one pass over it (a local
    uncompressed tar: each member at its offset), ``threads`` shards at once; files at URLs,
    or copies to a URL, ``threads`` at once; local files one after another (threads only
    contend for the interpreter there).

    ``with_metadata``: each image's caption (the metadata's ``caption``, where it is text that
    is not blank) and metadata row (JSON, values as :func:`~unicom.search.queries.json_value`
    gives them) are written beside it first (:func:`beside_files`), the image last: an item
    counts as copied once its image and its ``.json`` are there."""
    from concurrent.futures import ThreadPoolExecutor

    check_copy_folder(folder)
    storage.make_folder(folder)
    there = storage.list_files(folder)
    for name, entry in there.items():  # a killed run's temporaries of copies
        target = storage.temporary_target(name)
        if target is not None and (COPIED_NAME.match(target) or BESIDE_NAME.match(target)):
            storage.remove(entry)
    done = {int(match.group(1)) for match in map(COPIED_NAME.match, there) if match}
    if with_metadata:  # a copy without its metadata (an earlier run without the option) is made again
        done &= {int(match.group(1)) for match in map(BESIDE_NAME.match, there) if match and match.group(2) == "json"}
    ids = np.asarray(ids, np.int64)
    todo = np.array([item_id for item_id in ids.tolist() if item_id not in done], np.int64)
    result = Copied(present=len(ids) - len(todo))
    bar = progress(total=len(ids), initial=result.present, desc="copying images", unit="images")

    shown = threading.Lock()

    def advance() -> None:  # an item done, from any thread
        with shown:
            bar.update(1)

    def tally(item_id: int, why: str | None) -> None:
        if why is None:
            result.copied += 1
        else:
            result.failed.append((item_id, why))

    with refused_write(folder, "an image", "the copies already made are kept"), \
            ThreadPoolExecutor(threads, thread_name_prefix="unicom-copy") as pool:
        for start in range(0, len(todo), GROUP_ROWS):
            files, shards = [], {}
            for chunk in range(start, min(len(todo), start + GROUP_ROWS), CHUNK_ROWS):
                chunk_ids = todo[chunk:min(len(todo), start + GROUP_ROWS, chunk + CHUNK_ROWS)]
                for item_id, row in zip(chunk_ids.tolist(), index.metadata_table(chunk_ids).to_pylist()):
                    path = images.file(row)
                    beside = beside_files(row) if with_metadata else {}
                    if path is None and images.in_shard(row) and not images.shards.reads_members(row["shard"]):
                        shards.setdefault(row["shard"], []).append((item_id, row, beside))
                    else:
                        files.append((item_id, row, path, beside))
            streams = [pool.submit(_copy_shard, images, folder, shard, items, advance) for shard, items in shards.items()]
            remote = storage.is_url(folder) or any(isinstance(path, str) for _, _, path, _ in files)
            copy = (lambda item: _copy_one(images, folder, *item))
            for (item_id, *_), why in zip(files, pool.map(copy, files) if remote else map(copy, files)):
                tally(item_id, why)
                advance()
            for stream in streams:
                for item_id, why in stream.result():
                    tally(item_id, why)
    bar.close()
    result.failed.sort()
    return result


def beside_files(row: dict) -> dict[str, bytes]:
    """The files written beside an item's image with ``--with-metadata``, suffix -> bytes:
    its caption (``.txt``, where ``row``'s ``caption`` is text that is not blank) and its
    metadata row (``.json``), as img2dataset writes them beside its images."""
    import json

    from unicom.data.lists import CAPTION_SUFFIX, FIELDS_SUFFIX
    from unicom.search.queries import json_value

    files = {}
    caption = row.get("caption")
    if isinstance(caption, str) and caption.strip():
        files[CAPTION_SUFFIX] = caption.encode("utf-8")
    files[FIELDS_SUFFIX] = json.dumps(json_value(row), ensure_ascii=False).encode("utf-8")
    return files


def _put(folder, item_id: int, head: bytes, rest=None, beside: dict[str, bytes] | None = None) -> str | None:
    """Write an image (its first bytes ``head``, then the rest of the open file ``rest``) into
    ``folder``, named by its format, after the files ``beside`` it (:func:`beside_files`);
    None, or why it is not written (not an image: nothing is written)."""
    from unicom.files import write_new_file_atomic
    from unicom.search.item_images import sniff

    kind = sniff(head[:HEAD])
    if kind is None:
        return f"the image file of item {item_id} is not an image"
    stem = image_name(item_id, kind).rsplit(".", 1)[0]
    for suffix, data in [*(beside or {}).items(), (None, head)]:  # the image last: its presence says the item is done
        target = storage.join(folder, image_name(item_id, kind) if suffix is None else stem + suffix)
        more = rest if suffix is None else None
        if not storage.is_url(folder):
            write_new_file_atomic(target, data, more)
            continue
        with atomic_path(target) as staged, open(staged, "wb") as out:
            out.write(data)
            if more is not None:
                shutil.copyfileobj(more, out)
    return None


def _copy_one(images, folder, item_id: int, row: dict, path, beside: dict[str, bytes]) -> str | None:
    """Copy item ``item_id``'s image (at ``path``, its :meth:`ItemImages.file`) into
    ``folder``, the files ``beside`` it with it; None, or why it could not be."""
    from unicom.data import transforms
    from unicom.search.item_images import ImageUnavailable, sample_occurrence

    try:
        if path is None and images.in_shard(row):  # a member of a local tar, read whole: not past an image's length
            size = images.shards.size(row["shard"], row["key"], sample_occurrence(row)) or 0
            if size > transforms.MAX_IMAGE_BYTES:
                return (f"the image of item {item_id} in the shard {row['shard']} is {size:,} bytes long, more than the "
                        f"{transforms.MAX_IMAGE_BYTES:,} an image may have")
        source = path if isinstance(path, Path) else images.source(row, item_id)
    except ImageUnavailable as error:
        return error.detail
    if isinstance(source, bytes):
        return _put(folder, item_id, source, beside=beside)
    try:
        handle = open(source, "rb")  # noqa: SIM115 - closed below, after the copy
        head = handle.read(HEAD)
    except OSError as error:  # a write's error is not caught here: refused_write names it
        return f"the image file of item {item_id}, {source}, cannot be read ({storage.describe(error)})"
    with handle:
        return _put(folder, item_id, head, handle, beside)


def _copy_shard(images, folder, shard: str, items: list[tuple[int, dict, dict]], advance) -> list[tuple[int, str | None]]:
    """Copy the images of ``items`` ((id, metadata row, the files beside its image), samples of ``shard``) in one pass
    over the shard: each the ``occurrence``-th sample of its key (without the column, the
    key's first sample with an image); ``advance()`` after each item found. Returns (id, None
    or why) of each."""
    from unicom.data.shards import ShardReadError
    from unicom.search.item_images import sample_occurrence

    exact, first = {}, {}  # (key, occurrence) -> id; key -> ids of the key's first sample with an image
    beside = {item_id: files for item_id, _, files in items}
    for item_id, row, _ in items:
        number = sample_occurrence(row)
        if number is None:
            first.setdefault(row["key"], []).append(item_id)
        else:
            exact[(row["key"], number)] = item_id
    done: list[tuple[int, str | None]] = []
    seen: dict[str, int] = {}
    unread = None  # why the shard could not be read to its end
    try:
        samples = iter(images.shards.samples(shard))
    except FileNotFoundError as error:
        samples, unread = iter(()), f"the shard {shard} cannot be read ({error})"
    while exact or first:
        try:  # the reading only: a write that fails is not the shard's failure
            sample = next(samples)
        except StopIteration:
            break
        except (ShardReadError, storage.FetchError, FileNotFoundError, tarfile.TarError) as error:
            why = error if isinstance(error, ShardReadError) else storage.describe(error)
            unread = f"the shard {shard} cannot be read ({why})"
            break
        number = seen.get(sample.key, 0)
        seen[sample.key] = number + 1
        image = sample.image_bytes()
        found = [exact.pop((sample.key, number))] if (sample.key, number) in exact else []
        if image is not None and sample.key in first:
            found += first.pop(sample.key)
        for item_id in found:
            if image is None:
                done.append((item_id, f"sample {number} of key {sample.key!r} in the shard {shard} has no image"))
            elif not isinstance(image, bytes):  # longer than an image may be: not read
                done.append((item_id, f"the image of item {item_id} in the shard {shard} cannot be read ({image})"))
            else:
                done.append((item_id, _put(folder, item_id, image, beside=beside[item_id])))
            advance()
    samples = None  # a stream broken off: its download stops
    left = [*exact.values(), *(item_id for ids in first.values() for item_id in ids)]
    for _ in left:
        advance()
    return done + [(item_id, unread or f"the image of item {item_id} is not in its shard {shard}") for item_id in left]
