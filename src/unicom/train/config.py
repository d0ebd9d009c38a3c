"""Training recipes: typed sections read from YAML, ``key=value`` overrides, strict validation.

A recipe is a YAML mapping of sections (``model``, ``data``, ``augment``, ``loss``,
``optim``, ``schedule``, ``train``, ``checkpoint``, ``log``) plus ``out`` and ``seed``.
Every key has a type and a default (the dataclasses below are the reference). Reading a
recipe, or applying ``section.key=value`` overrides from the command line, checks every
key and value before anything runs: an unknown key is an error that lists the valid keys
of its section, a value of the wrong type names the key, the expected type and the value.

Values of overrides are parsed as YAML (``optim.lr=5e-4``, ``data.shards=[a.tar,b.tar]``,
``model.init=null``); numbers written like ``1e-3`` are accepted for float keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from unicom.errors import InputError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "onecycle", "constant")
MARGIN_HEADS = ("arcface", "cosface")


@dataclass
class ModelConfig:
    """The network: a name of :func:`unicom.models.vit.model_names` and optional starting weights."""

    name: str | None = "ViT-B-32"  # ViT-B-32/ViT-B-16/ViT-L-14/ViT-L-14-336, or a released name (ViT-B/32 ...)
    init: str | None = None  # released name, released .pt, exported folder, open_clip file, or a run/checkpoint
    embedding_dim: int | None = None  # D; default: the named model's (512 for B/32, 768 otherwise)
    image_size: int | None = None
    patch_size: int | None = None
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    mlp_ratio: float | None = None
    act: Literal["gelu", "quick_gelu"] | None = None  # quick_gelu for OpenAI's CLIP weights
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the backbone
    sync_batchnorm: bool = True  # BatchNorm statistics over all GPUs (the released architecture's head)

    def overrides(self) -> dict[str, Any]:
        names = ("embedding_dim", "image_size", "patch_size", "width", "depth", "heads", "mlp_ratio", "act")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class DataConfig:
    """Training images and their labels. Exactly one of ``shards``, ``folder``, ``table``,
    ``benchmark`` is the source; ``labels`` joins pseudo-labels of ``unicom cluster`` by key."""

    shards: list[str] | None = None  # webdataset shards: paths, brace patterns, globs or a folder
    labels: str | None = None  # a `unicom cluster` output folder (labels/labels_{i}.parquet)
    folder: str | None = None  # one sub-folder of images per class
    table: str | None = None  # CSV or parquet list of images
    benchmark: str | None = None  # a retrieval benchmark (sop, inshop, inaturalist, cub, cars196) or imagenet
    root: str | None = None  # the benchmark's folder
    path_column: str = "path"
    label_column: str = "label"
    key_column: str | None = None  # table column of keys (default: the path as written)
    batch_size: int = 128  # images per rank and micro-step
    workers: int | None = None  # decoding processes per rank (default: 8 on GPU, 0-2 on CPU)
    shuffle_buffer: int = 2000  # shards: samples held for shuffling, per reader
    samples_per_epoch: int | None = None  # shards: default, the labelled samples of the label files


@dataclass
class AugmentConfig:
    """Training transform (timm's ``create_transform``); evaluation uses the model's own."""

    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random resized crop, area range
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])
    hflip: float = 0.5
    randaugment: str | None = None  # e.g. rand-m9-mstd0.5-inc1 (timm's syntax)
    color_jitter: float = 0.0  # brightness/contrast/saturation strength (timm ignores it with RandAugment)
    random_erasing: float = 0.0  # probability
    random_erasing_mode: Literal["const", "rand", "pixel"] = "const"  # fill: zeros, one random colour, random pixels
    interpolation: Literal["bicubic", "bilinear", "random"] = "bicubic"


@dataclass
class LossConfig:
    """The margin softmax over prototypes (:class:`unicom.losses.PartialFC`)."""

    head: Literal["arcface", "cosface"] = "arcface"
    margin: float = 0.3
    scale: float = 64.0
    sample_rate: float = 0.1  # r1: fraction of classes per step (positives always included)
    feature_rate: float = 1.0  # r2: fraction of feature dimensions per step
    centers: int = 1  # prototypes per class (sub-center)
    num_classes: int | None = None  # default: from the labels (k of the clustering, or the classes of the list)


@dataclass
class OptimConfig:
    """AdamW for the backbone, :class:`unicom.optim.SparseAdamW` for the prototypes."""

    lr: float = 1e-3
    weight_decay: float = 0.05  # not applied to norms, biases, position embeddings and the class token
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    prototype_lr_scale: float = 1.0  # the prototypes' learning rate is lr times this
    prototype_weight_decay: float | None = None  # default: weight_decay
    clip_grad_norm: float | None = None  # clip the global gradient norm (backbone and prototypes) to this


@dataclass
class ScheduleConfig:
    """Learning rate over steps: a factor of ``optim.lr``."""

    kind: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_fraction: float = 0.0  # of all steps; linear warm-up (cosine) or the rising part (onecycle)
    warmup_steps: int | None = None  # overrides warmup_fraction
    min_lr_ratio: float = 0.0  # cosine: the final factor
    onecycle_div: float = 25.0  # onecycle: the start is lr / onecycle_div
    onecycle_final_div: float = 1e4  # onecycle: the end is lr / (onecycle_div * onecycle_final_div)


@dataclass
class TrainSection:
    """Length, precision and numerics."""

    epochs: float = 32.0
    steps: int | None = None  # overrides epochs
    accumulation: int = 1  # micro-steps per optimiser step
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    max_nonfinite_steps: int = 20  # stop after this many consecutive skipped steps
    device: str = "auto"  # auto: this rank's GPU, else the CPU
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep: int = 3  # checkpoints kept (the newest)
    resume: str = "auto"  # auto: the newest valid checkpoint of `out`, if any; never; or a checkpoint folder


@dataclass
class LogConfig:
    every: int = 50  # steps between log lines
    tensorboard: bool = True  # write out/tensorboard (when the tensorboard package is installed)


@dataclass
class TrainConfig:
    """A whole recipe."""

    out: str | None = None  # output folder: checkpoints, logs, the exported model
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        """Check values and their combinations (types were checked on reading)."""
        validate(self)
        return self


# ------------------------------------------------------------------ typed reading


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(annotation)) else inner
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"a list of {_type_name(item)}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(annotation, str(annotation))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, annotation, raw: bool):
    """``value`` as ``annotation``; ``raw``: it is the text of a command-line override."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and type(None) in args):
            if type(None) in args:
                return None
            raise _Mismatch
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, raw)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(annotation):
            return value
        raise _Mismatch
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, str) and raw:
            import yaml

            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [value]
            value = parsed
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item, raw) for v in value]
        if isinstance(value, str) and item is str:  # one shard pattern instead of a list
            return [value]
        raise _Mismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise _Mismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise _Mismatch from None
            if number.is_integer():
                return int(number)
        raise _Mismatch
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        if raw or isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    raise TypeError(f"unsupported annotation {annotation}")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted key of a recipe (``model.name``, ``optim.lr``, ...)."""
    cls = cls or TrainConfig
    keys = []
    hints = _hints(cls)
    for name in _fields(cls):
        if dataclasses.is_dataclass(hints[name]):
            keys.extend(valid_keys(hints[name], f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key(key: str, section_cls, section: str, source: str) -> InputError:
    names = list(_fields(section_cls))
    close = difflib.get_close_matches(key.split(".")[-1], names, n=1)
    hint = f" (did you mean {section + '.' if section else ''}{close[0]}?)" if close else ""
    where = f"section {section!r}" if section else "the top level"
    return InputError(f"{source}: unknown key {key!r}{hint}; valid keys of {where}: {', '.join(names)}")


def _set(obj, key: str, value: Any, raw: bool, source: str) -> None:
    """Set dotted ``key`` of the dataclass ``obj`` to ``value``, checking name and type."""
    parts = key.split(".")
    target, section = obj, ""
    for depth, part in enumerate(parts):
        hints = _hints(type(target))
        if part not in hints:
            raise _unknown_key(".".join(parts[: depth + 1]), type(target), section, source)
        annotation = hints[part]
        if depth < len(parts) - 1:
            if not dataclasses.is_dataclass(annotation):
                raise InputError(f"{source}: {'.'.join(parts[: depth + 1])} is a value, not a section; cannot set {key!r}")
            target, section = getattr(target, part), ".".join(parts[: depth + 1])
            continue
        if dataclasses.is_dataclass(annotation):
            if raw or not isinstance(value, Mapping):
                keys = ", ".join(f"{key}.{name}" for name in _fields(annotation))
                raise InputError(f"{source}: {key!r} is a section; set its keys instead: {keys}")
            for name, inner in value.items():
                _set(obj, f"{key}.{name}", inner, raw, source)
            return
        try:
            setattr(target, part, _coerce(value, annotation, raw))
        except _Mismatch:
            raise InputError(f"{source}: {key} must be {_type_name(annotation)}, got {value!r}") from None


def from_dict(data: Mapping[str, Any], source: str = "config", cls=None) -> TrainConfig:
    """A :class:`TrainConfig` (or another recipe dataclass ``cls``) from a nested mapping (a parsed YAML file)."""
    if not isinstance(data, Mapping):
        raise InputError(f"{source}: expected a mapping of sections (model:, data:, ...), got {type(data).__name__}")
    config = (cls or TrainConfig)()
    for key, value in data.items():
        _set(config, str(key), value, raw=False, source=source)
    return config


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply ``section.key=value`` strings (values parsed as YAML, typed by the key)."""
    import yaml

    for text in overrides:
        if "=" not in text:
            raise InputError(f"override {text!r}: expected key=value, e.g. optim.lr=5e-4 (valid keys: unicom train --list-keys)")
        key, value = text.split("=", 1)
        key = key.strip()
        annotation = _annotation(key, type(config))
        # Strings stay as written (a brace pattern is not a YAML mapping); other types parse as YAML.
        if annotation is not None and _is_plain_string(annotation):
            parsed: Any = None if value.strip().lower() in ("null", "none", "~") and _optional(annotation) else value
        else:
            try:
                parsed = yaml.safe_load(value) if value.strip() else value
            except yaml.YAMLError:
                parsed = value
        _set(config, key, parsed, raw=isinstance(parsed, str), source=f"override {text!r}")
    return config


