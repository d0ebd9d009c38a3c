"""UniFEx recipes: typed sections read from YAML with ``key=value`` overrides.

The recipe system is :mod:`unicom.train.config`'s (strict keys that list the valid ones on
a typo, typed values, YAML-parsed overrides); this module defines the sections of
``unicom probe`` and their checks. The ``augment``, ``optim`` and ``schedule`` sections are
the training program's own, so a key means the same thing in both recipes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from unicom.errors import InputError
from unicom.train.config import AugmentConfig, OptimConfig, ScheduleConfig, check, load_config
from unicom.train.config import default_values as recipe_defaults

# recipe name of a margin head -> its class in unicom.losses
MARGIN_HEADS = {
    "arcface": "ArcFace",
    "cosface": "CosFace",
    "combined": "CombinedMargin",
    "dynm_arcface": "DynMArcFace",
    "adacos": "AdaCos",
    "li_arcface": "LiArcFace",
    "curricularface": "CurricularFace",
    "adaface": "AdaFace",
}
# loss keys passed to the head's constructor when set (None: the head's own default)
HEAD_OPTIONS = ("margin", "scale", "m1", "m2", "m3", "m_max", "m_min", "dynamic", "h", "t_alpha", "momentum")


@dataclass
class BackboneConfig:
    """The frozen foundation model: any spec :func:`unicom.models.encoders.load_encoder` understands."""

    model: str = "ViT-SO400M-14-SigLIP-384"  # an open_clip name, timm/<name>, an exported folder ...
    pretrained: str | None = "webli"  # open_clip/timm tag or a local checkpoint file (null: random or the spec's own)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # the backbone's forward; auto: fp16 on GPU, fp32 on CPU


@dataclass
class NeckConfig:
    """What turns the frozen features into the embedding."""

    kind: Literal["linear", "pooling"] = "linear"  # linear projection, or average pooling (nothing to train)
    embedding_dim: int = 64
    batchnorm: bool = False  # BatchNorm1d after the projection
    dropout: float = 0.0  # on the backbone features, before the projection


@dataclass
class DataConfig:
    """Training images: CSV/parquet lists of (dataset, path, class) rows, classes disjoint across datasets."""

    train: list[str] | None = None  # one or more lists; their datasets are composed
    root: str | None = None  # folder of relative paths (default: each list's own folder)
    dataset_column: str = "dataset"  # when a list has no such column, its file name is the dataset
    path_column: str = "path"
    class_column: str = "class"
    datasets: list[str] | None = None  # train on these datasets only
    min_images_per_class: int = 1  # leave out smaller classes
    sampling: Literal["instance", "class_balanced"] = "instance"
    batch_size: int = 128
    workers: int | None = None  # image decoding processes (cache build, direct mode); default: by device


@dataclass
class CacheConfig:
    """The feature cache: backbone features of every image, in the ``unicom embed`` layout."""

    folder: str | None = None  # default OUT/cache; runs with the same backbone and lists can share one
    augmented_views: int = 0  # extra views of each training image, drawn with the augment section
    dtype: Literal["float32", "float16"] = "float32"
    batch_size: int = 64  # images per backbone forward while building
    rows_per_part: int = 10_000  # images per part file (the unit of resuming)


@dataclass
class LossConfig:
    """The margin head inside :class:`unicom.losses.PartialFC`; unset options keep the head's defaults."""

    head: Literal["arcface", "cosface", "combined", "dynm_arcface", "adacos", "li_arcface", "curricularface",
                  "adaface"] = "arcface"
    margin: float | None = None  # arcface, cosface, li_arcface, curricularface, adaface
    scale: float | None = None  # every head but adacos
    m1: float | None = None  # combined: cos(m1*theta + m2) - m3
    m2: float | None = None
    m3: float | None = None
    m_max: float | None = None  # dynm_arcface (the margins come from the training class counts)
    m_min: float | None = None
    dynamic: bool | None = None  # adacos: adapt the scale every step
    h: float | None = None  # adaface
    t_alpha: float | None = None  # adaface
    momentum: float | None = None  # curricularface
    centers: int = 1  # prototypes per class: k > 1 is sub-center ArcFace (max over the k)
    sample_rate: float = 1.0  # fraction of the classes in each step's softmax (positives always in)


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


@dataclass
class ProbeConfig:
    """A whole ``unicom probe`` recipe."""

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "ProbeConfig":
        validate(self)
        return self


