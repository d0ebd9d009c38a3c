"""Multi-domain training data: lists of (dataset, path, class) rows with disjoint class ids.

M4D-35k and lists like it are one CSV of rows ``dataset,path,class``; a class is the pair
(dataset, class), so class ``12`` of Products-10k and class ``12`` of GLDv2 are two
classes. The lists the UniFEx authors publish (``m4d-35k_train.csv``,
``furniture180_train.csv``, ``storefronts146_train.csv``) name their columns
``img_path,label``, with paths relative to the list's folder: they are read as they are. Several lists compose: their datasets are listed in order of first appearance,
and each dataset's classes (sorted: numerically when every value is an integer) take the
next block of global ids ``0..K-1``.

Sampling per epoch (:func:`epoch_order`), seeded by ``(seed, epoch)``:

* ``instance``: a random permutation of the images;
* ``class_balanced``: as many draws as images, each a class drawn uniformly, then one of
  its images drawn uniformly (rare classes are seen as often as frequent ones).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from unicom import storage
from unicom.data.lists import COLUMN_ALIASES, ImageList, csv_error
from unicom.errors import InputError


@dataclass
class DomainImages:
    """Images of one or more datasets with global class ids.

    Attributes:
        images: paths, keys (``dataset/path as written``, unique) and ``labels`` int64 (N,)
            global class ids in 0..K-1; ``class_names[k]`` is ``"dataset/class"``.
        datasets: dataset names, in order of first appearance.
        class_dataset: int64 (K,) the dataset (index into ``datasets``) of each class.
        class_values: (K,) the class of each global id as written in its list.
        source: int64 (N,) the list each row came from (index into the lists read).
        written: (N,) each row's path as written in its list (None: not kept).
    """

    images: ImageList
    datasets: list[str]
    class_dataset: np.ndarray
    class_values: list[str]
    source: np.ndarray
    written: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> np.ndarray:
        return self.images.labels

    @property
    def num_classes(self) -> int:
        return len(self.class_values)

    def class_counts(self) -> np.ndarray:
        """int64 (K,) images per class."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def subset(self, rows, relabel: bool = True) -> "DomainImages":
        """Rows ``rows`` (indices or a mask); with ``relabel``, the classes left are numbered
        0..K'-1 in their previous order (unused datasets are dropped too)."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        images = self.images.subset(rows)
        written = None if self.written is None else [self.written[i] for i in rows]
        if not relabel:
            return DomainImages(images, self.datasets, self.class_dataset, self.class_values, self.source[rows], written)
        kept = np.unique(images.labels)
        new_id = np.full(self.num_classes, -1, dtype=np.int64)
        new_id[kept] = np.arange(len(kept))
        used_datasets = np.unique(self.class_dataset[kept])
        new_dataset = np.full(len(self.datasets), -1, dtype=np.int64)
        new_dataset[used_datasets] = np.arange(len(used_datasets))
        images.labels = new_id[images.labels]
        images.class_names = [self.images.class_names[k] for k in kept]
        return DomainImages(
            images,
            [self.datasets[d] for d in used_datasets],
            new_dataset[self.class_dataset[kept]],
            [self.class_values[k] for k in kept],
            self.source[rows],
            written,
        )

    def summary(self) -> list[dict]:
        """Per dataset: images, classes, the global class ids, images per class (min/median/max)."""
        counts = self.class_counts()
        rows = []
        for d, name in enumerate(self.datasets):
            classes = np.flatnonzero(self.class_dataset == d)
            per_class = counts[classes]
            rows.append({
                "dataset": name,
                "images": int(per_class.sum()),
                "classes": int(len(classes)),
                "first_class": int(classes.min()) if len(classes) else None,
                "last_class": int(classes.max()) if len(classes) else None,
                "images_per_class": {
                    "min": int(per_class.min()) if len(classes) else 0,
                    "median": float(np.median(per_class)) if len(classes) else 0.0,
                    "max": int(per_class.max()) if len(classes) else 0,
                },
            })
        return rows


def format_summary(summary: list[dict]) -> str:
    """The per-dataset summary as an aligned text table."""
    header = f"{'dataset':<24} {'images':>9} {'classes':>8} {'class ids':>15} {'images/class min/med/max':>26}"
    lines = [header]
    for row in summary:
        ids = f"{row['first_class']}..{row['last_class']}"
        per = row["images_per_class"]
        spread = f"{per['min']}/{per['median']:g}/{per['max']}"
        lines.append(f"{row['dataset']:<24} {row['images']:>9,} {row['classes']:>8,} {ids:>15} {spread:>26}")
    total_images = sum(r["images"] for r in summary)
    total_classes = sum(r["classes"] for r in summary)
    lines.append(f"{'all':<24} {total_images:>9,} {total_classes:>8,}")
    return "\n".join(lines)


# the column names tried, in order, when a recipe does not name the column
DEFAULT_COLUMNS = {"path": ("path", *COLUMN_ALIASES["path"]), "class": ("class", "label")}


def _read_columns(path: Path, columns: dict[str, str | None]) -> dict[str, list[str] | None]:
    """Columns of a CSV or parquet list as lists of strings (None for an absent dataset column).

    A role whose column is not named (None) takes the first of :data:`DEFAULT_COLUMNS` the
    list has. Every missing required column is named in one error.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    parquet = storage.name(path).lower().endswith(".parquet")
    if not storage.is_file(path):
        raise InputError(f"{path}: file not found (expected a CSV or parquet list of dataset, path, class rows)")
    try:
        if parquet:
            table = pq.read_table(storage.readable(path))
        else:
            source = storage.readable(path)  # a path, or the fetched bytes (read twice)
            with pacsv.open_csv(source) as reader:  # every column as text: class "007" stays "007"
                names = reader.schema.names
            table = pacsv.read_csv(source, convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as error:  # a header not UTF-8
        raise csv_error(path, error) if not parquet else InputError(
            f"{path}: cannot be read as parquet ({error})") from error
    chosen, missing = {}, []
    for role, name in columns.items():
        candidates = (name,) if name is not None else DEFAULT_COLUMNS.get(role, ())
        present = [c for c in candidates if c in table.column_names]
        if present:
            chosen[role] = present[0]
        elif role != "dataset":
            wanted = " or ".join(repr(c) for c in candidates)
            missing.append(f"no {role} column ({wanted}; set data.{role}_column=)")
    if missing:
        raise InputError(f"{path}: {'; '.join(missing)}. Its columns are {table.column_names}")
    found: dict[str, list[str] | None] = {"dataset": None}
    for role, name in chosen.items():
        values = table.column(name).cast(pa.string()).to_pylist()
        empty = [row for row, value in enumerate(values) if value is None or value == ""]
        if empty:
            rows = ", ".join(str(r + 1) for r in empty[:5])
            raise InputError(f"{path}: data rows {rows}{' …' if len(empty) > 5 else ''} have an empty {name!r}; fill them or drop the rows")
        found[role] = values
    return found


def _class_order(values: set[str]) -> list[str]:
    """Classes sorted numerically when every value is an integer, else as strings; values of
    one number ("2", "002") by their text, so that the order never depends on the set's."""
    try:
        return sorted(values, key=lambda value: (int(value), value))
    except ValueError:
        return sorted(values)


def read_domain_lists(
    lists: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    root: str | os.PathLike | None = None,
    dataset_column: str = "dataset",
    path_column: str | None = None,
    class_column: str | None = None,
    dataset_name: str | None = None,
) -> DomainImages:
    """Read and compose CSV/parquet lists of (dataset, path, class) rows.

    Relative paths are resolved against ``root`` (default: each list's folder). A list
    without ``dataset_column`` is one dataset named ``dataset_name`` (default: after its
    file; query and index lists share one name, so that their classes match). Path and class columns
    not named are found among :data:`DEFAULT_COLUMNS` (``path``/``img_path``,
    ``class``/``label``). Every path and class must be non-empty. Keys are ``dataset/path as written`` (``#2``, ``#3`` ... appended to
    repeated rows so that keys stay unique).
    """
    if isinstance(lists, (str, os.PathLike)):
        lists = [lists]
    if not lists:
        raise InputError("no image list was given (data.train)")
    datasets: list[str] = []
    classes_of: dict[str, set[str]] = {}
    rows: list[tuple[str, str, str, str, int]] = []  # dataset, path as written, resolved path, class, source
    for source, name in enumerate(lists):
        path = storage.text(name) if storage.is_url(name) else Path(name)
        found = _read_columns(path, {"dataset": dataset_column, "path": path_column, "class": class_column})
        if not found["path"]:  # its per-list filters would fall on the next list
            raise InputError(f"{path}: no rows (only a header); give a list with images or leave it out")
        base = root if root is not None else storage.parent(path)
        dataset_values = found["dataset"] or [dataset_name or Path(storage.name(path)).stem] * len(found["path"])
        for dataset, written, value in zip(dataset_values, found["path"], found["class"]):
            if dataset not in classes_of:
                datasets.append(dataset)
                classes_of[dataset] = set()
            classes_of[dataset].add(value)
            resolved = storage.resolve(base, written)
            rows.append((dataset, written, resolved, value, source))

    class_id: dict[tuple[str, str], int] = {}
    class_dataset, class_values, class_names = [], [], []
    for d, dataset in enumerate(datasets):
        for value in _class_order(classes_of[dataset]):
            class_id[(dataset, value)] = len(class_values)
            class_dataset.append(d)
            class_values.append(value)
            class_names.append(f"{dataset}/{value}")
    seen: dict[str, int] = {}
    keys = []
    for dataset, written, _, _, _ in rows:
        key = f"{dataset}/{written}"
        seen[key] = seen.get(key, 0) + 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    images = ImageList(
        paths=[r[2] for r in rows],
        keys=keys,
        labels=np.asarray([class_id[(r[0], r[3])] for r in rows], dtype=np.int64),
        class_names=class_names,
    )
    return DomainImages(
        images, datasets, np.asarray(class_dataset, dtype=np.int64), class_values,
        np.asarray([r[4] for r in rows], dtype=np.int64), [r[1] for r in rows],
    )


def exclude_listed(data: DomainImages, tables: Sequence[str | os.PathLike] | None) -> tuple[DomainImages, int]:
    """``data`` without the rows whose path, as written in its list, a table of ``tables``
    lists in its ``key`` column (``data.exclude``: ``unicom dedup``'s ``duplicates.parquet``;
    the key ``unicom embed --input LIST`` gives a row, or ``--input ROOT/`` to paths relative
    to ``ROOT``), relabelled, and how many rows were left out. Tables none of whose keys is a
    row's path, and a listed path that names different images in different lists (it would
    leave out both), are an :class:`InputError`."""
    from unicom.data.lists import unlisted_rows

    if not tables:
        return data, 0
    if data.written is None:
        raise ValueError("exclude_listed needs the paths as written (read_domain_lists keeps them)")
    kept = unlisted_rows(data.written, tables, "data.train", "exclude the keys of an embedding folder made from the "
                         "list (unicom embed --input LIST, or --input ROOT/ for paths relative to ROOT), then unicom "
                         "dedup --against")
    if not len(kept):
        raise InputError(f"data.exclude ({', '.join(map(str, tables))}) lists every image of data.train; nothing is "
                         "left to train on")
    dropped = np.setdiff1d(np.arange(len(data)), kept)
    files: dict[str, set[str]] = {}
    for row in dropped:
        files.setdefault(data.written[row], set()).add(storage.same_file(data.images.paths[row]))
    shared = next(((written, sorted(found)) for written, found in files.items() if len(found) > 1), None)
    if shared is not None:
        raise InputError(f"data.exclude lists {shared[0]!r}, the path of {len(shared[1])} different images of "
                         f"data.train ({', '.join(shared[1][:2])}): a key names one image; write the lists' paths so "
                         "that they tell the images apart (relative to one data.root), or leave these rows out of the lists")
    return (data.subset(kept) if len(dropped) else data), len(dropped)


def _per_list(value, lists: int, key: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * lists
    if len(values) != lists:
        raise InputError(f"data.{key} gives {len(values)} values for {lists} lists; give one value, or one per list")
    return values


def select_training(data: DomainImages, datasets: Sequence[str] | None = None,
                    min_images_per_class: int | Sequence[int] = 1,
                    max_images_per_class: int | Sequence[int | None] | None = None, seed: int = 0,
                    lists: int | None = None) -> DomainImages:
    """Rows of the named ``datasets`` (all when None), with each list's own class filters.

    ``min_images_per_class`` and ``max_images_per_class`` are one value for every list, or
    one per list read (``data.source``), as the UniFEx code filters each dataset (e.g.
    Storefronts146 drops classes under 3 images, GLDv2 keeps at most 100 per class).
    Classes are counted within their list; a class above its maximum keeps a random subset
    of its rows (seeded by ``seed``), in list order. ``lists``: how many lists were read
    (default: up to the last that ``data`` holds rows of).
    """
    if lists is None:
        lists = int(data.source.max()) + 1 if len(data) else 0
    minimum = _per_list(min_images_per_class, lists, "min_images_per_class")
    maximum = _per_list(max_images_per_class, lists, "max_images_per_class")
    keep = np.ones(len(data), dtype=bool)
    if datasets:
        unknown = [d for d in datasets if d not in data.datasets]
        if unknown:
            raise InputError(f"data.datasets: {unknown} are not in the lists; they hold {data.datasets}")
        wanted = np.isin(np.asarray(data.datasets, dtype=object), list(datasets))
        keep &= wanted[data.class_dataset[data.labels]]
    rng = np.random.default_rng([seed, 0xF17])
    for source in range(lists):
        rows = np.flatnonzero((data.source == source) & keep)
        counts = np.bincount(data.labels[rows], minlength=data.num_classes)
        if minimum[source] is not None and minimum[source] > 1:
            keep[rows[counts[data.labels[rows]] < minimum[source]]] = False
        cap = maximum[source]
        if cap is not None:
            for c in np.flatnonzero(counts > cap):
                members = rows[data.labels[rows] == c]
                dropped = rng.permutation(members)[cap:]
                keep[dropped] = False
    if not keep.any():
        raise InputError("no training image is left after data.datasets and the per-class limits")
    return data.subset(keep) if not keep.all() else data


def holdout_split(data: DomainImages, fraction: float, queries_per_class: int, seed: int
                  ) -> tuple[DomainImages, DomainImages, DomainImages]:
    """``(train, query, index)``: ``round(fraction · K)`` classes (at least 1, at most K − 1)
    are held out of training; of each, ``queries_per_class`` random images are queries and
    the rest goes to the index (a held-out class too small to have both is index only).

    ``train`` is relabelled 0..K'-1; ``query`` and ``index`` keep the original class ids.
    """
    k = data.num_classes
    if k < 2:
        raise InputError("eval.holdout_classes needs at least 2 training classes")
    held = min(max(1, round(fraction * k)), k - 1)
    rng = np.random.default_rng([seed, 0x4E1D])
    held_classes = np.sort(rng.permutation(k)[:held])
    is_held = np.zeros(k, dtype=bool)
    is_held[held_classes] = True
    query_rows, index_rows = [], []
    for c in held_classes:
        members = rng.permutation(np.flatnonzero(data.labels == c))
        if len(members) > queries_per_class:
            query_rows.extend(members[:queries_per_class])
            index_rows.extend(members[queries_per_class:])
        else:
            index_rows.extend(members)
    if not query_rows:
        raise InputError("eval.holdout_classes: no held-out class has more images than eval.queries_per_class")
    train = data.subset(~is_held[data.labels])
    return train, data.subset(np.sort(query_rows), relabel=False), data.subset(np.sort(index_rows), relabel=False)


# ----------------------------------------------------------------------------- sampling

SAMPLINGS = ("instance", "class_balanced")


def epoch_order(labels: np.ndarray, epoch: int, seed: int, sampling: str = "instance") -> np.ndarray:
    """int64 (N,) the rows of epoch ``epoch`` in training order (module docstring)."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch, 0x5A])
    n = len(labels)
    if sampling == "instance":
        return rng.permutation(n).astype(np.int64)
    if sampling != "class_balanced":
        raise InputError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    by_class = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[by_class], return_index=True, return_counts=True)
    drawn = rng.integers(0, len(classes), size=n)
    within = np.floor(rng.random(n) * counts[drawn]).astype(np.int64)
    return by_class[starts[drawn] + within]


def epoch_batches(order: np.ndarray, batch_size: int, keep_last: bool = False, min_rows: int = 2) -> list[np.ndarray]:
    """``order`` cut into batches of ``batch_size``. The last incomplete batch is dropped
    unless ``keep_last`` (the UniFEx code keeps it) or it is the only one; a batch of fewer
    than ``min_rows`` rows is never made (BatchNorm needs 2)."""
    full = len(order) // batch_size
    batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(full)]
    rest = order[full * batch_size:]
    if (keep_last or full == 0) and len(rest) >= min_rows:
        batches.append(rest)
    return batches


__all__ = ["DomainImages", "read_domain_lists", "select_training", "holdout_split", "epoch_order", "epoch_batches",
           "format_summary", "SAMPLINGS"]
