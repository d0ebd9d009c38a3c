"""Inputs of extraction as numbered *parts*: one per webdataset shard, or row chunks of a list.

Each part becomes one output part (``img_emb_{number}.npy`` ...). A shard keeps the
number in its file name (``00012.tar`` -> part 12), so outputs line up with the shards and
with img2dataset's own per-shard files; an image folder or a CSV/parquet list is cut into
parts of ``rows_per_part`` rows, numbered from 0.

A part yields :class:`Record` s: what to decode plus the metadata columns of its row.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from unicom import storage
from unicom.data import parquet_shards
from unicom.data.lists import (
    CAPTION_SUFFIX,
    FIELDS_SUFFIX,
    IMAGE_SUFFIXES,
    ImageList,
    sidecar_files,
    check_utf8_names,
    read_image_folder,
    read_table,
    warn_other_images,
)
from unicom.data.shards import (
    SHARD_SUFFIXES,
    TAR_SUFFIXES,
    ShardReadError,
    check_shard_columns,
    expand_shards,
    is_parquet,
    prefetch_shard,
    read_shard_samples,
    shard_name,
    shard_number,
)
from unicom.data.transforms import DecodeError
from unicom.errors import InputError
from unicom.formats.embeddings import OCCURRENCE

TABLE_SUFFIXES = (".csv", ".parquet")
DEFAULT_ROWS_PER_PART = 100_000  # rows per part of an image folder or a list


@dataclass
class Record:
    """One sample of a part.

    ``index`` is its position in the part (failed samples included), ``image`` encoded
    bytes, a file path, a PIL image, or None when the sample has no image; ``columns`` the
    metadata values of its output row besides key, caption, width and height.
    """

    index: int
    key: str
    image: Any
    caption: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    # a folder's json file of the sample's fields (FieldsFile), read into ``columns`` with its
    # caption file (``caption`` a CaptionFile) where the batch is made
    fields: Any = None


def _utf8(text: str) -> str:
    """``text`` with lone surrogates (JSON's ``"\\ud83d"``, half of a pair cut off) written
    as escapes: metadata files hold UTF-8 only."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class ShardPart:
    """A shard, a webdataset tar or a parquet file holding the images: a local ``Path`` or a
    URL. Metadata columns: ``url`` (from the json, or the parquet's url column), ``shard``
    and ``occurrence`` (:func:`key_occurrences`), and the fields :attr:`metadata_fields`
    names. ``following``: the shard the same reader reads next, whose download starts when
    this one starts (remote shards). ``shard_columns``: the columns of a parquet shard named
    instead of the usual ones, and the fields kept as metadata (``fields``)."""

    number: int
    path: Path | str
    following: Path | str | None = None
    shard_columns: parquet_shards.ShardColumns = parquet_shards.DEFAULT_COLUMNS
    columns = (("url", "string"), ("shard", "string"), (OCCURRENCE, "int32"))
    has_captions = True
    size = None  # samples: unknown until the tar is read

    @property
    def name(self) -> str:
        return storage.text(self.path)

    @property
    def metadata_fields(self) -> tuple[str, ...]:
        """Fields of each sample's json (a tar's) or columns (a parquet shard's) kept as metadata
        columns of these names, as clip-retrieval's ``enable_metadata`` keeps them;
        :data:`~unicom.data.parquet_shards.ALL_FIELDS`: every one but the columns the metadata
        has anyway (:data:`SHARD_METADATA`)."""
        return self.shard_columns.fields

    def records(self) -> Iterator[Record]:
        """Records in the shard's order; raises :class:`ShardReadError` after the last one of a
        damaged (or, remotely, unfetchable) shard."""
        shard = shard_name(self.path)
        samples = read_shard_samples(self.path, columns=self.shard_columns)
        prefetch_shard(self.following, self.shard_columns)
        met: dict[str, int] = {}  # samples of each key so far: the shard's keys, as its metadata rows hold them
        for index, sample in enumerate(samples):
            occurrence = met[sample.key] = met.get(sample.key, -1) + 1
            info = sample.json()
            caption = sample.caption()
            if caption is None and isinstance(info.get("caption"), str):
                caption = _utf8(info["caption"])
            url = info.get("url")
            columns = {**_kept_fields(info, self.metadata_fields, SHARD_METADATA),
                       "url": None if url is None else _utf8(str(url)), "shard": shard, OCCURRENCE: occurrence}
            yield Record(index, sample.key, sample.image_bytes(), caption, columns)


# the metadata columns of a shard's samples and of a folder's, which no field of theirs may replace
SHARD_METADATA = ("key", "caption", "url", "width", "height", "shard", OCCURRENCE)
LIST_METADATA = ("key", "caption", "image_path", "width", "height", OCCURRENCE, "label")


def _kept_fields(info: dict, fields: tuple[str, ...], reserved: tuple[str, ...]) -> dict[str, Any]:
    """The fields of a sample's json ``info`` kept as metadata (see :attr:`ShardPart.metadata_fields`):
    with :data:`~unicom.data.parquet_shards.ALL_FIELDS`, all but the ``reserved`` columns."""
    if not fields:
        return {}
    if tuple(fields) == parquet_shards.ALL_FIELDS:
        return {name: value for name, value in info.items() if name not in reserved}
    return {name: info.get(name) for name in fields}


def check_metadata_fields(fields: Sequence[str], reserved: tuple[str, ...] = SHARD_METADATA) -> tuple[str, ...]:
    """``fields`` as :attr:`ShardPart.metadata_fields` (``reserved`` :data:`SHARD_METADATA`)
    or :attr:`ListPart.metadata_fields` (:data:`LIST_METADATA`) takes them; a name the
    metadata has anyway, an empty one or one given twice is an :class:`InputError`."""
    fields = tuple(fields)
    if fields == parquet_shards.ALL_FIELDS:
        return fields
    taken = [name for name in fields if name in reserved or name in parquet_shards.ALL_FIELDS]
    if taken:
        raise InputError(f"metadata fields {', '.join(taken)}: the metadata has columns of these names already "
                         f"({', '.join(reserved)}), or 'all' names every field alone; leave them out")
    if any(not name for name in fields) or len(set(fields)) < len(fields):
        raise InputError(f"metadata fields {','.join(fields)}: give each field once, by name")
    return fields


# the longest caption or json file beside an image read (a model reads a caption's first few
# dozen words; img2dataset's json of a sample is a few kB)
MAX_SIDECAR_BYTES = 1 << 20


def _read_sidecar(path: str, what: str) -> bytes:
    data = storage.read_range(path, 0, MAX_SIDECAR_BYTES + 1, exact=False)
    if len(data) > MAX_SIDECAR_BYTES:
        raise DecodeError(f"its {what} file {path} is longer than the {MAX_SIDECAR_BYTES:,} bytes it may have")
    return data


@dataclass(frozen=True)
class CaptionFile:
    """The caption of an image in a folder, in the text file beside it
    (:func:`unicom.data.lists.sidecar_files`): read when its sample's batch is made, as
    UTF-8 (bytes that are not replaced), stripped as a tar's ``.txt`` is."""

    path: str

    def read(self) -> str:
        """The caption; :class:`unicom.data.transforms.DecodeError` for a file over
        :data:`MAX_SIDECAR_BYTES`, ``OSError`` (``storage.FetchError`` for a URL) when it cannot be read."""
        return _utf8(_read_sidecar(self.path, "caption").decode("utf-8", errors="replace").strip())


@dataclass(frozen=True)
class FieldsFile:
    """The json file beside an image in a folder (img2dataset's ``files`` output writes its
    url, status, sizes and its input's columns there), whose ``fields`` are kept as metadata
    (:attr:`ListPart.metadata_fields`); read when its sample's batch is made, as a tar's
    ``.json`` is (a file that is not a JSON object gives no fields)."""

    path: str
    fields: tuple[str, ...]

    def read(self) -> dict[str, Any]:
        """The fields kept; errors as :meth:`CaptionFile.read`'s."""
        try:
            info = json.loads(_read_sidecar(self.path, "json"))
        except ValueError:
            info = {}
        return _kept_fields(info if isinstance(info, dict) else {}, self.fields, LIST_METADATA)


@dataclass(frozen=True)
class ListPart:
    """Rows ``start:stop`` of an :class:`ImageList` (captions from its ``captions``, or read
    from its ``caption_files`` as :class:`CaptionFile`). Metadata: ``image_path``, ``occurrence``
    (:func:`key_occurrences` over the whole list: ``occurrences``, None when every key is
    unique) and ``label``: the class id, or with ``label_names`` the class name when the labels
    are names (a CSV list's labels as written)."""

    number: int
    images: ImageList
    start: int
    stop: int
    source: str
    label_names: bool = False
    occurrences: Any = field(default=None, compare=False, repr=False)
    # fields kept as metadata columns, as ShardPart.metadata_fields keeps a shard's: the list's
    # own columns (images.extra), or a folder's json file beside each image (images.json_files)
    metadata_fields: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[tuple[str, str], ...]:
        columns = [("image_path", "string"), (OCCURRENCE, "int32")]
        if self.images.labels is not None:
            columns.append(("label", "string" if self._names else "int64"))
        return tuple(columns)

    @property
    def _names(self) -> bool:
        return self.label_names and self.images.class_names is not None

    @property
    def has_captions(self) -> bool:
        return self.images.captions is not None or self.images.caption_files is not None

    @property
    def name(self) -> str:
        return f"{self.source} rows {self.start}-{self.stop - 1}"

    @property
    def size(self) -> int:
        return self.stop - self.start

    def records(self) -> Iterator[Record]:
        images = self.images
        for index, row in enumerate(range(self.start, self.stop)):
            columns = {"image_path": images.paths[row],
                       OCCURRENCE: 0 if self.occurrences is None else int(self.occurrences[row])}
            if images.labels is not None:
                label = int(images.labels[row])
                columns["label"] = images.class_names[label] if self._names else label
            caption = None if images.captions is None else images.captions[row]
            if images.caption_files is not None and images.caption_files[row] is not None:
                caption = CaptionFile(images.caption_files[row])  # read by the batch's maker: its slice only
            fields = None
            if images.extra is not None:  # a list's columns kept
                columns.update({name: values[row] for name, values in images.extra.items() if name not in LIST_METADATA})
            elif self.metadata_fields:
                json_file = None if images.json_files is None else images.json_files[row]
                if json_file is not None:
                    fields = FieldsFile(json_file, self.metadata_fields)
                elif tuple(self.metadata_fields) != parquet_shards.ALL_FIELDS:
                    columns.update({name: None for name in self.metadata_fields})
            yield Record(index, images.keys[row], images.paths[row], caption, columns, fields)


@dataclass(frozen=True)
class ItemsPart:
    """In-memory items (paths or PIL images) as one part; keys are the positions ``"0"``, ``"1"``..."""

    items: Sequence[Any]
    number: int = 0
    columns = ()
    has_captions = False
    name = "images"

    @property
    def size(self) -> int:
        return len(self.items)

    def records(self) -> Iterator[Record]:
        for index, item in enumerate(self.items):
            yield Record(index, str(index), item)


@dataclass(frozen=True)
class QueryCrop:
    """A query image cropped to its box, made when the sample is decoded (by
    :func:`unicom.data.benchmarks.revisited.crop_query`): a decoded image, so neither draft
    nor GPU decoding applies to it."""

    path: str
    box: tuple[float, float, float, float]

    def decoded(self):
        from unicom.data.benchmarks.revisited import crop_query

        return crop_query(self.path, self.box)


@dataclass(frozen=True)
class CroppedPart:
    """The queries of a benchmark whose queries are boxes of images (Revisited Oxford/Paris)
    as one part: keys ``jpg/<name>.jpg#crop``, each image cropped to its box when it is
    decoded. Metadata: ``image_path`` (the whole image the crop is of)."""

    number: int
    images: ImageList
    boxes: tuple[tuple[float, float, float, float], ...]
    source: str
    columns = (("image_path", "string"),)
    has_captions = False

    @property
    def name(self) -> str:
        return f"{self.source} query crops"

    @property
    def size(self) -> int:
        return len(self.images)

    def records(self) -> Iterator[Record]:
        for index, (path, key, box) in enumerate(zip(self.images.paths, self.images.keys, self.boxes)):
            yield Record(index, key, QueryCrop(path, box), columns={"image_path": path})


# benchmarks whose queries only `unicom embed --dataset` (or `unicom evaluate --model`) can
# embed: crops of images, not image files
CROPPED_QUERY_BENCHMARKS = ("roxford5k", "rparis6k")


def open_benchmark(name: str, root, rows_per_part: int = DEFAULT_ROWS_PER_PART) -> tuple[list[ListPart | CroppedPart], dict]:
    """The parts of benchmark ``name`` (one of :data:`CROPPED_QUERY_BENCHMARKS` or an alias)
    read from ``root``: its gallery cut into parts of ``rows_per_part`` rows (keys
    ``jpg/<name>.jpg``), then one :class:`CroppedPart` of its cropped queries; and what the
    embeddings depend on besides the model: ``{"dataset": name, "query_boxes_sha256": ...}``.
    Warns when boxes reach beyond their image."""
    from unicom.data.benchmarks import ALIASES, canonical_name, load_retrieval_benchmark
    from unicom.data.benchmarks.revisited import query_boxes_sha256, warn_boxes_outside

    canonical = canonical_name(name)
    if canonical not in CROPPED_QUERY_BENCHMARKS:
        aliases = [alias for alias, target in ALIASES.items() if target in CROPPED_QUERY_BENCHMARKS]
        raise InputError(
            f"--dataset {name}: unicom embed writes the benchmarks whose queries are crops: "
            f"{', '.join(CROPPED_QUERY_BENCHMARKS)} (or {', '.join(aliases)}); embed another benchmark's images with "
            "--input (its image folder or a list), or evaluate it with unicom evaluate --model"
        )
    protocol = load_retrieval_benchmark(canonical, root)
    source = os.fspath(root)
    parts: list[ListPart | CroppedPart] = list_parts(protocol.gallery, rows_per_part, source)
    warn_boxes_outside(protocol.query, protocol.query_boxes)
    boxes = tuple(tuple(float(v) for v in box) for box in protocol.query_boxes)
    parts.append(CroppedPart(len(parts), protocol.query, boxes, source))
    return parts, {"dataset": canonical, "query_boxes_sha256": query_boxes_sha256(protocol.query_boxes)}


def read_in_turn(parts: Sequence[Any]) -> list[Any]:
    """``parts`` for one reader that reads them in this order: each remote shard names
    the next one, which then downloads while it is decoded (see :attr:`ShardPart.following`)."""
    return [replace(part, following=after.path) if isinstance(part, ShardPart) and isinstance(after, ShardPart) else part
            for part, after in zip(parts, [*parts[1:], None])]


def list_parts(images: ImageList, rows_per_part: int, source: str, label_names: bool = False,
               metadata_fields: tuple[str, ...] = ()) -> list[ListPart]:
    """Cut ``images`` into parts of ``rows_per_part`` rows, numbered 0, 1, ... (``label_names``,
    ``metadata_fields``: see :class:`ListPart`)."""
    if rows_per_part < 1:
        raise InputError(f"rows per part must be at least 1, got {rows_per_part}")
    occurrences = key_occurrences(images.keys)
    return [
        ListPart(number, images, start, min(start + rows_per_part, len(images)), source, label_names, occurrences,
                 metadata_fields)
        for number, start in enumerate(range(0, len(images), rows_per_part))
    ]


def key_occurrences(keys: Sequence[str]) -> np.ndarray | None:
    """(N,) int32: each key's number among the equal keys before it (0 for the first), or
    None when every key is unique. How a label file names a sample of a repeated key
    (``occurrence``, see :mod:`unicom.formats.clusters`)."""
    met: dict[str, int] = {}
    occurrences = np.empty(len(keys), dtype=np.int32)
    for row, key in enumerate(keys):
        occurrences[row] = met[key] = met.get(key, -1) + 1
    return occurrences if len(met) < len(keys) else None


def read_flat_folder(root) -> ImageList:
    """Every image under ``root`` (recursively; a folder or a URL), keyed by its path relative to ``root``."""
    if storage.is_url(root):
        base = storage.text(root).rstrip("/")
        files = [storage.text(p) for p in storage.find_files(root)]
        warn_other_images(root, [p[len(base) + 1:] for p in files])
        paths = [p for p in files if Path(storage.name(p)).suffix.lower() in IMAGE_SUFFIXES]
        if not paths:
            raise InputError(f"{base}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
        sidecars = {p for p in files if p.endswith((CAPTION_SUFFIX, FIELDS_SUFFIX))}
        return ImageList(paths, [p[len(base) + 1:] for p in paths], caption_files=sidecar_files(paths, sidecars, CAPTION_SUFFIX),
                         json_files=sidecar_files(paths, sidecars, FIELDS_SUFFIX))
    root = Path(root)
    files = sorted(root.rglob("*"))
    warn_other_images(root, [p.relative_to(root).as_posix() for p in files])
    paths = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not paths:
        raise InputError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
    check_utf8_names(root, [str(p) for p in paths])
    absolute = [str(p.absolute()) for p in paths]
    sidecars = {str(p.absolute()) for p in files if p.suffix in (CAPTION_SUFFIX, FIELDS_SUFFIX)}
    return ImageList(absolute, [p.relative_to(root).as_posix() for p in paths],
                     caption_files=sidecar_files(absolute, sidecars, CAPTION_SUFFIX),
                     json_files=sidecar_files(absolute, sidecars, FIELDS_SUFFIX))


def _folder_list(root) -> ImageList:
    """A class folder (``root/<class>/<images>``) with labels, else a flat listing."""
    if storage.is_url(root):
        has_top_images = any(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in storage.list_files(root))
        has_sub_folders = any(not name.startswith(".") for name in storage.list_folders(root))
    else:
        root = Path(root)
        has_top_images = any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in root.iterdir())
        has_sub_folders = any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
    if has_sub_folders and not has_top_images:
        return read_image_folder(root)
    return read_flat_folder(root)


def _first_sub_folder_image(location: str) -> list[str]:
    """The first image found in a sub-folder of ``location`` (not a hidden one), as a path
    relative to it: ``[]`` or one name."""
    if storage.is_url(location):
        base = storage.text(location).rstrip("/")
        for folder in sorted(storage.list_folders(location)):
            if not folder.startswith("."):
                for path in storage.find_files(f"{base}/{folder}"):
                    if Path(storage.name(path)).suffix.lower() in IMAGE_SUFFIXES:
                        return [storage.text(path)[len(base) + 1:]]
        return []
    root = Path(location)
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in folder.rglob("*"):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                return [path.relative_to(root).as_posix()]
    return []


def _is_image_folder(location: str) -> bool:
    """A folder (local, or a URL of a listable store) that holds no shards. A folder holding
    tar shards and images beside them is an :class:`InputError`: reading either would leave
    the other out without a word. Parquet files are the folder's shards only when it holds
    no images (an image folder may keep a list or labels in parquet)."""
    if storage.is_url(location):
        if storage.is_pipe(location) or storage.protocol(location) in storage.READ_ONLY or storage.has_magic(location):
            return False
        if shard_name(location).endswith(SHARD_SUFFIXES) or not storage.is_dir(location):
            return False
        names = sorted(storage.list_files(location))
    elif os.path.isdir(location):
        names = sorted(p.name for p in Path(location).iterdir() if p.is_file())
    else:
        return False
    parquets = [name for name in names if name.endswith(parquet_shards.PARQUET_SUFFIX)]
    shards = [name for name in names if name.endswith(TAR_SUFFIXES)]
    images = [name for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    found = f"images ({images[0]}, {len(images)} in all)" if images else None
    if (shards or parquets) and not images:  # a class folder: its images are in the (not hidden) sub-folders
        found = next((f"images in its sub-folders ({image}, ...)" for image in _first_sub_folder_image(location)), None)
    if not shards and parquets:  # parquet shards, or a list (of labels, ...) kept beside the images
        return found is not None
    if shards and found:
        raise InputError(
            f"{location}: the folder holds both shards ({shards[0]}, {len(shards)} in all) and {found}; give the "
            f"shards by a pattern ({storage.text(location).rstrip('/')}/*.tar) or move them out of the image folder"
        )
    return not shards


def _holds_images(location: str, table_options: dict[str, Any], columns: parquet_shards.ShardColumns) -> bool:
    """Whether the one parquet file given is a shard (its rows hold the images, in the column
    ``columns`` names or one of the usual ones) rather than a list of image paths. A file
    with both an image column and the list's path column, or a shard given with a list's
    path or label column named, is an :class:`InputError`: either reading would leave what
    the other names unread."""
    from unicom.data.lists import find_column

    if not storage.is_file(location):
        if columns.image is not None:
            raise InputError(f"{location}: no such file (a parquet shard, its image column named {columns.image!r})")
        return False
    try:
        schema = parquet_shards.read_schema(location)
    except Exception as error:  # noqa: BLE001 - unreadable or absent: reading it as a list names what is wrong
        if columns.image is not None:
            raise InputError(f"{location}: cannot be read as a parquet shard ({type(error).__name__}: {error})") from error
        return False
    layout = parquet_shards.parquet_layout(schema, location, columns)
    path_column = table_options.get("path_column", "path")
    if layout is None:
        if parquet_shards.image_columns(schema) and find_column(schema.names, path_column) is None:
            raise parquet_shards.no_images_error(location, schema)  # images under a name of its own: which to read
        return False
    label_column = table_options.get("label_column", "label")
    named = [c for c in table_options.get("required", ()) if c == label_column]
    named += [path_column] if path_column != "path" else []
    if named:
        raise InputError(f"{location}: a parquet shard (its images are in the column {layout.images[0]!r}), and "
                         f"{', '.join(repr(c) for c in named)} name the path or label column of a list; a shard's "
                         "images and keys are its own (docs/embedding.md): leave those column options out")
    if find_column(schema.names, path_column) is not None:
        raise InputError(f"{location}: holds both images (column {layout.images[0]!r}) and image paths (column "
                         f"{path_column!r}); write the images and the list of paths to separate files")
    return True


def open_parts(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    rows_per_part: int = DEFAULT_ROWS_PER_PART,
    table_options: dict[str, Any] | None = None,
    shard_columns: parquet_shards.ShardColumns | None = None,
    metadata_fields: Sequence[str] = (),
) -> list[ShardPart] | list[ListPart]:
    """The parts of ``inputs``, in part-number order.

    ``inputs`` is one of: shard paths / brace patterns / globs (``.tar``), a folder of
    shards, an image folder (class sub-folders give a ``label`` column), or one CSV/parquet
    list (``table_options`` go to :func:`unicom.data.lists.read_table`); each may be a URL
    (:mod:`unicom.storage`). ``shard_columns``: the image, caption and key columns of
    parquet shards, named instead of the usual ones (refused for tars and image folders; a
    list takes its caption and key columns from ``table_options``). ``metadata_fields``:
    fields of the samples kept as metadata columns (:attr:`ShardPart.metadata_fields`,
    :attr:`ListPart.metadata_fields`), names the parts' metadata has refused.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(i) for i in inputs]
    columns = shard_columns or parquet_shards.DEFAULT_COLUMNS
    fields = tuple(metadata_fields)

    def with_fields() -> parquet_shards.ShardColumns:  # a shard's fields are read with its columns
        return replace(columns, fields=check_metadata_fields(fields, SHARD_METADATA)) if fields else columns

    if not inputs:
        raise InputError("no input was given")
    if len(inputs) == 1:
        only = inputs[0]
        if only.lower().endswith(TABLE_SUFFIXES) and storage.braces(only) == [only] and not storage.has_magic(only):
            if only.lower().endswith(parquet_shards.PARQUET_SUFFIX) and _holds_images(only, table_options or {}, columns):
                shard_columns = with_fields()
                _check_first_parquet([only], shard_columns)  # the fields named, before anything is written
                return [ShardPart(shard_number(only), only if storage.is_url(only) else Path(only),
                                  shard_columns=shard_columns)]
            fields = check_metadata_fields(fields, LIST_METADATA) if fields else ()
            if columns.image is not None:
                raise InputError(f"{only}: a list of image files, whose paths are in its path column; the image column "
                                 f"named ({columns.image!r}) is the column of encoded images of parquet shards: leave "
                                 "it out, or name the list's path column")
            every = fields == parquet_shards.ALL_FIELDS
            images = read_table(only, **(table_options or {}), extra_columns=() if every else fields,
                                every_other_column=every)
            if not len(images):
                raise InputError(f"{only}: the list has no rows; give a list with one row per image")
            return list_parts(images, rows_per_part, only, label_names=True, metadata_fields=fields)
        if _is_image_folder(only):
            if columns.named():
                shown = ", ".join(f"{role} {name!r}" for role, name in columns.named().items())
                raise InputError(f"{only}: an image folder, whose keys are its files' paths; the columns named ({shown}) "
                                 "are columns of parquet shards or of a list: leave them out")
            fields = check_metadata_fields(fields, LIST_METADATA) if fields else ()
            return list_parts(_folder_list(only), rows_per_part, only, metadata_fields=fields)
    shards = expand_shards(inputs, instead="; give shards (webdataset tars, or parquet files that hold the images), one "
                                           "image folder, or one CSV/parquet list")
    check_shard_columns(shards, columns)
    shard_columns = with_fields()
    _check_first_parquet(shards, shard_columns)
    return [ShardPart(shard_number(p), p, shard_columns=shard_columns) for p in shards]


def _check_first_parquet(shards: Sequence[Any], columns: parquet_shards.ShardColumns) -> None:
    """Refuse parquet shards without images (img2dataset's metadata beside its tars), or
    without the ``columns`` named, before anything is read or written: the first one's
    footer tells."""
    first = next((shard for shard in shards if is_parquet(shard)), None)
    if first is None:
        return
    try:
        schema = parquet_shards.read_schema(first)
    except Exception:  # noqa: BLE001 - unreadable: its part fails when read, naming why
        return
    if parquet_shards.parquet_layout(schema, first, columns) is None:
        raise parquet_shards.no_images_error(first, schema)


__all__ = ["DEFAULT_ROWS_PER_PART", "Record", "ShardPart", "SHARD_METADATA", "LIST_METADATA", "check_metadata_fields", "CaptionFile", "FieldsFile", "ListPart", "ItemsPart", "CroppedPart", "QueryCrop", "CROPPED_QUERY_BENCHMARKS",
           "open_benchmark", "ShardReadError", "open_parts", "list_parts", "read_flat_folder",
           "read_in_turn"]
