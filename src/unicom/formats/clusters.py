"""The clustering output folder: what ``unicom cluster`` writes and ``unicom train`` reads.

::

    OUT/centroids.npy               (k, d) float32 centroids (unit rows when spherical)
    OUT/centroids.json              how they were trained: settings, inputs, training points
    OUT/assignment.json             which inputs and centroids the labels describe (checked on resume)
    OUT/labels/labels_{i}.parquet   one per input part i: key, occurrence (int32), label (int64),
                                    similarity (float32)
    OUT/cluster_sizes.npy           (k,) int64 samples per cluster
    OUT/cluster_sizes.png           their histogram
    OUT/clusters.json               the summary
    OUT/parts/part_{p}.npy          hierarchical mode: part p's centroids (k_p, d) float32,
    OUT/parts/part_{p}_sizes.npy    (k_p,) int64 training points per centroid,
    OUT/parts/part_{p}.json         and its record (written last: the part is done)

Every file is written under a temporary name and renamed; a record is written after the
arrays it describes, so a record on disk means its arrays are complete. ``OUT`` may be a
URL (``s3://bucket/clusters``, see :mod:`unicom.storage`); each stage first removes the
temporaries that a killed run of the same stage left (:meth:`ClusterFolder.sweep`). A label file's
schema metadata ``unicom.labels`` holds ``{"rows", "invalid", "key_column"}`` of its part.

A label row names its sample by ``key`` and ``occurrence``: the sample's number among the
samples of that key in its shard (in its list, for image folders and lists), counting the
samples that failed to embed, 0 for the first (``unicom embed``'s metadata column of that
name, copied). A key that several samples of a shard carry is common in repacked shards;
by occurrence, a sample that failed to embed or that cluster dropped leaves its own label
out and no other's. Files written before the column existed (and labels keyed by another
column than ``key``) have none: a key whose rows share one label gives it to every sample of
the key, as before the column existed; otherwise the n-th row of a key labels the key's n-th
sample, which is refused where the key has more or fewer samples than rows (:class:`AmbiguousLabels`).

:class:`ClusterFolder` writes and reads the folder for ``unicom cluster``;
:class:`PseudoLabels` is how a trainer reads the labels: the files, checked (columns
``key`` and ``label``, class ids 0..k-1), k from the run's record, and which parts the run
labelled. This module imports neither faiss nor torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from unicom import storage
from unicom.errors import InputError
from unicom.files import numbered_files, save_npy_atomic, sweep_temporaries, write_json_atomic, write_parquet_atomic
from unicom.formats.embeddings import OCCURRENCE

LABEL_METADATA_KEY = b"unicom.labels"
LABELS_FOLDER = "labels"
LABEL_PREFIX, LABEL_SUFFIX = "labels_", ".parquet"
RECORDS = ("centroids.json", "clusters.json")  # where k is recorded, in the order read


def label_files(folder: str | os.PathLike) -> dict[int, Path]:
    """``{i: labels_{i}.parquet}`` of a labels folder, by part number (empty when it has none)."""
    return dict(numbered_files(folder, LABEL_PREFIX, LABEL_SUFFIX))


def read_record(path: Path) -> dict:
    """A JSON record of the folder."""
    try:
        return json.loads(storage.read_text(path))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable JSON record ({error}); delete it to redo its stage") from error


def check_record(path: Path, expected: dict) -> dict | None:
    """The record at ``path`` if it exists and agrees with ``expected``; an error if it
    disagrees (a resumed run must not mix two settings); None if there is none."""
    if not storage.is_file(path):
        return None
    record = read_record(path)
    differences = [_difference(key, record.get(key), value) for key, value in expected.items() if record.get(key) != value]
    if differences:
        raise InputError(
            f"{path} was written by a run with other settings ({'; '.join(differences)}); "
            f"use another --out, or delete {path} and what was made from it to start over"
        )
    return record


def centroids_digest(centroids: np.ndarray) -> str:
    """A short digest of the (k, d) float32 centroids' values: which centroids labels were
    assigned with (kept in ``assignment.json``, so that labels of other centroids are told apart)."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(centroids, dtype=np.float32)).cast("B")).hexdigest()[:16]


