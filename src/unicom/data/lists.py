"""Image lists: a folder with one sub-folder per class, or a CSV/parquet table of paths.

Both produce an :class:`ImageList`: parallel lists of paths, keys, and optionally labels
(integers) and captions. Keys identify rows in every output the pipeline writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unicom import storage
from unicom.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class ImageList:
    """Parallel per-image records.

    ``labels`` is an int64 array (N,) or None; ``class_names[labels[i]]`` names image i's
    class when known; ``captions`` is a list of N strings or None.
    """

    paths: list[str]
    keys: list[str]
    labels: np.ndarray | None = None
    captions: list[str] | None = None
    class_names: list[str] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index) -> "ImageList":
        """The rows at ``index`` (an int array or boolean mask), class names kept."""
        index = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index, dtype=np.int64)
        return ImageList(
            paths=[self.paths[i] for i in index],
            keys=[self.keys[i] for i in index],
            labels=None if self.labels is None else self.labels[index],
            captions=None if self.captions is None else [self.captions[i] for i in index],
            class_names=self.class_names,
        )


def read_image_folder(root: str | os.PathLike) -> ImageList:
    """``root/<class>/<image>``: classes are the sub-folder names in sorted order.

    Keys are the paths relative to ``root`` (``"cat/001.jpg"``); ``root`` may be a URL.
    """
    if storage.is_url(root):
        return _read_remote_image_folder(storage.text(root).rstrip("/"))
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: folder not found (expected one sub-folder of images per class)")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise InputError(f"{root}: no class sub-folders (expected {root}/<class name>/<image files>)")
    paths, keys, labels = [], [], []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                paths.append(str(path))
                keys.append(path.relative_to(root).as_posix())
                labels.append(label)
    if not paths:
        raise InputError(f"{root}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return ImageList(paths, keys, np.asarray(labels, dtype=np.int64), None, [d.name for d in class_dirs])


def _read_remote_image_folder(root: str) -> ImageList:
    """:func:`read_image_folder` of a URL: one recursive listing; image paths are URLs."""
    if not storage.is_dir(root):
        raise InputError(f"{root}: folder not found (expected one sub-folder of images per class)")
    by_class: dict[str, list[str]] = {}
    for entry in storage.find_files(root):
        relative = storage.text(entry)[len(root) + 1:]
        if "/" not in relative or relative.startswith(".") or Path(relative).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        by_class.setdefault(relative.split("/", 1)[0], []).append(relative)
    if not by_class:
        raise InputError(f"{root}: no class sub-folders with images ({', '.join(IMAGE_SUFFIXES)}) under it")
    class_names = sorted(by_class)
    paths, keys, labels = [], [], []
    for label, name in enumerate(class_names):
        for relative in sorted(by_class[name]):
            paths.append(f"{root}/{relative}")
            keys.append(relative)
            labels.append(label)
    return ImageList(paths, keys, np.asarray(labels, dtype=np.int64), None, class_names)


def read_table(
    path: str | os.PathLike,
    *,
    path_column: str = "path",
    label_column: str | None = "label",
    caption_column: str | None = "caption",
    key_column: str | None = "key",
    root: str | os.PathLike | None = None,
) -> ImageList:
    """A CSV or parquet list of images, one row each.

    ``path_column`` is required; relative paths are resolved against ``root`` (default: the
    table's folder). The table, its root and the image paths may be URLs. Label and caption columns are used when present; labels that are not
    integers are mapped to 0..C-1 in sorted order of their values (``class_names``). Keys
    come from ``key_column`` when present, else from the path as written.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    remote = storage.is_url(path)
    path = storage.text(path) if remote else Path(path)
    parquet = str(path).lower().endswith(".parquet")
    if not storage.is_file(path):
        raise InputError(f"{path}: file not found (expected a CSV or parquet list with a {path_column!r} column)")
    try:
        source = storage.readable(path)
        table: pa.Table = pq.read_table(source) if parquet else pacsv.read_csv(source)
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"{path}: cannot be read as {'parquet' if parquet else 'CSV'} ({error})") from error
    if path_column not in table.column_names:
        raise InputError(f"{path}: no {path_column!r} column; columns are {table.column_names}")
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
        missing = [row + 1 for row, v in enumerate(values) if v is None]
        if missing:
            raise InputError(f"{path}: rows {missing[:5]} have no {label_column!r}; fill them or drop the rows")
        if all(isinstance(v, int) for v in values):
            labels = np.asarray(values, dtype=np.int64)
        else:
            class_names = sorted({str(v) for v in values})
            lookup = {name: i for i, name in enumerate(class_names)}
            labels = np.asarray([lookup[str(v)] for v in values], dtype=np.int64)
    captions = None
    if caption_column and caption_column in table.column_names:
        captions = ["" if c is None else str(c) for c in table.column(caption_column).to_pylist()]
    return ImageList(paths, keys, labels, captions, class_names)
