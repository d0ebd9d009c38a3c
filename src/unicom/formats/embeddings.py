"""The embedding folder: what ``unicom embed`` writes and every later stage reads.

::

    ROOT/img_emb/img_emb_{i}.npy          (N_i, D) float16 or float32, one row per sample
    ROOT/text_emb/text_emb_{i}.npy        (N_i, D') the same samples, from the text tower
    ROOT/metadata/metadata_{i}.parquet    N_i rows: key, caption, path or url, width, height, occurrence
    ROOT/failures/failures_{i}.parquet    samples of part i that could not be embedded
    ROOT/embed_config.json                what made the embeddings (below)

``embed_config.json`` holds ``model`` (the spec given to ``unicom embed``), ``pretrained``
(a tag, or the weights file's absolute path), ``modalities``, ``dtype`` and
``weights_sha256`` (:data:`WEIGHTS_CHECKSUM`: the digest of the model's parameters and
buffers, :meth:`unicom.models.encoders.Encoder.weights_sha256`), by which a later stage
knows whether the model it loads is the one that made the embeddings, even when that
model had random weights and no file; ``draft`` (images decoded with draft decoding, which
changes their embeddings) when images were embedded; for image folders and lists also
``rows_per_part`` and ``keys_sha256`` (which rows make part ``i``: the cut, and the digest of
the keys listed, in order).

``part_settings`` (:data:`PART_SETTINGS`) lists, each once, the settings (below) of every run that
wrote parts into the folder, recorded before the run writes any: a superset of those the parts
record, read in place of the parts' footers when it holds only the settings of the run that
resumes the folder. Folders written by earlier versions have none.

How a part's embeddings were computed on the machine that made them (``precision``: ``fp32``,
``fp16`` or ``bf16``; ``decode``: ``cpu`` or ``gpu``, where its JPEGs were decoded and resized)
is recorded in its metadata file's parquet key-value metadata under :data:`SETTINGS_KEY`
(JSON), read back by :func:`part_settings`: a folder resumed on other hardware holds parts of
both, which differ slightly, and says so. Parts written by earlier versions have no record.

This is clip-retrieval's layout (LAION's published embeddings are read as they are), with
keys. ``ROOT`` may be a URL (``s3://bucket/emb``, see :mod:`unicom.storage`): parts are
listed with one listing per folder and embeddings are read in row ranges, as a memory map
reads a local file. Row ``r`` of every file of part ``i`` describes the same sample; the ``key`` column
keeps that link explicit so embeddings, metadata and pseudo-labels stay aligned.
``occurrence`` (int32, :data:`OCCURRENCE`) tells apart the samples of a key that several
samples of a shard carry: the sample's number among the samples of its key in its shard
(in its list, for image folders and lists), counting those that failed to embed, 0 for the
first; ``(key, occurrence)`` names one sample of the input, and label files carry both.
Folders written by earlier versions have no such column. Part
numbers are integers parsed from the names (``img_emb_9`` before ``img_emb_10``).

**Complete parts.** A part is complete for the kinds a reader needs when the file of every
one of those kinds exists. :func:`write_part` writes a part's embedding files first and
its metadata file last, so where the collection has metadata:

* a part with embedding files but no metadata file is *unfinished*: a writer is at work,
  or was killed (``unicom embed`` finishes it when run again);
* a part with a metadata file but without an embedding file the reader needs is
  *damaged*, as are files of one part with different row counts, unreadable files,
  embeddings that are not 2-D float arrays, and parts of different dimensions.

:meth:`EmbeddingFolders.contents` is the one reader and validator every stage lists its
parts with, so the same folder gives the same parts, and the same damage the same error,
in ``cluster``, ``index``, ``evaluate`` and the UniFEx feature cache.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from unicom import storage
from unicom.errors import InputError
from unicom.files import numbered_files, save_npy_atomic, sweep_temporaries, write_json_atomic, write_parquet_atomic

logger = logging.getLogger(__name__)

# kind -> (sub-folder, file prefix, suffix)
KINDS: dict[str, tuple[str, str, str]] = {
    "image": ("img_emb", "img_emb_", ".npy"),
    "text": ("text_emb", "text_emb_", ".npy"),
    "metadata": ("metadata", "metadata_", ".parquet"),
}
KEY_COLUMNS = ("key", "image_path", "url")
OCCURRENCE = "occurrence"  # metadata column: the sample's number among the samples of its key in its input
CONFIG_FILE = "embed_config.json"
WEIGHTS_CHECKSUM = "weights_sha256"  # the key of the model's weights digest in CONFIG_FILE
FAILURES_FOLDER = "failures"
SHOWN = 10  # part numbers listed in a message
# embed_config.json: the columns of parquet shards that unicom embed was told to read
# ({"image": ..., "caption": ..., "key": ...}, those named only); every reader of the shards takes them
SHARD_COLUMNS = "shard_columns"
METADATA_FIELDS = "metadata_fields"  # embed_config.json: the fields of shards' samples kept as metadata columns
PART_SETTINGS = "part_settings"  # embed_config.json: the settings of every run that wrote parts (a list)
FLIP = "flip"  # embed_config.json (and an evaluation's cache record): true when each image embedding averages its mirror's


SCALES = "scales"  # embed_config.json (and an evaluation's cache record): the scales of multi-scale image embeddings


def recorded_flip(config: dict | None) -> bool | None:
    """Whether a folder's record (``embed_config.json``, an evaluation's cache record) says its
    image embeddings average each image's mirror (:data:`FLIP`); None without a record."""
    return None if config is None else bool(config.get(FLIP, False))


