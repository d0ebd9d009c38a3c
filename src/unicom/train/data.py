"""Training batches with labels: shards joined with pseudo-labels, or labelled image lists.

Two sources, one stream:

* :class:`ShardSource`: webdataset shards (``unicom embed``'s input) joined by key with the
  ``labels/labels_{i}.parquet`` that ``unicom cluster`` wrote for them (shard ``i``, labels
  ``i``; a key that several samples of the shard carry is told apart by the rows'
  ``occurrence``, see :func:`unicom.formats.clusters.read_shard_labels`). Samples without a
  label are counted and skipped.
* :class:`ListSource`: an image folder, a CSV/parquet list, or the training split of a
  benchmark, with its own labels or joined with pseudo-labels by key.

Each rank reads its part through ``roles`` readers (the DataLoader's workers; one in the
main process when there are none). A reader's records form an endless sequence of
*passes*; in pass ``p``:

* shards: the shard list is permuted by ``(seed, p)``; rank ``r`` of ``R`` takes every
  R-th shard from ``r``, reader ``w`` of ``W`` every W-th of those from ``w``, reads them in
  turn and shuffles their labelled samples through a buffer seeded by ``(seed, p, r, w)``;
* lists: the rows are permuted by ``(seed, p)``; rank ``r`` takes ``perm[r::R]`` cut to
  ``N // R`` rows, in chunks of ``batch_size``; reader ``w`` takes chunks ``w, w + W, ...``.
  Without decoding failures a global batch (all ranks' batch ``s``) is then the same set of
  images whatever the number of ranks: ``perm[s·G:(s+1)·G]``.

Every image is decoded and augmented with random generators seeded by ``(seed, p, sample)``,
so an image's augmentation does not depend on which process handles it. Images that fail
to decode are counted, reported and replaced by the reader's next records, so every batch
holds exactly ``batch_size`` images (every rank must pass the same number to PartialFC).

A batch carries ``(role, pass, cursor)``: the records its reader had consumed in that pass.
Saving the last consumed ``(pass, cursor)`` of every reader and the next reader in turn is
enough to restart the stream exactly where it stopped: readers skip ``cursor`` records
without decoding them, and the DataLoader's round-robin over its workers is rotated so
that the reader in turn comes first.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from unicom.errors import InputError

FAILURES_PER_BATCH = 8  # failure details carried per batch (all are counted)


# --------------------------------------------------------------------------- records


@dataclass
class Record:
    """One labelled sample before decoding. ``uid`` ``(a, b)``: (shard number, index in the
    shard) or (-1, row of the list); it seeds the sample's augmentation."""

    uid: tuple[int, int]
    image: Any  # encoded bytes, a path, or a PIL image
    label: int
    key: str
    origin: str


@dataclass
class Counters:
    """What a reader skipped since it last handed a batch over."""

    unlabelled: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)
    broken: set[str] = field(default_factory=set)  # shards reported as breaking off: once, not every pass

    def take(self) -> tuple[int, int, list[dict]]:
        """The counts and details so far; zero them (in place: the readers hold this object)."""
        taken = (self.unlabelled, self.failed, self.failures)
        self.unlabelled, self.failed, self.failures = 0, 0, []
        return taken

    def fail(self, record_key: str, origin: str, reason: str) -> None:
        self.failed += 1
        if len(self.failures) < FAILURES_PER_BATCH:
            self.failures.append({"key": record_key, "source": origin, "reason": reason})


