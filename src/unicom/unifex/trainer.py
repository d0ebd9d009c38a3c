"""``unicom probe``: train a UniFEx head on a frozen backbone, evaluate it, export it.

Two ways to feed the head, one training step (the training core's
:class:`~unicom.engine.step.TrainStep`: the neck and :class:`~unicom.losses.PartialFC`
with AdamW / SparseAdamW):

* **cache** (default): the backbone embeds every training image once (and optionally
  several augmented views) into the feature cache (:mod:`unicom.unifex.cache`); each
  epoch then reads features from memory (:class:`FeatureBatches`), seconds per epoch;
* **direct**: every epoch decodes and transforms the images (augmented when
  ``train.augment``) and runs the frozen backbone (:class:`ImageBatches`), as the
  UniFEx paper did.

Both draw the same batches for the same seed (:func:`unicom.unifex.data.epoch_order`), so
without augmentation they train the same head. Order of work: the recipe and the lists
are checked, the backbone is built and its transform checked for export, a checkpoint to
resume from is checked, and only then is anything written under ``out``.

Outputs under ``out``: ``config.yaml``, ``datasets.json`` (per-dataset summary),
``log.jsonl`` (one line per epoch), ``checkpoint.pt`` (after every epoch; a rerun
resumes from it), ``cache/`` (cache mode), ``metrics.json`` and the exported model
folder ``model/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from unicom import storage
from unicom.engine.device import autocast
from unicom.engine.seeding import rng_state, set_rng_state
from unicom.engine.step import UNREAD_STEPS
from unicom.errors import InputError
from unicom.models.encoders import Encoder
from unicom.unifex.config import ProbeConfig
from unicom.unifex.data import DomainImages, epoch_batches, epoch_order

CHECKPOINT = "checkpoint.pt"
MODEL_FOLDER = "model"
BEST_MODEL = "model_best"  # eval.keep_best's folder in out
METRICS = "metrics.json"
RESUMES = "with the same out= it resumes after the last epoch checkpointed"  # what a rerun after a refused write does
CURVES = "curves.png"  # the loss (and the evaluations) against the epoch, drawn at the end
EVAL_DATASET = "eval"  # the dataset of the rows of evaluation lists without a dataset column
# keys that may change between a run and its resumption: they do not change what is trained
# (eval.holdout_classes does: the held-out classes are left out of training)
RESUMABLE_CHANGES = ("out", "eval.query", "eval.index", "eval.queries_per_class", "eval.ks", "eval.every",
                     "data.workers", "cache.batch_size", "cache.folder", "train.device", "log.")


# ------------------------------------------------------------------------ batches


class FeatureBatches:
    """Cache mode: batches of cached features.

    ``views``: float32 (V, N, D_in) features of the N training rows in V views (view 0 the
    plain one); ``labels``: int64 (N,). With ``augment`` every row of an epoch reads a
    view drawn uniformly among the V, else view 0.
    """

    def __init__(self, views: torch.Tensor, labels: torch.Tensor, batch_size: int, sampling: str, seed: int,
                 augment: bool = False, keep_last: bool = False, min_rows: int = 2):
        self.views, self.labels = views, labels
        self.batch_size, self.sampling, self.seed = batch_size, sampling, seed
        self.augment = augment and views.shape[0] > 1
        self.keep_last, self.min_rows = keep_last, min_rows
        self._labels = labels.cpu().numpy()

    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        return epoch_batches(order, self.batch_size, self.keep_last, self.min_rows)

    def __len__(self) -> int:
        return len(self._cut(np.arange(len(self._labels))))

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(self._labels, epoch, self.seed, self.sampling)
        device = self.views.device
        view_of = None
        if self.augment:
            draws = np.random.default_rng([self.seed, epoch, 0x71E]).integers(0, self.views.shape[0], len(order))
            view_of = torch.from_numpy(draws).to(device)
        # the epoch's order copied once (a copy from the host per batch would wait for the device's queue)
        on_device = torch.from_numpy(order).to(device)
        position = 0
        for batch in self._cut(order):  # consecutive slices of the order
            rows = on_device[position:position + len(batch)]
            view = view_of[position:position + len(batch)] if view_of is not None else 0
            position += len(batch)
            yield self.views[view, rows], self.labels[rows]


class _DecodedImages(torch.utils.data.Dataset):
    """Image ``i`` decoded in full (as the cache's embedding engine decodes by default) and
    transformed, with its label, or a failure record (index, path, reason).

    With ``seed`` (a random transform), the transform of image ``i`` in epoch ``epoch``
    draws from torch's, NumPy's and Python's generators seeded by ``(seed, epoch, i)`` (timm's
    RandAugment uses all three) and leaves the
    caller's state as it was: the views are the same whichever process decodes the image
    (``data.workers`` does not change them) and the main process's generators, which the
    neck's dropout uses, are not drawn from."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, transform, seed: int | None = None):
        from unicom.data.transforms import short_side_size

        self.paths, self.labels, self.transform = list(paths), labels, transform
        self.seed, self.epoch = seed, 0
        self.short_side = short_side_size(transform)  # a thin image is refused before the resize enlarges it

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from unicom.data.transforms import DecodeError, check_resized_pixels, decode_image

        try:
            image, _ = decode_image(self.paths[index], None)
            check_resized_pixels(self.short_side, image.size)
        except DecodeError as error:
            return {"index": index, "path": self.paths[index], "reason": str(error)}
        if self.seed is None:
            return self.transform(image), int(self.labels[index])
        from unicom.data.transforms import seeded_draws

        with seeded_draws(int(np.random.SeedSequence([self.seed, self.epoch, index, 0xA06]).generate_state(1)[0])):
            return self.transform(image), int(self.labels[index])