def recorded_scales(config: dict | None) -> tuple[float, ...] | None:
    """The scales a folder's record says its image embeddings average (:data:`SCALES`), ``(1.0,)``
    for a record without them (the model input alone); None without a record."""
    if config is None:
        return None
    scales = config.get(SCALES)
    return (1.0,) if not scales else tuple(float(scale) for scale in scales)


def views_record(flip: bool = False, scales=None) -> dict:
    """The keys a record keeps for test-time views, only those set (records made before they
    existed match embeddings made without them): ``flip`` true, ``scales`` (decreasing)."""
    record = {FLIP: True} if flip else {}
    if scales is not None and tuple(scales) != (1.0,):
        record[SCALES] = [float(scale) for scale in scales]
    return record


def describe_views(flip: bool | None, scales) -> str:
    """How images were embedded, in words: mirrored (``--flip``), multi-scale (``--scales``), or alone."""
    ways = []
    if flip:
        ways.append("each image averaged with its mirror image (--flip)")
    if scales is not None and tuple(scales) != (1.0,):
        ways.append(f"each image at scales {', '.join(f'{scale:g}' for scale in scales)} (--scales)")
    return " and ".join(ways) or "the images alone (no --flip, no --scales)"
SETTINGS_KEY = b"unicom.embed_settings"  # a part's metadata file: how its embeddings were computed (JSON)


# --------------------------------------------------------------------------- writing


def part_name(kind: str, number: int) -> str:
    """The file name of part ``number`` of ``kind``: ``img_emb_3.npy``."""
    _, prefix, suffix = KINDS[kind]
    return f"{prefix}{number}{suffix}"


def part_path(folder, kind: str, number: int) -> Path:
    """Path of part ``number`` of ``kind`` inside ``folder`` (the kind's own folder; a URL gives a ``UPath``)."""
    return storage.join(folder, part_name(kind, number))


def failures_path(root, number: int) -> Path:
    """``ROOT/failures/failures_{number}.parquet``: the samples of part ``number`` left out,
    or why the part could not be read (then the part is not written)."""
    return storage.join(root, FAILURES_FOLDER, f"failures_{number}.parquet")


def write_part(
    root: str | os.PathLike,
    number: int,
    *,
    image: np.ndarray | None = None,
    text: np.ndarray | None = None,
    metadata=None,
    settings: dict | None = None,
) -> None:
    """Write part ``number`` under ``root`` atomically, metadata last.

    The metadata file marks a finished part: a reader (or a resumed job) that sees it can
    rely on the embedding files beside it. ``settings``: how the embeddings were computed
    (JSON-able), recorded in the metadata file (:func:`part_settings`).
    """
    root = storage.path(root)
    for kind, array in (("image", image), ("text", text)):
        if array is not None:
            save_npy_atomic(part_path(root / KINDS[kind][0], kind, number), array)
    if metadata is not None:
        if settings is not None:
            recorded = json.dumps(settings, sort_keys=True).encode()
            metadata = metadata.replace_schema_metadata({**(metadata.schema.metadata or {}), SETTINGS_KEY: recorded})
        write_parquet_atomic(part_path(root / KINDS["metadata"][0], "metadata", number), metadata)