def load_probe_config(path, overrides: Sequence[str] = ()) -> ProbeConfig:
    """Read a recipe (or the defaults when ``path`` is None), apply ``key=value`` overrides, validate."""
    for text in overrides:
        if "=" not in text:
            raise InputError(f"override {text!r}: expected key=value, e.g. neck.embedding_dim=64 (unicom probe --list-keys)")
    return load_config(path, overrides, cls=ProbeConfig)


def default_values() -> dict[str, Any]:
    """Every dotted key of a probe recipe with its default value."""
    return recipe_defaults(ProbeConfig)


def head_option_names(head: str) -> list[str]:
    """The recipe options (:data:`HEAD_OPTIONS`) that the margin head ``head`` takes."""
    import inspect

    from unicom import losses

    parameters = inspect.signature(getattr(losses, MARGIN_HEADS[head])).parameters
    return [name for name in HEAD_OPTIONS if name in parameters]


def validate(config: ProbeConfig) -> None:
    """Raise :class:`InputError` listing every value out of range and every bad combination."""
    problems: list[str] = []
    data, neck, cache, loss, optim, train, ev = (config.data, config.neck, config.cache, config.loss, config.optim,
                                                 config.train, config.eval)
    check(bool(config.out), problems, "out is required: the folder for the model, metrics and cache (out=DIR or --out DIR)")
    check(config.seed >= 0, problems, f"seed must be non-negative, got {config.seed}")
    check(bool(data.train), problems, "data.train is required: CSV/parquet lists of (dataset, path, class) rows")
    check(data.min_images_per_class >= 1, problems, "data.min_images_per_class must be at least 1")
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
    augment = config.augment
    check(len(augment.crop_scale) == 2 and 0 < augment.crop_scale[0] <= augment.crop_scale[1] <= 1, problems,
           f"augment.crop_scale must be [low, high] with 0 < low <= high <= 1, got {augment.crop_scale}")
    check(0.0 <= augment.hflip <= 1.0 and 0.0 <= augment.random_erasing <= 1.0, problems,
           "augment.hflip and augment.random_erasing are probabilities in [0, 1]")
    check(0.0 < loss.sample_rate <= 1.0, problems, f"loss.sample_rate must be in (0, 1], got {loss.sample_rate}")
    check(loss.centers >= 1, problems, f"loss.centers must be at least 1, got {loss.centers}")
    check(loss.scale is None or loss.scale > 0, problems, "loss.scale must be positive")
    accepted = head_option_names(loss.head)
    for name in HEAD_OPTIONS:
        if getattr(loss, name) is not None and name not in accepted:
            problems.append(f"loss.{name} does not apply to loss.head={loss.head}; its options are {', '.join(accepted) or 'none'}")
    check(optim.lr > 0, problems, f"optim.lr must be positive, got {optim.lr}")
    check(optim.weight_decay >= 0, problems, "optim.weight_decay must be non-negative")
    check(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), problems, "optim.betas must be two numbers in [0, 1)")
    check(optim.prototype_lr_scale > 0, problems, "optim.prototype_lr_scale must be positive")
    check(optim.clip_grad_norm is None or optim.clip_grad_norm > 0, problems, "optim.clip_grad_norm must be positive")
    check(0.0 <= config.schedule.warmup_fraction < 1.0, problems, "schedule.warmup_fraction must be in [0, 1)")
    check(0.0 <= config.schedule.min_lr_ratio <= 1.0, problems, "schedule.min_lr_ratio must be in [0, 1]")
    check(bool(ev.query) == bool(ev.index), problems, "give eval.query and eval.index together")
    check(0.0 <= ev.holdout_classes < 1.0, problems, f"eval.holdout_classes must be in [0, 1), got {ev.holdout_classes}")
    check(not (ev.query and ev.holdout_classes), problems, "give eval.query/eval.index or eval.holdout_classes, not both")
    check(ev.queries_per_class >= 1, problems, "eval.queries_per_class must be at least 1")
    check(bool(ev.ks) and all(k >= 1 for k in ev.ks), problems, f"eval.ks must be positive integers, got {ev.ks}")
    check(ev.every >= 0, problems, "eval.every must be 0 or more")
    if problems:
        raise InputError("invalid probe config:\n  " + "\n  ".join(problems))


__all__ = [
    "ProbeConfig", "BackboneConfig", "NeckConfig", "DataConfig", "CacheConfig", "LossConfig", "ProbeTrainConfig",
    "EvalConfig", "MARGIN_HEADS", "HEAD_OPTIONS", "load_probe_config", "default_values", "flatten",
    "head_option_names", "validate",
]