def _collate(items):
    good = [item for item in items if not isinstance(item, dict)]
    failures = [item for item in items if isinstance(item, dict)]
    if not good:
        return None, None, failures
    return torch.stack([image for image, _ in good]), torch.tensor([label for _, label in good]), failures


class ImageBatches:
    """Direct mode: the same batches as :class:`FeatureBatches`, decoded, transformed and
    passed through the frozen backbone every epoch. Images that fail to decode are left
    out of their batch and listed in ``failures``."""

    def __init__(self, encoder: Encoder, paths: Sequence[str], labels: np.ndarray, transform, batch_size: int,
                 sampling: str, seed: int, workers: int, device: torch.device, precision: str,
                 keep_last: bool = False, min_rows: int = 2, normalize: bool = True, augment: bool = False):
        self.encoder, self.device, self.precision = encoder, device, precision
        self.dataset = _DecodedImages(paths, np.asarray(labels), transform, seed if augment else None)
        self.batch_size, self.sampling, self.seed, self.workers = batch_size, sampling, seed, workers
        self.keep_last, self.min_rows, self.normalize = keep_last, min_rows, normalize
        self._labels = np.asarray(labels)
        self.failures: list[dict] = []

    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        return epoch_batches(order, self.batch_size, self.keep_last, self.min_rows)

    def __len__(self) -> int:
        return len(self._cut(np.arange(len(self._labels))))

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        from unicom.progress import progress
        from unicom.unifex.model import backbone_features

        batches = [b.tolist() for b in self._cut(epoch_order(self._labels, epoch, self.seed, self.sampling))]
        self.dataset.epoch = epoch  # before the loader starts: its workers take a copy
        # its own generator: the loader must not draw from the global one, which the neck's
        # dropout uses (so that both modes draw the same masks)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers, collate_fn=_collate,
                            generator=generator, pin_memory=self.device.type == "cuda")
        bar = progress(total=sum(len(b) for b in batches), desc=f"direct mode, epoch {epoch + 1}", unit="img", leave=False)
        for images, labels, failures in loader:
            bar.update(len(failures) + (0 if images is None else len(images)))
            self.failures.extend(failures)
            if images is None or len(images) < self.min_rows:
                continue
            with torch.no_grad(), autocast(self.device, self.precision):
                features = backbone_features(self.encoder, images.to(self.device, non_blocking=True), self.normalize)
            yield features.float(), labels.to(self.device, non_blocking=True)
        bar.close()


# ------------------------------------------------------------------------- the head


@dataclass
class Head:
    """The trainable part: neck and prototypes with their optimisers and one shared step."""

    neck: nn.Module
    partial_fc: nn.Module
    step_fn: Any  # unicom.engine.step.TrainStep
    neck_optimizer: Any
    prototype_optimizer: Any


def build_head(config: ProbeConfig, input_dim: int, class_counts: np.ndarray, device: torch.device) -> Head:
    """Neck, margin head and PartialFC, seeded by ``config.seed`` (the global torch
    generator is seeded here: the neck's initialisation and dropout draw from it)."""
    from unicom.engine.step import build_train_step
    from unicom.unifex.model import build_neck

    torch.manual_seed(config.seed)
    neck = build_neck(input_dim, _neck_settings(config)).to(device)
    partial_fc = config.loss.partial_fc(config.neck.embedding_dim, len(class_counts), class_counts, seed=config.seed).to(device)
    step_fn = build_train_step(neck, partial_fc, config.optim, device, "fp32")
    return Head(neck, partial_fc, step_fn, step_fn.backbone_optimizer, step_fn.prototype_optimizer)


def _neck_settings(config: ProbeConfig) -> dict:
    neck = config.neck
    return {"kind": neck.kind, "embedding_dim": neck.embedding_dim, "batchnorm": neck.batchnorm, "dropout": neck.dropout,
            "features": neck.features}


