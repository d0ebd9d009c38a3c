"""The extraction engine: images (and captions) in, L2-normalised embeddings out.

Two ways in:

* :func:`embed_images` / :func:`embed_texts`: a list of images, paths or captions ->
  ``np.ndarray`` float32 (N, D), rows L2-normalised, in the order given.
* :func:`embed_to_folder` (``unicom embed``): webdataset shards, an image folder or a
  CSV/parquet list -> an embedding folder (:mod:`unicom.formats.embeddings`), one output part
  per input part, float16 by default. Finished parts are skipped, so a killed job resumes
  where it stopped; under ``torchrun`` the parts are split over the ranks. Inputs and the
  output folder may be URLs (:mod:`unicom.storage`).

Samples whose image cannot be decoded are left out of the outputs, counted, and listed per
part in ``failures/failures_{i}.parquet`` (part, index, key, source, reason). A part whose
shard broke off or could not be fetched (after the retries) is not written at all: the
report names the shard and the reason, and the next run tries the part again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from unicom import distributed, storage
from unicom.data.loading import Batch, BatchStream, plan_units
from unicom.data.parquet_shards import ALL_FIELDS
from unicom.data.shards import drop_prefetched, shard_name, written_name
from unicom.data.sources import (
    DEFAULT_ROWS_PER_PART,
    ItemsPart,
    ListPart,
    ShardPart,
    open_benchmark,
    open_parts,
    read_in_turn,
)
from unicom.data.transforms import check_workers_share, draft_size, resolve_decode
from unicom.engine.device import HostCopies, HostCopy, autocast, made_ahead, resolve_device, resolve_precision
from unicom.errors import InputError
from unicom.files import part_number, refused_write, write_parquet_atomic
from unicom.formats.embeddings import (
    CONFIG_FILE,
    FLIP,
    METADATA_FIELDS,
    PART_SETTINGS,
    SCALES,
    SHARD_COLUMNS,
    WEIGHTS_CHECKSUM,
    complete_parts,
    failures_path,
    listed_parts,
    part_column_values,
    part_settings,
    read_config,
    sweep_writer_temporaries,
    views_record,
    write_config,
    write_part,
)
from unicom.models.encoders import Encoder, check_scales, load_encoder, with_views
from unicom.models.foundation import local_folder, recorded_spec
from unicom.progress import progress

logger = logging.getLogger(__name__)

MODALITIES = ("image", "text")
DTYPES = ("float16", "float32")
FAILURES_SHOWN = 20
# keys of embed_config.json that older folders lack (precision and decode: UniFEx feature caches)
RECORDED_LATER = (WEIGHTS_CHECKSUM, "rows_per_part", "precision", "decode", "draft", "keys_sha256")
SAME_OPTIONS = "use another --out, or run with the same options"
KEPT_PARTS = "the parts already written are kept"  # what a rerun after a refused write does
BENCHMARK_KEYS = ("dataset", "query_boxes_sha256")  # of embed_config.json, what open_benchmark's parts depend on


# --------------------------------------------------------------------------- shared pieces


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_num_workers(device: torch.device) -> int:
    """Decoding processes per rank.

    On a GPU the model waits for images: every CPU of this rank but one decodes (at most
    16). On the CPU the model already keeps every core busy and a decoding process only
    preempts its threads, so small machines decode in the main process between batches (a
    few percent of the time of a forward pass); larger ones give one core in eight to
    decoding.
    """
    cpus = available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        return max(1, min(16, cpus - 1))
    return 0 if cpus <= 4 else cpus // 8


def _check_batching(batch_size: int, num_workers: int | None) -> None:
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    if num_workers is not None and num_workers < 0:
        raise InputError(f"workers must be 0 (decode in the main process) or more, got {num_workers}")


def _normalized(embeddings: torch.Tensor) -> HostCopy:
    """(B, D) any float dtype -> float32, rows L2-normalised (zero rows stay zero), on its way to the host."""
    return HostCopy(F.normalize(embeddings.float(), dim=-1))


@contextlib.contextmanager
def _inference(device: torch.device, precision: str):
    """The mode of every batch of one call: no autograd, in the call's precision, with its
    autocast region held open from the first batch to the last. Autocast then casts each
    weight to the low precision once per call and reuses it (it forgets its casts whenever
    its outermost region ends, and keeps none under ``torch.inference_mode``): on a GPU a
    ViT-B/32 batch launches ~100 cast kernels fewer."""
    with torch.no_grad(), autocast(device, resolve_precision(precision, device, training=False)):
        yield


def _with_model_input(batches, stream: BatchStream, device: torch.device, wanted: bool = True):
    """``(batch, its images as model input on device, or None)`` for each of ``batches``.

    Making the input may move samples to the batch's failures (JPEGs no decoder reads), so
    a batch is read after its input is made. When JPEGs are decoded where the model runs,
    the next batch's input is made while the caller runs the model on this one
    (:func:`unicom.engine.device.made_ahead`): decoding, resizing and the forward pass
    overlap instead of taking turns.
    """
    def make(batch: Batch):
        if not wanted or not batch.indices:
            return None
        with torch.no_grad():  # not inference_mode: the model runs under no_grad (_inference) and may change its input in place
            return stream.model_input(batch, device)

    return made_ahead(batches, make, device, ahead=stream.tensor_transform is not None)


def _embed_input(encoder: Encoder, images: torch.Tensor | None, device: torch.device, precision: str,
                 normalize: bool = True) -> HostCopy | None:
    """Embeddings of model input from :func:`_with_model_input` (read them with
    :meth:`HostCopy.array`, a batch or two later: :class:`HostCopies`); None when there is none."""
    if images is None or len(images) == 0:
        return None
    return _encode_model_input(encoder, images, device, precision, normalize)


def _encode_model_input(encoder: Encoder, images: torch.Tensor, device: torch.device, precision: str,
                        normalize: bool = True) -> HostCopy:
    """Float model input (B, 3, H, W) on ``device`` -> float32 embeddings, L2-normalised
    unless ``normalize=False`` (the encoder's features as they are), on their way to the host."""
    with _inference(device, precision):  # within a call's own region (above) its weights are cast once
        features = encoder.encode_image(images)
        return _normalized(features) if normalize else HostCopy(features.float())


def _encode_tokens(encoder: Encoder, tokens: torch.Tensor, device: torch.device, precision: str) -> HostCopy:
    if device.type == "cuda":  # from pageable memory the copy would first wait for the batches queued before it
        tokens = tokens.pin_memory()
    with _inference(device, precision):
        return _normalized(encoder.encode_text(tokens.to(device, non_blocking=True)))


def _loader(stream: BatchStream, workers: int, device: torch.device):
    from torch.utils.data import DataLoader

    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers > 0 else None,
    )


