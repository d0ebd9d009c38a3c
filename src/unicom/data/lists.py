"""Image lists: a folder with one sub-folder per class, or a CSV/parquet table of paths.

Both produce an :class:`ImageList`: parallel lists of paths, keys, and optionally labels
(integers) and captions. Keys identify rows in every output the pipeline writes.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from unicom import storage
from unicom.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# files beside a folder's image, of its name: its caption, and its fields (img2dataset's json)
CAPTION_SUFFIX, FIELDS_SUFFIX = ".txt", ".json"
# Names of image files that a folder's listing leaves out (other formats, other spellings of
# JPEG): named in a warning, as the user's photos rather than sidecar files (.txt, .json).
OTHER_IMAGE_SUFFIXES = (".heic", ".heif", ".avif", ".jxl", ".svg", ".jfif", ".jpe", ".jp2", ".ico", ".psd", ".tga",
                        ".dng", ".cr2", ".nef", ".arw", ".raw")


def warn_other_images(root, names: Sequence[str]) -> None:
    """Warn, naming one and counting each suffix, when ``names`` (paths of the files found
    under ``root``) hold image files of a format a folder listing leaves out
    (:data:`OTHER_IMAGE_SUFFIXES`): otherwise they would be missing without a word."""
    import warnings

    counts: dict[str, int] = {}
    first = None
    for name in names:
        suffix = os.path.splitext(str(name))[1].lower()
        if suffix in OTHER_IMAGE_SUFFIXES:
            counts[suffix] = counts.get(suffix, 0) + 1
            first = first or str(name)
    if counts:
        found = ", ".join(f"{suffix}: {count}" for suffix, count in sorted(counts.items()))
        total = sum(counts.values())
        warnings.warn(f"{storage.text(root)}: {total} image file{'s' if total != 1 else ''} left out ({found}; e.g. {first}): "
                      f"only {', '.join(IMAGE_SUFFIXES)} files are read; convert the others to JPEG or PNG "
                      "(or rename other spellings of JPEG to .jpg) to include them", stacklevel=2)
# Other names of the default columns, tried when a list lacks the default one: the lists the
# UniFEx authors publish name their columns img_path,label.
COLUMN_ALIASES = {"path": ("img_path", "image_path"), "label": ("class",)}


def find_column(names, wanted: str | None) -> str | None:
    """``wanted`` if it is among ``names``, else the first of its aliases that is, else None."""
    if wanted is None or wanted in names:
        return wanted
    return next((alias for alias in COLUMN_ALIASES.get(wanted, ()) if alias in names), None)


@dataclass
class ImageList:
    """Parallel per-image records.

    ``labels`` is an int64 array (N,) or None; ``class_names[labels[i]]`` names image i's
    class when known; ``captions`` is a list of N strings or None. ``caption_files`` and
    ``json_files``: for images listed from a folder, the text file beside each image that
    holds its caption and the json file of its fields (:func:`sidecar_files`; None where
    there is none), or None when no image has one.
    """

    paths: list[str]
    keys: list[str]
    labels: np.ndarray | None = None
    captions: list[str] | None = None
    class_names: list[str] | None = field(default=None)
    caption_files: list[str | None] | None = None
    json_files: list[str | None] | None = None
    # a list's other columns kept as metadata (read_table's extra_columns): name -> N values
    extra: dict[str, list] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def keys_sha256(self) -> str:
        """sha256 of the keys in order (each followed by a NUL): which image is row ``i``."""
        digest = hashlib.sha256()
        for key in self.keys:
            digest.update(key.encode("utf-8", "surrogateescape") + b"\0")
        return digest.hexdigest()

    def subset(self, index) -> "ImageList":
        """The rows at ``index`` (an int array or boolean mask), class names kept."""
        index = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index, dtype=np.int64)
        return ImageList(
            paths=[self.paths[i] for i in index],
            keys=[self.keys[i] for i in index],
            labels=None if self.labels is None else self.labels[index],
            captions=None if self.captions is None else [self.captions[i] for i in index],
            class_names=self.class_names,
            caption_files=None if self.caption_files is None else [self.caption_files[i] for i in index],
            json_files=None if self.json_files is None else [self.json_files[i] for i in index],
            extra=None if self.extra is None else {name: [values[i] for i in index] for name, values in self.extra.items()},
        )


class NestedClassFolders(InputError):
    """A class folder holds its images in sub-folders (``alphabet/character/*.png``): the
    classes could be the top-level folders or the leaf folders, and the caller must say which."""

    def __init__(self, root: Path, top: int, leaves: list[str]):
        self.root, self.top, self.leaves = root, top, leaves
        super().__init__(
            f"{root}: the class folders hold images in sub-folders (e.g. {leaves[0]}/): {top} top-level folders, "
            f"{len(leaves)} folders with images; say which are the classes: the leaf folders (classes='leaf') or the "
            f"top-level ones (classes='top')"
        )


FOLDER_CLASSES = ("top", "leaf")


def read_image_folder(root: str | os.PathLike, classes: str | None = "top") -> ImageList:
    """``root/<class>/<image>``: classes are the sub-folder names in sorted order.

    Keys are the paths relative to ``root`` (``"cat/001.jpg"``); ``root`` may be a URL.
    Images further down (``root/<a>/<b>/<image>``) belong to ``<a>`` with
    ``classes="top"``; with ``"leaf"`` every folder that holds images is a class of its
    own, named by its path (``"a/b"``); with ``None`` such a layout raises
    :class:`NestedClassFolders`.
    """
    # (path, key, top-level class folder, folder holding the image), in class then path order
    found, class_dirs, sidecars = _remote_folder_images(root) if storage.is_url(root) else _local_folder_images(root)
    leaves = sorted({folder for _, _, _, folder in found})
    nested = any("/" in folder for folder in leaves)
    if nested and classes is None:
        raise NestedClassFolders(root, len(class_dirs), [f for f in leaves if "/" in f] + [f for f in leaves if "/" not in f])
    if classes == "leaf":
        names = leaves
        lookup = {name: i for i, name in enumerate(names)}
        labels = [lookup[folder] for _, _, _, folder in found]
    else:
        names = class_dirs
        lookup = {name: i for i, name in enumerate(names)}
        labels = [lookup[top] for _, _, top, _ in found]
    paths = [path for path, _, _, _ in found]
    keys = [key for _, key, _, _ in found]
    return ImageList(paths, keys, np.asarray(labels, dtype=np.int64), None, names,
                     sidecar_files(paths, sidecars, CAPTION_SUFFIX), sidecar_files(paths, sidecars, FIELDS_SUFFIX))


def text_lines(path: str | os.PathLike, newline: str | None = None) -> Iterator[str]:
    """The lines of a local list file, decoded as UTF-8 (a leading byte-order mark dropped),
    read as they are taken: a list of millions of rows is never held whole. ``newline``: as
    :func:`open`'s (``""`` for the csv module).

    A file in another encoding (a list saved by an editor in Latin-1 or Windows-1252) is an
    :class:`InputError` naming the file, the line and the byte offset of the first byte
    that is not UTF-8.
    """
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as f:
            yield from f
    except UnicodeDecodeError:
        decode_utf8(Path(path).read_bytes(), path)  # names where the first byte that is not UTF-8 is
        raise


def read_lines(location, what: str, comments: bool = False) -> list[str]:
    """The non-blank lines of a small text file (a path or a URL), stripped, decoded as
    :func:`text_lines` decodes them; with ``comments``, lines starting with ``#`` left out
    too. ``what`` names the file in errors (``"--text-file prompts.txt"``)."""
    try:
        data = storage.read_bytes(location)
    except OSError as error:
        raise InputError(f"{what}: cannot be read ({error})") from error
    lines = (line.strip() for line in decode_utf8(data, what).splitlines())
    return [line for line in lines if line and not (comments and line.startswith("#"))]


_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # what a spreadsheet's "Unicode text" starts with


def decode_utf8(data: bytes, path) -> str:
    """``data``, the bytes of the list file ``path``, decoded as :func:`text_lines` decodes them
    (an :class:`InputError` naming the line and byte offset of a byte that is not UTF-8)."""
    if data.startswith(_UTF16_BOMS):
        raise InputError(f"{path}: the file is UTF-16 (it starts with a UTF-16 byte-order mark), not UTF-8; save it as "
                         "UTF-8 (e.g. iconv -f utf-16 -t utf-8) and run again")
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start
        line = data.count(b"\n", 0, offset) + 1
        raise InputError(
            f"{path}: line {line} (byte {offset}, {data[offset:offset + 1]!r}) is not UTF-8; "
            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) and run again"
        ) from None


def check_utf8_names(root, paths: list[str]) -> None:
    """An :class:`InputError` when local image ``paths`` under ``root`` hold names that are
    not UTF-8 (Python's surrogate escapes): the metadata stores paths and keys as UTF-8."""
    bad = [p for p in paths if not p.isascii() and _not_utf8(p)]
    if bad:
        raise InputError(
            f"{root}: {len(bad)} file names are not UTF-8 (e.g. {os.fsencode(bad[0])!r}), and the metadata can only hold "
            "UTF-8 paths: rename them (e.g. convmv -f latin1 -t utf-8 -r --notest FOLDER)"
        )


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _local_folder_images(root) -> tuple[list[tuple[str, str, str, str]], list[str], set[str]]:
    """The images of the class folder ``root`` on disk (see :func:`read_image_folder`), the
    class folder names, and the text and json files among the images (:func:`sidecar_files`)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: folder not found (expected one sub-folder of images per class)")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise InputError(f"{root}: no class sub-folders (expected {root}/<class name>/<image files>)")
    found, others, sidecars = [], [], set()
    for class_dir in class_dirs:
        for path in sorted(class_dir.rglob("*")):
            if path.suffix in (CAPTION_SUFFIX, FIELDS_SUFFIX):
                sidecars.add(str(path.absolute()))
            if path.suffix.lower() in OTHER_IMAGE_SUFFIXES:
                others.append(path.relative_to(root).as_posix())
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                found.append((str(path.absolute()), path.relative_to(root).as_posix(), class_dir.name,
                              path.parent.relative_to(root).as_posix()))
    warn_other_images(root, others)
    if not found:
        raise InputError(f"{root}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    check_utf8_names(root, [path for path, _, _, _ in found])
    return found, [d.name for d in class_dirs], sidecars


def _remote_folder_images(root) -> tuple[list[tuple[str, str, str, str]], list[str], set[str]]:
    """:func:`_local_folder_images` of a URL: one recursive listing; image paths are URLs."""
    root = storage.text(root).rstrip("/")
    if not storage.is_dir(root):
        raise InputError(f"{root}: folder not found (expected one sub-folder of images per class)")
    relative = [storage.text(entry)[len(root) + 1:] for entry in storage.find_files(root)]
    sidecars = {f"{root}/{r}" for r in relative if r.endswith((CAPTION_SUFFIX, FIELDS_SUFFIX))}
    warn_other_images(root, [r for r in relative if "/" in r and not r.startswith(".")])
    relative = sorted((r for r in relative if "/" in r and not r.startswith(".")
                       and Path(r).suffix.lower() in IMAGE_SUFFIXES), key=lambda r: r.split("/"))
    if not relative:
        raise InputError(f"{root}: no class sub-folders with images ({', '.join(IMAGE_SUFFIXES)}) under it")
    found = [(f"{root}/{r}", r, r.split("/", 1)[0], r.rsplit("/", 1)[0]) for r in relative]
    return found, sorted({top for _, _, top, _ in found}), sidecars


def sidecar_files(paths: Sequence[str], sidecars: set[str], suffix: str) -> list[str | None] | None:
    """For each image of a folder (a path or URL), the file beside it named as the image with
    ``suffix`` for its own (``0001.txt``, its caption, and ``0001.json``, its fields, beside
    ``0001.jpg``, as img2dataset's ``files`` output and clip-retrieval's ``files`` input have
    them), if it is among ``sidecars`` (the folder's files of these suffixes); None when no
    image has one."""
    found = [name if (name := path[: len(path) - len(Path(path).suffix)] + suffix) in sidecars else None
             for path in paths]
    return found if any(name is not None for name in found) else None


def utf8_error(path) -> InputError | None:
    """The error naming the line and byte of the first byte of the list file ``path`` (a path
    or a URL) that is not UTF-8 (:func:`decode_utf8`); None when it is all UTF-8."""
    try:
        decode_utf8(storage.read_bytes(path), path)
    except InputError as error:
        return error
    return None


def csv_error(path, error: Exception) -> InputError:
    """The error for a CSV list (a path or a URL) that pyarrow could not read: where its text is
    not UTF-8 (pyarrow says only "invalid UTF8 data", or of a UTF-16 file that its columns are
    not as expected), the line and byte of the first such byte."""
    utf16 = storage.read_range(path, 0, 2, exact=False).startswith(_UTF16_BOMS)
    named = utf8_error(path) if "UTF8" in str(error) or isinstance(error, UnicodeDecodeError) or utf16 else None
    if named is None and _COLUMN_COUNT.search(str(error)):
        named = uneven_row_error(path)
    return named or InputError(f"{path}: cannot be read as CSV ({error})")


# pyarrow's words for a row with more or fewer fields than the header; it numbers the row only when
# it reads on one thread, and then counts records, not the file's lines (a quoted value may hold a newline)
_COLUMN_COUNT = re.compile(r"Expected \d+ columns, got \d+")


def uneven_row_error(path) -> InputError | None:
    """The error naming the first line of the CSV list ``path`` (a path or a URL; 1-based, the
    header is line 1) whose row has more or fewer fields than the header; None when every row
    has as many (or the csv module cannot read the file either). The file is read as a
    stream, row by row."""
    import csv

    with storage.open_stream(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace",
                                                             newline="") as stream:
        written: list[str] = []  # the lines of the row being read, as the file has them

        def lines():
            for line in stream:
                written.append(line)
                yield line

        rows = csv.reader(lines())
        header, end = None, 0
        try:
            for fields in rows:
                start, end = end + 1, rows.line_num
                text, written[:] = "".join(written).rstrip("\r\n"), []
                if not fields:  # a blank line, skipped as pyarrow skips it
                    continue
                if header is None:
                    header = fields
                elif len(fields) != len(header):
                    where = f"line {start}" if end == start else (
                        f"lines {start}-{end} (a quoted value holds a line break)")
                    text = text if len(text) <= 80 else text[:77] + "..."
                    return InputError(
                        f"{path}: the row on {where} has {len(fields)} field{'s' if len(fields) != 1 else ''} ({text!r}) where "
                        f"the header has {len(header)} ({','.join(header)}); give every line one value per column "
                        "(quote a value that holds a comma) or drop the line, and run again"
                    )
        except csv.Error:
            return None
    return None


def read_table(
    path: str | os.PathLike,
    *,
    path_column: str = "path",
    label_column: str | None = "label",
    caption_column: str | None = "caption",
    key_column: str | None = "key",
    root: str | os.PathLike | None = None,
    required: Sequence[str] = (),
    extra_columns: Sequence[str] = (),
    every_other_column: bool = False,
) -> ImageList:
    """A CSV or parquet list of images, one row each.

    ``path_column`` is required; relative paths are resolved against ``root`` (default: the
    table's folder); the table, its root and the image paths may be URLs. A default column name that the table lacks is looked for under its
    aliases (:data:`COLUMN_ALIASES`: ``img_path`` for ``path``, ``class`` for ``label``).
    Label and caption columns are used when present: numeric labels are class ids as
    written (a value that is not a whole number is an :class:`InputError` naming its rows),
    other labels are names mapped to 0..C-1 in sorted order (``class_names``). A column in
    ``required`` (one the user named) must be there: its absence is an :class:`InputError`,
    not a list read without it. Keys come
    from ``key_column`` when present, else from the path as written; a CSV's paths, keys
    and captions are read as text, exactly as written (key ``000123`` stays ``"000123"``).
    ``extra_columns`` (each must be there), or with ``every_other_column`` every column but
    those read as path, key, caption and label, are kept in ``extra`` as their values.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = storage.text(path) if storage.is_url(path) else Path(path)
    parquet = str(path).lower().endswith(".parquet")
    if not storage.is_file(path):
        raise InputError(f"{path}: file not found (expected a CSV or parquet list with a {path_column!r} column)")
    try:
        source = storage.readable(path)
        # paths, keys and captions as written: a key 000123 (webdataset's) must not become 123
        text_columns = {name: pa.string() for wanted in (path_column, key_column, caption_column) if wanted
                        for name in (wanted, *COLUMN_ALIASES.get(wanted, ()))}
        table: pa.Table = pq.read_table(source) if parquet else pacsv.read_csv(
            source, convert_options=pacsv.ConvertOptions(column_types=text_columns))
    except (pa.ArrowInvalid, OSError) as error:
        raise csv_error(path, error) if not parquet else InputError(
            f"{path}: cannot be read as parquet ({error})") from error
    if not parquet:
        try:
            names = table.column_names
        except UnicodeDecodeError:  # a header that is not UTF-8: its names cannot be read
            names = None
        # pyarrow reads a column whose text is not UTF-8 as bytes: labels would be named b'...'
        suspect = names is None or any(pa.types.is_binary(field.type) for field in table.schema)
        named = utf8_error(path) if suspect else None
        if named is not None:
            raise named
    found_path = find_column(table.column_names, path_column)
    if found_path is None:
        names = " or ".join(repr(c) for c in (path_column, *COLUMN_ALIASES.get(path_column, ())))
        raise InputError(f"{path}: no image path column ({names}); columns are {table.column_names}")
    path_column = found_path
    absent = [name for name in required if find_column(table.column_names, name) is None]
    if absent:
        raise InputError(f"{path}: no column {absent[0]!r}; columns are {table.column_names}")
    label_column = find_column(table.column_names, label_column)
    base = root if root is not None else storage.parent(path)
    raw_paths = [str(p) for p in table.column(path_column).to_pylist()]
    for row, value in enumerate(raw_paths):
        if value in ("", "None"):
            raise InputError(f"{path}: row {row + 1} has an empty {path_column!r}")
    paths = [storage.resolve(base, p) for p in raw_paths]
    keys = raw_paths
    if key_column and key_column in table.column_names:
        keys = [str(k) for k in table.column(key_column).to_pylist()]
    labels = class_names = None
    if label_column and label_column in table.column_names:
        values = table.column(label_column).to_pylist()
        # an empty cell of a column of names is read as "": no class, like an empty number's None
        missing = [row + 1 for row, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip())]
        if missing:
            raise InputError(f"{path}: rows {missing[:5]} have no {label_column!r}; fill them or drop the rows")
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) == len(values):  # class ids: whole numbers, written 3 or 3.0
            bad = [row + 1 for row, v in enumerate(values) if not float(v).is_integer()]
            if bad:
                raise InputError(
                    f"{path}: data rows {bad[:5]}{' …' if len(bad) > 5 else ''} have {label_column!r} values that are "
                    f"not whole numbers (e.g. {values[bad[0] - 1]!r}); class ids are integers"
                )
            labels = np.asarray(values, dtype=np.float64).astype(np.int64)
        else:
            class_names = sorted({str(v) for v in values})
            lookup = {name: i for i, name in enumerate(class_names)}
            labels = np.asarray([lookup[str(v)] for v in values], dtype=np.int64)
    captions = None
    if caption_column and caption_column in table.column_names:
        kind = table.schema.field(caption_column).type
        if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_struct(kind) or pa.types.is_map(kind):
            raise InputError(
                f"{path}: column {caption_column!r} holds {kind}, not one caption per row; give one row per image "
                "and caption (an image on several rows is embedded once per row), or score such a table with "
                "unicom evaluate --dataset captions, which takes lists of captions")
        captions = ["" if c is None else str(c) for c in table.column(caption_column).to_pylist()]
    absent = [name for name in extra_columns if name not in table.column_names]
    if absent:
        raise InputError(f"{path}: no column {absent[0]!r} (a metadata field named); columns are {table.column_names}")
    used = {path_column, key_column, caption_column, label_column}
    kept = [name for name in table.column_names if name not in used] if every_other_column else list(extra_columns)
    extra = {name: table.column(name).to_pylist() for name in kept} if kept else None
    return ImageList(paths, keys, labels, captions, class_names, extra=extra)


def unlisted_rows(keys: Sequence[str], tables: Sequence[str | os.PathLike] | None, origin: str,
                  advice: str) -> np.ndarray | None:
    """The rows of ``keys`` that no table of ``tables`` lists (:func:`read_keys`; None without
    tables). Tables that list keys, none of them one of ``keys``, are an :class:`InputError`
    naming ``origin``, an example of each and ``advice`` (how to make keys of these images):
    they name another collection's images, or these under other keys."""
    if not tables:
        return None
    listed = read_keys(tables)
    keep = np.fromiter((key not in listed for key in keys), dtype=bool, count=len(keys))
    if listed and keep.all():
        raise InputError(
            f"{origin}: none of the {len(listed):,} keys that data.exclude lists ({', '.join(map(str, tables))}; e.g. "
            f"{min(listed)!r}) is the key of one of its {len(keys):,} images (keys like {keys[0]!r}); the tables "
            f"list other images, or these under other keys: {advice}"
        )
    return np.flatnonzero(keep)


def read_keys(tables: Sequence[str | os.PathLike]) -> frozenset[str]:
    """The keys listed in the ``key`` column of each table (parquet or CSV, a path or URL), as
    written: the samples that ``unicom cluster --exclude`` and ``unicom train``'s ``data.exclude``
    leave out, such as those of ``unicom dedup``'s ``duplicates.parquet``."""
    keys: set[str] = set()
    for table in tables:
        keys.update(read_table(table, path_column="key", label_column=None, caption_column=None, key_column=None).keys)
    return frozenset(keys)
