"""Decoded, batched samples of parts, for a ``DataLoader`` with worker processes.

The work is cut into *units*: a whole part, or one of ``slices`` interleaved slices of a
part (see :func:`plan_units`). Batches are always the same runs of
``batch_size`` consecutive samples of a part (batch ``b`` holds samples
``b*batch_size .. (b+1)*batch_size-1``), whatever the number of workers or ranks, so a
part recomputed alone gives the same numbers as in the first run. Slice ``j`` of ``k``
takes the batches with ``b % k == j``.

Each unit ends with an empty batch marked ``last`` that says how many samples the unit
read; the consumer knows a part is complete when all its units have ended.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from unicom.data.shards import ShardReadError
from unicom.data.sources import CaptionFile
from unicom.data.transforms import (
    DecodeError,
    EncodedJpegs,
    ImageTooLarge,
    SplitTransform,
    TensorTransform,
    check_resized_pixels,
    check_workers_share,
    decode_image,
    decoded_by_workers,
    encoded_bytes,
    seeded_draws,
    short_side_size,
)
from unicom.storage import FetchError


@dataclass(frozen=True)
class Unit:
    """Slice ``slice`` of ``slices`` of ``part``."""

    part: Any
    slice: int = 0
    slices: int = 1


def plan_units(parts: Sequence[Any], workers: int) -> list[Unit]:
    """Whole parts, except that the last wave is cut into slices to keep every worker busy.

    Workers take units in turn, so ``len(parts) // workers`` full waves of whole parts run
    with every worker busy; a whole part is read by one worker only (a shard is read once).
    The ``len(parts) % workers`` parts left over (all of them when there are fewer parts
    than workers: a single list, a few shards) are cut into interleaved slices, enough for
    every worker to have one.
    """
    workers = max(1, workers)
    whole = len(parts) - len(parts) % workers
    tail = parts[whole:]
    units = [Unit(part) for part in parts[:whole]]
    if tail:
        slices = math.ceil(workers / len(tail))
        units += [Unit(part, j, slices) for part in tail for j in range(slices)]
    return units


@dataclass
class Batch:
    """Decoded samples of one part.

    ``images``: (B, 3, H, W) uint8 pixels or float model input (see ``BatchStream``), or None; ``tokens``: int64 (B, L) or None; ``indices``:
    the samples' positions in the part; ``rows``: their metadata (key, caption, width,
    height, part columns); ``failures``: dicts (index, key, source, reason) of samples left
    out. ``last`` marks the end of a unit, with ``read`` = samples the unit went through.
    With decoding on the model's device, ``jpegs`` holds the samples still encoded and
    ``images`` the others (see :meth:`BatchStream.model_input`).
    """

    part: int
    indices: list[int] = field(default_factory=list)
    images: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    last: bool = False
    read: int = 0
    jpegs: EncodedJpegs | None = None

    def pin_memory(self) -> "Batch":
        if self.images is not None:
            self.images = self.images.pin_memory()
        if self.tokens is not None:
            self.tokens = self.tokens.pin_memory()
        if self.jpegs is not None:
            self.jpegs.pin_memory()
        return self


class BatchStream(IterableDataset):
    """Batches of the given units; ``DataLoader`` workers take the next unit when they finish one.

    One pass only: make a new stream to read the units again.

    Args:
        units: from :func:`plan_units`.
        batch_size: samples per batch (before failures are removed).
        image_transform: PIL image -> float tensor (3, H, W); None to skip images (text only).
            It is run as a :class:`SplitTransform`: batches may hold uint8 pixels, which
            ``stream.image_input.on_device`` turns into the model's input where it runs.
        tokenize: list of captions -> int64 (B, L); None to skip texts.
        draft: (width, height) that JPEG draft decoding must keep, or None for full decoding.
        device_decode: leave JPEGs encoded for the model's device (nvJPEG on a GPU; see
            :func:`unicom.data.transforms.resolve_decode`); other images take the CPU path.
        workers_share: with ``device_decode``, the share of those JPEGs that the workers
            decode nonetheless (:func:`unicom.data.transforms.decoded_by_workers`).
    """

    def __init__(
        self,
        units: Sequence[Unit],
        batch_size: int,
        image_transform: Callable | None,
        tokenize: Callable[[list[str]], torch.Tensor] | None = None,
        draft: tuple[int, int] | None = None,
        device_decode: bool = False,
        workers_share: float = 0.0,
    ):
        super().__init__()
        self.units = list(units)
        self.batch_size = int(batch_size)
        self.image_transform = image_transform
        self.seed_of = getattr(image_transform, "seed_of", None)  # DrawnPerKey: draws seeded per sample key
        self.image_input = SplitTransform(image_transform) if image_transform is not None else None
        self.tokenize = tokenize
        self.draft = draft
        self.short_side = short_side_size(image_transform)
        self.tensor_transform = TensorTransform(image_transform) if device_decode else None
        share = check_workers_share(workers_share)  # checked even where it has no effect
        self.workers_share = share if device_decode else 0.0
        self._next_unit = multiprocessing.Value("q", 0)  # shared with the workers it is forked or sent to

    def __iter__(self) -> Iterator[Batch]:
        if get_worker_info() is None:
            for unit in self.units:
                yield from self.unit_batches(unit)
            return
        # workers take the next unit when they finish one: with a fixed share, the worker
        # that drew one unit more than the others would run alone at the end
        while True:
            with self._next_unit.get_lock():
                index = self._next_unit.value
                self._next_unit.value += 1
            if index >= len(self.units):
                return
            yield from self.unit_batches(self.units[index])

    def unit_batches(self, unit: Unit) -> Iterator[Batch]:
        part = unit.part
        chunk: list = []
        chunk_number = 0
        read = 0
        failure = None
        try:
            for record in part.records():
                read += 1
                number = record.index // self.batch_size
                if number != chunk_number:
                    if chunk:
                        yield self.make_batch(part, chunk)
                    chunk, chunk_number = [], number
                if number % unit.slices == unit.slice:
                    chunk.append(record)
        except ShardReadError as error:
            # by every slice that meets it (each reads the shard itself, and a download may fail
            # for one of them only); the consumer keeps one report per part
            reason = f"shard unreadable after {error.samples} samples: {error.reason}"
            failure = {"index": -1, "key": "", "source": part.name, "reason": reason}
        if chunk:
            yield self.make_batch(part, chunk)
        end = Batch(part.number, last=True, read=read)
        if failure is not None:
            end.failures.append(failure)
        yield end

    def draws(self, key: str):
        """The context of a sample's random draws (its crop plan on the device-decode path,
        its transform on the CPU path): seeded by its key for a :class:`DrawnPerKey` view."""
        return contextlib.nullcontext() if self.seed_of is None else seeded_draws(self.seed_of(key))

    def make_batch(self, part, records: list) -> Batch:
        with _one_thread():
            return self._make_batch(part, records)

    def _make_batch(self, part, records: list) -> Batch:
        batch = Batch(part.number)
        images, captions = [], []
        jpegs: tuple[list, list, list, list] = ([], [], [], [])
        for record in records:
            if isinstance(record.caption, CaptionFile) or record.fields is not None:  # a folder's files beside the image,
                failure = _read_sidecars(record)  # read for this slice's samples only
                if failure is not None:
                    batch.failures.append(failure)
                    continue
            row = {"key": record.key, "caption": record.caption, "width": None, "height": None, **record.columns}
            if self.image_transform is not None:
                source = record.columns.get("image_path") or _path_or(record.image, part.name)
                if record.image is None:
                    named = getattr(getattr(part, "shard_columns", None), "image", None)
                    why = "no image in the sample" + (f" (no {named!r}, the image column named)" if named else "")
                    batch.failures.append(_failure(record, source, why))
                    continue
                try:
                    data = encoded_bytes(record.image) if self.tensor_transform is not None else None
                    size = self.tensor_transform.device_size(data) if data is not None else None
                    if size is not None and self.workers_share and decoded_by_workers(record.index, self.workers_share):
                        size = None  # this worker's share of the JPEGs
                    if size is not None:  # decoded where the model runs
                        check_resized_pixels(self.short_side, size)
                        row["width"], row["height"] = size
                        with self.draws(record.key):
                            plan = self.tensor_transform.plan(*size)
                        for held, value in zip(jpegs, (data, plan, len(batch.indices), str(source))):
                            held.append(value)
                        batch.indices.append(record.index)
                        batch.rows.append(row)
                        captions.append(record.caption or "")
                        continue
                    image, (row["width"], row["height"]) = decode_image(data or record.image, self.draft)
                    check_resized_pixels(self.short_side, image.size)
                    with self.draws(record.key):
                        images.append(self.image_input.on_worker(image))
                except DecodeError as error:  # an image over a size limit is told apart: its remedy differs
                    failure = _failure(record, source, str(error))
                    batch.failures.append(dict(failure, too_large=True) if isinstance(error, ImageTooLarge) else failure)
                    continue
                except FetchError as error:
                    if error.missing:  # after every retry the store has no such file: as a missing local file
                        batch.failures.append(_failure(record, source, f"file not found: {error}"))
                    else:  # the part is not finished: a rerun fetches it again
                        batch.failures.append(dict(_failure(record, source, f"fetch failed: {error}"), fetch=True))
                    continue
                except Exception as error:  # a transform that rejects this image
                    batch.failures.append(_failure(record, source, f"transform failed: {type(error).__name__}: {error}"))
                    continue
            batch.indices.append(record.index)
            batch.rows.append(row)
            captions.append(record.caption or "")
        if images:
            batch.images = torch.stack(images)
        if jpegs[0]:
            batch.jpegs = EncodedJpegs(*jpegs)
        if self.tokenize is not None and captions:
            batch.tokens = self.tokenize(captions)
        return batch

    def model_input(self, batch: Batch, device: torch.device) -> torch.Tensor | None:
        """The batch's images as the model's float input on ``device``; samples whose JPEG no
        decoder could read are moved from the batch's rows to its failures."""
        from unicom.data.transforms import images_on_device

        if not batch.indices or self.image_input is None:
            return None
        images, failed = images_on_device(len(batch.indices), batch.images, batch.jpegs, device, self.image_input,
                                          self.tensor_transform)
        if failed:
            keep = [i for i in range(len(batch.indices)) if i not in failed]
            sources = dict(zip(batch.jpegs.slots, batch.jpegs.sources))
            for i in sorted(failed):
                batch.failures.append({"index": batch.indices[i], "key": batch.rows[i]["key"], "source": sources[i],
                                       "reason": failed[i]})
            batch.indices = [batch.indices[i] for i in keep]
            batch.rows = [batch.rows[i] for i in keep]
            if batch.tokens is not None:
                batch.tokens = batch.tokens[keep]
        return images