def _difference(key: str, there, now) -> str:
    if isinstance(there, dict) and isinstance(now, dict):  # name the fields, not whole listings
        keys = [k for k in {**there, **now} if there.get(k) != now.get(k)]
        return "; ".join(_difference(f"{key}.{k}", there.get(k), now.get(k)) for k in keys[:5])
    there_text, now_text = json.dumps(there), json.dumps(now)
    if len(there_text) + len(now_text) > 120:
        return f"{key} differs"
    return f"{key} {there_text} there, {now_text} now"


def _read_label_table(path: Path, columns: Sequence[str] | None = None):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(storage.readable(path), columns=list(columns) if columns is not None else None)
    except Exception as error:  # pyarrow raises several types for damaged files or absent columns
        raise InputError(f"{path}: cannot read {list(columns) if columns else 'the label file'} ({error})") from error


def read_label_facts(path: str | os.PathLike) -> dict | None:
    """The ``unicom.labels`` facts of one label file (rows, invalid, key_column), or None for a
    file without them (not written by ``unicom cluster``)."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(storage.readable(path)).metadata or {}
    return json.loads(metadata[LABEL_METADATA_KEY]) if LABEL_METADATA_KEY in metadata else None


# why a label file has no occurrence column, and what to do about it (resumed into the same
# folders, `unicom embed` and `unicom cluster` keep the parts they hold, written without it)
WITHOUT_OCCURRENCE = "written by an earlier version, or from embeddings without it such as LAION's published ones"
REEMBED = ("Run `unicom embed` with this version into a new --out, then `unicom cluster` on that into a new --out "
           "(resumed into the old folders, both keep the parts an earlier version wrote)")


class AmbiguousLabels(InputError):
    """Label files without the ``occurrence`` column name a key on ``rows`` rows, but more (or
    fewer) samples of the input carry it: which row labels which sample is unknown."""

    def __init__(self, key, rows: int, samples: int | None = None):
        self.key, self.rows, self.samples = key, rows, samples
        met = f"{samples}" if samples is not None else f"more than {rows}"
        super().__init__(
            f"key {key!r} is on {rows} label row(s) but {met} samples carry it, and the label file has no "
            f"{OCCURRENCE!r} column ({WITHOUT_OCCURRENCE}) to tell which row is which sample's: a sample "
            "of this key failed to embed or was dropped by `unicom cluster`, so its row would go to another "
            f"sample. {REEMBED} (their outputs name each sample by key and occurrence)"
        )


class _KeyRows:
    """The label rows of a key that is not simply one row for its first sample: ``labels``
    ``{occurrence: label}``; ``met``: the samples of the key read so far."""

    __slots__ = ("labels", "met")

    def __init__(self, labels: dict):
        self.labels, self.met = labels, 0


class KeyLabels(dict):
    """``{key: label}`` of label files, as :func:`label_of` reads it (values are private:
    an int label for a key whose one row labels its first sample, otherwise the key's rows).
    ``exact``: every file names each row's sample by key and occurrence; otherwise (files
    written before the ``occurrence`` column) every sample of a key whose rows share one label
    takes it, and for other keys the n-th sample takes the n-th row of the key, which holds
    only where the rows of a key are as many as its samples."""

    exact: bool = True
    repeated: list  # the keys whose values are _KeyRows (checked at the end of the input)


def read_shard_labels(*paths: str | os.PathLike) -> KeyLabels:
    """The labels of files read in the order given (one shard's file, or a list's part files
    by part number), for :func:`label_of`. A row labels the sample with its ``key`` whose
    ``occurrence`` it holds: the sample's number among the samples of that key in the shard
    (in the list, for image folders and lists), counting those that failed to embed, 0 for
    the first. Files without the column (earlier versions) give a key's label to every sample
    of the key where its rows share one label (as those versions did), else the n-th row of a
    key to the key's n-th sample, refused by :func:`label_of` and :func:`check_all_met`
    (:class:`AmbiguousLabels`) where the samples of the key are more or fewer than its rows."""
    lookup = KeyLabels()
    lookup.repeated = []
    files = []
    for path in paths:
        table = _read_label_table(path)
        if "key" not in table.column_names or "label" not in table.column_names:
            raise InputError(f"{path}: expected columns key and label (as written by `unicom cluster`), "
                             f"found {table.column_names}")
        files.append((path, table))
        lookup.exact = lookup.exact and OCCURRENCE in table.column_names
    for path, table in files:
        keys, labels = table.column("key").to_pylist(), table.column("label").to_pylist()
        if not lookup.exact:  # by row order: the n-th row of a key is the n-th sample's
            occurrences = None
        elif not _any_nonzero(table.column(OCCURRENCE)):  # every row labels its key's first sample
            occurrences = None
        else:
            occurrences = table.column(OCCURRENCE).to_pylist()
        for row, (key, label) in enumerate(zip(keys, labels)):
            occurrence = 0 if occurrences is None else occurrences[row]
            value = lookup.get(key)
            if value is None and occurrence == 0:
                lookup[key] = label
                continue
            if value is None:
                value = lookup[key] = _KeyRows({})
                lookup.repeated.append(key)
            elif not isinstance(value, _KeyRows):
                value = lookup[key] = _KeyRows({0: value})
                lookup.repeated.append(key)
            if not lookup.exact:
                occurrence = len(value.labels)
            elif occurrence in value.labels:
                raise InputError(f"{path}: key {key!r} with {OCCURRENCE} {occurrence} on two rows; a label file "
                                 "labels each sample once: cluster again into a new --out")
            value.labels[occurrence] = label
    if not lookup.exact:  # which row is whose does not matter where a key's rows share one label
        for key in lookup.repeated:
            if len(set(lookup[key].labels.values())) == 1:
                lookup[key] = lookup[key].labels[0]
        lookup.repeated = [key for key in lookup.repeated if isinstance(lookup[key], _KeyRows)]
    return lookup


def _any_nonzero(column) -> bool:
    import pyarrow.compute as pc

    return bool(pc.any(pc.not_equal(column, 0)).as_py())


def label_of(lookup: KeyLabels, key):
    """The label of the next sample with ``key`` of the input (samples read in order, each
    once) from a :func:`read_shard_labels` lookup, or None for a sample without one.
    Raises :class:`AmbiguousLabels` for files without the ``occurrence`` column when a key
    whose rows differ in label turns out to have more samples than rows."""
    value = lookup.get(key)
    if value is None:
        return None
    if type(value) is int:
        if not lookup.exact:
            return value  # the key's one label (on one row or several): every sample of the key takes it
        if value >= 0:
            lookup[key] = ~value  # met: a later sample of the key is not its first
            return value
        return None  # its one row labels the key's first sample
    n, value.met = value.met, value.met + 1
    label = value.labels.get(n)
    if label is None and not lookup.exact:
        raise AmbiguousLabels(key, len(value.labels))
    return label


def check_all_met(lookup: KeyLabels) -> None:
    """At the end of the input: for files without the ``occurrence`` column, an
    :class:`AmbiguousLabels` for a key whose rows outnumber the samples read (some were
    given rows that may belong to a sample that is not there)."""
    if lookup.exact:
        return
    for key in lookup.repeated:
        value = lookup[key]
        if 0 < value.met < len(value.labels):
            raise AmbiguousLabels(key, len(value.labels), value.met)


class ClusterFolder:
    """One run's output folder (see the module docstring): its paths, writers and readers."""

    def __init__(self, root):
        self.root = storage.path(root)
        self.centroids = self.root / "centroids.npy"
        self.centroids_record = self.root / "centroids.json"
        self.assignment_record = self.root / "assignment.json"
        self.labels = self.root / LABELS_FOLDER
        self.sizes = self.root / "cluster_sizes.npy"
        self.histogram = self.root / "cluster_sizes.png"
        self.summary = self.root / "clusters.json"
        self.parts = self.root / "parts"

    def sweep(self, names=(), labels=(), parts=()) -> list[str]:
        """Remove what a killed writer left: temporaries of the files ``names`` of the
        folder, of the label files of parts ``labels`` and of the files of hierarchical
        parts ``parts`` (only those: other processes may be writing the rest)."""
        removed = sweep_temporaries(self.root, names) if names else []
        if labels:
            removed += sweep_temporaries(self.labels, [storage.name(self.label_path(n)) for n in labels])
        if parts:
            removed += sweep_temporaries(self.parts, [storage.name(p) for part in parts for p in self.part_paths(part)])
        return removed

    # ------------------------------------------------------------------ centroids

    def read_record(self) -> dict:
        """``centroids.json``: how the centroids were trained."""
        if not (storage.is_file(self.centroids) and storage.is_file(self.centroids_record)):
            raise InputError(
                f"{self.root}: no trained centroids (centroids.npy and centroids.json); run `unicom cluster` "
                "or, in hierarchical mode, `unicom cluster part` and `unicom cluster merge` first"
            )
        return read_record(self.centroids_record)

    def read_centroids(self, mmap: bool = False) -> tuple[np.ndarray, dict]:
        """The (k, d) float32 centroids and their record, checked against each other;
        ``mmap``: memory-mapped (a URL: rows fetched as they are indexed)."""
        record = self.read_record()
        centroids = storage.load_npy(self.centroids, mmap=mmap)
        if centroids.shape != (record["k"], record["dimension"]):
            raise InputError(
                f"{self.centroids}: shape {centroids.shape}, but {self.centroids_record.name} says "
                f"({record['k']}, {record['dimension']}); the folder was altered, run again into a new --out"
            )
        return centroids, record

    def write_centroids(self, centroids: np.ndarray, record: dict) -> None:
        """The (k, d) centroids, then their record (last: the centroids are complete), which
        keeps their digest (``digest``: a trainer tells labels of other centroids apart without
        reading them)."""
        save_npy_atomic(self.centroids, centroids)
        write_json_atomic(self.centroids_record, {**record, "digest": centroids_digest(centroids)})

    # ------------------------------------------------------------------ hierarchical parts

    def part_paths(self, part: int) -> tuple[Path, Path, Path]:
        """Centroids, sizes and record of hierarchical part ``part``."""
        return (self.parts / f"part_{part}.npy", self.parts / f"part_{part}_sizes.npy", self.parts / f"part_{part}.json")

    def write_part(self, part: int, centroids: np.ndarray, sizes: np.ndarray, record: dict) -> None:
        centroids_path, sizes_path, record_path = self.part_paths(part)
        save_npy_atomic(centroids_path, centroids)
        save_npy_atomic(sizes_path, sizes)
        write_json_atomic(record_path, record)  # last: the part is complete

    def part_records(self) -> dict[int, dict]:
        """``{p: record}`` of every finished hierarchical part."""
        listing = numbered_files(self.parts, "part_", ".json") if storage.is_dir(self.parts) else []
        return {number: read_record(path) for number, path in listing}

    def read_part(self, part: int, k: int, dimension: int) -> tuple[np.ndarray, np.ndarray]:
        """Part ``part``'s centroids (memory-mapped (k, dimension) float32) and sizes ((k,) int64)."""
        centroids_path, sizes_path, _ = self.part_paths(part)
        centroids = storage.load_npy(centroids_path, mmap=True)
        sizes = storage.load_npy(sizes_path, mmap=False)
        if centroids.shape != (k, dimension) or sizes.shape != (k,):
            raise InputError(f"{centroids_path}: shape {centroids.shape} (sizes {sizes.shape}) does not match its record; redo part {part}")
        return centroids, sizes

    # ------------------------------------------------------------------ labels

    def label_path(self, number: int) -> Path:
        return self.labels / f"{LABEL_PREFIX}{number}{LABEL_SUFFIX}"

    def labelled_parts(self) -> set[int]:
        """The part numbers that have a label file (one listing)."""
        return set(label_files(self.labels)) if storage.is_dir(self.labels) else set()

    def read_assignment(self) -> dict:
        if not storage.is_file(self.assignment_record):
            raise InputError(f"{self.root}: no labels yet; run `unicom cluster assign` first")
        return read_record(self.assignment_record)

    def write_assignment(self, record: dict) -> None:
        write_json_atomic(self.assignment_record, record)

    def check_assigned_with(self, assignment: dict | None, centroids: np.ndarray) -> str:
        """The digest of ``centroids``; an error if ``assignment`` (the record of the labels
        there) says the labels were assigned with other centroids (records written before the
        digest was kept lack it, and are taken as they are)."""
        digest = centroids_digest(centroids)
        if assignment is not None and assignment.get("centroids", digest) != digest:
            raise self._other_centroids()
        return digest

    def _other_centroids(self) -> InputError:
        return InputError(
            f"{self.labels}: the labels there were assigned with other centroids than those in {self.centroids} "
            f"(trained again since); delete {self.labels} and {self.assignment_record}, then run `unicom cluster "
            "assign` (or the same `unicom cluster` command) again"
        )

    def check_recorded_digests(self) -> None:
        """An error if the labels were assigned with other centroids than those recorded in
        ``centroids.json`` (trained again since), read from the two records' digests alone
        (folders written before they were kept lack them, and pass)."""
        if not (storage.is_file(self.assignment_record) and storage.is_file(self.centroids_record)):
            return
        assigned = read_record(self.assignment_record).get("centroids")
        trained = read_record(self.centroids_record).get("digest")
        if assigned is not None and trained is not None and assigned != trained:
            raise self._other_centroids()

    def write_labels(self, number: int, keys, labels: np.ndarray, similarity: np.ndarray, facts: dict,
                     occurrences=None) -> None:
        """``labels_{number}.parquet``: ``keys`` (a pyarrow array), int32 ``occurrences`` (a
        pyarrow array, the samples' occurrence of their key; None: no such column), int64
        ``labels``, float32 ``similarity``, with ``facts`` (rows, invalid, key_column) in the
        schema metadata."""
        import pyarrow as pa

        columns = {"key": keys}
        if occurrences is not None:
            columns[OCCURRENCE] = occurrences.cast(pa.int32())
        table = pa.table({**columns, "label": np.asarray(labels, dtype=np.int64),
                          "similarity": np.asarray(similarity, dtype=np.float32)})
        table = table.replace_schema_metadata({LABEL_METADATA_KEY: json.dumps(facts).encode()})
        write_parquet_atomic(self.label_path(number), table)

    def replace_labels(self, number: int, table) -> None:
        """Rewrite ``labels_{number}.parquet`` with the rows of ``table`` (read from it), its facts kept."""
        write_parquet_atomic(self.label_path(number), table)

    def read_labels(self, number: int, columns: Sequence[str] | None = None):
        """``labels_{number}.parquet`` as a ``pyarrow.Table`` (of ``columns``, default all)."""
        return _read_label_table(self.label_path(number), columns)

    def label_facts(self, number: int) -> dict:
        """The ``unicom.labels`` facts of ``labels_{number}.parquet``: rows, invalid, key_column."""
        facts = read_label_facts(self.label_path(number))
        if facts is None:
            raise InputError(f"{self.label_path(number)}: not a label file written by unicom cluster "
                             f"(no {LABEL_METADATA_KEY.decode()} metadata)")
        return facts

    def load_labels(self, columns: list[str] | None = None):
        """Every label file in part order, as one ``pyarrow.Table`` (``occurrence`` null on the
        rows of files written without it: parts of an embedding folder resumed across versions)."""
        import pyarrow as pa

        files = label_files(self.labels) if storage.is_dir(self.labels) else {}
        if not files:
            raise InputError(f"{self.labels}: no labels_<N>.parquet files; run `unicom cluster` first")
        return pa.concat_tables([_read_label_table(path, columns) for path in files.values()], promote_options="default")

    # ------------------------------------------------------------------ sizes and summary

    def write_sizes(self, sizes: np.ndarray) -> None:
        save_npy_atomic(self.sizes, sizes)

    def read_sizes(self) -> np.ndarray:
        """(k,) int64 samples per cluster."""
        if not storage.is_file(self.sizes):
            raise InputError(f"{self.root}: no cluster_sizes.npy yet; run `unicom cluster assign` (or `unicom cluster stats`) first")
        return storage.load_npy(self.sizes, mmap=False)

    def read_summary(self) -> dict | None:
        """``clusters.json``, or None before the first summary."""
        return read_record(self.summary) if storage.is_file(self.summary) else None

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.summary, summary)