def part_settings(root, numbers: Sequence[int]) -> dict[int, dict | None]:
    """How each of the finished parts ``numbers`` under ``root`` was embedded (the ``settings``
    :func:`write_part` recorded; None for a part written without them), read from the footers
    of their metadata files (of remote files the footers alone, several at a time)."""
    folder = storage.join(root, KINDS["metadata"][0])

    def read(path) -> dict | None:
        recorded = (_parquet_metadata(path).metadata or {}).get(SETTINGS_KEY)
        return json.loads(recorded) if recorded else None

    return dict(zip(numbers, storage.gather(read, [part_path(folder, "metadata", n) for n in numbers], threads=8)))


def part_complete(root: str | os.PathLike, number: int, kinds: Sequence[str]) -> bool:
    """Whether part ``number`` under ``root`` is complete for ``kinds`` (every file exists).

    What a writer that resumes asks of its own folder; readers list parts with
    :meth:`EmbeddingFolders.contents`, which applies the same rule and checks the files.
    """
    return all(storage.is_file(part_path(storage.join(root, KINDS[kind][0]), kind, number)) for kind in kinds)


def complete_parts(root, numbers: Sequence[int] | None, kinds: Sequence[str]) -> set[int]:
    """The parts among ``numbers`` (None: every part of the folder, as numbered in the files
    of ``kinds[0]``) that are complete for ``kinds`` under ``root`` (:func:`part_complete`
    for many parts, with one listing per folder)."""
    listings = {kind: storage.list_files(storage.join(root, KINDS[kind][0])) for kind in kinds}
    if numbers is None:
        _, prefix, suffix = KINDS[kinds[0]]
        numbers = [int(name[len(prefix):-len(suffix)]) for name in listings[kinds[0]]
                   if name.startswith(prefix) and name.endswith(suffix) and name[len(prefix):-len(suffix)].isdigit()]
    return {n for n in numbers if all(part_name(kind, n) in listings[kind] for kind in kinds)}


def sweep_writer_temporaries(root, numbers: Sequence[int]) -> list[str]:
    """Remove what killed writers of parts ``numbers`` left under ``root``: temporaries of
    their files, of their failure reports and of ``embed_config.json`` (no other writer's)."""
    removed = sweep_temporaries(root, [CONFIG_FILE])
    for kind, (sub, _, _) in KINDS.items():
        removed += sweep_temporaries(storage.join(root, sub), [part_name(kind, n) for n in numbers])
    removed += sweep_temporaries(storage.join(root, FAILURES_FOLDER), [f"failures_{n}.parquet" for n in numbers])
    return removed


def read_config(root) -> dict | None:
    """``ROOT/embed_config.json`` (what made the embeddings), or None when there is none."""
    return read_record(storage.join(root, CONFIG_FILE), f"delete it if {root} holds no parts")


def read_record(path, remedy: str) -> dict | None:
    """The JSON object at ``path`` (a local path or URL) that records what made the embeddings
    beside it, or None when there is none. One that cannot be read or is not an object (cut
    short by a full disk) is an :class:`InputError` naming the file and ``remedy``; nothing is
    removed."""
    if not storage.is_file(path):
        return None
    try:
        record = json.loads(storage.read_text(path))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable ({error}); {remedy}") from error
    if not isinstance(record, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(record).__name__}; {remedy}")
    return record


def write_config(root, config: dict) -> None:
    write_json_atomic(storage.join(root, CONFIG_FILE), config)


# --------------------------------------------------------------------------- reading


def key_column(names: Sequence[str], where: str | os.PathLike, wanted: str | None = None, option: str | None = None) -> str:
    """The metadata column that names each sample: ``wanted``, or the first of
    :data:`KEY_COLUMNS` among ``names`` (the columns of the metadata file ``where``).
    ``option``: the command-line option that names the column, for the messages."""
    if wanted is None:
        present = [name for name in KEY_COLUMNS if name in names]
        if not present:
            hint = f"add one or name it with {option}" if option else "add one"
            raise InputError(
                f"{where}: none of the key columns {', '.join(KEY_COLUMNS)} is present (columns: {', '.join(names)}); {hint}"
            )
        return present[0]
    if wanted not in names:
        hint = f"; choose another with {option}" if option else ""
        raise InputError(f"{where}: no key column {wanted!r} (columns: {', '.join(names)}){hint}")
    return wanted