@functools.lru_cache(maxsize=2)
def _cached_encoder(spec: str, pretrained: str | None, device: str, versions: tuple) -> Encoder:
    return load_encoder(spec, pretrained, device)


def _local_version(location: str | None) -> tuple | None:
    """What changes when a local model folder or weights file is written again (each file's
    name, inode, modification time and size), so that a model trained again in place is not
    served from the cache; None for names, tags and URLs."""
    if location is None or storage.is_url(location) or not os.path.exists(location):
        return None
    files = [entry for entry in os.scandir(location) if entry.is_file()] if os.path.isdir(location) else [location]
    stats = [(os.fspath(f), os.stat(f)) for f in files]
    return tuple(sorted((os.path.basename(name), st.st_ino, st.st_mtime_ns, st.st_size) for name, st in stats))


def _as_specs(model, pretrained):
    """A model and its weights given as paths (``pathlib.Path``) as the strings of specs."""
    return (os.fspath(model) if isinstance(model, os.PathLike) else model,
            None if pretrained is None else os.fspath(pretrained))


def _as_encoder(model: Encoder | str, pretrained: str | None, device) -> Encoder:
    """An :class:`Encoder` as given, or built from a spec (kept for the next call, and built
    again when the spec's local model folder or weights file has been written since)."""
    device = resolve_device(str(device), "device") if device is not None else None  # "auto", a name or a torch.device
    if isinstance(model, Encoder):
        if device is not None:
            model.to(device)
        return model
    model, pretrained = _as_specs(model, pretrained)
    if not isinstance(model, str):
        hint = (" module: give the spec it was loaded from (a name, model folder or file), or "
                "unicom.load_encoder(spec)") if isinstance(model, torch.nn.Module) else ""
        raise TypeError(f"model must be an Encoder or a model spec string, got a {type(model).__name__}{hint}")
    device = device if device is not None else distributed.local_device()
    location = local_folder(model) or model  # a model folder, weights file, or the folder of a local-dir: spec
    return _cached_encoder(model, pretrained, str(device), (_local_version(location), _local_version(pretrained)))


# --------------------------------------------------------------------------- Python API


def _image_remedy(failure: dict) -> str:
    """What to do about an image that cannot be embedded (a failure of a :class:`Batch`)."""
    if failure.get("too_large"):  # its reason names the limit
        return ("no option raises that limit: give a copy of the image within it (smaller, or cropped where the limit "
                "is on the ratio of its sides), or remove it from the images given (the folder or list)")
    return ("download the image again (it may be damaged, cut short or missing), or remove it from the images given "
            "(the folder or list)")


def embed_images(
    model: Encoder | str | os.PathLike,
    images_or_paths: Sequence[Any],
    batch_size: int = 64,
    *,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    draft: bool = False,
    precision: str = "auto",
    normalize: bool = True,
    decode: str = "auto",
    decode_workers_share: float = 0.0,
    flip: bool = False,
    scales=None,
) -> np.ndarray:
    """Embed images (PIL images, file paths or URLs, encoded bytes): float32 (N, D), rows
    L2-normalised (unless ``normalize=False``), in order. ``flip``: each the mean of the
    image's features and its mirror image's (:class:`unicom.models.encoders.FlipAveraged`);
    ``scales``: the mean of its normalised embeddings at each scale of the model input
    (:class:`unicom.models.encoders.MultiScale`, such as ``(1, 0.7071, 0.5)``).

    ``model`` is an :class:`Encoder` or a spec for :func:`unicom.models.encoders.load_encoder`
    (with ``pretrained``). Images are decoded and transformed by ``num_workers`` processes
    (default: :func:`default_num_workers`), or JPEGs on the model's GPU (``decode``, see
    :func:`unicom.data.transforms.resolve_decode`); with JPEGs decoded there,
    ``decode_workers_share`` of them are decoded by the workers nonetheless
    (:func:`unicom.data.transforms.decoded_by_workers`). Raises :class:`InputError` naming the
    first image that cannot be decoded.
    """
    if isinstance(images_or_paths, (str, os.PathLike)) or hasattr(images_or_paths, "getpixel"):
        images_or_paths = [images_or_paths]
    items = list(images_or_paths)
    for position, item in enumerate(items):
        if not isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)) and not hasattr(item, "getpixel"):
            raise InputError(
                f"image {position} is a {type(item).__name__}: embed_images takes PIL images, file paths or URLs, or "
                "encoded bytes; model input that is already a tensor goes to the encoder itself (encoder.encode_image)"
            )
    _check_batching(batch_size, num_workers)
    encoder = with_views(_as_encoder(model, pretrained, device), flip, scales)
    device = encoder.device
    if not items:
        return np.zeros((0, encoder.embedding_dim), dtype=np.float32)
    workers = default_num_workers(device) if num_workers is None else num_workers
    workers = min(workers, math.ceil(len(items) / batch_size))
    transform = encoder.image_transform
    stream = BatchStream(
        plan_units([ItemsPart(items)], workers), batch_size, transform, None, draft_size(transform) if draft else None,
        device_decode=resolve_decode(decode, device, transform), workers_share=decode_workers_share,
    )
    out: np.ndarray | None = None
    copies = HostCopies()  # each batch's embeddings read a batch or two later: the GPU keeps working meanwhile
    batches = _with_model_input(_loader(stream, workers, device), stream, device)
    with contextlib.closing(batches), _inference(device, precision):
        for batch, images in batches:  # closed at the end: the reader ahead stops whatever happens
            embeddings = _embed_input(encoder, images, device, precision, normalize)
            if batch.failures:
                failure = batch.failures[0]
                more = f" (and {len(batch.failures) - 1} more in its batch)" if len(batch.failures) > 1 else ""
                raise InputError(f"{failure['source']}: image {failure['index']} cannot be used: {failure['reason']}{more}; "
                                 + _image_remedy(failure))
            if embeddings is None:
                continue
            if out is None:
                out = np.empty((len(items), embeddings.shape[1]), dtype=np.float32)

            def place(array: np.ndarray, indices: list[int] = batch.indices) -> None:
                out[indices] = array

            copies.add(embeddings, then=place)
    copies.finish()
    return out