def train_epoch(head: Head, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], config: ProbeConfig, first_step: int,
                total_steps: int, check_first: bool = False, steps_per_epoch: int | None = None) -> dict:
    """One epoch of steps; returns ``{"loss", "steps", "skipped", "images", "seconds", "lr"}``."""
    start = time.perf_counter()
    losses, steps, skipped, images, factor = [], 0, 0, 0, 0.0
    head.neck.train()
    head.partial_fc.train()
    unread = []  # results read in groups: the host queues steps while the device runs them

    def read() -> int:
        for result in unread:
            if result.finite:
                losses.append(result.loss)
        count = sum(1 for result in unread if not result.finite)
        unread.clear()
        return count

    for features, labels in batches:
        step = first_step + steps
        factor = config.schedule.factor(step, total_steps, steps_per_epoch)
        head.step_fn.set_learning_rates(*config.optim.learning_rates(factor))
        head.partial_fc.check_inputs = check_first and steps == 0  # labels and shapes, once per run
        unread.append(head.step_fn([(features, labels)]))
        head.partial_fc.check_inputs = False
        steps += 1
        images += len(labels)
        if len(unread) >= UNREAD_STEPS:
            skipped += read()
    skipped += read()
    if steps and not losses:
        from unicom.engine.step import TrainingStopped

        raise TrainingStopped("every step of the epoch had a non-finite loss or gradient and was skipped; "
                              "lower optim.lr or set optim.clip_grad_norm")
    seconds = time.perf_counter() - start
    return {"loss": float(np.mean(losses)) if losses else float("nan"), "steps": steps, "skipped": skipped,
            "images": images, "seconds": seconds, "lr": config.optim.learning_rates(factor)[0]}


# --------------------------------------------------------------------- evaluation


@torch.no_grad()
def head_embeddings(neck: nn.Module | None, features: torch.Tensor, chunk: int = 65_536) -> torch.Tensor:
    """The neck (eval mode) applied to (N, D_in) features; ``neck=None`` gives the features."""
    if neck is None:
        return features
    was_training = neck.training
    neck.eval()
    out = torch.cat([neck(features[i:i + chunk]) for i in range(0, max(len(features), 1), chunk)])
    neck.train(was_training)
    return out


def retrieval_scores(neck: nn.Module | None, split: "EvalSplit", ks: Sequence[int]) -> dict:
    """mMP@5, Recall@K, MAP@R ... of ``split`` (queries against the index) with ``neck``
    (``None``: the backbone's features themselves)."""
    from unicom.evaluate import retrieval_metrics

    query = head_embeddings(neck, split.query_features)
    index = head_embeddings(neck, split.index_features)
    return retrieval_metrics(query, split.query_labels, index, split.index_labels, ks=tuple(ks))


@dataclass
class EvalSplit:
    """Backbone features and class ids of a query set and an index set."""

    query_features: torch.Tensor
    query_labels: np.ndarray
    index_features: torch.Tensor
    index_labels: np.ndarray
    description: str = ""


# ---------------------------------------------------------------------- checkpoint


def _check_resumable(stored: dict, config: ProbeConfig, path: Path) -> None:
    from unicom.engine.recipe import changed_keys

    changed = changed_keys(stored, config, ignore=RESUMABLE_CHANGES)
    if changed:
        details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed[:8])
        raise InputError(f"{path} was written by a run with other settings ({details}); "
                         f"use another out=, or delete {path} to train from the start")


def read_checkpoint(path: Path, config: ProbeConfig, train: DomainImages | None = None) -> dict | None:
    """The state saved after the last finished epoch, checked against ``config`` and the
    training rows ``train`` (None: no checkpoint)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged files
        raise InputError(f"{path}: unreadable ({error}); delete it to train from the start") from error
    _check_resumable(json.loads(state["config"]), config, path)
    if train is not None and "train_rows" in state:  # (checkpoints written before the rows were recorded: not checked)
        then = json.loads(state["train_rows"])
        if then["fingerprint"] != _train_rows(train)["fingerprint"]:
            raise InputError(
                f"{path} was written by a run whose lists of data.train held other rows ({then['images']:,} images of "
                f"{then['classes']:,} classes then, {len(train):,} of {train.num_classes:,} now); "
                f"use another out=, or delete {path} to train from the start")
    return state


def _train_rows(train: DomainImages) -> dict:
    """What the head is trained on, as a checkpoint records it: the rows' fingerprint and counts."""
    from unicom.unifex.cache import images_fingerprint

    return {"fingerprint": images_fingerprint(train.images), "images": len(train), "classes": train.num_classes}