def _annotation(key: str, cls=None):
    cls = cls or TrainConfig
    annotation = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = _hints(cls)
        if part not in hints:
            return None
        annotation = cls = hints[part]
    return annotation


def _optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _is_plain_string(annotation) -> bool:
    if annotation is str:
        return True
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and args == [str]


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), cls=None) -> TrainConfig:
    """Read a recipe file (or the defaults when ``path`` is None), apply overrides, validate.

    ``cls``: the recipe dataclass (default :class:`TrainConfig`); it needs a ``validate()`` method.
    """
    import yaml

    data: Any = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: recipe file not found (the recipes shipped with unicom are in configs/)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise InputError(f"{path}: not valid YAML ({error})") from error
        source = str(path)
    config = from_dict(data, source, cls)
    apply_overrides(config, overrides)
    return config.validate()


def default_values(cls=None) -> dict[str, Any]:
    """Every dotted key of a recipe (``cls``, default :class:`TrainConfig`) with its default value."""
    return flatten(dataclasses.asdict((cls or TrainConfig)()))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe dict as ``{"section.key": value}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def to_yaml(config: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)


# -------------------------------------------------------------------- validation


def check(condition: bool, problems: list[str], message: str) -> None:
    """Add ``message`` to ``problems`` when ``condition`` fails (validation reports them all at once)."""
    if not condition:
        problems.append(message)


