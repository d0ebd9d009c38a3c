"""Margin functions: cosines of (embedding, prototype) pairs -> scaled logits.

Every head is called as ``head(cosines, labels) -> logits``:

* ``cosines``: (B, C) cosine similarities, any float dtype;
* ``labels``: (B,) int64, the column of each row's target class in ``cosines``, or -1 when
  the row's class is not among the columns (it lives on another shard of a
  :class:`~unicom.losses.PartialFC`);
* ``logits``: (B, C) float32 (float64 if the cosines are float64), ready for a softmax.

Heads that need more than the cosines (the global class ids, the embedding norms, the
target cosine of rows whose target lives on another shard) receive a
:class:`MarginContext` as a third argument from ``PartialFC``; called directly, they build
one from the arguments (a single shard holding every class).

This module is the one implementation of the margin mathematics in the project.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class MarginContext:
    """What a margin head may need beyond ``(cosines, labels)``.

    Attributes:
        class_ids: (B,) int64 global class of every row (the softmax's target class).
        column_classes: (C,) int64 global class of every column of ``cosines``.
        norms: (B,) float, the L2 norms of the embeddings before normalisation (AdaFace).
        group: the process group over which the columns are sharded (None: one shard).
        world_size: number of shards.
        all_targets_local: every row's target is among the columns (no label is -1), as with
            one shard: the masks for rows without a target are skipped (fewer operations).
    """

    class_ids: torch.Tensor
    column_classes: torch.Tensor
    norms: torch.Tensor | None = None
    group: Any = None
    world_size: int = 1
    all_targets_local: bool = False

    def target_cosine(self, cosines: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,) the cosine of each row with its target prototype, gathered over the shards."""
        value = torch.where(labels >= 0, target_entries(cosines, labels).detach(), 0.0)
        if self.world_size > 1:
            dist.all_reduce(value, group=self.group)
        return value

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the shards in place (no-op with one shard)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor


def target_index(labels: torch.Tensor, all_local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, columns)`` that index each row's target entry, column 0 for rows whose label
    is -1 (made once per step and passed to :func:`target_entries` and :func:`set_target_entries`).
    ``all_local``: no label is -1 (:attr:`MarginContext.all_targets_local`)."""
    return torch.arange(labels.shape[0], device=labels.device), labels if all_local else labels.clamp_min(0)


def target_entries(values: torch.Tensor, labels: torch.Tensor, index=None) -> torch.Tensor:
    """(B,) ``values[i, labels[i]]``, with column 0 for rows whose label is -1.

    Every row is read and the caller masks the rows without a target: selecting the rows
    first would give a data-dependent size, which makes the host wait for a GPU. (Integer
    indexing rather than ``gather``, whose backward would keep ``values`` and so forbid
    writing into it afterwards.) ``index``: :func:`target_index` of ``labels`` when made already.
    """
    return values[index if index is not None else target_index(labels)]


def set_target_entries(values: torch.Tensor, labels: torch.Tensor, entries: torch.Tensor, index=None,
                       all_local: bool = False) -> torch.Tensor:
    """``values[i, labels[i]] = entries[i]`` in place for the rows with a target (label >= 0).
    ``all_local``: no label is -1, every row is written."""
    index = index if index is not None else target_index(labels, all_local)
    return values.index_put_(index, entries if all_local else torch.where(labels >= 0, entries, values[index]))


def local_context(cosines: torch.Tensor, labels: torch.Tensor) -> MarginContext:
    """The context of a call without ``PartialFC``: one shard holds every class."""
    columns = torch.arange(cosines.shape[1], device=cosines.device)
    return MarginContext(class_ids=labels.clamp_min(0), column_classes=columns)


def _float_logits(cosines: torch.Tensor) -> torch.Tensor:
    """A float32 (or float64) copy of ``cosines`` that may be modified in place."""
    dtype = torch.float64 if cosines.dtype == torch.float64 else torch.float32
    return cosines.to(dtype, copy=True)


class MarginHead(nn.Module):
    """Base class: subclasses implement :meth:`target_logit` (and may override ``forward``).

    The default ``forward`` replaces the target entry of every row that has one by
    ``target_logit(cos_target, rows)`` and multiplies all logits by ``scale``. Its backward
    (:class:`_TargetMargin`) is two passes over the (B, C) logits whatever ``target_logit``
    computes; a head with trainable parameters is differentiated by autograd throughout.
    """

    scale: float
    uses_norms = False  # reads MarginContext.norms (PartialFC computes them only for such heads)

    def target_logit(self, cos_target: torch.Tensor, rows: torch.Tensor, context: MarginContext) -> torch.Tensor:
        raise NotImplementedError

    def target_logit_and_slope(self, cos_target: torch.Tensor, rows: torch.Tensor, context: MarginContext):
        """``(target_logit(...), d target_logit / d cos_target)`` with the slope written out, a
        (B,) tensor or a float, for heads that have it in closed form; None (the default):
        the backward differentiates :meth:`target_logit` with autograd."""
        return None

    def forward(self, cosines: torch.Tensor, labels: torch.Tensor, context: MarginContext | None = None) -> torch.Tensor:
        if context is None:
            context = local_context(cosines, labels)
        if (torch.is_grad_enabled() and cosines.requires_grad
                and not any(p.requires_grad for p in self.parameters())):
            return _TargetMargin.apply(cosines, labels, self, context)
        return _margin_logits(self, cosines, labels, context)[0]


def _margin_logits(head: MarginHead, cosines: torch.Tensor, labels: torch.Tensor, context: MarginContext,
                   separate: bool = False):
    """``(logits, index, slope)``: the float logits of ``cosines`` with every target entry
    replaced by ``head.target_logit`` of it, times the head's scale. ``separate`` (for
    :class:`_TargetMargin`'s backward): the target logits are computed without ``cosines``'
    graph, and ``slope`` is their derivative in the target cosines: the head's closed form
    (:meth:`MarginHead.target_logit_and_slope`), else ``(target, cos_target)``, a graph of
    their own from a detached leaf for autograd. Without ``separate``, ``slope`` is None."""
    all_local = context.all_targets_local
    logits = _float_logits(cosines)
    index = target_index(labels, all_local)  # rows without a target are computed and dropped
    cos_target = target_entries(logits, labels, index)
    slope = None
    if separate:
        slope = head.target_logit_and_slope(cos_target, index[0], context) if _closed_form(type(head)) else None
        if slope is not None:
            entries, slope = slope
        else:
            cos_target = cos_target.detach().requires_grad_()
            with torch.enable_grad():
                target = head.target_logit(cos_target, index[0], context)
            entries, slope = target.detach(), (target, cos_target)
    else:
        entries = head.target_logit(cos_target, index[0], context)
    set_target_entries(logits, labels, entries, index, all_local)
    # in place: the (B, C) logits are the largest tensors of the step
    return logits.mul_(head.scale), index, slope


@functools.lru_cache(maxsize=None)
def _closed_form(head_class: type) -> bool:
    """Whether ``head_class``'s :meth:`~MarginHead.target_logit_and_slope` belongs to its
    ``target_logit``: defined by the same class or a subclass of it. (A subclass that
    overrides only ``target_logit`` is differentiated by autograd, not by its parent's slope.)"""
    owner = {name: next(c for c in head_class.__mro__ if name in c.__dict__)
             for name in ("target_logit", "target_logit_and_slope")}
    return issubclass(owner["target_logit_and_slope"], owner["target_logit"])


class _TargetMargin(torch.autograd.Function):
    """:meth:`MarginHead.forward` with a backward of two passes over the (B, C) logits: the
    incoming gradient times ``scale``, and each row's target entry replaced by that entry
    times d target_logit / d cos (the head's closed form, or autograd over the (B,) target
    cosines alone). Autograd through the forward's indexing and in-place write would add a
    zero-filled (B, C) tensor and three more passes over the logits; the gradient is the same."""

    @staticmethod
    def forward(ctx, cosines, labels, head, context):
        logits, index, ctx.slope = _margin_logits(head, cosines, labels, context, separate=True)
        ctx.index, ctx.scale, ctx.all_local, ctx.dtype = index, head.scale, context.all_targets_local, cosines.dtype
        ctx.save_for_backward(labels)
        return logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (labels,) = ctx.saved_tensors
        grad = grad * ctx.scale
        if isinstance(ctx.slope, tuple):
            target, cos_target = ctx.slope
            # the (B,) graph is kept as long as this node: a backward may run again (retain_graph)
            (target_grad,) = torch.autograd.grad(target, cos_target, grad[ctx.index], retain_graph=True)
        elif isinstance(ctx.slope, float) and ctx.slope == 1.0:  # the target entries keep s · grad
            return grad.to(ctx.dtype), None, None, None
        else:
            target_grad = grad[ctx.index] * ctx.slope
        set_target_entries(grad, labels, target_grad.to(grad.dtype), ctx.index, ctx.all_local)
        return grad.to(ctx.dtype), None, None, None


class _ScaledIdentityGradient(torch.autograd.Function):
    """Forward: ``logits`` as computed (without a graph) by a head; backward: ``scale`` times
    the incoming gradient, to ``cosines``: d logit / d cos = s for every entry."""

    @staticmethod
    def forward(ctx, cosines, logits, scale):
        ctx.scale, ctx.dtype = scale, cosines.dtype
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        return (grad * ctx.scale).to(ctx.dtype), None, None


def straight_through(head: nn.Module, cosines: torch.Tensor, labels: torch.Tensor,
                     context: MarginContext | None = None) -> torch.Tensor:
    """``head(cosines, labels, context)`` with the margin treated as a constant in the backward.

    The forward values are the head's own, bit for bit. The gradient treats every logit as
    ``s · cos`` (s the head's scale after the call: AdaCos may update it): d logit / d cos
    = s for the target and every other column alike. This is what the reference Partial FC
    code does when it applies the ArcFace margin in place under ``torch.no_grad()``; the
    exact gradient (the head called directly) also differentiates the margin function,
    e.g. d s·cos(θ + m) / d cos θ = s · sin(θ + m) / sin θ for the target of ArcFace.
    Nothing of the head's computation is kept for the backward.
    """
    with torch.no_grad():
        logits = head(cosines, labels, context)
    return _ScaledIdentityGradient.apply(cosines, logits, float(head.scale))


_ACOS_MARGIN = {torch.float32: 1e-7, torch.float64: 1e-12}


def _acos_margin(cos: torch.Tensor) -> float:
    """How far inside ±1 cosines are clamped before acos (float64 cosines: 1e-12, others 1e-7)."""
    return _ACOS_MARGIN[torch.float64 if cos.dtype == torch.float64 else torch.float32]


def _inside_acos(cos: torch.Tensor) -> torch.Tensor:
    # acos has an infinite derivative at +-1; keep strictly inside
    eps = _acos_margin(cos)
    return cos.clamp(-1.0 + eps, 1.0 - eps)


def _angle(cos: torch.Tensor) -> torch.Tensor:
    return torch.acos(_inside_acos(cos))


def angular_margin(cos_target: torch.Tensor, m1: float, m2, m3: float = 0.0, slope: bool = False):
    """cos(m1·θ + m2) − m3 with θ = arccos(cos_target); ``m2`` a float or a per-row tensor.

    Where m1·θ + m2 > π the value falls back to cos θ − m3 − m2·sin(m2), the monotonic
    continuation used by ArcFace implementations, so a worse angle never scores better.
    ``slope``: return ``(value, d value / d cos_target)``, autograd's derivative written out:
    m1 · sin(m1·θ + m2) / sin θ, 0 where the cosine is clamped away from ±1 (θ constant there;
    at the clamp's bounds too, as autograd's derivative of a clamp), 1 in the fallback.
    """
    inside = _inside_acos(cos_target)
    # (m1 = 1 and m3 = 0, ArcFace's, are exact no-ops and skipped: fewer kernels per step)
    angle = torch.acos(inside) if m1 == 1.0 else m1 * torch.acos(inside)
    angle = angle + m2
    shifted = cos_target if m3 == 0.0 else cos_target - m3
    fallback = shifted - m2 * (torch.sin(m2) if torch.is_tensor(m2) else math.sin(m2))
    cos = torch.cos(angle)
    below_pi = angle <= math.pi
    value = torch.where(below_pi, cos if m3 == 0.0 else cos - m3, fallback)
    if not slope:
        return value
    # d cos(angle) / d cos θ = sin(angle) · m1 / sqrt(1 − cos² θ), in the order of autograd's operations
    derivative = torch.sin(angle) * (1 - inside * inside).rsqrt()
    if m1 != 1.0:
        derivative = derivative * m1
    derivative = torch.where(cos_target.abs() < 1.0 - _acos_margin(cos_target), derivative, 0.0)  # as autograd's clamp: 0 at its bounds
    return value, torch.where(below_pi, derivative, 1.0)


class CombinedMargin(MarginHead):
    """cos(m1·θ + m2) − m3 on the target class, logits scaled by ``scale``.

    ``m1=1, m2=m, m3=0`` is ArcFace, ``m1=1, m2=0, m3=m`` is CosFace. Where the angle
    m1·θ + m2 would pass π (so that cos would rise again and the loss reward a worse
    angle), the target logit falls back to cos θ − m3 − m2·sin(m2), the standard
    monotonic continuation of ArcFace implementations.
    """

    def __init__(self, m1: float = 1.0, m2: float = 0.3, m3: float = 0.0, scale: float = 64.0):
        super().__init__()
        if m1 <= 0:
            raise ValueError(f"m1 must be positive, got {m1}")
        self.m1, self.m2, self.m3, self.scale = float(m1), float(m2), float(m3), float(scale)

    def target_logit(self, cos_target, rows, context):
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos_target - self.m3
        return angular_margin(cos_target, self.m1, self.m2, self.m3)

    def target_logit_and_slope(self, cos_target, rows, context):
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos_target - self.m3, 1.0
        return angular_margin(cos_target, self.m1, self.m2, self.m3, slope=True)

    def extra_repr(self) -> str:
        return f"m1={self.m1}, m2={self.m2}, m3={self.m3}, scale={self.scale}"


def fused_softmax_margin(head: nn.Module) -> dict | None:
    """The margin of ``head`` as the fused margin softmax kernel takes it
    (:func:`unicom.kernels.margin_softmax_forward`), or None when the kernel does not compute
    this head: it computes :class:`CombinedMargin`, :class:`ArcFace` and :class:`CosFace` with
    m1 = 1 and 0 <= m2 < π (cos(θ + m2) from the cosine, without the angle) on float32 logits."""
    if type(head) not in (CombinedMargin, ArcFace, CosFace) or head.m1 != 1.0 or not 0.0 <= head.m2 < math.pi:
        return None
    eps, m2, m3 = _ACOS_MARGIN[torch.float32], head.m2, head.m3
    return {"angular": m2 != 0.0,
            "values": {"scale": head.scale, "lower": -1.0 + eps, "upper": 1.0 - eps, "cos_m": math.cos(m2),
                       "sin_m": math.sin(m2), "floor": -math.cos(m2), "m3": m3, "fallback_shift": m3 + m2 * math.sin(m2)}}


class ArcFace(CombinedMargin):
    """Additive angular margin: cos(θ + margin) on the target class (Deng et al. 2019)."""

    def __init__(self, margin: float = 0.3, scale: float = 64.0):
        super().__init__(m1=1.0, m2=margin, m3=0.0, scale=scale)
        self.margin = float(margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, scale={self.scale}"


class CosFace(CombinedMargin):
    """Additive cosine margin: cos θ − margin on the target class (Wang et al. 2018)."""

    def __init__(self, margin: float = 0.35, scale: float = 64.0):
        super().__init__(m1=1.0, m2=0.0, m3=margin, scale=scale)
        self.margin = float(margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, scale={self.scale}"


class DynMArcFace(MarginHead):
    """ArcFace with a margin per class that grows as the class gets rarer.

    m(n) = m_min + ½ (m_max − m_min) (1 + cos(π · n̂)), n̂ = (n − n_min) / (n_max − n_min)
    the min-max normalised training count of the class: the rarest class gets m_max, the
    most frequent m_min (n̂ = 0 for all when every class has the same count).

    Args:
        class_counts: (K,) number of training samples of each class.
    """

    def __init__(self, class_counts, m_max: float = 0.6, m_min: float = 0.2, scale: float = 64.0):
        super().__init__()
        counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
        if counts.numel() == 0 or bool((counts < 0).any()):
            raise ValueError("class_counts must be a non-empty vector of non-negative counts")
        spread = counts.max() - counts.min()
        normalised = (counts - counts.min()) / spread if spread > 0 else torch.zeros_like(counts)
        margins = m_min + 0.5 * (m_max - m_min) * (1 + torch.cos(math.pi * normalised))
        self.register_buffer("margins", margins.float())
        self.m_max, self.m_min, self.scale = float(m_max), float(m_min), float(scale)

    def target_logit(self, cos_target, rows, context):
        return angular_margin(cos_target, 1.0, self._row_margins(cos_target, rows, context))

    def target_logit_and_slope(self, cos_target, rows, context):
        return angular_margin(cos_target, 1.0, self._row_margins(cos_target, rows, context), slope=True)

    def _row_margins(self, cos_target, rows, context):
        return self.margins[context.class_ids[rows]].to(cos_target.dtype)

    def extra_repr(self) -> str:
        return f"classes={self.margins.numel()}, m_max={self.m_max}, m_min={self.m_min}, scale={self.scale}"


class AdaCos(MarginHead):
    """No margin; an adaptive scale (Zhang et al. 2019).

    Fixed: s = √2 · ln(K − 1). Dynamic (default): every training step, before the logits,

        B_avg = mean over rows of Σ_{j ≠ y} exp(s · cos θ_j)   (over the columns in use)
        s ← ln(B_avg) / cos(min(π/4, median of the target angles θ_y))

    With PartialFC the sums and the target angles are gathered over the shards; with
    sample_rate < 1 the non-target sum runs over the sampled classes only.

    Args:
        num_classes: K.
    """

    def __init__(self, num_classes: int, dynamic: bool = True):
        super().__init__()
        if num_classes < 2:
            raise ValueError("AdaCos needs at least 2 classes")
        self.num_classes, self.dynamic = int(num_classes), bool(dynamic)
        self.register_buffer("scale_value", torch.tensor(math.sqrt(2.0) * math.log(num_classes - 1), dtype=torch.float64))

    @property
    def scale(self) -> float:
        return float(self.scale_value)

    def forward(self, cosines, labels, context=None):
        if context is None:
            context = local_context(cosines, labels)
        logits = _float_logits(cosines)
        if self.dynamic and self.training:
            with torch.no_grad():
                target = context.target_cosine(logits, labels)
                has_target = labels >= 0
                # in float64: exp(s · cos) passes float32's largest value from s · cos ≈ 89 on
                exp = torch.exp(self.scale_value * logits.double())
                non_target = exp.sum(dim=1) - torch.where(has_target, target_entries(exp, labels), 0.0)
                b_avg = context.all_reduce_sum(non_target).mean()
                theta_median = torch.median(_angle(target)).double()
                scale = torch.log(b_avg) / torch.cos(theta_median.clamp(max=math.pi / 4))
                # a non-finite scale (a batch of non-finite cosines) would make every later step non-finite
                self.scale_value.copy_(torch.where(torch.isfinite(scale), scale, self.scale_value))
        return logits.mul_(self.scale_value.to(logits.dtype))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dynamic={self.dynamic}, scale={self.scale:.4f}"


class LiArcFace(MarginHead):
    """Linear angular logits (Li et al. 2019, "AirFace"): s · (π − 2(θ + m·[j = y])) / π.

    Every logit is a linear function of its angle, so no fallback is needed past π.
    """

    def __init__(self, margin: float = 0.45, scale: float = 64.0):
        super().__init__()
        self.margin, self.scale = float(margin), float(scale)

    def forward(self, cosines, labels, context=None):
        angles = _angle(_float_logits(cosines))
        index = target_index(labels)
        set_target_entries(angles, labels, target_entries(angles, labels, index) + self.margin, index)
        return self.scale * (math.pi - 2 * angles) / math.pi

    def extra_repr(self) -> str:
        return f"margin={self.margin}, scale={self.scale}"


class CurricularFace(MarginHead):
    """ArcFace target with adaptively weighted hard negatives (Huang et al. 2020).

    Target: cos(θ_y + m) (ArcFace fallback past π). A negative j of row i is hard when
    cos θ_ij > cos(θ_iy + m); its logit becomes cos θ_ij · (t + cos θ_ij). ``t`` follows the
    mean target cosine: t ← 0.01 · mean_i cos θ_iy + 0.99 · t (a buffer, updated in
    training, gathered over the shards with PartialFC).
    """

    def __init__(self, margin: float = 0.5, scale: float = 64.0, momentum: float = 0.01):
        super().__init__()
        self.margin, self.scale, self.momentum = float(margin), float(scale), float(momentum)
        self.register_buffer("t", torch.zeros(()))

    def forward(self, cosines, labels, context=None):
        if context is None:
            context = local_context(cosines, labels)
        logits = _float_logits(cosines)
        with torch.no_grad():
            target = context.target_cosine(logits, labels)  # every row, whichever shard holds it
            if self.training:
                self.t.mul_(1 - self.momentum).add_(self.momentum * target.mean().to(self.t.dtype))
        target_with_margin = angular_margin(target, 1.0, self.margin)
        hard = logits > target_with_margin[:, None]
        t = self.t.to(logits.dtype)
        logits = torch.where(hard, logits * (t + logits), logits)
        index = target_index(labels)
        set_target_entries(logits, labels, angular_margin(target_entries(cosines, labels, index).to(logits.dtype), 1.0,
                                                          self.margin), index)
        return logits.mul_(self.scale)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, scale={self.scale}, t={float(self.t):.4f}"


class AdaFace(MarginHead):
    """Margin adapted to image quality through the embedding norm (Kim et al. 2022).

    With the norms ‖z_i‖ (clipped to [0.001, 100]) and running batch statistics μ, σ
    (μ ← α·mean + (1 − α)·μ, σ ← α·std + (1 − α)·σ in training; α = ``t_alpha``):

        ĝ_i = clip(h · (‖z_i‖ − μ) / (σ + 1e-3), −1, 1)
        target logit = cos(clip(θ_y − m·ĝ_i, ε, π − ε)) − (m + m·ĝ_i)

    Non-target logits are s · cos θ. The norms come from ``PartialFC`` (the context); called
    directly, pass a :class:`MarginContext` with ``norms``.
    """

    uses_norms = True

    def __init__(self, margin: float = 0.4, h: float = 0.333, scale: float = 64.0, t_alpha: float = 0.01):
        super().__init__()
        self.margin, self.h, self.scale, self.t_alpha = float(margin), float(h), float(scale), float(t_alpha)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def target_logit(self, cos_target, rows, context):
        if context.norms is None:
            raise ValueError("AdaFace needs the embedding norms: use it inside PartialFC or pass a MarginContext with norms")
        norms = context.norms[rows].to(cos_target.dtype).clamp(0.001, 100)
        margin_scaler = ((norms - self.batch_mean) / (self.batch_std + 1e-3) * self.h).clamp(-1, 1)
        eps = 1e-7 if cos_target.dtype == torch.float32 else 1e-12
        theta = (_angle(cos_target) - self.margin * margin_scaler).clamp(eps, math.pi - eps)
        return torch.cos(theta) - (self.margin + self.margin * margin_scaler)

    def forward(self, cosines, labels, context=None):
        if context is not None and context.norms is not None and self.training:
            with torch.no_grad():
                norms = context.norms.float().clamp(0.001, 100)
                std = norms.std() if norms.numel() > 1 else torch.zeros((), device=norms.device)
                self.batch_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * norms.mean())
                self.batch_std.mul_(1 - self.t_alpha).add_(self.t_alpha * std)
        return super().forward(cosines, labels, context)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, h={self.h}, scale={self.scale}, t_alpha={self.t_alpha}"