def load_labels(out: str | os.PathLike, columns: list[str] | None = None):
    """Every label file of ``OUT/labels`` in part order, as one ``pyarrow.Table``."""
    return ClusterFolder(out).load_labels(columns)


# --------------------------------------------------------------------------- the trainer's reader


@dataclass
class LabelRange:
    """What the label files of some parts hold: ``rows`` and the smallest and largest
    label (``low`` 0 and ``high`` -1 when they hold no row); ``file_rows``: the rows of
    each file, in the order given; ``without_occurrence``: the files without the
    ``occurrence`` column (written by earlier versions, see :func:`read_shard_labels`)."""

    rows: int
    low: int
    high: int
    file_rows: tuple[int, ...] = ()
    without_occurrence: int = 0

    def note(self) -> str | None:
        """A line for the start of training on files without ``occurrence``, else None."""
        if not self.without_occurrence:
            return None
        return (f"{self.without_occurrence} of {len(self.file_rows)} label files have no {OCCURRENCE!r} column "
                f"({WITHOUT_OCCURRENCE}): their rows are given to the samples of a key in order, exact where keys "
                "are unique in their shard; a key whose rows differ in label and whose samples are more or fewer than "
                "its rows stops the run when it is read. "
                f"To join every sample exactly: {REEMBED[0].lower()}{REEMBED[1:]}")