def embed_texts(
    model: Encoder | str | os.PathLike,
    texts: Sequence[str],
    batch_size: int = 256,
    *,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
) -> np.ndarray:
    """Embed captions with the model's text tower: float32 (N, D), rows L2-normalised."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"text {position} is a {type(text).__name__}, not a string: embed_texts takes strings "
                             "(a missing caption is None: leave it out, or give \"\" for an empty one)")
    _check_batching(batch_size, None)
    encoder = _as_encoder(model, pretrained, device)
    if not encoder.has_text:
        raise InputError(f"{encoder.name} has no text tower; embed texts with a CLIP model such as ViT-B-32")
    device = encoder.device
    # longest first, so that texts of like lengths share a batch: a tokenizer that pads to the batch's longest text
    # (a multilingual model's) then pads little; the rows come back in the order given
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    chunks, copies = [], HostCopies()
    with _inference(device, precision):
        for start in range(0, len(texts), batch_size):
            batch = [texts[i] for i in order[start:start + batch_size]]
            chunks.append(_encode_tokens(encoder, encoder.tokenize(batch), device, precision))
            copies.add(chunks[-1])  # read at the end, at most two batches behind the device
    if not chunks:
        return np.zeros((0, _text_dim(encoder, device, precision)), dtype=np.float32)
    embedded = np.concatenate([chunk.array() for chunk in chunks])
    embedded[order] = embedded.copy()
    return embedded


# --------------------------------------------------------------------------- folders


@dataclass
class EmbedSummary:
    """What one run did (summed over ranks by :func:`embed_to_folder`)."""

    parts: int = 0
    skipped: int = 0
    written: int = 0
    samples: int = 0
    failed: int = 0
    broken_shards: int = 0
    unfinished: int = 0
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)
    startup_seconds: float = 0.0  # until the first batch was through the model (workers, first reads)
    startup_images: int = 0  # the images of that first batch
    input_wait_seconds: float = 0.0  # after the start-up: waiting for the next batch of model input (the most of any rank)
    decode: str | None = None  # where JPEGs were decoded: "gpu" (the model's device) or "cpu"; None without images

    @property
    def images_per_second(self) -> float:
        return (self.samples + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_second(self) -> float:
        """The rate after the start-up: what a long extraction runs at."""
        seconds = self.seconds - self.startup_seconds
        return (self.samples + self.failed - self.startup_images) / seconds if seconds > 0 else 0.0

    @property
    def input_wait_share(self) -> float | None:
        """After the start-up, the share of the time the loop waited for its next batch of
        model input (read, decoded, resized): near 1 the input pipeline limits the run and the
        model idles; near 0 the model does. None without batches after the start-up's."""
        seconds = self.seconds - self.startup_seconds
        later = self.samples + self.failed - self.startup_images
        return min(1.0, self.input_wait_seconds / seconds) if seconds > 0 and self.startup_images and later > 0 else None

    def merge(self, other: "EmbedSummary") -> "EmbedSummary":
        return EmbedSummary(
            parts=self.parts,
            skipped=self.skipped,
            written=self.written + other.written,
            samples=self.samples + other.samples,
            failed=self.failed + other.failed,
            broken_shards=self.broken_shards + other.broken_shards,
            unfinished=self.unfinished + other.unfinished,
            seconds=max(self.seconds, other.seconds),
            failures=(self.failures + other.failures)[:FAILURES_SHOWN],
            startup_seconds=max(self.startup_seconds, other.startup_seconds),
            startup_images=self.startup_images + other.startup_images,
            input_wait_seconds=max(self.input_wait_seconds, other.input_wait_seconds),
            decode=self.decode or other.decode,
        )


class _PendingPart:
    """Results of one part collected from its units until the last one ends."""

    def __init__(self, part, units: int):
        self.part = part
        self.open_units = units
        self.read = 0
        self.indices: list[int] = []
        self.rows: list[dict] = []
        self.image: list[HostCopy] = []
        self.text: list[HostCopy] = []
        self.failures: list[dict] = []

    def add(self, batch: Batch, image: HostCopy | None, text: HostCopy | None) -> None:
        self.indices.extend(batch.indices)
        self.rows.extend(batch.rows)
        if image is not None:
            self.image.append(image)
        if text is not None:
            self.text.append(text)

    def finish(self, batch: Batch) -> bool:
        """Count the end of a unit; True when the part is complete."""
        self.read = max(self.read, batch.read)  # every slice reads the whole part
        self.open_units -= 1
        return self.open_units == 0