def save_checkpoint(path: Path, head: Head, epoch: int, history: list, baseline: dict, config: ProbeConfig,
                    train: DomainImages | None = None) -> None:
    from unicom.files import atomic_path, save_torch

    state = {
        "epoch": epoch,
        "neck": head.neck.state_dict(),
        "partial_fc": head.partial_fc.state_dict(),
        "neck_optimizer": head.neck_optimizer.state_dict(),
        "prototype_optimizer": head.prototype_optimizer.state_dict(),
        "rng": rng_state(head.partial_fc.prototypes.device),  # the CUDA generator too: dropout on a GPU draws from it
        "selection_rng": head.partial_fc.rng_state(),
        "history": json.dumps(history),
        "baseline": json.dumps(baseline),
        "config": json.dumps(config.to_dict()),
        **({} if train is None else {"train_rows": json.dumps(_train_rows(train))}),
    }
    with atomic_path(path) as tmp:
        save_torch(state, tmp)


def restore(head: Head, state: dict, device: torch.device) -> None:
    head.neck.load_state_dict(state["neck"])
    head.partial_fc.load_state_dict(state["partial_fc"])
    if all("param_names" in group for group in head.neck_optimizer.param_groups):  # AdamW: the moments by name
        from unicom.engine.step import load_optimizer_state

        load_optimizer_state(head.neck_optimizer, state["neck_optimizer"], head.neck)
    else:
        head.neck_optimizer.load_state_dict(state["neck_optimizer"])
    head.prototype_optimizer.load_state_dict(state["prototype_optimizer"])
    if "rng" in state:
        set_rng_state(state["rng"], device)
    else:  # written before the CUDA generator was saved
        torch.set_rng_state(state["torch_rng"])
    if state["selection_rng"]:
        head.partial_fc.set_rng_state(state["selection_rng"], device)


# --------------------------------------------------------------------------- probe


@dataclass
class ProbeData:
    """The lists of a recipe, read and split."""

    all_train: DomainImages  # every row of data.train (what the cache holds)
    train: DomainImages  # the rows trained on, classes 0..K-1
    query: DomainImages | None = None
    index: DomainImages | None = None
    eval_lists: DomainImages | None = None  # eval.query + eval.index read together (one class vocabulary)
    notes: list[str] = field(default_factory=list)


def read_probe_data(config: ProbeConfig) -> ProbeData:
    """Read ``data.train`` (and the evaluation lists), select and split them."""
    from unicom.unifex.data import exclude_listed, holdout_split, read_domain_lists, select_training

    data, ev = config.data, config.eval
    columns = dict(root=data.root, dataset_column=data.dataset_column, path_column=data.path_column,
                   class_column=data.class_column)
    all_train = read_domain_lists(data.train, **columns)
    kept, excluded = exclude_listed(all_train, data.exclude)
    train = select_training(kept, data.datasets, data.min_images_per_class, data.max_images_per_class, config.seed,
                            lists=len(data.train))
    result = ProbeData(all_train, train)
    if data.exclude:
        result.notes.append(f"data.exclude: {excluded:,} of the {len(all_train):,} images of data.train left out")
    if ev.holdout_classes > 0:
        result.train, result.query, result.index = holdout_split(train, ev.holdout_classes, ev.queries_per_class, config.seed)
    elif ev.query:
        # a list without the dataset column is one benchmark: its classes match the other lists' classes
        lists = read_domain_lists(list(ev.query) + list(ev.index), **columns, dataset_name=EVAL_DATASET)
        result.eval_lists = lists
        result.query = lists.subset(lists.source < len(ev.query), relabel=False)
        result.index = lists.subset(lists.source >= len(ev.query), relabel=False)
        _require_disjoint(result.query, result.index)
    if result.train.num_classes < 2:
        raise InputError(f"training needs at least 2 classes; {result.train.num_classes} are left")
    return result


def _require_disjoint(query: DomainImages, index: DomainImages) -> None:
    """An :class:`InputError` when an image is both a query and an index image (the same
    file, by its resolved path): it would find itself first and lift every score."""
    from unicom import storage

    indexed = {storage.same_file(path) for path in index.images.paths}  # ./a.jpg and a.jpg: one file
    shared = [key for key, path in zip(query.images.keys, query.images.paths) if storage.same_file(path) in indexed]
    if shared:
        raise InputError(
            f"eval.query and eval.index share {len(shared)} of the {len(query)} query images (e.g. "
            f"{', '.join(shared[:3])}): each would find itself first and lift every score; give lists without "
            "common images (or eval.holdout_classes, which splits the training classes)")


def _rows_of(keys: Sequence[str], subset: DomainImages) -> np.ndarray:
    row_of = {key: row for row, key in enumerate(keys)}
    return np.asarray([row_of[k] for k in subset.images.keys], dtype=np.int64)


def _print_scores(say, rows: list[tuple[str, dict]], ks: Sequence[int]) -> None:
    keys = ["mmp@5"] + [f"recall@{k}" for k in ks] + ["map@r"]
    say(f"  {'':<12}" + "".join(f"{k:>11}" for k in keys))
    for name, scores in rows:
        say(f"  {name:<12}" + "".join(f"{100 * scores[k]:>10.2f}%" for k in keys))