class PseudoLabels:
    """The pseudo-labels of a clustering run, as a trainer reads them.

    ``path``: the run's output folder (``OUT``, holding ``labels/``) or a folder holding
    ``labels_{i}.parquet`` itself. Each label file needs the columns ``key`` and ``label``
    (class ids 0..k-1), and names repeated keys' samples by ``occurrence`` where it has it
    (:func:`read_shard_labels`); ``num_classes`` is k from the run's record (``centroids.json``,
    else ``clusters.json``), None without one; ``labelled_parts`` are the input parts the
    run set out to label (``assignment.json``), None without a record; ``centroids``: the
    digest of the centroids the labels were assigned with (:func:`centroids_digest`, from
    ``assignment.json``), None without a record of it.
    """

    def __init__(self, path):
        path = storage.path(path)
        if storage.is_dir(path / LABELS_FOLDER):
            self.folder = path / LABELS_FOLDER
        elif any(n.startswith(LABEL_PREFIX) and n.endswith(LABEL_SUFFIX) for n in storage.list_files(path)):
            self.folder = path
        else:
            raise InputError(f"{path}: no labels/labels_<i>.parquet inside; give the output folder of `unicom cluster`")
        self.run = ClusterFolder(path)
        self.files = label_files(self.folder)
        self.num_classes = self._recorded_classes()
        assignment = read_record(self.run.assignment_record) if storage.is_file(self.run.assignment_record) else None
        self.labelled_parts = None if assignment is None else self._recorded_parts(assignment)
        self.centroids = None if assignment is None else assignment.get("centroids")
        self.run.check_recorded_digests()

    def _recorded_classes(self) -> int | None:
        for name in RECORDS:
            record = self.run.root / name
            if storage.is_file(record):
                try:
                    return int(json.loads(storage.read_text(record))["k"])
                except (ValueError, KeyError, TypeError) as error:
                    raise InputError(f"{record}: unreadable clustering record ({error})") from error
        return None

    def _recorded_parts(self, record: dict) -> set[int]:
        try:
            return {int(number) for number in record["inputs"]["shards"]}
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"{self.run.assignment_record}: unreadable assignment record ({error})") from error

    def select(self, numbers: Sequence[int], what: str = "shards") -> dict[int, Path]:
        """``{i: labels_{i}.parquet}`` of the parts ``numbers``; an error naming the parts
        without labels, and whether the run has not labelled them yet or never saw them."""
        missing = [n for n in numbers if n not in self.files]
        if missing:
            pending = [n for n in missing if self.labelled_parts is not None and n in self.labelled_parts]
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            why = (f"the run has not labelled {len(pending)} of them yet: finish `unicom cluster assign`; "
                   if pending else "")
            raise InputError(
                f"{self.folder}: no labels for {len(missing)} of {len(numbers)} {what} (numbers {shown}); {why}shard <i>.tar "
                "is joined with labels_<i>.parquet: cluster the embeddings of these shards, or leave them out of data.shards"
            )
        return {n: self.files[n] for n in numbers}

    def check(self, files: Sequence[Path] | None = None) -> LabelRange:
        """Rows and label range of ``files`` (default all), from the parquet statistics when
        present; an error for a file without ``key``/``label``, with labels that are not
        integers, a row without a label (null), or a negative label."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = list(self.files.values()) if files is None else list(files)
        if not files:
            raise InputError(f"{self.folder}: no labels_<i>.parquet files")
        file_rows, low, high, without_occurrence = [], None, None, 0
        for path in files:
            try:
                meta = pq.ParquetFile(storage.readable(path)).metadata
            except Exception as error:  # pyarrow raises several types for damaged files
                raise InputError(f"{path}: not a readable parquet file ({error})") from error
            names = meta.schema.names
            if "key" not in names or "label" not in names:
                raise InputError(f"{path}: expected columns key and label (as written by `unicom cluster`), found {names}")
            label_type = meta.schema.to_arrow_schema().field("label").type
            if not pa.types.is_integer(label_type):
                raise InputError(f"{path}: the label column holds {label_type}, not integers; labels are class ids "
                                 "0..k-1: write the column as int64 (as `unicom cluster` does)")
            file_rows.append(meta.num_rows)
            without_occurrence += OCCURRENCE not in names
            column = names.index("label")
            stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
            if all(s is not None and s.has_min_max and s.has_null_count for s in stats):
                nulls, bounds = sum(s.null_count for s in stats), [(s.min, s.max) for s in stats]
            else:  # no statistics (or a row group of nulls only): read the column
                import pyarrow.compute as pc

                values = _read_label_table(path, ["label"]).column("label")
                nulls, extremes = values.null_count, pc.min_max(values)
                bounds = [(extremes["min"].as_py(), extremes["max"].as_py())] if len(values) > nulls else []
            if nulls:
                raise InputError(f"{path}: {nulls} row(s) without a label (null); a label file lists labelled samples "
                                 "only (a sample not in it is unlabelled and skipped): leave those rows out")
            for smallest, largest in bounds:
                low = int(smallest) if low is None else min(low, int(smallest))
                high = int(largest) if high is None else max(high, int(largest))
        if low is not None and low < 0:
            raise InputError(f"{self.folder}: negative labels ({low}); labels must be class ids 0..k-1")
        return LabelRange(sum(file_rows), 0 if low is None else low, -1 if high is None else high, tuple(file_rows),
                          without_occurrence)

    def lookup(self) -> KeyLabels:
        """The labels of every label file, by part number, for :func:`label_of` (see
        :func:`read_shard_labels`)."""
        return read_shard_labels(*self.files.values())


__all__ = [
    "LABEL_METADATA_KEY",
    "OCCURRENCE",
    "AmbiguousLabels",
    "KeyLabels",
    "check_all_met",
    "ClusterFolder",
    "LabelRange",
    "PseudoLabels",
    "check_record",
    "label_files",
    "load_labels",
    "read_label_facts",
    "label_of",
    "read_shard_labels",
    "centroids_digest",
    "read_record",
]