def _metadata_table(part, rows: list[dict], with_images: bool):
    """key, caption, url|image_path, width, height, the part's other columns, then the fields
    its samples keep (:attr:`unicom.data.sources.ShardPart.metadata_fields`), as a pyarrow table."""
    import pyarrow as pa

    types = {"key": pa.string(), "caption": pa.string(), "width": pa.int32(), "height": pa.int32()}
    types.update({name: getattr(pa, kind)() for name, kind in part.columns})
    names = ["key"]
    if part.has_captions:
        names.append("caption")
    names += [name for name, _ in part.columns if name in ("url", "image_path")]
    if with_images:
        names += ["width", "height"]
    names += [name for name, _ in part.columns if name not in names]
    columns = {name: pa.array([row.get(name) for row in rows], type=types[name]) for name in names}
    fields = getattr(part, "metadata_fields", ())
    if tuple(fields) == ALL_FIELDS:  # those the part's samples have, in the order met
        fields = tuple(dict.fromkeys(name for row in rows for name in row if name not in types))
    for name in fields:
        columns[name] = field_array([row.get(name) for row in rows])
    return pa.table(columns)


def field_array(values: list):
    """A metadata column of the values of one field (``None`` where a sample lacks it), typed
    by pyarrow from the values (int64, double, string, bool, structs, lists); values of
    several kinds (numbers and text) are kept as their JSON text, and a field no sample has
    as an empty string column."""
    import pyarrow as pa

    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        array = pa.array([None if value is None else json.dumps(value, default=str) for value in values], pa.string())
    return array.cast(pa.string()) if pa.types.is_null(array.type) else array


def _write_pending(out, pending: _PendingPart, modalities: Sequence[str], dims: dict[str, int], dtype: str,
                   settings: dict | None = None) -> bool:
    """Sort the part's rows back into input order and write it (failures first, metadata
    last). A part that could not be read to the end (a broken or unfetched shard, an image
    that could not be fetched) gets its failure report only: False, it is not finished."""
    import pyarrow as pa

    part = pending.part
    finished = not any(f["index"] < 0 or f.get("fetch") for f in pending.failures)
    embedded, failed = len(pending.indices), sum(1 for f in pending.failures if f["index"] >= 0)
    if finished and embedded + failed != pending.read:
        raise RuntimeError(f"{part.name}: read {pending.read} samples but accounted for {embedded} + {failed} failures")
    order = np.argsort(np.asarray(pending.indices, dtype=np.int64), kind="stable")
    arrays = {}
    for kind, chunks in (("image", pending.image), ("text", pending.text)):
        if kind in modalities:
            stacked = np.concatenate([c.array() for c in chunks]) if chunks else np.zeros((0, dims[kind]), dtype=np.float32)
            arrays[kind] = stacked[order].astype(dtype)
    rows = [pending.rows[i] for i in order]
    report = failures_path(out, part.number)
    if pending.failures:
        failures = sorted(pending.failures, key=lambda f: f["index"])
        write_parquet_atomic(
            report,
            pa.table({
                "part": pa.array([part.number] * len(failures), type=pa.int64()),
                "index": pa.array([f["index"] for f in failures], type=pa.int64()),
                "key": pa.array([f["key"] for f in failures], type=pa.string()),
                "source": pa.array([f["source"] for f in failures], type=pa.string()),
                "reason": pa.array([f["reason"] for f in failures], type=pa.string()),
            }),
        )
    else:
        storage.remove(report)  # a stale report of an earlier run of this part
    if finished:
        write_part(out, part.number, **arrays, metadata=_metadata_table(part, rows, "image" in modalities),
                   settings=settings)
    return finished


def _check_config(out, config: dict, advice: str = SAME_OPTIONS) -> bool | None:
    """Compare with the configuration a previous run left in ``out``: False if there was
    none, True if it matches, None if only the weights file moved: the same weights by
    their digest (``config`` without it: not known until the weights are loaded; with it
    and equal: the new place is recorded). ``advice``: what the error for another
    configuration tells the user to do."""
    previous = read_config(out)
    if previous is None:
        return False
    # a benchmark's folder is not continued from other inputs (which lack these keys)
    # nor a folder of shards read by other columns
    # nor one whose captions another model embedded, nor one of images averaged with their mirrors or scales
    config = {**{key: None for key in (*BENCHMARK_KEYS, SHARD_COLUMNS, METADATA_FIELDS, "text_model", FLIP, SCALES)
                 if key in previous},
              **config}
    for key in ("model", "pretrained"):  # folders recorded relative to where an older run started
        previous[key] = recorded_spec(previous.get(key))
    if "text_model" in previous:
        previous["text_model"] = recorded_spec(previous["text_model"])
    moved = (previous.get("pretrained") != config.get("pretrained") and previous.get(WEIGHTS_CHECKSUM) is not None
             and all(previous.get(k) == v for k, v in config.items() if k not in ("pretrained", WEIGHTS_CHECKSUM)
                     and (k in previous or k not in RECORDED_LATER)))
    if moved and config.get(WEIGHTS_CHECKSUM) in (None, previous[WEIGHTS_CHECKSUM]):
        if WEIGHTS_CHECKSUM in config and distributed.get_rank() == 0:
            write_config(out, dict(previous, pretrained=config.get("pretrained")))
        return None
    # folders written before these were recorded are compared without them
    different = {k: (previous.get(k), v) for k, v in config.items()
                 if previous.get(k) != v and (k in previous or k not in RECORDED_LATER)}
    if different:
        details = ", ".join(f"{k}: {old!r} before, {new!r} now" for k, (old, new) in different.items())
        if "keys_sha256" in different:
            advice = ("the images listed changed since (added, removed or reordered), so the finished parts hold "
                      "other rows than this listing cuts; embed into another --out, or give the list as it was")
        raise InputError(
            f"{out} holds embeddings of another configuration ({details}); mixing them would make the parts "
            f"incomparable: {advice}"
        )
    return True