def row_keys(metadata, root) -> list[str]:
    """The key of each row of an embedding folder's ``metadata`` (its first key column,
    :data:`KEY_COLUMNS`), as text; an error naming ``root`` without metadata."""
    if metadata is None:
        raise InputError(f"{root}: no metadata/ folder, so rows have no keys to match images or labels with")
    column = key_column(metadata.column_names, storage.join(root, "metadata"))
    return [str(v) for v in metadata.column(column).to_pylist()]


def require_usable_rows(x: np.ndarray, keys: Sequence[str], folder, rows: Sequence[int] | None = None,
                        scored: np.ndarray | None = None, block_rows: int = 65_536) -> None:
    """An :class:`InputError` naming the folder, key and row of the rows of ``x`` (N, D) that
    hold NaN or infinite values or are all zeros: they have no direction to rank by. Named
    here, by key and by ``rows`` (x's rows in the folder; default 0..N-1), rather than by
    their position among the rows scored. ``scored``: the rows of ``x`` used (default all;
    a class subset's), the others are not looked at."""
    scored = np.arange(len(x)) if scored is None else np.asarray(scored, dtype=np.int64)
    bad = []
    for start in range(0, len(scored), block_rows):
        chosen = scored[start:start + block_rows]
        block = np.asarray(x[chosen], dtype=np.float32)
        bad.extend(chosen[~np.isfinite(block).all(1) | ~block.any(1)].tolist())
    if bad:
        shown = ", ".join(f"{keys[i]!r} (row {i if rows is None else int(rows[i])})" for i in bad[:3])
        raise InputError(f"{folder}: {len(bad)} of the rows used hold NaN or infinite values or are all zeros, "
                         f"e.g. {shown}; embed those images again or leave them out")


def _load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """A part's embeddings: memory-mapped (a URL: a :class:`~unicom.storage.RemoteArray`) or read."""
    try:
        array = storage.load_npy(path, mmap)
    except storage.FetchError as error:
        raise InputError(error.advice()) from error
    except (ValueError, EOFError, OSError) as error:
        raise InputError(f"{path}: not a readable .npy file ({error})") from error
    if array.ndim != 2:
        raise InputError(f"{path}: expected a 2-D array (rows, dimension), found shape {array.shape}")
    return array