def _generator_seed(*values: int) -> int:
    """A 32-bit seed mixed from non-negative integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


def permutation(n: int, *seed: int) -> np.ndarray:
    """A permutation of ``range(n)`` that depends only on ``seed``."""
    return np.random.default_rng(_generator_seed(*seed)).permutation(n)


class ShardSource:
    """Webdataset shards joined with pseudo-labels by key.

    Args:
        shards: ``(number, path)`` of every shard, numbers as in ``labels_{number}.parquet``.
        label_files: number -> labels parquet (columns ``key``, ``label``).
        labelled: labelled samples over all shards (the rows of the label files).
        num_classes: k, the number of pseudo-classes.
        shard_rows: the labelled samples of each shard (the rows of its label file), in
            the order of ``shards``; when given, :meth:`check_readers` also checks that
            every reader can fill a batch in a pass.
        left_out: shards of the input without a labelled sample, not in ``shards``.
    """

    kind = "shards"
    labels_centroids: str | None = None  # digest of the centroids the pseudo-labels were assigned with, if recorded
    labels_note: str | None = None  # said at the start: label files of an earlier version (LabelRange.note)

    def __init__(self, shards: Sequence[tuple[int, Any]], label_files: dict[int, Any], labelled: int, num_classes: int,
                 shuffle_buffer: int = 2000, shard_rows: Sequence[int] | None = None, left_out: int = 0,
                 columns=None):
        self.shards = list(shards)
        self.columns = columns  # the columns of parquet shards named (a ShardColumns), or None
        self.shard_rows = None if shard_rows is None else [int(r) for r in shard_rows]
        self.left_out = int(left_out)
        self.label_files = label_files
        self.labelled = int(labelled)
        self.num_classes = int(num_classes)
        self.shuffle_buffer = int(shuffle_buffer)

    @property
    def samples(self) -> int:
        return self.labelled

    def describe(self) -> str:
        empty = f" ({self.left_out} more without a labelled sample left out)" if self.left_out else ""
        return f"{len(self.shards)} shards{empty}, {self.labelled:,} labelled samples, {self.num_classes:,} classes"

    def max_readers(self, world_size: int, batch_size: int) -> int:
        """Readers per rank that this data keeps busy: every reader needs a shard."""
        return max(1, len(self.shards) // world_size)

    def check_readers(self, world_size: int, roles: int, batch_size: int = 1) -> None:
        if len(self.shards) < world_size * roles:
            raise InputError(
                f"{len(self.shards)} shards{f' with labelled samples ({self.left_out} more without)' if self.left_out else ''} "
                f"cannot feed {world_size} ranks x {roles} readers = {world_size * roles} readers "
                "(every reader needs at least one shard per pass): lower data.workers or split the data into more shards"
            )
        if self.shard_rows is None:
            return
        # rank r reads shards r, r + R, ... of a pass's order and reader w every W-th of
        # those: the last reader of the last rank has the fewest, and a reader whose largest
        # possible share cannot fill one batch would read pass after pass without end
        fewest = len(range(roles - 1, len(range(world_size - 1, len(self.shards), world_size)), roles))
        most = sum(sorted(self.shard_rows, reverse=True)[:fewest])
        if most < batch_size:
            raise InputError(
                f"data.batch_size={batch_size} cannot be filled: {world_size} rank(s) x {roles} reader(s) share "
                f"{len(self.shards)} shards, so a reader may get only {fewest} shard(s) per pass, and the largest "
                f"{fewest} hold {most} labelled samples; every reader must fill whole batches from its shards: lower "
                f"data.batch_size to at most {most}, use fewer ranks or data.workers, or write fewer, larger shards"
            )

    def class_counts(self) -> np.ndarray:
        """(num_classes,) int64 labelled samples per class: the rows of the label files."""
        import pyarrow.parquet as pq

        from unicom import storage

        counts = np.zeros(self.num_classes, dtype=np.int64)
        for path in self.label_files.values():
            labels = pq.read_table(storage.readable(path), columns=["label"]).column("label").to_numpy()
            counts += np.bincount(labels, minlength=self.num_classes)
        return counts

    def _labels(self, number: int):
        from unicom.formats.clusters import read_shard_labels

        return read_shard_labels(self.label_files[number])

    def records(self, seed: int, pass_: int, rank: int, world_size: int, role: int, roles: int, batch_size: int,
                counters: Counters) -> Iterator[Record]:
        from unicom import storage
        from unicom.data.shards import ShardReadError, read_shard_samples, shard_name
        from unicom.formats.clusters import AmbiguousLabels, check_all_met, label_of

        order = permutation(len(self.shards), seed, pass_)
        mine = [self.shards[i] for i in order[rank::world_size][role::roles]]

        def labelled() -> Iterator[Record]:
            for number, path in mine:
                labels = self._labels(number)
                found, first = 0, None
                try:
                    for index, sample in enumerate(read_shard_samples(path, columns=self.columns)):
                        first = sample.key if first is None else first
                        label = label_of(labels, sample.key)  # by key and the sample's occurrence of it
                        if label is None:
                            counters.unlabelled += 1
                            continue
                        found += 1
                        yield Record((number, index), sample.image_bytes(), int(label), sample.key, shard_name(path))
                    if first is not None and not found and labels:
                        # read whole, it fed nothing: a shard written anew since it was clustered, or
                        # labels of other inputs (the check before training looks at the first shard only)
                        raise InputError(
                            f"{storage.text(path)}: none of its samples (keys like {first!r}) is in "
                            f"{storage.name(self.label_files[number])} (keys like {next(iter(labels))!r}); "
                            f"{_why_keys_differ(self.label_files[number], 'cluster these shards again, or leave this one out of data.shards')}"
                        )
                    check_all_met(labels)
                except AmbiguousLabels as error:
                    raise InputError(f"{storage.text(path)} with {storage.text(self.label_files[number])}: {error}") from None
                except ShardReadError as error:
                    if storage.text(path) not in counters.broken:
                        counters.broken.add(storage.text(path))
                        counters.fail("", storage.text(path), f"shard broke off after {error.samples} samples: "
                                      f"{error.reason}; the rest of it is not read in any pass (reported once)")

        buffer: list[Record] = []
        rng = random.Random(_generator_seed(seed, pass_, rank, role, 0x5EED))
        for record in labelled():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], record = record, buffer[j]
            yield record
        rng.shuffle(buffer)
        yield from buffer


class ListSource:
    """A labelled image list (paths or PIL images, int labels 0..num_classes-1, keys)."""

    kind = "list"
    labels_centroids: str | None = None  # with pseudo-labels: digest of their centroids, if recorded
    labels_note: str | None = None  # said at the start: label files of an earlier version (LabelRange.note)

    def __init__(self, images: Sequence[Any], labels: np.ndarray, keys: Sequence[str], num_classes: int, origin: str,
                 class_labels: Sequence[str] | None = None):
        self.images = list(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.keys = list(keys)
        self.num_classes = int(num_classes)
        self.origin = origin
        self.unlabelled = 0  # rows of the list without a pseudo-label (counted when joining)
        self.excluded = 0  # rows of the list whose key a data.exclude table lists, left out
        # the label as given (id or name) of each prototype row; None: pseudo-labels, the rows themselves
        self.class_labels = None if class_labels is None else [str(c) for c in class_labels]

    def classes_table(self) -> str:
        """``prototype,label`` CSV: the given label of each prototype row that has one."""
        lines = ["prototype,label"] + [f"{row},{_csv_field(label)}" for row, label in enumerate(self.class_labels or [])]
        return "\n".join(lines) + "\n"

    def describe_classes(self) -> str:
        """One line: how the given labels map to prototype rows."""
        labels = self.class_labels or []
        if all(label == str(row) for row, label in enumerate(labels)):
            return f"classes: the labels 0..{len(labels) - 1} are the prototype rows"
        shown = ", ".join(f"{label} -> {row}" for row, label in enumerate(labels[:5]))
        return f"classes: {len(labels):,} labels -> prototype rows: {shown}{', …' if len(labels) > 5 else ''}"

    @property
    def samples(self) -> int:
        return len(self.images)

    def describe(self) -> str:
        skipped = f", {self.unlabelled:,} without a label skipped" if self.unlabelled else ""
        excluded = f", {self.excluded:,} left out by data.exclude" if self.excluded else ""
        return f"{self.origin}: {len(self.images):,} images, {self.num_classes:,} classes{skipped}{excluded}"

    def class_counts(self) -> np.ndarray:
        """(num_classes,) int64 images per class."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def max_readers(self, world_size: int, batch_size: int) -> int:
        """Readers per rank that this data keeps busy: every reader needs a batch per pass."""
        return max(1, len(self.images) // world_size // batch_size)

    def check_readers(self, world_size: int, roles: int, batch_size: int = 1) -> None:
        chunks = len(self.images) // world_size // batch_size
        if chunks < roles:
            raise InputError(
                f"{self.origin}: {len(self.images)} images make {chunks} batches of {batch_size} per rank for {world_size} "
                f"rank(s), fewer than the {roles} readers per rank; lower data.batch_size or data.workers"
            )

    def records(self, seed: int, pass_: int, rank: int, world_size: int, role: int, roles: int, batch_size: int,
                counters: Counters) -> Iterator[Record]:
        perm = permutation(len(self.images), seed, pass_)
        per_rank = len(self.images) // world_size
        stream = perm[rank::world_size][:per_rank]
        chunks = per_rank // batch_size
        for chunk in range(role, chunks, roles):
            for row in stream[chunk * batch_size : (chunk + 1) * batch_size]:
                row = int(row)
                image = self.images[row]
                origin = os.fspath(image) if isinstance(image, (str, os.PathLike)) else self.origin
                yield Record((-1, row), image, int(self.labels[row]), self.keys[row], origin)


# --------------------------------------------------------------------------- batches


@dataclass
class TrainBatch:
    """``images`` float (B, 3, S, S); ``labels`` int64 (B,); the reader's position after it;
    what the reader skipped on the way (counts, and a few failure details).

    Decoding on the model's device, ``jpegs`` holds the samples still encoded and
    ``images`` the others (or None): :meth:`TrainStream.to_device` makes the model input.
    """

    images: torch.Tensor | None
    labels: torch.Tensor
    role: int
    pass_: int
    cursor: int
    unlabelled: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)
    jpegs: Any = None  # unicom.data.transforms.EncodedJpegs

    def pin_memory(self) -> "TrainBatch":
        if self.images is not None:
            self.images = self.images.pin_memory()
        self.labels = self.labels.pin_memory()
        if self.jpegs is not None:
            self.jpegs.pin_memory()
        return self