def _earlier_number(part) -> int | None:
    """The number earlier versions gave a shard, where it differs from today's: the last
    number of its name as written (an http name percent-escaped: ``shard%2000012.tar`` ->
    2000012; a Hugging Face total: ``train-00000-of-00001.tar`` -> 1)."""
    if not isinstance(part, ShardPart) or storage.is_pipe(part.path):
        return None
    name = written_name(part.path)
    try:
        number = part_number(name)
    except InputError:
        return None
    return None if number == part.number else number


def _check_numbering(out, parts: Sequence[Any], kinds: Sequence[str]) -> None:
    """Refuse to continue a folder in which an earlier version wrote a shard under another
    part number than today's: the shard would be embedded a second time beside it."""
    earlier = {part.number: number for part in parts if (number := _earlier_number(part)) is not None}
    if not earlier:
        return
    written = complete_parts(out, sorted(set(earlier.values())), kinds)
    shards: dict[int, set] = {}  # a written part's 'shard' column, read once (many shards share a total)
    for part in parts:
        number = earlier.get(part.number)
        if number not in written:
            continue
        if number not in shards:
            shards[number] = part_column_values(out, number, "shard")
        if {shard_name(part.path), written_name(part.path)} & shards[number]:
            raise InputError(
                f"{storage.text(out)}: part {number} holds the embeddings of {storage.text(part.path)}, which is part "
                f"{part.number} now (the number in its name is read as the server reads the name, and a Hugging Face "
                f"total after -of- is not counted); continuing would embed it a second time as part {part.number}: "
                "embed into another --out, or leave the shards already embedded out of --input")


def _text_dim(encoder: Encoder, device: torch.device, precision: str) -> int:
    return _encode_tokens(encoder, encoder.tokenize([""]), device, precision).shape[1]


def _checked_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    if isinstance(modalities, str):
        modalities = modalities.split(",")
    unknown = [m for m in modalities if m not in MODALITIES]
    chosen = tuple(m for m in MODALITIES if m in modalities)
    if unknown or not chosen:
        raise InputError(f"modalities {list(modalities)}: choose one or both of {', '.join(MODALITIES)}")
    return chosen


def embed_parts(
    parts: Sequence[Any],
    encoder: Encoder,
    out: str | os.PathLike,
    *,
    modalities: Sequence[str] = ("image",),
    batch_size: int = 256,
    num_workers: int | None = None,
    dtype: str = "float16",
    draft: bool = False,
    precision: str = "auto",
    config: dict | None = None,
    normalize: bool = True,
    decode: str = "auto",
    advice: str = SAME_OPTIONS,
    group=None,
    decode_workers_share: float = 0.0,
) -> EmbedSummary:
    """Embed ``parts`` (from :func:`unicom.data.sources.open_parts`) into the layout under ``out``.

    Parts whose files are all present are skipped. Under ``torch.distributed`` the
    remaining parts are dealt round-robin over the ranks; the returned summary is this
    rank's (``parts``/``skipped`` are global). ``config`` (model, weights, modalities,
    dtype) is stored in ``out/embed_config.json`` and must match on a rerun (``advice`` says
    what to do when it does not). ``normalize=False``
    stores the image features as the encoder gives them (the UniFEx feature cache's raw mode).
    ``group``: the process group the ranks meet in before writing (default: the world's).
    ``decode_workers_share``: with JPEGs decoded on the model's device, the share of them the
    workers decode instead (:func:`unicom.data.transforms.decoded_by_workers`).
    """
    out = storage.path(out)
    storage.writable_folder(out)
    modalities = _checked_modalities(modalities)
    _check_batching(batch_size, num_workers)
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if "text" in modalities and not encoder.has_text:
        raise InputError(f"{encoder.name} has no text tower; use --modalities image, or a CLIP model for texts")
    numbers = [part.number for part in parts]
    if len(set(numbers)) != len(numbers):
        raise InputError("two inputs map to the same output part number; give distinct shard numbers")
    config = dict(config or {"model": encoder.name})
    config.update({"modalities": list(modalities), "dtype": dtype, WEIGHTS_CHECKSUM: encoder.weights_sha256()})
    had_config = _check_config(out, config, advice)

    kinds = list(modalities) + ["metadata"]
    if had_config is not False:
        _check_numbering(out, parts, kinds)
    # the folder's finished parts, also those of inputs not given now (a run over other shards)
    finished = complete_parts(out, None, kinds)
    complete = finished & set(numbers)
    pending = [part for part in parts if part.number not in complete]
    summary = EmbedSummary(parts=len(parts), skipped=len(parts) - len(pending))
    rank, world = distributed.get_rank(), distributed.get_world_size()
    if rank == 0:  # what killed runs left half-written, before any rank writes again
        sweep_writer_temporaries(out, [part.number for part in pending])
    # every rank lists the finished parts before any rank writes a new one, so all agree
    distributed.barrier(group)
    settings = run_settings(encoder, modalities, precision, decode, decode_workers_share)
    every = []  # the settings of every rank of this run (hardware may differ between nodes)
    for made in distributed.all_gather_object(settings, group):
        every += [made] if made not in every else []
    if rank == 0:
        current = config if had_config is False else read_config(out)
        recorded = _check_settings(out, current, sorted(finished), [part.number for part in pending], settings, every)
        if had_config is False or recorded is not None:
            with refused_write(out, CONFIG_FILE, KEPT_PARTS):
                write_config(out, current if recorded is None else {**current, PART_SETTINGS: recorded})
    distributed.barrier(group)  # no rank writes a part before its settings are recorded
    mine = pending[rank::world]
    if mine:
        _embed_assigned(mine, encoder, out, summary, modalities, batch_size, num_workers, dtype, draft, precision, normalize,
                        settings)
    return summary