@dataclass
class Backbone:
    """The frozen encoder of a run and how it is fed."""

    encoder: Encoder
    preprocess: dict  # its evaluation transform as a model folder's preprocess
    device: torch.device
    precision: str
    workers: int
    augment_transform: Any = None  # the augment section's random transform, when used
    train_transform: Any = None  # the training images' plain transform (data.resize); default the encoder's own

    @property
    def plain(self):
        return self.encoder.image_transform

    @property
    def trains_on_plain(self) -> bool:
        return self.train_transform is None or self.train_transform is self.encoder.image_transform

    @property
    def input_dim(self) -> int:
        return int(self.encoder.embedding_dim)


@dataclass
class Feed:
    """What the head trains and is evaluated on."""

    batches: FeatureBatches | ImageBatches
    class_counts: np.ndarray  # (K,) training images per class
    split: EvalSplit | None = None
    cache: dict | None = None  # cache mode: the folder, build seconds, what it holds


def _to_split(query: np.ndarray, query_labels, index: np.ndarray, index_labels, device) -> EvalSplit:
    return EvalSplit(torch.from_numpy(query).to(device), np.asarray(query_labels),
                     torch.from_numpy(index).to(device), np.asarray(index_labels),
                     f"{len(query_labels):,} queries against {len(index_labels):,} index images")


def build_cache(config: ProbeConfig, data: ProbeData, backbone: Backbone, out: Path, log) -> dict:
    """Build (or complete) the feature cache of a recipe; returns its folder, build time and contents."""
    from unicom.models.foundation import recorded_spec
    from unicom.unifex import cache as feature_cache
    from unicom.unifex.model import weights_reference

    root = storage.path(config.cache.folder) if config.cache.folder else out / "cache"
    identity = {"model": recorded_spec(config.backbone.model), "pretrained": weights_reference(config.backbone.pretrained)}
    options = dict(identity=identity, batch_size=config.cache.batch_size, num_workers=backbone.workers,
                   dtype=config.cache.dtype, rows_per_part=config.cache.rows_per_part, precision=backbone.precision,
                   seed=config.seed, normalize=config.neck.features == "normalized", decode=config.data.decode)
    plain = backbone.plain
    training = plain if backbone.trains_on_plain else backbone.train_transform
    transforms = [training] + [backbone.augment_transform] * config.cache.augmented_views
    began = time.perf_counter()
    log.print(f"feature cache {root}: {len(data.all_train):,} training images x {len(transforms)} view(s)")
    try:
        if not storage.is_url(root):  # (object stores have no folders to make)
            Path(root).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"feature cache {storage.text(root)}: cannot be written ({storage.describe(error)}); "
                         "give cache.folder= a folder that can be") from error
    feature_cache.build_views(backbone.encoder, data.all_train.images, root, "train", transforms, **options)
    contents = {"train": {"images": len(data.all_train), "views": len(transforms)}}
    if _separate_eval(data, backbone):
        for name, subset in (("query", data.query), ("index", data.index)):
            split = feature_cache.eval_split(name, subset.images)
            feature_cache.build_views(backbone.encoder, subset.images, root, split, [plain], **options)
            contents[name] = {"images": len(subset), "views": 1, "folder": split}
    feature_cache.write_manifest(root, identity, backbone.input_dim, contents)
    seconds = time.perf_counter() - began
    log.event("cache", folder=storage.text(root), seconds=round(seconds, 3), **{k: v["images"] for k, v in contents.items()})
    return {"cache": storage.text(root), "seconds": seconds, "splits": contents}


def _separate_eval(data: ProbeData, backbone: Backbone) -> bool:
    """Whether the evaluation images need views of their own: evaluation lists, or held-out
    classes when training images are transformed otherwise than the backbone's own way."""
    return data.eval_lists is not None or (data.query is not None and not backbone.trains_on_plain)


