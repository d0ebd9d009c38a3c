"""``unicom train`` recipes: the sections of a training run and their checks.

A recipe is a YAML mapping of sections (``model``, ``data``, ``augment``, ``loss``,
``optim``, ``schedule``, ``train``, ``checkpoint``, ``log``) plus ``out`` and ``seed``.
Every key has a type and a default (the dataclasses below and the shared sections of
:mod:`unicom.engine.sections` are the reference); the recipe engine
(:mod:`unicom.engine.recipe`) reads files and ``key=value`` overrides and checks every key
and value before anything runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence

from unicom.engine import recipe
from unicom.engine.device import PRECISIONS
from unicom.engine.recipe import Recipe, check, check_local_out
from unicom.engine.sections import AugmentConfig, LogConfig, LossConfig, OptimConfig, ScheduleConfig


@dataclass
class ModelConfig:
    """The network: a name of :func:`unicom.models.vit.model_names` and optional starting weights."""

    name: str | None = "ViT-B-32"  # ViT-B-32/ViT-B-16/ViT-L-14/ViT-L-14-336, a released name (ViT-B/32 ...), or timm/<name>
    init: str | None = None  # released name, released .pt, exported folder, open_clip file, a run/checkpoint; timm/<name>: timm or its state-dict file
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
    # the backend of the attention (F.scaled_dot_product_attention) in the training step; auto: PyTorch's choice
    attention: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"
    sync_batchnorm: bool = True  # BatchNorm statistics over all GPUs (the released architecture's head)
    # open_clip's --lock-image: the network's layer groups (timm's) are not trained but the last
    # model.unlocked_groups (0: the whole trunk; the projection after it is trained)
    lock: bool = False
    unlocked_groups: int = 0
    lock_bn_stats: bool = False  # the locked groups' BatchNorm layers keep their statistics (open_clip's --lock-image-freeze-bn-stats)

    def overrides(self) -> dict[str, Any]:
        names = ("embedding_dim", "image_size", "patch_size", "width", "depth", "heads", "mlp_ratio", "act")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class DataConfig:
    """Training images and their labels. Exactly one of ``shards``, ``folder``, ``table``,
    ``benchmark`` is the source; ``labels`` joins pseudo-labels of ``unicom cluster`` by key."""

    shards: list[str] | None = None  # shards (tars, parquet files holding images): paths, brace patterns, globs or a folder
    labels: str | None = None  # a `unicom cluster` output folder (labels/labels_{i}.parquet)
    folder: str | None = None  # one sub-folder of images per class
    folder_classes: Literal["top", "leaf"] | None = None  # images in sub-sub-folders: the classes are these (default: refuse)
    table: str | None = None  # CSV or parquet list of images
    benchmark: str | None = None  # a retrieval benchmark (sop, inshop, inaturalist, cub, cars196) or imagenet
    root: str | None = None  # the benchmark's folder
    path_column: str = "path"
    label_column: str = "label"
    key_column: str | None = None  # table or parquet shards' column of keys (default: a table's paths as written; a shard's key column, else its row numbers)
    exclude: list[str] | None = None  # tables (parquet/CSV, a key column: unicom dedup's duplicates.parquet) of images left out of a folder, table or benchmark
    image_column: str | None = None  # parquet shards' column of encoded images (default: jpg, jpeg, png, webp or image); tars': the image members' extension
    batch_size: int = 128  # images per rank and micro-step
    workers: int | None = None  # decoding processes per rank (default: 8 on GPU, 0-2 on CPU)
    decode: Literal["auto", "cpu", "gpu"] = "auto"  # JPEGs decoded and cropped on the GPU (auto: on CUDA, plain crop/flip augment)
    shuffle_buffer: int = 2000  # shards: samples held for shuffling, per reader
    samples_per_epoch: int | None = None  # shards: default, the labelled samples of the label files


@dataclass
class TrainLossConfig(LossConfig):
    """The shared ``loss`` section (every margin head of :mod:`unicom.losses.heads`), with the
    paper's default r1 = 0.1 and the number of classes, which the labels give by default."""

    sample_rate: float = 0.1  # r1: fraction of classes per step (positives always included)
    num_classes: int | None = None  # default: from the labels (k of the clustering, or the classes of the list)

    def check(self, problems: list[str], name: str = "loss") -> None:
        super().check(problems, name)
        check(self.num_classes is None or self.num_classes >= 1, problems, f"{name}.num_classes must be positive")