def run_settings(encoder: Encoder, modalities: Sequence[str], precision: str, decode: str,
                 workers_share: float = 0.0) -> dict:
    """How this process computes embeddings, as each part it writes records it: ``precision``
    as resolved on the encoder's device (``auto``: fp16 on a GPU, fp32 on a CPU) and, with
    images, ``decode``: where their JPEGs are decoded and resized (``cpu`` or ``gpu``), and
    with ``gpu`` and a workers' share above 0, ``decode_workers_share``: the share of them
    that the workers decode instead (recorded only then: parts made before it existed match)."""
    settings = {"precision": resolve_precision(precision, encoder.device, training=False)}
    share = check_workers_share(workers_share)
    if "image" in modalities:
        settings["decode"] = "gpu" if resolve_decode(decode, encoder.device, encoder.image_transform) else "cpu"
        if settings["decode"] == "gpu" and share:
            settings["decode_workers_share"] = share
    return settings


def _describe_settings(settings: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(settings.items()))


def _check_settings(out, config: dict, finished: list[int], pending: list[int], settings: dict,
                    every: list[dict]) -> list[dict] | None:
    """Warn when finished parts of ``out`` were embedded with other settings than this run's
    (:func:`_warn_other_settings`), reading the parts' footers only when ``config``'s record
    (:data:`PART_SETTINGS`) holds other settings than ``settings`` or the folder has none (it
    was written by an earlier version): a folder of thousands of remote parts, all made with
    this run's settings, is not read part by part. Returns the record with ``every`` (the
    settings of this run's ranks) added, or None when it needs no change (nothing to embed)."""
    if not pending:
        return None
    known = config.get(PART_SETTINGS) if finished else []
    if not (isinstance(known, list) and all(isinstance(made, dict) for made in known)):
        known = None  # none recorded (an earlier version), or not as written: the parts are read
    if known is None or any(made != settings for made in known):
        found = _warn_other_settings(out, finished, pending, settings)
        known = found if known is None else known
    recorded = known + [made for made in every if made not in known]
    return None if recorded == config.get(PART_SETTINGS) else recorded


def _warn_other_settings(out, finished: list[int], pending: list[int], settings: dict) -> list[dict]:
    """Warn when finished parts of ``out`` were embedded with other settings than this run's
    (another precision or decoding: a run resumed on other hardware or with other options). Not
    refused: a resumed run must finish on whatever machine it gets; parts without a record
    (written by earlier versions) are not compared. Returns the settings the parts record, each once."""
    made: dict[str, list[int]] = {}
    found: list[dict] = []
    for number, recorded in part_settings(out, finished).items():
        if recorded is not None and recorded not in found:
            found.append(recorded)
        if recorded is not None and recorded != settings:
            made.setdefault(_describe_settings(recorded), []).append(number)
    if not made:
        return found
    before = "; ".join(f"parts {listed_parts(numbers)} with {described}" for described, numbers in made.items())
    logger.warning("%s: finished parts were embedded with other settings than this run's (%s); this run embeds parts %s "
                   "with %s. Their embeddings differ slightly; to keep one setting throughout, stop and run again with "
                   "the options those parts were made with (--precision, --decode, --decode-workers-share)",
                   storage.text(out), before, listed_parts(pending), _describe_settings(settings))
    return found