def cache_feed(config: ProbeConfig, data: ProbeData, backbone: Backbone, cache: dict, say) -> Feed:
    """Cache mode: the training views and the evaluation features, read from the cache into memory."""
    from unicom.unifex.cache import eval_split, load_view, view_folder

    root, device = storage.path(cache["cache"]), backbone.device
    keys = data.all_train.images.keys
    views = cache["splits"]["train"]["views"] if config.train.augment else 1
    loaded = [load_view(view_folder(root, "train", v), keys) for v in range(views)]
    present = np.logical_and.reduce([p for _, p in loaded])
    rows = _rows_of(keys, data.train)
    usable = present[rows]
    if not usable.all():
        say(f"note: {int((~usable).sum())} training images could not be decoded and are left out "
            f"(listed in {root}/train/view_*/failures/)")
    rows, labels = rows[usable], data.train.labels[usable]
    batches = FeatureBatches(torch.from_numpy(np.stack([f[rows] for f, _ in loaded])).to(device),
                             torch.from_numpy(labels).to(device), config.data.batch_size, config.data.sampling,
                             config.seed, augment=config.train.augment, **_batching(config))
    split = None
    if _separate_eval(data, backbone):
        (query, query_ok), (index, index_ok) = (
            load_view(view_folder(root, eval_split(name, subset.images), 0), subset.images.keys)
            for name, subset in (("query", data.query), ("index", data.index)))
    elif data.query is not None:  # held-out classes of the training lists: their plain view
        query_rows, index_rows = _rows_of(keys, data.query), _rows_of(keys, data.index)
        query, query_ok = loaded[0][0][query_rows], present[query_rows]
        index, index_ok = loaded[0][0][index_rows], present[index_rows]
    if data.query is not None:
        for name, ok in (("query", query_ok), ("index", index_ok)):
            if not ok.all():
                say(f"note: {int((~ok).sum())} {name} images could not be decoded and are left out of the evaluation "
                    f"(listed in the failures/ of their view in {root})")
        split = _to_split(query[query_ok], data.query.labels[query_ok], index[index_ok], data.index.labels[index_ok], device)
    return Feed(batches, np.bincount(labels, minlength=data.train.num_classes), split, cache)


def _batching(config: ProbeConfig) -> dict:
    """How an epoch is cut into batches: the last, smaller one kept or not; a batch of one
    row only when the last batch is kept and the neck has no BatchNorm."""
    keep = config.data.last_batch == "keep"
    return {"keep_last": keep, "min_rows": 1 if keep and not config.neck.batchnorm else 2}


def direct_feed(config: ProbeConfig, data: ProbeData, backbone: Backbone) -> Feed:
    """Direct mode: images through the backbone every epoch; evaluation features computed once."""
    normalize = config.neck.features == "normalized"
    if config.train.augment:
        transform = backbone.augment_transform
    else:
        transform = backbone.plain if backbone.trains_on_plain else backbone.train_transform
    batches = ImageBatches(backbone.encoder, data.train.images.paths, data.train.labels, transform, config.data.batch_size,
                           config.data.sampling, config.seed, backbone.workers, backbone.device, backbone.precision,
                           normalize=normalize, augment=config.train.augment, **_batching(config))
    split = None
    if data.query is not None:
        from unicom.embed import embed_images

        query, index = (embed_images(backbone.encoder, subset.images.paths, config.cache.batch_size,
                                     num_workers=backbone.workers, precision=backbone.precision, normalize=normalize,
                                     decode=config.data.decode)
                        for subset in (data.query, data.index))
        split = _to_split(query, data.query.labels, index, data.index.labels, backbone.device)
    return Feed(batches, data.train.class_counts(), split)


def load_backbone(config: ProbeConfig) -> Backbone:
    """The frozen encoder on its device, with its transform checked for export (before any work)."""
    from unicom.embed import default_num_workers
    from unicom.engine.device import resolve_device, resolve_precision
    from unicom.models.encoders import load_encoder
    from unicom.unifex.model import describe_transform, freeze

    device = resolve_device(config.train.device)
    encoder = freeze(load_encoder(config.backbone.model, config.backbone.pretrained, device))
    preprocess = describe_transform(encoder.image_transform, config.backbone.model)
    workers = default_num_workers(device) if config.data.workers is None else config.data.workers
    # the frozen backbone only infers: auto is fp16 on a GPU, as `unicom embed`
    precision = resolve_precision(config.backbone.precision, device, training=False)
    backbone = Backbone(encoder, preprocess, device, precision, workers)
    backbone.train_transform = training_transform(encoder, preprocess, config.data.resize)
    if config.train.augment or config.cache.augmented_views:
        backbone.augment_transform = config.augment.transform(preprocess["size"], preprocess["mean"], preprocess["std"])
    return backbone


def training_transform(encoder: Encoder, preprocess: dict, resize: str):
    """The plain transform of the training images (``data.resize``): the encoder's own
    (``model``), or its size, interpolation and normalisation with the short side resized
    and a centre crop (``shortest``, the UniFEx code's training transform) or both sides
    resized (``squash``). Evaluation and the exported model always use the encoder's own."""
    if resize == "model" or (resize == preprocess["resize_mode"] and "resize_size" not in preprocess):
        return encoder.image_transform
    from unicom.models.export import build_transform

    described = {key: value for key, value in preprocess.items() if key != "resize_size"}
    return build_transform({**described, "resize_mode": resize})