@contextlib.contextmanager
def _one_thread():
    """Run per-image tensor work on one thread.

    Waking a pool of threads for tensors of one image costs more than the work, and far
    more when the cores are busy with the model: 0.1 ms becomes 20 ms. Worker processes run
    on one thread already; in the main process we switch for the duration of a batch.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _path_or(image, default: str) -> str:
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else default


def _failure(record, source: str, reason: str) -> dict:
    return {"index": record.index, "key": record.key, "source": str(source), "reason": reason}


def _read_sidecars(record) -> dict | None:
    """Read the caption file of ``record`` into its ``caption`` and its json file's fields into
    its ``columns``; the sample's failure when one cannot be read (a file that could not be
    fetched leaves the part unfinished, as an image does)."""
    path = ""
    try:
        if isinstance(record.caption, CaptionFile):
            path = record.caption.path
            record.caption = record.caption.read()
        if record.fields is not None:
            path = record.fields.path
            record.columns.update(record.fields.read())
            record.fields = None
    except DecodeError as error:
        return _failure(record, path, str(error))
    except FetchError as error:
        if error.missing:
            return _failure(record, path, f"file not found: {error}")
        return dict(_failure(record, path, f"fetch failed: {error}"), fetch=True)
    except OSError as error:
        return _failure(record, path, f"unreadable: {error.strerror or error}")
    return None