def _embed_assigned(parts, encoder, out, summary, modalities, batch_size, num_workers, dtype, draft, precision,
                    normalize: bool, settings: dict) -> None:
    """The loop of :func:`embed_parts` over this rank's parts; fills ``summary``. ``settings``:
    :func:`run_settings`, recorded in each part written."""
    device = encoder.device
    summary.decode = settings.get("decode")
    workers = default_num_workers(device) if num_workers is None else num_workers
    if workers == 0:  # one reader takes the parts in order: each remote shard downloads during the one before
        parts = read_in_turn(parts)
    units = plan_units(parts, workers)
    slices = {unit.part.number: unit.slices for unit in units}
    transform = encoder.image_transform if "image" in modalities else None
    stream = BatchStream(
        units,
        batch_size,
        transform,
        encoder.tokenize if "text" in modalities else None,
        draft_size(transform) if (draft and transform is not None) else None,
        device_decode=settings.get("decode") == "gpu",
        workers_share=settings.get("decode_workers_share", 0.0),
    )
    dims = {"image": encoder.embedding_dim}
    if "text" in modalities:
        dims["text"] = _text_dim(encoder, device, precision)

    by_number = {part.number: part for part in parts}
    sizes = [part.size for part in parts]
    collecting: dict[int, _PendingPart] = {}
    read_per_part: list[int] = []
    threads = torch.get_num_threads()
    if device.type == "cpu" and workers > 0 and threads > 4:
        # many model threads stall on any one that a decoding process preempts: leave the
        # workers their cores. With few cores that would cost the model more than decoding.
        torch.set_num_threads(max(threads // 2, threads - workers))
    start = time.perf_counter()
    bar = progress(total=None if None in sizes else sum(sizes), desc=f"embed {len(parts)} parts", unit="img")
    batches = _with_model_input(_loader(stream, workers, device), stream, device, wanted="image" in modalities)
    copies = HostCopies()  # each batch's embeddings read a batch or two later: the GPU keeps working meanwhile
    first = True
    try:
        with _inference(device, precision):  # the weights cast to the low precision once, not per batch
            for batch, images in _waits_counted(batches, summary):
                pending = collecting.get(batch.part)
                if pending is None:
                    pending = collecting[batch.part] = _PendingPart(by_number[batch.part], slices[batch.part])
                if batch.indices:  # unless no decoder could read any of its JPEGs
                    image = _embed_input(encoder, images, device, precision, normalize) if "image" in modalities else None
                    text = _encode_tokens(encoder, batch.tokens, device, precision) if "text" in modalities else None
                    pending.add(batch, image, text)
                    copies.add(image, text)
                    if first:  # the start-up ends with the first batch's embeddings on the host
                        for copy in (image, text):
                            if copy is not None:
                                copy.array()
                failures = batch.failures
                if any(f["index"] < 0 for f in pending.failures):  # the part's break, as another slice met it
                    failures = [f for f in failures if f["index"] >= 0]
                pending.failures.extend(failures)
                failed = sum(1 for f in failures if f["index"] >= 0)
                summary.failed += failed
                summary.broken_shards += len(failures) - failed
                summary.samples += len(batch.indices)
                summary.failures.extend(failures[: max(0, FAILURES_SHOWN - len(summary.failures))])
                bar.update(len(batch.indices) + failed)
                if first:  # the start-up: until the first batch is through the model
                    summary.startup_seconds, first = time.perf_counter() - start, False
                    summary.startup_images = summary.samples + summary.failed
                if batch.last and pending.finish(batch):
                    with refused_write(out, f"part {batch.part}", KEPT_PARTS):
                        written = _write_pending(out, pending, modalities, dims, dtype, settings)
                    if written:
                        summary.written += 1
                    else:
                        summary.unfinished += 1
                        summary.samples -= len(pending.indices)  # embedded, but not written
                    del collecting[batch.part]
                    read_per_part.append(pending.read)
                    if None in sizes:  # shards: the total is estimated from the parts done so far
                        bar.total = int(sum(read_per_part) / len(read_per_part) * len(parts))
                    bar.set_postfix(parts=f"{summary.written}/{len(parts)}", refresh=False)
    finally:
        batches.close()  # the reader ahead stops
        bar.close()
        torch.set_num_threads(threads)
        drop_prefetched()
    summary.seconds = time.perf_counter() - start


def _waits_counted(batches, summary: EmbedSummary):
    """``batches``, the time each took to come after the first one added to
    ``summary.input_wait_seconds`` (the first belongs to the start-up)."""
    iterator = iter(batches)
    first = True
    while True:
        asked = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        if not first:
            summary.input_wait_seconds += time.perf_counter() - asked
        first = False
        yield item


def gather_summary(summary: EmbedSummary, group=None) -> EmbedSummary:
    """The summaries of all ranks merged (every rank gets the result); ``group``: the
    process group to gather over (default: the world's)."""
    everyone = distributed.all_gather_object(summary, group)
    merged = everyone[0]
    for other in everyone[1:]:
        merged = merged.merge(other)
    return merged


def _weights_for_config(pretrained: str | None) -> str | None:
    if pretrained is not None and os.path.isfile(pretrained):
        return os.path.realpath(pretrained)
    return pretrained


def embed_to_folder(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    model: Encoder | str | os.PathLike,
    *,
    pretrained: str | os.PathLike | None = None,
    modalities: Sequence[str] = ("image",),
    batch_size: int = 256,
    num_workers: int | None = None,
    dtype: str = "float16",
    rows_per_part: int | None = None,
    table_options: dict | None = None,
    shard_columns=None,
    metadata_fields: Sequence[str] = (),
    draft: bool = False,
    precision: str = "auto",
    device: str | torch.device | None = None,
    decode: str = "auto",
    dataset: str | None = None,
    decode_workers_share: float = 0.0,
    text_model: str | os.PathLike | Encoder | None = None,
    flip: bool = False,
    scales=None,
) -> EmbedSummary:
    """``unicom embed``: read ``inputs``, load the model, write the layout under ``out``.

    ``flip``: each image embedding the mean of the image's features and its mirror image's
    (:class:`unicom.models.encoders.FlipAveraged`); ``scales``: the mean of the normalised
    embeddings of the model input resized by each (:class:`unicom.models.encoders.MultiScale`).
    The folder records them (``flip``, ``scales``: a rerun without them is refused, and
    ``unicom index`` passes them on to the queries' model).

    ``text_model``: a multilingual text model into the model's space
    (:mod:`unicom.models.multilingual`; a folder or ``hf-hub:`` spec) that embeds the captions
    instead of the model's own text tower (clip-retrieval's ``inference --use_mclip``); the
    folder records it (``text_model``, ``text_model_sha256``).

    ``dataset``: a benchmark whose queries are crops (roxford5k, rparis6k; see
    :func:`unicom.data.sources.open_benchmark`), read from the folder ``inputs``: the gallery
    and the cropped queries are written with the keys ``unicom evaluate --embeddings`` looks
    for, and the folder records the dataset and the digest of the query boxes.

    ``rows_per_part``: rows per part of an image folder, a list or a benchmark's gallery
    (default 100,000); refused with shards, each of which is one part whatever its size.
    ``shard_columns``: the columns of parquet shards named instead of the usual ones
    (:class:`unicom.data.parquet_shards.ShardColumns`), recorded in the folder's
    configuration, where ``unicom cluster show`` and ``unicom index`` find them.
    ``metadata_fields``: fields of the samples kept as metadata columns (see
    :attr:`unicom.data.sources.ShardPart.metadata_fields`; ``("all",)``: every one).

    Inputs and the folder's previous configuration are checked before the model is built
    and before anything is written. Returns the summary of all ranks.
    ``decode_workers_share``: see :func:`embed_parts`.
    """
    modalities = _checked_modalities(modalities)
    if text_model is not None and "text" not in modalities:
        raise InputError("--text-model embeds the captions: give --modalities image,text (or text), or leave it out")
    if flip and "image" not in modalities:
        raise InputError("--flip averages each image's embedding with its mirror image's; --modalities text embeds no "
                         "image: leave --flip out")
    scales = check_scales(scales)
    if scales is not None and "image" not in modalities:
        raise InputError("--scales averages each image's embeddings at several sizes; --modalities text embeds no "
                         "image: leave --scales out")
    check_workers_share(decode_workers_share, "--decode-workers-share")
    _check_batching(batch_size, num_workers)
    model, pretrained = _as_specs(model, pretrained)
    storage.writable_folder(out)
    if device is not None:
        device = resolve_device(str(device), "--device")
    identity = {}
    cut = DEFAULT_ROWS_PER_PART if rows_per_part is None else rows_per_part
    if dataset is not None:
        parts, identity = open_benchmark(dataset, inputs, cut)
    else:
        parts = open_parts(inputs, rows_per_part=cut, table_options=table_options, shard_columns=shard_columns,
                           metadata_fields=metadata_fields)
    if rows_per_part is not None and parts and isinstance(parts[0], ShardPart):
        raise InputError(f"rows per part (--rows-per-part {rows_per_part}) cut image folders and lists; every shard is "
                         "one part, whatever its size: leave it out, or write smaller shards for more parts")
    if "text" in modalities and parts and not any(part.has_captions for part in parts):
        what = "a benchmark of images" if dataset is not None else \
            "an image folder without a .txt caption file beside its images, or a list without a caption column: name " \
            "it with --caption-column"
        raise InputError(f"{parts[0].source}: no captions to embed as text ({what}); use --modalities image")
    # a model folder is recorded by its absolute path: `unicom search` reads it from anywhere
    name = recorded_spec(model if isinstance(model, str) else model.name)
    config = {"model": name, "pretrained": _weights_for_config(pretrained)}
    if text_model is not None:  # the captions' model: another one's embeddings are not mixed with them
        config["text_model"] = recorded_spec(os.fspath(text_model) if not isinstance(text_model, Encoder) else text_model.name)
    if parts and isinstance(parts[0], ListPart):  # which rows make part i: another cut would mix two
        config["rows_per_part"] = cut
        # and the images listed: with images added or removed the same cut makes other parts
        config["keys_sha256"] = parts[0].images.keys_sha256()
    if parts and isinstance(parts[0], ShardPart) and parts[0].shard_columns.named():  # other keys, images, captions
        config[SHARD_COLUMNS] = parts[0].shard_columns.named()
    if parts and getattr(parts[0], "metadata_fields", ()):  # other metadata columns
        config[METADATA_FIELDS] = list(parts[0].metadata_fields)
    if "image" in modalities:  # draft decoding changes image embeddings (cosine ~0.99): not mixed with full decoding
        config["draft"] = bool(draft)
        # recorded only when set: folders made before they existed match a run without them
        config.update(views_record(flip, scales))
    config.update(identity)  # a benchmark's crops of other boxes would be other queries
    check = dict(config, modalities=list(modalities), dtype=dtype)
    if not storage.is_url(out):  # object storage is one store for every node; a local path may not be
        distributed.require_shared_folder(out, "--out", "each rank writes its parts there and the summary counts them "
                                          "all as written to it")
    if _check_config(out, check):  # (None: the weights file moved; their digest decides once they are loaded)
        kinds = check["modalities"] + ["metadata"]
        numbers = [part.number for part in parts]
        if len(complete_parts(out, numbers, kinds)) == len(set(numbers)):  # nothing to do: no model to build
            return EmbedSummary(parts=len(parts), skipped=len(parts))
    # the ranks meet before writing and when all are done: a rank with fewer or smaller
    # parts waits there for the slowest, for as long as its parts take
    waiting = distributed.waiting_group()
    try:
        texts = None
        if text_model is not None:  # first: a wrong text model is named before the image model loads
            from unicom.models.multilingual import WithTextModel, load_multilingual

            texts = text_model if isinstance(text_model, Encoder) else load_multilingual(
                text_model, device if device is not None else distributed.local_device())
        if isinstance(model, str):
            encoder = load_encoder(model, pretrained, device if device is not None else distributed.local_device())
        else:
            encoder = _as_encoder(model, None, device)
        encoder = with_views(encoder, flip, scales)
        if texts is not None:
            encoder = WithTextModel(encoder, texts.to(encoder.device))
            config["text_model_sha256"] = texts.weights_sha256()
        summary = embed_parts(parts, encoder, out, modalities=modalities, batch_size=batch_size,
                              num_workers=num_workers, dtype=dtype, draft=draft, precision=precision, config=config,
                              decode=decode, group=waiting, decode_workers_share=decode_workers_share)
        return gather_summary(summary, waiting)
    finally:  # also when this rank fails: its group's threads do not outlive the command
        if waiting is not None:
            torch.distributed.destroy_process_group(waiting)


__all__ = [
    "embed_images",
    "embed_texts",
    "embed_parts",
    "embed_to_folder",
    "EmbedSummary",
    "default_num_workers",
]