def validate(config: TrainConfig) -> None:
    """Raise :class:`InputError` listing every value out of range and every bad combination."""
    problems: list[str] = []
    data, loss, optim, schedule, train = config.data, config.loss, config.optim, config.schedule, config.train
    sources = [name for name in ("shards", "folder", "table", "benchmark") if getattr(data, name)]
    check(config.seed >= 0, problems, f"seed must be non-negative, got {config.seed}")
    check(len(sources) == 1, problems,
           f"give exactly one training source among data.shards, data.folder, data.table, data.benchmark (got {sources or 'none'})")
    check(not data.shards or bool(data.labels), problems,
           "data.shards needs data.labels (the `unicom cluster` output folder with labels/labels_<i>.parquet)")
    check(not data.benchmark or bool(data.root), problems, "data.benchmark needs data.root (the benchmark's folder)")
    check(not (data.benchmark and data.labels), problems, "data.labels does not apply to data.benchmark (its labels are its own)")
    check(config.model.name is not None or config.model.init is not None, problems,
           "give model.name (e.g. ViT-B-32) or model.init (weights that fix the architecture)")
    check(data.batch_size >= 1, problems, f"data.batch_size must be at least 1, got {data.batch_size}")
    check(data.workers is None or data.workers >= 0, problems, f"data.workers must be 0 or more, got {data.workers}")
    check(data.shuffle_buffer >= 1, problems, f"data.shuffle_buffer must be at least 1, got {data.shuffle_buffer}")
    check(data.samples_per_epoch is None or data.samples_per_epoch >= 1, problems, "data.samples_per_epoch must be positive")
    augment = config.augment
    check(len(augment.crop_scale) == 2 and 0 < augment.crop_scale[0] <= augment.crop_scale[1] <= 1, problems,
           f"augment.crop_scale must be [low, high] with 0 < low <= high <= 1, got {augment.crop_scale}")
    check(len(augment.crop_ratio) == 2 and 0 < augment.crop_ratio[0] <= augment.crop_ratio[1], problems,
           f"augment.crop_ratio must be [low, high] with 0 < low <= high, got {augment.crop_ratio}")
    for name in ("hflip", "random_erasing"):
        value = getattr(augment, name)
        check(0.0 <= value <= 1.0, problems, f"augment.{name} must be a probability in [0, 1], got {value}")
    check(augment.color_jitter >= 0, problems, f"augment.color_jitter must be non-negative, got {augment.color_jitter}")
    if augment.randaugment is not None:
        check(augment.randaugment.startswith("rand"), problems,
               f"augment.randaugment must be a timm RandAugment string such as rand-m9-mstd0.5-inc1, got {augment.randaugment!r}")
    for name in ("sample_rate", "feature_rate"):
        value = getattr(loss, name)
        check(0.0 < value <= 1.0, problems, f"loss.{name} must be in (0, 1], got {value}")
    check(loss.scale > 0, problems, f"loss.scale must be positive, got {loss.scale}")
    check(loss.margin >= 0, problems, f"loss.margin must be non-negative, got {loss.margin}")
    check(loss.centers >= 1, problems, f"loss.centers must be at least 1, got {loss.centers}")
    check(loss.num_classes is None or loss.num_classes >= 1, problems, "loss.num_classes must be positive")
    check(optim.lr > 0, problems, f"optim.lr must be positive, got {optim.lr}")
    check(optim.weight_decay >= 0, problems, f"optim.weight_decay must be non-negative, got {optim.weight_decay}")
    check(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), problems,
           f"optim.betas must be two numbers in [0, 1), got {optim.betas}")
    check(optim.eps > 0, problems, "optim.eps must be positive")
    check(optim.prototype_lr_scale > 0, problems, "optim.prototype_lr_scale must be positive")
    check(optim.prototype_weight_decay is None or optim.prototype_weight_decay >= 0, problems,
           "optim.prototype_weight_decay must be non-negative")
    check(optim.clip_grad_norm is None or optim.clip_grad_norm > 0, problems, "optim.clip_grad_norm must be positive")
    check(0.0 <= schedule.warmup_fraction < 1.0, problems, f"schedule.warmup_fraction must be in [0, 1), got {schedule.warmup_fraction}")
    check(schedule.warmup_steps is None or schedule.warmup_steps >= 0, problems, "schedule.warmup_steps must be non-negative")
    check(0.0 <= schedule.min_lr_ratio <= 1.0, problems, f"schedule.min_lr_ratio must be in [0, 1], got {schedule.min_lr_ratio}")
    check(schedule.onecycle_div >= 1 and schedule.onecycle_final_div >= 1, problems,
           "schedule.onecycle_div and schedule.onecycle_final_div must be at least 1")
    check(train.steps is not None or train.epochs > 0, problems, f"train.epochs must be positive, got {train.epochs}")
    check(train.steps is None or train.steps >= 1, problems, f"train.steps must be at least 1, got {train.steps}")
    check(train.accumulation >= 1, problems, f"train.accumulation must be at least 1, got {train.accumulation}")
    check(train.max_nonfinite_steps >= 1, problems, "train.max_nonfinite_steps must be at least 1")
    check(config.model.drop_path_rate >= 0 and config.model.drop_path_rate < 1, problems, "model.drop_path_rate must be in [0, 1)")
    check(config.checkpoint.every >= 1, problems, f"checkpoint.every must be at least 1, got {config.checkpoint.every}")
    check(config.checkpoint.keep >= 1, problems, f"checkpoint.keep must be at least 1, got {config.checkpoint.keep}")
    check(config.log.every >= 1, problems, f"log.every must be at least 1, got {config.log.every}")
    check(bool(config.out), problems, "out is required: the folder for checkpoints, logs and the exported model (out=DIR or --out DIR)")
    if problems:
        raise InputError("invalid training config:\n  " + "\n  ".join(problems))


__all__ = [
    "TrainConfig",
    "ModelConfig",
    "DataConfig",
    "AugmentConfig",
    "LossConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainSection",
    "CheckpointConfig",
    "LogConfig",
    "load_config",
    "from_dict",
    "apply_overrides",
    "valid_keys",
    "to_yaml",
    "validate",
]