def export(config: ProbeConfig, head: Head, backbone: Backbone, out: Path, counts: np.ndarray, epochs: int,
           folder: str = MODEL_FOLDER, evaluation: dict | None = None) -> Path:
    """The head and the backbone reference as a model folder (``out/model``, or ``out/folder``);
    ``evaluation``: its score (``provenance.eval``)."""
    from unicom.losses.heads import head_settings
    from unicom.models.export import save_model
    from unicom.unifex.model import ARCHITECTURE, unifex_settings

    settings = unifex_settings(config.backbone.model, config.backbone.pretrained, backbone.input_dim, _neck_settings(config),
                               backbone.encoder.weights_sha256())
    head.neck.eval()
    provenance = {"trained_by": "unicom probe", "train_lists": [storage.absolute(p) for p in config.data.train],
                  "classes": int(len(counts)), "images": int(counts.sum()), "epochs": epochs,
                  "loss": {**head_settings(head.partial_fc.margin), "centers": config.loss.centers,
                           "sample_rate": config.loss.sample_rate, "feature_rate": config.loss.feature_rate,
                           "margin_gradient": config.loss.margin_gradient}}
    if evaluation is not None:
        provenance["eval"] = evaluation
    return save_model(out / folder, {f"neck.{k}": v for k, v in head.neck.state_dict().items()}, ARCHITECTURE, settings,
                      backbone.preprocess, embedding_dim=config.neck.embedding_dim, provenance=provenance)


