"""Learning-rate schedules as pure functions of the step (nothing to save but the step).

``lr_factor(step, total, ...)`` multiplies ``optim.lr`` (and the prototypes' scaled lr) for
optimiser step ``step`` (0-based, the step about to be taken):

* ``cosine``: linear warm-up from 0 over ``warmup`` steps (the first step uses 1/warmup),
  then a half cosine from 1 down to ``min_ratio`` at the last step;
* ``onecycle``: as ``torch.optim.lr_scheduler.OneCycleLR`` with cosine annealing: from
  ``1/div`` up to 1 over ``warmup`` steps, then down to ``1/(div · final_div)`` at the last step;
* ``constant``: 1 after the linear warm-up.

With ``warmup_mode="multiply"`` (cosine and constant) the warm-up does not come before the
schedule but multiplies it from step 0: the factor is ``min(1, (step+1)/warmup)`` times a
cosine over all ``total`` steps, ``min_ratio + (1 - min_ratio)(1 + cos(pi step/total))/2``,
which is ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total)`` dampened by
pytorch_warmup's ``LinearWarmup`` (the UniFEx code's schedule).
"""

from __future__ import annotations

import math


def _cosine(start: float, end: float, progress: float) -> float:
    """From ``start`` (progress 0) to ``end`` (progress 1) along half a cosine."""
    return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0


def lr_factor(
    step: int,
    total: int,
    kind: str = "cosine",
    warmup: int = 0,
    min_ratio: float = 0.0,
    div: float = 25.0,
    final_div: float = 1e4,
    warmup_mode: str = "before",
) -> float:
    """The learning-rate factor of optimiser step ``step`` of ``total`` (module docstring)."""
    if total < 1:
        raise ValueError(f"total steps must be positive, got {total}")
    step = min(max(step, 0), total - 1)
    if warmup_mode == "multiply":
        if kind == "onecycle":
            raise ValueError("onecycle has its own warm-up; warmup_mode multiply applies to cosine and constant")
        dampening = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        schedule = 1.0 if kind == "constant" else _cosine(1.0, min_ratio, step / total)
        return dampening * schedule
    warmup = min(max(warmup, 0), total - 1)
    if kind == "onecycle":
        start, end = 1.0 / div, 1.0 / (div * final_div)
        if step < warmup:
            return _cosine(start, 1.0, step / warmup)
        return _cosine(1.0, end, (step - warmup) / max(total - 1 - warmup, 1))
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        return _cosine(1.0, min_ratio, (step - warmup) / max(total - 1 - warmup, 1))
    raise ValueError(f"unknown schedule {kind!r}; choose cosine, onecycle or constant")


def warmup_steps(total: int, fraction: float, steps: int | None, epochs: float | None = None,
                 steps_per_epoch: int | None = None) -> int:
    """Warm-up length: ``steps`` when given, else ``round(epochs · steps_per_epoch)`` when
    ``epochs`` is given, else ``round(fraction · total)``."""
    if steps is not None:
        return int(steps)
    if epochs is not None:
        if steps_per_epoch is None:
            raise ValueError("a warm-up in epochs needs the number of steps per epoch")
        return int(round(epochs * steps_per_epoch))
    return int(round(fraction * total))