@dataclass
class TrainOptimConfig(OptimConfig):
    """The shared ``optim`` section with layer-wise learning-rate decay for the network."""

    layer_decay: float | None = None  # the rate of layer l of L is lr * layer_decay^(L - l): timm's layers (BEiT's scheme)

    def check(self, problems: list[str], name: str = "optim") -> None:
        super().check(problems, name)
        check(self.layer_decay is None or 0 < self.layer_decay <= 1, problems,
              f"{name}.layer_decay must be in (0, 1], got {self.layer_decay}")
        check(self.layer_decay is None or self.optimizer == "adamw", problems,
              f"{name}.layer_decay applies to {name}.optimizer=adamw")


@dataclass
class TrainSection:
    """Length, precision and numerics."""

    epochs: float = 32.0
    steps: int | None = None  # overrides epochs; 0: export the initial (untrained) network and stop
    accumulation: int = 1  # micro-steps per optimiser step
    precision: Literal[PRECISIONS] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    max_nonfinite_steps: int = 20  # stop after this many consecutive skipped steps
    device: str = "auto"  # auto: this rank's GPU, else the CPU
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    ema: float | None = None  # keep a moving average of the weights at this decay per step (e.g. 0.9998); exported as the model
    ema_warmup: bool = False  # timm's warm-up of the decay (1 - t^(-2/3) at step t, up to train.ema): for short runs
    ema_update_after: int = 0  # the average is a copy of the network through this step, averaging after it (timm's update_after_step)
    ema_min_decay: float = 0.0  # the warm-up's least decay (timm's min_decay)
    ema_warmup_gamma: float = 1.0  # the warm-up's decay at step t: 1 - (1 + t/gamma)^(-power) (timm's warmup_gamma)
    ema_warmup_power: float = 2.0 / 3.0  # (timm's warmup_power)


@dataclass
class TrainEvalConfig:
    """Retrieval on a benchmark while training: every ``every`` steps and at the end, the model
    as it would be exported (the moving average with train.ema) embeds the benchmark and is scored."""

    benchmark: str | list[str] | None = None  # a retrieval benchmark of unicom evaluate (sop, cub, cars196, inshop, ..., folder), or a list of them ([cub, cars196])
    root: str | list[str] | None = None  # its folder (a list: one per benchmark, in their order)
    every: int = 0  # optimiser steps between evaluations (0: at the end only)
    batch_size: int = 64  # images per rank and batch
    workers: int | None = None  # decoding processes per rank (default: as unicom embed)
    keep_best: bool = False  # export OUT/model_best whenever the benchmark's headline metric (several: their mean) beats every earlier evaluation
    metric: str | None = None  # keep_best's and the console line's metric, of every benchmark (default: each one's headline, recall@1, map_medium...)

    def benchmarks(self) -> list[tuple[str, str]]:
        """The benchmarks to score, in order, each with its folder: ``[("cub", "data/cub"), ...]``."""
        return list(zip(*self._lists()))

    def _lists(self) -> tuple[list[str], list[str]]:
        names, roots = (value if isinstance(value, list) else [value] if value else []
                        for value in (self.benchmark, self.root))
        return names, roots

    def check(self, problems: list[str], name: str = "eval") -> None:
        check(bool(self.benchmark) == bool(self.root), problems,
              f"give {name}.benchmark and {name}.root (the benchmark's folder) together")
        names, roots = self._lists()
        if names and roots:
            check(len(names) == len(roots), problems,
                  f"{name}.benchmark names {len(names)} benchmark(s) and {name}.root {len(roots)} folder(s): give "
                  f"one folder per benchmark, in the same order ({name}.benchmark=[cub,cars196] "
                  f"{name}.root=[data/cub,data/cars196])")
            from unicom.data.benchmarks import canonical_name

            canonical = [canonical_name(bench) for bench in names]  # cars and cars196 are one benchmark
            repeated = sorted({bench for bench in canonical if canonical.count(bench) > 1})
            check(not repeated, problems, f"{name}.benchmark names {', '.join(repeated)} more than once: its scores "
                  "are logged under its name; give each benchmark once")
        check(self.every >= 0, problems, f"{name}.every must be 0 or more, got {self.every}")
        check(self.batch_size >= 1, problems, f"{name}.batch_size must be at least 1, got {self.batch_size}")
        check(self.workers is None or self.workers >= 0, problems, f"{name}.workers must be 0 or more, got {self.workers}")
        check(self.benchmark or not self.keep_best, problems, f"{name}.keep_best keeps the best of the evaluations: "
              f"give {name}.benchmark and {name}.root")
        check(self.benchmark or self.metric is None, problems, f"{name}.metric is a metric of {name}.benchmark: "
              f"give {name}.benchmark and {name}.root")


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep: int = 3  # checkpoints kept (the newest)
    resume: str = "auto"  # auto: the newest valid checkpoint of `out`, if any; never; or a checkpoint folder
    # keep: a resumed run keeps the checkpoint's images per step (global batch) on any number of ranks by
    # changing train.accumulation, and refuses when no whole accumulation does; change: the recipe's batch as given
    resume_batch: Literal["keep", "change"] = "keep"