def probe(config: ProbeConfig, console=None, *, until_epoch: int | None = None, cache_only: bool = False) -> dict:
    """Run a UniFEx recipe: features, head training, evaluation, export to ``out/model``.

    ``until_epoch``: stop after that epoch (a rerun continues); ``cache_only``: build the
    feature cache and stop. Returns the report written to ``out/metrics.json`` (or, with
    ``cache_only``, the cache's description).
    """
    from unicom.engine.recipe import to_yaml
    from unicom.engine.runlog import RunLog, check_wandb
    from unicom.files import refused_write, write_json_atomic, write_text_atomic
    from unicom.unifex.data import format_summary
    from unicom.unifex.model import has_weights

    out = Path(config.out)
    if cache_only and config.train.mode != "cache":
        raise InputError("building the cache alone is for train.mode=cache; this recipe trains in direct mode")
    if config.log.wandb:
        check_wandb()
    data = read_probe_data(config)
    backbone = load_backbone(config)
    checkpoint = read_checkpoint(out / CHECKPOINT, config, data.train)

    summary = data.train.summary()
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", to_yaml(config))
        write_json_atomic(out / "datasets.json", {"train": summary, "lists": [storage.absolute(p) for p in config.data.train]})
    except OSError as error:  # a read-only or full disk: before any work, without a traceback
        raise InputError(f"{out}: the output folder cannot be written ({storage.describe(error)}); "
                         "give out= a folder that can be") from error
    # the epochs after the checkpoint are trained again: logged once (the cache's build record stays)
    log = RunLog(out, tensorboard=config.log.tensorboard and not cache_only, console=console, continues_from=int(checkpoint["epoch"]) if checkpoint else 0,
                 counted_in="epoch", keep_others=True, wandb=None if cache_only else config.log.wandb_run(config))
    say = log.print
    failed = True  # until the run returns: W&B is told how it ended
    try:
        say(f"unicom probe: {backbone.encoder.name}, {backbone.input_dim} features -> {config.neck.kind} neck -> "
            f"{config.neck.embedding_dim}; {config.loss.head} head, {config.loss.centers} center(s) per class; "
            f"{config.train.mode} mode on {backbone.device}")
        say(format_summary(summary))
        for note in data.notes:
            say(note)
        if config.train.mode == "cache":
            cache = build_cache(config, data, backbone, out, log)
            if cache_only:
                say(f"cache ready in {cache['seconds']:.1f} s")
                return cache
            feed = cache_feed(config, data, backbone, cache, say)
        else:
            feed = direct_feed(config, data, backbone)

        head = build_head(config, backbone.input_dim, feed.class_counts, backbone.device)
        epochs = config.train.epochs if has_weights(head.neck) else 0
        if epochs == 0 and config.train.epochs:
            say("note: the pooling neck has no weights: nothing to train, the model is exported as it is")
        steps_per_epoch = len(feed.batches)
        if epochs and steps_per_epoch == 0:
            raise InputError(f"{int(feed.class_counts.sum())} training images make no batch of at least 2; add images")
        total_steps = max(1, epochs * steps_per_epoch)
        split, ks = feed.split, config.eval.ks
        history: list[dict] = []
        baseline: dict = {}
        start_epoch = 0
        if checkpoint is not None:
            restore(head, checkpoint, backbone.device)
            start_epoch = int(checkpoint["epoch"])
            history, baseline = json.loads(checkpoint["history"]), json.loads(checkpoint["baseline"])
            say(f"resuming after epoch {start_epoch} of {epochs} ({out / CHECKPOINT})")
            log.event("resume", epoch=start_epoch)
        elif split is not None:
            baseline = {"backbone": retrieval_scores(None, split, ks), "untrained": retrieval_scores(head.neck, split, ks)}
        log.event("start", epochs=epochs, steps_per_epoch=steps_per_epoch, classes=int(len(feed.class_counts)),
                  images=int(feed.class_counts.sum()), mode=config.train.mode, device=str(backbone.device))
        if config.eval.keep_best and split is None:
            raise InputError("eval.keep_best keeps the best-scored epoch, and this run has no evaluation split (its "
                             "backbone trains on plain images in direct mode): leave eval.keep_best out")
        if split is not None:
            say(f"evaluation: {split.description}")
            _print_scores(say, [(name, baseline[name]) for name in ("backbone", "untrained")], ks)

        last = epochs if until_epoch is None else min(epochs, until_epoch)
        for epoch in range(start_epoch, last):
            record = {"epoch": epoch + 1, **train_epoch(head, feed.batches.epoch(epoch), config, epoch * steps_per_epoch,
                                                        total_steps, check_first=epoch == start_epoch,
                                                        steps_per_epoch=steps_per_epoch)}
            line = (f"epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}, {record['steps']} steps, "
                    f"{record['images'] / max(record['seconds'], 1e-9):,.0f} images/s, {record['seconds']:.2f} s")
            if split is not None and config.eval.every and (epoch + 1) % config.eval.every == 0:
                record["metrics"] = scores = retrieval_scores(head.neck, split, ks)
                record["metric"] = config.eval.metric  # the one eval.keep_best compares, and curves.png draws
                line += f", mMP@5 {100 * scores['mmp@5']:.2f}%, Recall@{ks[0]} {100 * scores[f'recall@{ks[0]}']:.2f}%"
                if config.eval.keep_best:  # the earlier epochs' scores are in the history, the checkpoint's too
                    metric = config.eval.metric
                    earlier = [r["metrics"][metric] for r in history if "metrics" in r]
                    record["best"] = not earlier or scores[metric] > max(earlier)
                    if record["best"]:  # before the checkpoint: a run stopped here trains the epoch and exports again
                        with refused_write(out, f"the best model ({BEST_MODEL}/)", RESUMES):
                            best = export(config, head, backbone, out, feed.class_counts, epoch + 1, BEST_MODEL,
                                          {"metric": metric, "value": scores[metric]})
                        line += f"; the best so far: exported to {best}"
            history.append(record)
            log.event("epoch", **record)
            log.scalars(epoch + 1, {"loss": record["loss"], "images_per_second": record["images"] / max(record["seconds"], 1e-9)})
            if "metrics" in record:
                log.scalars(epoch + 1, record["metrics"], section="eval")
            say(line)
            with refused_write(out, CHECKPOINT, RESUMES):
                save_checkpoint(out / CHECKPOINT, head, epoch + 1, history, baseline, config, data.train)
        if isinstance(feed.batches, ImageBatches) and feed.batches.failures:
            say(f"note: {len(feed.batches.failures)} image reads failed and were left out, e.g. {feed.batches.failures[0]}")
        if last < epochs:
            say(f"stopped after epoch {last}; run again to continue")
            failed = False
            return {"stopped_after_epoch": last, "history": history}

        with refused_write(out, f"the model ({MODEL_FOLDER}/)", RESUMES):
            folder = export(config, head, backbone, out, feed.class_counts, epochs)
        report: dict[str, Any] = {"model": str(folder), "datasets": summary, "history": history, "epochs": epochs}
        if feed.cache is not None:
            report["cache"] = feed.cache
        if split is not None:
            final = retrieval_scores(head.neck, split, ks)
            report["evaluation"] = {"protocol": split.description, "ks": list(ks), **baseline, "trained": final}
            say("final evaluation:")
            _print_scores(say, [("backbone", baseline["backbone"]), ("untrained", baseline["untrained"]),
                                ("trained", final)], ks)
        with refused_write(out, METRICS, RESUMES):
            write_json_atomic(out / METRICS, report)
        if history:
            from unicom.engine.runlog import LOG_FILE
            from unicom.evaluate.plots import plot_training_curves

            with refused_write(out, CURVES, RESUMES):
                plot_training_curves(out / LOG_FILE, out / CURVES, title=f"unicom probe: {config.neck.kind} neck, {config.loss.head} head")
        log.event("end", model=str(folder))
        say(f"model exported to {folder} (unicom embed/evaluate/index --model {folder})")
        failed = False
        return report
    finally:
        log.close(failed=failed)


__all__ = ["probe", "FeatureBatches", "ImageBatches", "build_head", "train_epoch", "retrieval_scores", "EvalSplit",
           "read_probe_data", "load_backbone", "build_cache", "cache_feed", "direct_feed", "export", "Head", "Feed"]