class TrainStream(IterableDataset):
    """Endless batches of one rank (module docstring).

    Args:
        source: a :class:`ShardSource` or :class:`ListSource`.
        transform: PIL image -> float tensor (3, S, S), random (seeded per sample).
        batch_size: images per batch.
        seed, rank, world_size: the run's seed and this rank.
        roles: readers of this rank (the DataLoader's ``num_workers``, or 1 without workers).
        positions: per reader, ``(pass, cursor)`` to start from (default: all ``(0, 0)``).
        first_role: the reader whose batch comes first (the DataLoader's worker 0 plays it).
        device_decode: leave JPEGs encoded for the model's device (see
            :func:`unicom.data.transforms.resolve_decode`); their random crop and flip are
            drawn by the reader, seeded per sample as on the CPU path.
    """

    def __init__(self, source, transform: Callable, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 roles: int = 1, positions: Sequence[Sequence[int]] | None = None, first_role: int = 0,
                 device_decode: bool = False):
        super().__init__()
        from unicom.data.transforms import SplitTransform, TensorTransform

        self.source = source
        self.transform = transform
        self.split = SplitTransform(transform)
        self.tensor = TensorTransform(transform) if device_decode else None
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size, self.roles = int(rank), int(world_size), max(1, int(roles))
        self.positions = [tuple(p) for p in positions] if positions is not None else [(0, 0)] * self.roles
        if len(self.positions) != self.roles:
            raise ValueError(f"{len(self.positions)} reader positions for {self.roles} readers")
        self.first_role = int(first_role) % self.roles

    def __iter__(self) -> Iterator[TrainBatch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        if workers != self.roles:
            raise RuntimeError(f"the stream was planned for {self.roles} readers but runs in {workers}")
        role = (worker + self.first_role) % self.roles
        return self.reader(role)

    def reader(self, role: int) -> Iterator[TrainBatch]:
        """The endless batches of reader ``role``."""
        from unicom.data.transforms import DecodeError, EncodedJpegs, decode_image, encoded_bytes, seeded_draws

        pass_, skip = self.positions[role]
        counters = Counters()  # kept across passes: what the dropped tail of a pass skipped still counts
        while True:
            images: list[torch.Tensor] = []
            jpegs: tuple[list, ...] = ([], [], [], [], [])  # bytes, plans, positions, origins, keys
            labels: list[int] = []
            cursor = 0
            for record in self.source.records(self.seed, pass_, self.rank, self.world_size, role, self.roles,
                                              self.batch_size, counters):
                cursor += 1
                if cursor <= skip:  # consumed before the restart: not decoded again
                    if cursor == skip:
                        counters.take()  # what was skipped on the way was reported before
                    continue
                try:
                    data = encoded_bytes(record.image) if self.tensor is not None else None
                    size = self.tensor.device_size(data) if data is not None else None
                    with seeded_draws(_generator_seed(self.seed, pass_, record.uid[0] + 1, record.uid[1])):
                        if size is not None:  # decoded where the model runs, cropped as planned here
                            plan = self.tensor.plan(*size)
                        else:
                            image, _ = decode_image(data or record.image)
                            tensor = self.transform(image)
                except DecodeError as error:
                    counters.fail(record.key, record.origin, str(error))
                    continue
                except Exception as error:  # a transform that rejects this image
                    counters.fail(record.key, record.origin, f"transform failed: {type(error).__name__}: {error}")
                    continue
                if size is not None:
                    for held, value in zip(jpegs, (data, plan, len(labels), record.origin, record.key)):
                        held.append(value)
                else:
                    images.append(tensor)
                labels.append(record.label)
                if len(labels) == self.batch_size:
                    unlabelled, failed, failures = counters.take()
                    yield TrainBatch(
                        torch.stack(images) if images else None, torch.tensor(labels, dtype=torch.int64), role, pass_,
                        cursor, unlabelled, failed, failures, EncodedJpegs(*jpegs) if jpegs[0] else None,
                    )
                    images, jpegs, labels = [], ([], [], [], [], []), []
            if cursor == 0:
                raise InputError(
                    f"reader {role} of rank {self.rank} found no labelled sample in pass {pass_}; "
                    f"check that the labels were made from these inputs ({self.source.describe()})"
                )
            pass_, skip = pass_ + 1, 0

    def to_device(self, batch: TrainBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of ``batch`` on ``device``, decoded there when the reader left
        them encoded. A JPEG that no decoder can read is counted and reported as a failure
        of the batch and replaced by a copy of another of its images, with that image's
        label: every rank must pass the same number of images to PartialFC."""
        from unicom.data.transforms import images_on_device

        labels = batch.labels.to(device, non_blocking=True)
        if batch.jpegs is None:
            return batch.images.to(device, non_blocking=True), labels
        count = len(batch.labels)
        images, failed = images_on_device(count, batch.images, batch.jpegs, device, self.split, self.tensor)
        if failed:
            good = [i for i in range(count) if i not in failed]
            if not good:
                raise InputError(f"no image of a batch of {count} could be decoded ({next(iter(failed.values()))})")
            # position i takes row rows[i] of the decoded images: itself, or a good image in turn for a failed one
            rows, taken, substitute = [], 0, 0
            for i in range(count):
                if i in failed:
                    rows.append(substitute % len(good))
                    substitute += 1
                else:
                    rows.append(taken)
                    taken += 1
            # stacked rows, not indices made on the host (a blocking copy to the device: see assemble_model_input)
            images = torch.stack([images[r] for r in rows])
            labels = torch.stack([labels[good[r] if i in failed else i] for i, r in enumerate(rows)])
            where = {slot: (key, source) for slot, key, source in zip(batch.jpegs.slots, batch.jpegs.keys, batch.jpegs.sources)}
            batch.failed += len(failed)
            for i, reason in sorted(failed.items()):
                if len(batch.failures) < FAILURES_PER_BATCH:
                    batch.failures.append({"key": where[i][0], "source": where[i][1],
                                           "reason": f"{reason} (replaced in its batch by a copy of another image)"})
        return images, labels


# --------------------------------------------------------------------------- sources


def _resolve_classes(num_classes: int | None, clustered: int | None, high: int, origin: str) -> int:
    classes = num_classes or clustered or high + 1
    if high >= classes:
        raise InputError(f"{origin}: labels reach {high}, but there are only {classes} classes (loss.num_classes); raise it")
    if clustered is not None and num_classes is not None and num_classes != clustered:
        raise InputError(f"loss.num_classes={num_classes} but {origin} was clustered into k={clustered}; leave loss.num_classes empty")
    return classes


def _shard_source(data, num_classes: int | None) -> ShardSource:
    from unicom.data.parquet_shards import ShardColumns
    from unicom.data.shards import check_shard_columns, expand_shards, shard_number
    from unicom.formats.clusters import PseudoLabels

    shards = [(shard_number(path), path) for path in expand_shards(data.shards)]
    columns = ShardColumns(image=data.image_column, key=data.key_column)
    check_shard_columns([path for _, path in shards], columns)
    _refuse_unreadable([path for _, path in shards])
    labels = PseudoLabels(data.labels)
    files = labels.select([n for n, _ in shards])
    found = labels.check(list(files.values()))
    if found.rows == 0:
        raise InputError(f"{labels.folder}: the label files of these shards hold no rows")
    classes = _resolve_classes(num_classes, labels.num_classes, found.high, str(labels.folder))
    # a shard without a labelled sample (an empty shard) would leave its reader a pass with nothing to read
    rows = dict(zip(files, found.file_rows))
    kept = [(number, path) for number, path in shards if rows[number] > 0]
    source = ShardSource(kept, {n: files[n] for n, _ in kept}, found.rows, classes, data.shuffle_buffer,
                         shard_rows=[rows[n] for n, _ in kept], left_out=len(shards) - len(kept), columns=columns)
    source.labels_centroids = labels.centroids
    source.labels_note = found.note()
    _check_keys_match(source)
    return source


def _refuse_unreadable(shards: Sequence[Any]) -> None:
    """Refuse local shards that are not tars or parquet files (an error page saved under the shard's name, an
    empty file) before training: read, each would only break off at once, pass after pass.
    Rank 0 looks (512 bytes a shard) and every rank takes its answer."""
    from unicom import distributed
    from unicom.data.shards import not_a_shard

    found = []
    if distributed.get_rank() == 0:
        for path in shards:
            why = not_a_shard(path) if isinstance(path, Path) else None  # remote: would cost a request each
            if why is not None:
                found.append((str(path), why))
    found = distributed.broadcast_object(found)
    if found:
        path, why = found[0]
        more = (f" ({len(found) - 1} more shards are refused too: {', '.join(p for p, _ in found[1:4])}"
                f"{' …' if len(found) > 4 else ''})") if len(found) > 1 else ""
        raise InputError(f"{path}: {why}{more}; download the shard again, or leave it out of data.shards")


def _check_keys_match(source: ShardSource, probe: int = 64) -> None:
    """Fail early when the first shard's keys are absent from its labels (mismatched inputs)."""
    from unicom import storage
    from unicom.data.shards import ShardReadError, read_shard_samples

    number, path = source.shards[0]
    labels = source._labels(number)
    keys = []
    try:
        for sample in read_shard_samples(path, columns=source.columns):
            keys.append(sample.key)
            if len(keys) >= probe:
                break
    except ShardReadError:
        pass
    if keys and labels and not any(key in labels for key in keys):
        raise InputError(
            f"{path}: none of its first {len(keys)} sample keys (e.g. {keys[0]!r}) is in {storage.name(source.label_files[number])} "
            f"(keys like {next(iter(labels))!r}); {_why_keys_differ(source.label_files[number])}"
        )


def _why_keys_differ(label_file, otherwise: str = "") -> str:
    """Why a shard's sample keys are not in its label file: the labels name samples by another
    metadata column than the key (``unicom cluster --key-column``), or were made from other
    inputs (then ``otherwise``: what to do)."""
    from unicom.formats.clusters import read_label_facts

    column = (read_label_facts(label_file) or {}).get("key_column")
    if column not in (None, "key"):
        return (f"the labels name the samples by the metadata column {column!r} (`unicom cluster --key-column {column}`), "
                "and training joins them with the samples by key: cluster again with --key-column key")
    return "the labels were made from other inputs" + (f": {otherwise}" if otherwise else "")


def _join_pseudo_labels(images, data, num_classes: int | None, origin: str) -> ListSource:
    """Give the rows of an image list the pseudo-labels of a cluster run, by key (and, for a
    key on several rows, the row's occurrence of it)."""
    from unicom.formats.clusters import AmbiguousLabels, PseudoLabels, check_all_met, label_of

    pseudo = PseudoLabels(data.labels)
    found = pseudo.check()
    high = found.high
    lookup = pseudo.lookup()
    folder = pseudo.folder
    rows, labels = [], []
    try:
        for i, key in enumerate(images.keys):
            label = label_of(lookup, key)
            if label is not None:
                rows.append(i)
                labels.append(label)
        check_all_met(lookup)
    except AmbiguousLabels as error:
        raise InputError(f"{origin} with the labels of {folder}: {error}") from None
    if not rows:
        raise InputError(
            f"{origin}: none of its keys (e.g. {images.keys[0]!r}) is in the labels of {folder} "
            f"(keys like {next(iter(lookup))!r}); {_why_keys_differ(next(iter(pseudo.files.values())))}"
        )
    labels = np.asarray(labels, dtype=np.int64)
    classes = _resolve_classes(num_classes, pseudo.num_classes, high, str(folder))
    source = ListSource([images.paths[i] for i in rows], labels, [images.keys[i] for i in rows], classes, origin)
    source.unlabelled = len(images) - len(rows)
    source.labels_centroids = pseudo.centroids
    source.labels_note = found.note()
    return source


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def _contiguous(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered 0..C-1 in sorted order of their values, and C."""
    values, inverse = np.unique(labels, return_inverse=True)
    return inverse.astype(np.int64), len(values)


def _prototype_rows(labels: np.ndarray, names: Sequence[str] | None, num_classes: int | None,
                    origin: str) -> tuple[np.ndarray, list[str]]:
    """The prototype row of every image and the given label of every row.

    ``labels``: int64 (N,) class ids as written, or indices into ``names`` when the classes
    are names (a folder's sub-folders, a label column of names, a benchmark's classes).
    Ids must be non-negative and, when ``num_classes`` is given, below it: an id is then its
    own row. Without ``num_classes``, ids that are already 0..C-1 are their own rows, others
    are numbered in increasing order; names are numbered in sorted order.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if names is None:
        negative = np.flatnonzero(labels < 0)
        if len(negative):
            rows = [int(r) + 1 for r in negative[:5]]
            raise InputError(f"{origin}: data rows {rows}{' …' if len(negative) > 5 else ''} have negative labels "
                             f"(e.g. {int(labels[negative[0]])}); class ids are 0 or more")
        if num_classes is not None:
            beyond = np.flatnonzero(labels >= num_classes)
            if len(beyond):
                rows = [int(r) + 1 for r in beyond[:5]]
                raise InputError(f"{origin}: data rows {rows}{' …' if len(beyond) > 5 else ''} have labels beyond "
                                 f"loss.num_classes={num_classes} (e.g. {int(labels[beyond[0]])}); ids run from 0 "
                                 f"to {num_classes - 1}")
            return labels, [str(i) for i in range(num_classes)]
        rows, classes = _contiguous(labels)
        return rows, [str(v) for v in np.unique(labels)]
    rows, classes = _contiguous(labels)
    if num_classes is not None and num_classes < classes:
        raise InputError(f"{origin}: {classes} classes, more than loss.num_classes={num_classes}")
    return rows, [str(names[i]) for i in np.unique(labels)]


def _kept_rows(keys: Sequence[str], tables: Sequence[str] | None, origin: str) -> np.ndarray | None:
    """The rows of ``keys`` that no ``data.exclude`` table lists (None without tables)."""
    from unicom.data.lists import unlisted_rows

    return unlisted_rows(keys, tables, origin, "exclude the keys of an embedding folder made from this folder or table "
                                                "(for a benchmark, its dataset folder) with unicom embed --input, then "
                                                "unicom dedup --against")


def _list_source(data, num_classes: int | None) -> ListSource:
    from unicom.data.lists import read_table

    if data.benchmark:
        return _benchmark_source(data, num_classes)
    if data.folder:
        from unicom import storage
        from unicom.data.lists import NestedClassFolders, read_image_folder
        from unicom.data.sources import read_flat_folder

        root = data.folder if storage.is_url(data.folder) else Path(data.folder)
        if not storage.is_dir(root):
            raise InputError(f"{root}: folder not found (expected one sub-folder of images per class)")
        # keys are paths relative to the folder either way, as `unicom embed` writes them
        try:
            images = read_flat_folder(root) if data.labels else read_image_folder(root, data.folder_classes)
        except NestedClassFolders as nested:
            raise InputError(
                f"{root}: the class folders hold images in sub-folders (e.g. {nested.leaves[0]}/): {nested.top} "
                f"top-level folders, {len(nested.leaves)} folders with images. Set data.folder_classes=leaf to train on "
                f"the {len(nested.leaves)} leaf folders as classes, or data.folder_classes=top for the {nested.top} "
                "top-level ones"
            ) from None
        origin = storage.text(root)
    else:
        images = read_table(data.table, path_column=data.path_column, label_column=data.label_column,
                            key_column=data.key_column or "key")
        origin = str(data.table)
    kept = _kept_rows(images.keys, data.exclude, origin)
    excluded = 0 if kept is None else len(images) - len(kept)
    if kept is not None:
        images = images.subset(kept)
    if data.labels:
        source = _join_pseudo_labels(images, data, num_classes, origin)
        source.excluded = excluded
        return source
    if images.labels is None:
        raise InputError(
            f"{origin}: the images have no labels (a flat folder, or no {data.label_column!r} column); "
            "use class sub-folders, a label column, or data.labels from `unicom cluster`"
        )
    labels, given = _prototype_rows(images.labels, images.class_names, num_classes, origin)
    source = ListSource(images.paths, labels, images.keys, num_classes or len(given), origin, given)
    source.excluded = excluded
    return source


def _benchmark_source(data, num_classes: int | None) -> ListSource:
    from unicom.data.benchmarks import CLASSIFICATION_BENCHMARKS, RETRIEVAL_BENCHMARKS, canonical_name
    from unicom.data.benchmarks.classification import CLASSIFICATION_ALIASES

    name = data.benchmark.lower()
    if canonical_name(name) in RETRIEVAL_BENCHMARKS:
        from unicom.data.benchmarks import load_retrieval_benchmark

        protocol = load_retrieval_benchmark(name, data.root)
        if protocol.train is None or protocol.train.labels is None:
            raise InputError(f"{data.benchmark}: this benchmark has no labelled training split to fine-tune on")
        images, keys, raw = protocol.train.paths, protocol.train.keys, protocol.train.labels
        names = protocol.train.class_names
    elif CLASSIFICATION_ALIASES.get(name, name) in CLASSIFICATION_BENCHMARKS:
        from unicom.data.benchmarks import load_classification_benchmark

        train, _, _ = load_classification_benchmark(name, data.root)
        images, raw, names = train.images, train.labels, None
        keys = [os.fspath(i) if isinstance(i, (str, os.PathLike)) else str(n) for n, i in enumerate(images)]
    else:
        raise InputError(
            f"data.benchmark={data.benchmark!r}: not a retrieval benchmark ({', '.join(RETRIEVAL_BENCHMARKS)}) "
            f"nor a classification dataset ({', '.join(CLASSIFICATION_BENCHMARKS)})"
        )
    origin = f"{data.benchmark} ({data.root}) train split"
    kept = _kept_rows(keys, data.exclude, origin)
    raw, excluded = np.asarray(raw), 0 if kept is None else len(keys) - len(kept)
    if kept is not None:
        images, keys, raw = [images[i] for i in kept], [keys[i] for i in kept], raw[kept]
    labels, given = _prototype_rows(raw, names, num_classes, origin)
    source = ListSource(images, labels, keys, num_classes or len(given), origin, given)
    source.excluded = excluded
    return source


def build_source(config):
    """The training source of a recipe: checked (files, labels, keys) before any training."""
    if config.data.shards:
        return _shard_source(config.data, config.loss.num_classes)
    return _list_source(config.data, config.loss.num_classes)


def steps_per_epoch(source, world_size: int, batch_size: int, accumulation: int, samples_per_epoch: int | None = None) -> int:
    """Optimiser steps in one pass over the labelled samples (at least 1)."""
    if isinstance(source, ListSource) and samples_per_epoch is None:
        batches = len(source.images) // world_size // batch_size
    else:
        batches = (samples_per_epoch or source.samples) // (world_size * batch_size)
    return max(1, batches // accumulation)


def reader_error(error: InputError) -> InputError:
    """A reader's :class:`InputError` as the reader said it: the DataLoader raises one from a
    worker process with the worker's whole traceback before the message."""
    text, marker = str(error), f"\n{InputError.__module__}.{InputError.__qualname__}: "
    if text.startswith("Caught ") and marker in text:
        return InputError(text.rsplit(marker, 1)[1].rstrip("\n"))
    return error


def make_loader(stream: TrainStream, num_workers: int, device: torch.device):
    """A DataLoader over ``stream``: ``num_workers`` processes, one per reader, or the main
    process for a single reader when ``num_workers`` is 0."""
    from torch.utils.data import DataLoader

    if max(1, num_workers) != stream.roles:
        raise ValueError(f"{num_workers} workers for a stream of {stream.roles} readers")
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
    )