def _shape_and_dtype(path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of a part's embeddings, from the file's header (checked as :func:`_load_npy`)."""
    array = _load_npy(path)
    return tuple(array.shape), array.dtype


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(storage.readable(path))
    except storage.FetchError as error:
        raise InputError(error.advice()) from error
    except Exception as error:  # pyarrow raises several types for damaged files
        raise InputError(f"{path}: not a readable parquet file ({error})") from error


_FOOTER_READ = 64 * 1024  # bytes read from a remote parquet file's end: its footer, mostly whole


def _parquet_metadata(path: Path):
    """A parquet file's footer (row count, schema, row groups) as ``pyarrow.parquet.FileMetaData``;
    of a remote file only the footer is fetched (ranged reads), not the table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not storage.is_url(path):
        return _parquet_file(path).metadata
    try:
        tail = storage.read_tail(path, _FOOTER_READ)
        length = int.from_bytes(tail[-8:-4], "little") if len(tail) >= 12 else -1
        if tail[-4:] != b"PAR1" or length < 0 or (len(tail) < _FOOTER_READ and length > len(tail) - 12):
            raise InputError(f"{path}: not a readable parquet file (no parquet footer at its end)")
        if length + 8 > len(tail):  # a footer longer than the first read
            tail = storage.read_tail(path, length + 8)
            if len(tail) < length + 8:
                raise InputError(f"{path}: not a readable parquet file (its footer is longer than the file)")
        return pq.read_metadata(pa.BufferReader(b"PAR1" + tail[-(length + 8):]))
    except storage.FetchError as error:
        raise InputError(error.advice()) from error
    except InputError:
        raise
    except Exception as error:  # pyarrow raises several types for damaged footers
        raise InputError(f"{path}: not a readable parquet file ({error})") from error


def _read_parquet(path: Path, columns: Sequence[str] | None = None):
    file = _parquet_file(path)
    try:
        return file.read(columns=list(columns) if columns is not None else None)
    except Exception as error:  # a missing column, a damaged row group
        raise InputError(f"{path}: cannot read {list(columns) if columns else 'the table'} ({error})") from error


def part_column_values(root, number: int, column: str) -> set:
    """The distinct values of one metadata column of part ``number`` under ``root`` (none when
    the part's metadata has no such column)."""
    path = part_path(storage.join(root, KINDS["metadata"][0]), "metadata", number)
    file = _parquet_file(path)
    if column not in file.schema_arrow.names:
        return set()
    try:
        return set(file.read(columns=[column]).column(column).unique().to_pylist())
    except Exception as error:  # a damaged row group
        raise InputError(f"{path}: cannot read [{column!r}] ({error})") from error


def listed_parts(numbers, shown: int = SHOWN) -> str:
    """Part numbers for a message: ``[0, 3, 7]``, the first ``shown`` of many then ``...``."""
    numbers = sorted(numbers)
    return str(numbers[:shown])[:-1] + (", ...]" if len(numbers) > shown else "]")


@dataclass(frozen=True)
class EmbeddingPart:
    """One complete part: its number (from the file names) and its row count."""

    number: int
    rows: int


@dataclass
class EmbeddingFolders:
    """The folders of one collection: any of image, text and metadata may be absent.

    ``root`` is the folder they were found in (:meth:`from_root`), None when they were
    given one by one (e.g. LAION's ``img_emb/`` and ``metadata/`` downloaded apart).
    """

    image: Path | None = None
    text: Path | None = None
    metadata: Path | None = None
    root: Path | None = None

    @classmethod
    def from_root(cls, root) -> "EmbeddingFolders":
        """The sub-folders ``img_emb``, ``text_emb`` and ``metadata`` of ``root`` (a folder or a URL) that exist."""
        root = storage.path(root)
        if not storage.is_dir(root):
            found = "a file, not a folder" if storage.is_file(root) else "folder not found"
            raise InputError(f"{root}: {found} (an embedding folder holds img_emb/, text_emb/ and metadata/)")
        found = {kind: root / sub for kind, (sub, _, _) in KINDS.items() if storage.is_dir(root / sub)}
        if not found:
            raise InputError(f"{root}: none of img_emb/, text_emb/, metadata/ is inside; is this an embedding folder?")
        return cls(**found, root=root)

    def folder(self, kind: str) -> Path:
        folder = getattr(self, kind)
        if folder is None:
            if self.root is not None:
                raise InputError(f"{self.root}: no {KINDS[kind][0]}/ folder inside; this needs {kind} embeddings"
                                 if kind != "metadata" else f"{self.root}: no metadata/ folder inside")
            raise InputError(f"no {KINDS[kind][0]} folder was given")
        return storage.path(folder)

    def present(self) -> list[str]:
        return [kind for kind in KINDS if getattr(self, kind) is not None]

    def location(self) -> str:
        """Where the collection is, for messages: its root, or its folders."""
        if self.root is not None:
            return str(self.root)
        return ", ".join(str(getattr(self, kind)) for kind in self.present())

    def files(self, kind: str) -> dict[int, Path]:
        folder = self.folder(kind)
        _, prefix, suffix = KINDS[kind]
        parts = dict(numbered_files(folder, prefix, suffix))
        if not parts:
            raise InputError(f"{folder}: no {prefix}<N>{suffix} files in this folder")
        return parts

    def path(self, kind: str, number: int) -> Path:
        """The file of part ``number`` of ``kind``, its number zero-padded or not."""
        path = part_path(self.folder(kind), kind, number)
        if storage.is_file(path):
            return path
        return self.files(kind).get(number, path)

    def load(self, kind: str, number: int, mmap: bool = True, columns: Sequence[str] | None = None):
        """Part ``number`` of ``kind``: a (memory-mapped) 2-D array, or a ``pyarrow.Table``
        (of ``columns``, default all)."""
        path = self.path(kind, number)
        if not storage.is_file(path):
            raise InputError(f"{path}: file not found")
        if kind == "metadata":
            return _read_parquet(path, columns)
        return _load_npy(path, mmap)

    def num_rows(self, kind: str, number: int) -> int:
        path = self.path(kind, number)
        if kind == "metadata":
            return _parquet_metadata(path).num_rows
        return int(_load_npy(path).shape[0])

    # ------------------------------------------------------------------ the one listing

    def contents(
        self, embeddings: Sequence[str] = ("image",), *, metadata: bool | None = None, allow_unfinished: bool = False
    ) -> "Contents":
        """The complete parts for the embedding kinds ``embeddings``, every one checked.

        metadata: read the metadata too (True), not (False), or when the collection has
        it (None). allow_unfinished: leave unfinished parts out with a warning instead of
        raising :class:`InputError` (see the module docstring for both words). Damage is
        always an :class:`InputError` naming the file and what to do.
        """
        embeddings = tuple(embeddings)
        with_metadata = self.metadata is not None if metadata is None else metadata
        listing = {kind: self.files(kind) for kind in embeddings}
        if with_metadata:
            listing["metadata"] = dict(numbered_files(self.folder("metadata"), *KINDS["metadata"][1:]))
            complete, unfinished = self._by_metadata(listing, embeddings)
        else:
            complete, unfinished = self._same_parts(listing, embeddings), []
        if unfinished:
            what = (f"{self.folder('metadata')}: parts {listed_parts(unfinished)} have embeddings but no metadata_<N>.parquet "
                    "yet (`unicom embed` writes it last: they are unfinished)")
            if not allow_unfinished:
                raise InputError(f"{what}; let `unicom embed` finish them (it resumes where it stopped), or remove their files")
            logger.warning("%s; they are left out", what)
        # the headers and row counts of every file (at a URL, many requests at once)
        shapes = storage.gather(_shape_and_dtype, [listing[kind][n] for n in complete for kind in embeddings])
        shapes = {(n, kind): shapes[i * len(embeddings) + j] for i, n in enumerate(complete) for j, kind in enumerate(embeddings)}
        metadata_rows = dict(zip(complete, storage.gather(
            lambda path: _parquet_metadata(path).num_rows, [listing["metadata"][n] for n in complete]))) if with_metadata else {}
        parts, dimensions, dtypes, first = [], {}, {}, {}
        for number in complete:
            counts = {}
            for kind in embeddings:
                path = listing[kind][number]
                shape, dtype = shapes[number, kind]
                if dtype.kind != "f":
                    raise InputError(f"{path}: dtype {dtype} is not a float type; expected float16 or float32 embeddings")
                dimension = int(shape[1])
                first.setdefault(kind, path)
                dimensions.setdefault(kind, dimension)
                dtypes.setdefault(kind, str(dtype))
                if dimension != dimensions[kind]:
                    raise InputError(
                        f"{path}: dimension {dimension}, but {first[kind]} has {dimensions[kind]}; "
                        "every part must come from the same model"
                    )
                counts[kind] = int(shape[0])
            if with_metadata:
                counts["metadata"] = metadata_rows[number]
            if len(set(counts.values())) > 1:
                sizes = ", ".join(f"{listing[kind][number].name} has {rows}" for kind, rows in counts.items())
                raise InputError(
                    f"{self.location()}: part {number}: {sizes} rows; the files of one part must describe the same "
                    f"samples row by row: re-run `unicom embed` for part {number}"
                )
            parts.append(EmbeddingPart(number, next(iter(counts.values()))))
        kinds = (*embeddings, "metadata") if with_metadata else embeddings
        return Contents(self, kinds, parts, unfinished, dimensions, dtypes, listing)

    def _by_metadata(self, listing: dict, embeddings: tuple[str, ...]) -> tuple[list[int], list[int]]:
        """(complete, unfinished) part numbers, the metadata file marking a finished part."""
        finished = sorted(listing["metadata"])
        damaged = {n: [kind for kind in embeddings if n not in listing[kind]] for n in finished}
        damaged = {n: kinds for n, kinds in damaged.items() if kinds}
        if damaged:
            number, kinds = next(iter(damaged.items()))
            missing = part_path(self.folder(kinds[0]), kinds[0], number)
            more = f" (and parts {listed_parts(list(damaged)[1:])})" if len(damaged) > 1 else ""
            raise InputError(
                f"{listing['metadata'][number]}: part {number} has no {missing.name} beside it in {missing.parent}{more}; "
                "`unicom embed` writes a part's metadata last, so that file was removed or the folders hold different "
                f"collections: re-run `unicom embed` for part {number}, or remove its metadata file"
            )
        started = set().union(*(listing[kind] for kind in embeddings))
        return finished, sorted(started - set(finished))

    def _same_parts(self, listing: dict, embeddings: tuple[str, ...]) -> list[int]:
        """Part numbers without a metadata folder: every kind read must have the same."""
        reference_kind = embeddings[0]
        reference = set(listing[reference_kind])
        for kind in embeddings[1:]:
            other = set(listing[kind])
            if other != reference:
                raise InputError(
                    f"{self.folder(kind)} and {self.folder(reference_kind)} hold different parts: missing "
                    f"{listed_parts(reference - other, 5)}, extra {listed_parts(other - reference, 5)}; every part needs all of "
                    f"{list(embeddings)}"
                )
        return sorted(reference)


@dataclass
class Contents:
    """The complete, checked parts of a collection for the kinds one reader needs.

    ``kinds``: the kinds read (``"metadata"`` last when it is); ``parts``: the complete
    parts in part order; ``unfinished``: the numbers of the parts left out;
    ``dimensions`` and ``dtypes``: per embedding kind.
    """

    folders: EmbeddingFolders
    kinds: tuple[str, ...]
    parts: list[EmbeddingPart]
    unfinished: list[int]
    dimensions: dict[str, int]
    dtypes: dict[str, str]
    files: dict[str, dict[int, Path]]

    @property
    def numbers(self) -> list[int]:
        return [part.number for part in self.parts]

    @property
    def num_rows(self) -> int:
        return sum(part.rows for part in self.parts)

    def path(self, kind: str, number: int) -> Path:
        return self.files[kind][number]

    def load(self, kind: str, number: int, columns: Sequence[str] | None = None):
        """Part ``number`` of ``kind``: a fresh memory-mapped 2-D array, or a ``pyarrow.Table``
        (of ``columns``, default all)."""
        if kind == "metadata":
            return _read_parquet(self.path(kind, number), columns)
        return _load_npy(self.path(kind, number))

    def metadata_columns(self, number: int) -> list[str]:
        """The column names of part ``number``'s metadata."""
        return list(_parquet_metadata(self.path("metadata", number)).schema.to_arrow_schema().names)


def read_embedding_folder(root: str | os.PathLike, embeddings: bool = True):
    """Every part of an embedding folder in memory: (image embeddings float32 (N, D), or None
    when not ``embeddings`` (the metadata alone is read), the metadata as one
    ``pyarrow.Table``, or None without a metadata folder). Unfinished parts are an error:
    their rows would be missing."""
    import pyarrow as pa

    folders = EmbeddingFolders.from_root(root)
    contents = folders.contents(("image",))
    if not contents.parts:
        raise InputError(f"{root}: no complete part to read")
    arrays = [np.asarray(_load_npy(contents.path("image", n)), dtype=np.float32) for n in contents.numbers] \
        if embeddings else None
    metadata = None
    if "metadata" in contents.kinds:
        tables = [_read_parquet(contents.path("metadata", n)) for n in contents.numbers]
        try:
            metadata = pa.concat_tables(tables, promote_options="default")
        except (pa.ArrowTypeError, pa.ArrowInvalid) as error:
            raise _mixed_metadata(root, contents, tables) from error
    return (np.concatenate(arrays) if embeddings else None), metadata


def _mixed_metadata(root, contents: "Contents", tables) -> InputError:
    """The error for metadata parts whose column types differ (parts written by different
    versions: a list's class names, once stored as numbers, are stored as written)."""
    import pyarrow as pa

    for name in dict.fromkeys(name for table in tables for name in table.column_names):
        kinds: dict[str, list[int]] = {}
        for number, table in zip(contents.numbers, tables):
            if name in table.column_names and not pa.types.is_null(table.schema.field(name).type):
                kinds.setdefault(str(table.schema.field(name).type), []).append(number)
        if len(kinds) > 1:
            found = "; ".join(f"{kind} in parts {listed_parts(numbers)}" for kind, numbers in kinds.items())
            return InputError(
                f"{root}: the metadata parts hold column {name!r} as different types ({found}), so they cannot be "
                f"read as one table; they were written by different versions of unicom embed: delete the files of "
                f"the parts of one kind (img_emb/, metadata/ ...) and run the same unicom embed again to redo them")
    return InputError(f"{root}: the metadata parts cannot be read as one table; run unicom embed again into a new folder")


__all__ = [
    "CONFIG_FILE",
    "SHARD_COLUMNS",
    "METADATA_FIELDS",
    "FAILURES_FOLDER",
    "KEY_COLUMNS",
    "KINDS",
    "Contents",
    "EmbeddingFolders",
    "EmbeddingPart",
    "failures_path",
    "key_column",
    "complete_parts",
    "part_complete",
    "part_name",
    "part_path",
    "sweep_writer_temporaries",
    "read_config",
    "read_embedding_folder",
    "require_usable_rows",
    "row_keys",
    "write_config",
    "write_part",
]
