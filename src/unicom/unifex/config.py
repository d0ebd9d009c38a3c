"""UniFEx recipes: the sections of ``unicom probe`` and their checks.

The recipe engine is :mod:`unicom.engine.recipe`'s (strict keys that list the valid ones
on a typo, typed values, YAML-parsed overrides). The ``augment``, ``loss``, ``optim`` and
``schedule`` sections are the shared ones of :mod:`unicom.engine.sections`, so a key means
the same thing, with the same rules, as in ``unicom train``; ``loss.head`` is any head of
the table :mod:`unicom.losses.heads`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence

from unicom.engine import recipe
from unicom.engine.device import PRECISIONS
from unicom.engine.recipe import Recipe, check, check_local_out
from unicom.engine.sections import AugmentConfig, LogConfig, LossConfig, OptimConfig, ScheduleConfig


@dataclass
class BackboneConfig:
    """The frozen foundation model: any spec :func:`unicom.models.encoders.load_encoder` understands."""

    model: str = "ViT-SO400M-14-SigLIP-384"  # an open_clip name, timm/<name>, an exported folder ...
    pretrained: str | None = "webli"  # open_clip/timm tag or a local checkpoint file (null: random or the spec's own)
    precision: Literal[PRECISIONS] = "auto"  # the backbone's forward; auto: fp16 on GPU, fp32 on CPU


@dataclass
class NeckConfig:
    """What turns the frozen features into the embedding."""

    kind: Literal["linear", "pooling"] = "linear"  # linear projection, or average pooling (nothing to train)
    embedding_dim: int = 64
    batchnorm: bool = False  # BatchNorm1d after the projection
    dropout: float = 0.0  # on the backbone features, before the projection
    features: Literal["normalized", "raw"] = "normalized"  # the backbone's features L2-normalised, or as it gives them


@dataclass
class DataConfig:
    """Training images: CSV/parquet lists of (dataset, path, class) rows, classes disjoint across datasets."""

    train: list[str] | None = None  # one or more lists; their datasets are composed
    root: str | None = None  # folder of relative paths (default: each list's own folder)
    dataset_column: str = "dataset"  # when a list has no such column, its file name is the dataset
    path_column: str | None = None  # default: path, or img_path (the UniFEx lists)
    class_column: str | None = None  # default: class, or label (the UniFEx lists)
    datasets: list[str] | None = None  # train on these datasets only
    exclude: list[str] | None = None  # tables (parquet/CSV, a key column: unicom dedup's duplicates.parquet) of paths, as the lists write them, left out
    min_images_per_class: int | list[int] = 1  # leave out smaller classes: one value, or one per list of data.train
    max_images_per_class: int | list[int | None] | None = None  # keep a random subset (seeded) of larger classes; or one per list
    sampling: Literal["instance", "class_balanced"] = "instance"
    batch_size: int = 128
    last_batch: Literal["drop", "keep"] = "drop"  # the last, smaller batch of an epoch (a single row is always dropped with batchnorm)
    resize: Literal["model", "shortest", "squash"] = "model"  # training images: the backbone's own transform, or short side + centre crop, or squash
    workers: int | None = None  # image decoding processes (cache build, direct mode); default: by device
    decode: Literal["auto", "cpu", "gpu"] = "auto"  # feature cache and evaluation features: JPEGs decoded on the GPU (auto: on CUDA)


@dataclass
class CacheConfig:
    """The feature cache: backbone features of every image, in the ``unicom embed`` layout."""

    folder: str | None = None  # default OUT/cache; runs with the same backbone and lists can share one
    augmented_views: int = 0  # extra views of each training image, drawn with the augment section
    dtype: Literal["float32", "float16"] = "float32"
    batch_size: int = 64  # images per backbone forward while building
    rows_per_part: int = 10_000  # images per part file (the unit of resuming)


@dataclass
class ProbeTrainConfig:
    """How the head is trained."""

    mode: Literal["cache", "direct"] = "cache"  # features from the cache, or the backbone in the loop
    epochs: int = 10
    augment: bool = False  # cache: draw among the augmented views; direct: augment every image
    device: str = "auto"  # auto: the GPU when there is one, else the CPU


@dataclass
class EvalConfig:
    """Retrieval on a query/index split: mMP@5, Recall@K, MAP@R."""

    query: list[str] | None = None  # lists of query images (same columns as data.train)
    index: list[str] | None = None  # lists of index images; classes match the queries' by (dataset, class)
    holdout_classes: float = 0.0  # or: hold out this fraction of the training classes and split their images
    queries_per_class: int = 1  # holdout: queries taken from each held-out class, the rest is the index
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    every: int = 1  # epochs between evaluations (0: only at the end)
    keep_best: bool = False  # export out/model_best at each evaluation whose eval.metric beats every earlier one's
    metric: str = "mmp@5"  # keep_best's: mmp@5 (GUIEC's), recall@K of eval.ks, map@r, r_precision or map@100


@dataclass
class ProbeConfig(Recipe):
    """A whole ``unicom probe`` recipe."""

    command: ClassVar[str] = "unicom probe"
    kind: ClassVar[str] = "probe"

    out: str | None = None  # output folder: the model, metrics, log, checkpoint, cache
    seed: int = 0
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: ProbeTrainConfig = field(default_factory=ProbeTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def check(self, problems: list[str]) -> None:
        """The keys and combinations that the shared sections do not check."""
        data, neck, cache, train, ev = self.data, self.neck, self.cache, self.train, self.eval
        check(bool(self.out), problems, "out is required: the folder for the model, metrics and cache (out=DIR or --out DIR)")
        check_local_out(self.out, problems, "cache.folder and the lists")
        check(self.seed >= 0, problems, f"seed must be non-negative, got {self.seed}")
        check(bool(data.train), problems, "data.train is required: CSV/parquet lists of (dataset, path, class) rows")
        for key in ("min_images_per_class", "max_images_per_class"):
            value = getattr(data, key)
            values = value if isinstance(value, list) else [value]
            check(all(v is None or v >= 1 for v in values), problems, f"data.{key} must be at least 1, got {value}")
            check(not isinstance(value, list) or len(value) == len(data.train or []), problems,
                  f"data.{key} gives {len(values)} values for {len(data.train or [])} lists of data.train; give one per list")
        check(data.batch_size >= 2, problems, f"data.batch_size must be at least 2, got {data.batch_size}")
        check(data.workers is None or data.workers >= 0, problems, "data.workers must be 0 or more")
        check(neck.embedding_dim >= 1, problems, f"neck.embedding_dim must be positive, got {neck.embedding_dim}")
        check(0.0 <= neck.dropout < 1.0, problems, f"neck.dropout must be in [0, 1), got {neck.dropout}")
        check(not (neck.kind == "pooling" and (neck.batchnorm or neck.dropout)), problems,
              "neck.batchnorm and neck.dropout apply to the linear neck only")
        check(cache.augmented_views >= 0, problems, "cache.augmented_views must be 0 or more")
        check(cache.batch_size >= 1 and cache.rows_per_part >= 1, problems, "cache.batch_size and cache.rows_per_part must be positive")
        check(not (train.augment and train.mode == "cache" and cache.augmented_views == 0), problems,
              "train.augment in cache mode draws among augmented views: set cache.augmented_views to 1 or more")
        check(train.epochs >= 0, problems, f"train.epochs must be 0 or more, got {train.epochs}")
        check(bool(ev.query) == bool(ev.index), problems, "give eval.query and eval.index together")
        check(0.0 <= ev.holdout_classes < 1.0, problems, f"eval.holdout_classes must be in [0, 1), got {ev.holdout_classes}")
        check(not (ev.query and ev.holdout_classes), problems, "give eval.query/eval.index or eval.holdout_classes, not both")
        check(ev.queries_per_class >= 1, problems, "eval.queries_per_class must be at least 1")
        check(bool(ev.ks) and all(k >= 1 for k in ev.ks), problems, f"eval.ks must be positive integers, got {ev.ks}")
        check(ev.every >= 0, problems, "eval.every must be 0 or more")
        check(not ev.keep_best or bool(ev.query or ev.holdout_classes), problems,
              "eval.keep_best keeps the best-scored epoch: give eval.query and eval.index, or eval.holdout_classes")
        check(not ev.keep_best or ev.every >= 1, problems,
              "eval.keep_best compares the evaluations made every eval.every epochs: set eval.every to 1 or more")
        if ev.ks and all(k >= 1 for k in ev.ks):
            from unicom.evaluate.metrics import metric_names

            names = metric_names(ev.ks)
            check(ev.metric in names, problems, f"eval.metric={ev.metric}: the evaluation reports {', '.join(names)} "
                  "(recall@K for each K of eval.ks); give one of them")


def load_probe_config(path, overrides: Sequence[str] = (), validate: bool = True) -> ProbeConfig:
    """Read a probe recipe (a file, or a shipped recipe's name; the defaults when ``path`` is None), apply ``key=value`` overrides, validate."""
    return recipe.load(ProbeConfig, path, overrides, validate)


def default_values() -> dict[str, Any]:
    """Every dotted key of a probe recipe with its default value."""
    return recipe.default_values(ProbeConfig)


__all__ = [
    "ProbeConfig", "BackboneConfig", "NeckConfig", "DataConfig", "CacheConfig", "LossConfig", "ProbeTrainConfig",
    "EvalConfig", "load_probe_config", "default_values",
]