@dataclass
class TrainLogConfig(LogConfig):
    every: int = 50  # steps between log lines

    def check(self, problems: list[str], name: str = "log") -> None:
        super().check(problems, name)
        check(self.every >= 1, problems, f"{name}.every must be at least 1, got {self.every}")


@dataclass
class TrainConfig(Recipe):
    """A whole ``unicom train`` recipe."""

    command: ClassVar[str] = "unicom train"
    kind: ClassVar[str] = "training"

    out: str | None = None  # output folder: checkpoints, logs, the exported model
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: TrainLossConfig = field(default_factory=TrainLossConfig)
    optim: TrainOptimConfig = field(default_factory=TrainOptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: TrainLogConfig = field(default_factory=TrainLogConfig)

    def check(self, problems: list[str]) -> None:
        """The keys and combinations that the shared sections do not check."""
        data, train = self.data, self.train
        sources = [name for name in ("shards", "folder", "table", "benchmark") if getattr(data, name)]
        check(self.seed >= 0, problems, f"seed must be non-negative, got {self.seed}")
        check_local_out(self.out, problems, "the data")
        check(len(sources) == 1, problems,
              f"give exactly one training source among data.shards, data.folder, data.table, data.benchmark (got {sources or 'none'})")
        check(not data.shards or bool(data.labels), problems,
              "data.shards needs data.labels (the `unicom cluster` output folder with labels/labels_<i>.parquet)")
        check(not data.image_column or bool(data.shards), problems,
              "data.image_column names the column of encoded images of data.shards (of tar shards, the extension of "
              "their image members); a data.table names its image files in data.path_column")
        check(not (data.shards and data.exclude), problems,
              "data.exclude leaves images of a folder, table or benchmark out; the samples of data.shards are left out "
              "where they are labelled: unicom cluster --exclude TABLE (a sample without a label is not trained on)")
        check(not data.benchmark or bool(data.root), problems, "data.benchmark needs data.root (the benchmark's folder)")
        check(not (data.benchmark and data.labels), problems, "data.labels does not apply to data.benchmark (its labels are its own)")
        check(self.model.name is not None or self.model.init is not None, problems,
              "give model.name (e.g. ViT-B-32) or model.init (weights that fix the architecture)")
        check(data.batch_size >= 1, problems, f"data.batch_size must be at least 1, got {data.batch_size}")
        check(data.workers is None or data.workers >= 0, problems, f"data.workers must be 0 or more, got {data.workers}")
        check(data.shuffle_buffer >= 1, problems, f"data.shuffle_buffer must be at least 1, got {data.shuffle_buffer}")
        check(data.samples_per_epoch is None or data.samples_per_epoch >= 1, problems, "data.samples_per_epoch must be positive")
        check(train.steps is not None or train.epochs > 0, problems, f"train.epochs must be positive, got {train.epochs}")
        check(train.steps is None or train.steps >= 0, problems, f"train.steps must be 0 or more, got {train.steps}")
        check(train.accumulation >= 1, problems, f"train.accumulation must be at least 1, got {train.accumulation}")
        check(train.max_nonfinite_steps >= 1, problems, "train.max_nonfinite_steps must be at least 1")
        check(train.ema is None or 0 < train.ema < 1, problems, f"train.ema must be in (0, 1), got {train.ema}")
        check(train.ema is not None or not train.ema_warmup, problems, "train.ema_warmup warms up train.ema: set it too")
        check(train.ema is not None or not train.ema_update_after, problems,
              "train.ema_update_after delays train.ema: set it too")
        check(train.ema_update_after >= 0, problems, f"train.ema_update_after must be 0 or more, got {train.ema_update_after}")
        defaults = TrainSection()
        changed = [key for key in ("ema_min_decay", "ema_warmup_gamma", "ema_warmup_power")
                   if getattr(train, key) != getattr(defaults, key)]
        check(train.ema_warmup or not changed, problems,
              f"{', '.join('train.' + key for key in changed)} shape{'s' if len(changed) == 1 else ''} the warm-up of "
              "train.ema: set train.ema_warmup=true too")
        check(train.ema is None or 0 <= train.ema_min_decay <= train.ema, problems,
              f"train.ema_min_decay must be in [0, train.ema], got {train.ema_min_decay}")
        check(train.ema_warmup_gamma > 0 and train.ema_warmup_power > 0, problems,
              f"train.ema_warmup_gamma and train.ema_warmup_power must be above 0, got {train.ema_warmup_gamma} "
              f"and {train.ema_warmup_power}")
        check(0 <= self.model.drop_path_rate < 1, problems, "model.drop_path_rate must be in [0, 1)")
        check(self.model.unlocked_groups >= 0, problems, f"model.unlocked_groups must be 0 or more, got {self.model.unlocked_groups}")
        check(self.model.lock or not (self.model.unlocked_groups or self.model.lock_bn_stats), problems,
              "model.unlocked_groups and model.lock_bn_stats apply to a locked network: set model.lock=true too")
        check(self.checkpoint.every >= 1, problems, f"checkpoint.every must be at least 1, got {self.checkpoint.every}")
        check(self.checkpoint.keep >= 1, problems, f"checkpoint.keep must be at least 1, got {self.checkpoint.keep}")
        check(bool(self.out), problems, "out is required: the folder for checkpoints, logs and the exported model (out=DIR or --out DIR)")


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), validate: bool = True) -> TrainConfig:
    """Read a training recipe (a file, or a shipped recipe's name; the defaults when ``path`` is None), apply ``key=value`` overrides, validate."""
    return recipe.load(TrainConfig, path, overrides, validate)


def from_dict(data, source: str = "config") -> TrainConfig:
    """A :class:`TrainConfig` from a nested mapping (a parsed YAML file), not yet validated."""
    return recipe.from_dict(TrainConfig, data, source)


def default_values() -> dict[str, Any]:
    """Every dotted key of a training recipe with its default value."""
    return recipe.default_values(TrainConfig)


apply_overrides = recipe.apply_overrides
to_yaml = recipe.to_yaml


__all__ = [
    "TrainConfig", "ModelConfig", "DataConfig", "AugmentConfig", "TrainLossConfig", "OptimConfig", "TrainOptimConfig", "ScheduleConfig",
    "TrainSection", "CheckpointConfig", "TrainLogConfig", "load_config", "from_dict", "default_values", "apply_overrides",
    "to_yaml",
]
