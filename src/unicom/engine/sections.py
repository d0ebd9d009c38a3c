"""The recipe sections that ``unicom train`` and ``unicom probe`` share: ``augment``, ``loss``,
``optim``, ``schedule`` and ``log`` (TensorBoard and Weights & Biases).

Each is defined and checked once here (``check`` appends what is wrong to a list of
problems, see :mod:`unicom.engine.recipe`), so a key means the same thing, with the same
default and the same rules, in both recipes. A recipe may give a section other defaults
(``unicom train`` samples 10% of the classes by default, ``unicom probe`` all of them) by
a subclass that changes the default only.

Importing this module does not import torch; the builders import it when called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from unicom.engine.recipe import check
from unicom.losses.heads import HEAD_NAMES, HEAD_OPTIONS, HEADS, MARGIN_GRADIENTS, option_problems


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
    enabled: bool = True  # false: no random augmentation, the short side resized and a centre crop (CLIP's own)

    def check(self, problems: list[str], name: str = "augment") -> None:
        check(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, problems,
              f"{name}.crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}")
        check(len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1], problems,
              f"{name}.crop_ratio must be [low, high] with 0 < low <= high, got {self.crop_ratio}")
        for key in ("hflip", "random_erasing"):
            value = getattr(self, key)
            check(0.0 <= value <= 1.0, problems, f"{name}.{key} must be a probability in [0, 1], got {value}")
        check(self.color_jitter >= 0, problems, f"{name}.color_jitter must be non-negative, got {self.color_jitter}")
        if self.randaugment is not None:
            check(self.randaugment.startswith("rand"), problems,
                  f"{name}.randaugment must be a timm RandAugment string such as rand-m9-mstd0.5-inc1, "
                  f"got {self.randaugment!r}")

    def transform(self, image_size: int, mean=None, std=None):
        """The random training transform at ``image_size``, normalised with ``mean`` and
        ``std`` (default: CLIP's, like the evaluation transform of the CLIP-shaped ViTs).
        Not ``enabled``: the short side resized to ``image_size`` and a centre crop, the
        evaluation transform of the CLIP-shaped ViTs (the public fine-tuning code's
        ``--transform origin_clip``)."""
        from timm.data import create_transform

        from unicom.models.registry import CLIP_MEAN, CLIP_STD

        if not self.enabled:
            from unicom.models.export import build_transform

            return build_transform({
                "size": int(image_size), "resize_mode": "shortest",
                "interpolation": "bicubic" if self.interpolation == "random" else self.interpolation,
                "mean": list(CLIP_MEAN if mean is None else mean), "std": list(CLIP_STD if std is None else std)})

        return create_transform(
            image_size,
            is_training=True,
            scale=tuple(self.crop_scale),
            ratio=tuple(self.crop_ratio),
            hflip=self.hflip,
            color_jitter=self.color_jitter or None,
            auto_augment=self.randaugment,
            re_prob=self.random_erasing,
            re_mode=self.random_erasing_mode,
            interpolation=self.interpolation,
            mean=CLIP_MEAN if mean is None else tuple(mean),
            std=CLIP_STD if std is None else tuple(std),
        )


@dataclass
class LossConfig:
    """The margin head (:mod:`unicom.losses.heads`) inside :class:`unicom.losses.PartialFC`.

    The head's options left unset (null) keep the head's own defaults; an option the head
    does not take is an error.
    """

    head: Literal[HEAD_NAMES] = "arcface"  # a head of the table unicom.losses.heads (arcface, cosface, adaface ...)
    margin: float | None = None  # arcface 0.3, cosface 0.35, li_arcface 0.45, curricularface 0.5, adaface 0.4
    scale: float | None = None  # every head but adacos (64)
    m1: float | None = None  # combined: cos(m1*theta + m2) - m3
    m2: float | None = None
    m3: float | None = None
    m_max: float | None = None  # dynm_arcface (the margins come from the training images per class)
    m_min: float | None = None
    dynamic: bool | None = None  # adacos: adapt the scale every step
    h: float | None = None  # adaface
    t_alpha: float | None = None  # adaface
    momentum: float | None = None  # curricularface
    centers: int = 1  # prototypes per class: k > 1 is sub-center (the max over the k)
    prototype_init: Literal["normal", "xavier"] = "normal"  # N(0, 0.01²), or xavier-uniform over the whole matrix
    sample_rate: float = 1.0  # r1: fraction of the classes in each step's softmax (positives always in)
    feature_rate: float = 1.0  # r2: fraction of the feature dimensions in each step (the same for the batch)
    margin_gradient: Literal[MARGIN_GRADIENTS] = "exact"  # straight_through: d logit/d cos = scale, as the reference code

    def options(self) -> dict[str, Any]:
        """The head's options that are set."""
        return {name: getattr(self, name) for name in HEAD_OPTIONS if getattr(self, name) is not None}

    @property
    def needs_class_counts(self) -> bool:
        """Whether the head needs the training images of every class (DynM-ArcFace)."""
        return "class_counts" in HEADS[self.head].data

    def check(self, problems: list[str], name: str = "loss") -> None:
        for key in ("sample_rate", "feature_rate"):
            value = getattr(self, key)
            check(0.0 < value <= 1.0, problems, f"{name}.{key} must be in (0, 1], got {value}")
        check(self.centers >= 1, problems, f"{name}.centers must be at least 1, got {self.centers}")
        check(self.scale is None or self.scale > 0, problems, f"{name}.scale must be positive, got {self.scale}")
        for key in ("margin", "m_max", "m_min"):
            value = getattr(self, key)
            check(value is None or value >= 0, problems, f"{name}.{key} must be non-negative, got {value}")
        check(self.m1 is None or self.m1 > 0, problems, f"{name}.m1 must be positive, got {self.m1}")
        problems.extend(option_problems(self.head, self.options(), prefix=f"{name}."))

    def margin_head(self, num_classes: int, class_counts=None):
        """The margin head; ``class_counts`` ((K,) training images per class) is needed by
        DynM-ArcFace only."""
        from unicom.losses.heads import build_margin_head

        return build_margin_head(self.head, self.options(), num_classes=num_classes, class_counts=class_counts)

    def partial_fc(self, embedding_size: int, num_classes: int, class_counts=None, seed: int | None = None,
                   sparse_gradient: bool = True):
        """:class:`unicom.losses.PartialFC` over ``num_classes`` prototypes with this section's head and rates."""
        from unicom.losses import PartialFC

        return PartialFC(embedding_size, num_classes, self.margin_head(num_classes, class_counts),
                         sample_rate=self.sample_rate, feature_rate=self.feature_rate, centers=self.centers, seed=seed,
                         sparse_gradient=sparse_gradient, margin_gradient=self.margin_gradient,
                         prototype_init=self.prototype_init)


@dataclass
class OptimConfig:
    """AdamW for the trained module, :class:`unicom.optim.SparseAdamW` for the prototypes.

    ``optimizer: adam`` is Adam with the weight decay added to the gradient (coupled L2)
    on every trainable parameter, biases and prototypes included, as
    ``torch.optim.Adam(model.parameters(), weight_decay=...)`` (the UniFEx code).
    """

    lr: float = 1e-3
    weight_decay: float = 0.05  # adamw: not applied to norms, biases, position embeddings and the class token
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    prototype_lr_scale: float = 1.0  # the prototypes' learning rate is lr times this
    prototype_weight_decay: float | None = None  # default: weight_decay
    clip_grad_norm: float | None = None  # clip the global gradient norm (module and prototypes) to this
    optimizer: Literal["adamw", "adam"] = "adamw"  # adam: coupled L2 on every parameter (the UniFEx code)

    def check(self, problems: list[str], name: str = "optim") -> None:
        check(self.lr > 0, problems, f"{name}.lr must be positive, got {self.lr}")
        check(self.weight_decay >= 0, problems, f"{name}.weight_decay must be non-negative, got {self.weight_decay}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), problems,
              f"{name}.betas must be two numbers in [0, 1), got {self.betas}")
        check(self.eps > 0, problems, f"{name}.eps must be positive")
        check(self.prototype_lr_scale > 0, problems, f"{name}.prototype_lr_scale must be positive")
        check(self.prototype_weight_decay is None or self.prototype_weight_decay >= 0, problems,
              f"{name}.prototype_weight_decay must be non-negative")
        check(self.clip_grad_norm is None or self.clip_grad_norm > 0, problems, f"{name}.clip_grad_norm must be positive")

    def learning_rates(self, factor: float) -> tuple[float, float]:
        """(module, prototypes) learning rates at schedule factor ``factor``."""
        return self.lr * factor, self.lr * self.prototype_lr_scale * factor


@dataclass
class ScheduleConfig:
    """Learning rate over steps: a factor of ``optim.lr`` (:mod:`unicom.engine.schedule`)."""

    kind: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_fraction: float = 0.0  # of all steps; linear warm-up (cosine) or the rising part (onecycle)
    warmup_steps: int | None = None  # overrides warmup_fraction
    warmup_epochs: float | None = None  # overrides warmup_fraction: the warm-up in epochs (UniFEx's warmup_steps: 1)
    warmup_mode: Literal["before", "multiply"] = "before"  # multiply: scales the schedule from step 0 (the UniFEx code)
    min_lr_ratio: float = 0.0  # cosine: the final factor
    onecycle_div: float = 25.0  # onecycle: the start is lr / onecycle_div
    onecycle_final_div: float = 1e4  # onecycle: the end is lr / (onecycle_div * onecycle_final_div)

    def check(self, problems: list[str], name: str = "schedule") -> None:
        check(0.0 <= self.warmup_fraction < 1.0, problems,
              f"{name}.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        check(self.warmup_steps is None or self.warmup_steps >= 0, problems, f"{name}.warmup_steps must be non-negative")
        check(self.warmup_epochs is None or self.warmup_epochs >= 0, problems, f"{name}.warmup_epochs must be non-negative")
        check(self.warmup_steps is None or self.warmup_epochs is None, problems,
              f"give {name}.warmup_steps or {name}.warmup_epochs, not both")
        check(not (self.warmup_mode == "multiply" and self.kind == "onecycle"), problems,
              f"{name}.warmup_mode multiply applies to cosine and constant; onecycle has its own warm-up")
        check(0.0 <= self.min_lr_ratio <= 1.0, problems, f"{name}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.onecycle_div >= 1 and self.onecycle_final_div >= 1, problems,
              f"{name}.onecycle_div and {name}.onecycle_final_div must be at least 1")

    def warmup(self, total: int, steps_per_epoch: int | None = None) -> int:
        """The warm-up length in steps (``steps_per_epoch`` is needed with ``warmup_epochs``)."""
        from unicom.engine.schedule import warmup_steps

        return warmup_steps(total, self.warmup_fraction, self.warmup_steps, self.warmup_epochs, steps_per_epoch)

    def factor(self, step: int, total: int, steps_per_epoch: int | None = None) -> float:
        """The learning-rate factor of optimiser step ``step`` (0-based) of ``total``."""
        from unicom.engine.schedule import lr_factor

        return lr_factor(step, total, self.kind, self.warmup(total, steps_per_epoch), self.min_lr_ratio, self.onecycle_div,
                         self.onecycle_final_div, self.warmup_mode)


@dataclass
class LogConfig:
    """Where a run's scalars go besides ``log.jsonl``: TensorBoard, Weights & Biases
    (:class:`unicom.engine.runlog.RunLog`)."""

    tensorboard: bool = True  # write out/tensorboard (when the tensorboard package is installed)
    wandb: bool = False  # log the run's scalars and its recipe to Weights & Biases (pip install 'unicom[wandb]')
    wandb_project: str | None = None  # the W&B project (default: WANDB_PROJECT, else unicom)
    wandb_name: str | None = None  # the W&B run's name (default: the out folder's)

    def check(self, problems: list[str], name: str = "log") -> None:
        for option, what in (("wandb_project", "the W&B project"), ("wandb_name", "the W&B run")):
            check(self.wandb or getattr(self, option) is None, problems,
                  f"{name}.{option} names {what} of {name}.wandb: set {name}.wandb=true too")

    def wandb_run(self, recipe):
        """The :class:`~unicom.engine.runlog.WandbRun` of ``recipe`` (its config), None without ``wandb``."""
        from unicom.engine.runlog import WandbRun

        return WandbRun(self.wandb_project, self.wandb_name, recipe.to_dict()) if self.wandb else None


__all__ = ["AugmentConfig", "LossConfig", "OptimConfig", "ScheduleConfig", "LogConfig"]
