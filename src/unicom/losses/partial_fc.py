"""Margin softmax over a sharded prototype matrix with random class and feature selection.

The classification layer of Unicom (Partial FC design): the prototypes, one row per class,
are split into contiguous blocks over the ranks of a process group; each step

1. the embeddings and labels of every rank are all-gathered (the backward returns to each
   rank the exact gradient of the global loss with respect to its own embeddings);
2. each shard keeps every positive class of the global batch plus uniformly random
   negatives, ``max(ceil(sample_rate · classes on the shard), positives on the shard)``
   prototypes in all (random negative-class selection, r1);
3. one random subset of ``round(feature_rate · d)`` feature indices, the same for every
   sample and every rank, is kept; embeddings and prototypes are restricted to it and then
   L2-normalised (random feature selection, r2);
4. the margin head turns cosines into logits, and the softmax cross-entropy is computed
   across the shards with all-reduced maxima and sums: no rank holds the logits of all
   classes.

Only the selected prototypes receive a gradient; it is a sparse tensor (rows = selected
classes), which :class:`unicom.optim.SparseAdamW` applies to those rows only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from unicom.distributed import all_gather_tensor, reduce_scatter_tensor
from unicom.errors import InputError
from unicom.losses.heads import MARGIN_GRADIENTS
from unicom.kernels import Fused, triton_usable
from unicom.losses.margins import ArcFace, MarginContext, fused_softmax_margin, straight_through

# Prototypes are initialised in blocks of this many classes, each from its own seed, so the
# global matrix is the same whatever the number of ranks it is split over.
_INIT_BLOCK = 65536


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(first class, number of classes)`` held by ``rank``: contiguous, sizes differ by <= 1."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


class ClassesPerStep(NamedTuple):
    """How many classes one step of :class:`PartialFC` takes part in (:func:`classes_per_step`)."""

    num_classes: int  # k
    sampled: int  # sum over shards of min(ceil(sample_rate · classes on the shard), classes on the shard)
    positives: float  # expected distinct labels of the batch
    used: float  # expected classes per step, the positives included

    @property
    def all_classes(self) -> bool:
        """Every class takes part in every step."""
        return self.sampled >= self.num_classes

    @property
    def positives_only(self) -> bool:
        """The batch's positives are as many as the sampled classes, or more: a step then
        takes the positives only, and no random negatives."""
        return not self.all_classes and self.positives >= self.sampled


def sampled_classes(sample_rate: float, classes: int) -> int:
    """Classes a shard of ``classes`` samples at r1 = ``sample_rate`` before its positives are
    added: ceil(r1 · classes), all of them when r1 >= 1."""
    return classes if sample_rate >= 1.0 else min(classes, math.ceil(sample_rate * classes))


def classes_per_step(num_classes: int, batch: int, sample_rate: float, world_size: int = 1) -> ClassesPerStep:
    """The classes a step uses with random negative-class selection (r1 = ``sample_rate``).

    ``batch``: the labels of one forward, all ranks together (ranks × per-rank batch).
    Each shard of n classes keeps max(ceil(r1 · n), its positives), at most n
    (:meth:`PartialFC.select_classes`). The positives are counted as if labels were
    uniform over the k classes, k · (1 − (1 − 1/k)^batch) distinct ones expected (an upper
    bound for skewed class sizes), and ``used`` adds the shards' expectations
    max(ceil(r1 · n), n · (1 − (1 − 1/k)^batch)).
    """
    share = 1.0 - (1.0 - 1.0 / num_classes) ** batch  # chance that a given class is among the labels
    sampled = used = 0.0
    for rank in range(world_size):
        _, local = shard_range(num_classes, rank, world_size)
        keep = sampled_classes(sample_rate, local)
        sampled += keep
        used += min(local, max(keep, local * share))
    return ClassesPerStep(num_classes, int(sampled), num_classes * share, used)


PROTOTYPE_INITS = ("normal", "xavier")


def init_prototypes(weight: torch.Tensor, class_start: int, centers: int, seed: int, std: float = 0.01,
                    kind: str = "normal", num_classes: int | None = None) -> None:
    """Fill ``weight`` ((classes · centers, d), rows of classes ``class_start`` on) in place.

    ``kind``: ``normal``, N(0, std²); ``xavier``, uniform in ±sqrt(6 / (num_classes · centers
    + d)), ``torch.nn.init.xavier_uniform_`` over the whole (num_classes · centers, d)
    matrix (``num_classes``: all ranks together). Row values depend only on ``seed`` and the
    global class, never on the sharding.
    """
    if kind not in PROTOTYPE_INITS:
        raise InputError(f"prototype init must be one of {', '.join(PROTOTYPE_INITS)}, got {kind!r}")
    if kind == "xavier" and num_classes is None:
        raise ValueError("xavier initialisation needs num_classes, the classes of all ranks together")
    num_local = weight.shape[0] // centers
    d = weight.shape[1]
    first_block = class_start // _INIT_BLOCK
    last_block = (class_start + num_local - 1) // _INIT_BLOCK if num_local else first_block - 1
    with torch.no_grad():
        for block in range(first_block, last_block + 1):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
            if kind == "xavier":
                bound = math.sqrt(6.0 / (num_classes * centers + d))
                values = (torch.rand(_INIT_BLOCK * centers, d, generator=generator) * 2 - 1) * bound
            else:
                values = torch.randn(_INIT_BLOCK * centers, d, generator=generator) * std
            block_start = block * _INIT_BLOCK
            lo, hi = max(class_start, block_start), min(class_start + num_local, block_start + _INIT_BLOCK)
            src = values[(lo - block_start) * centers : (hi - block_start) * centers]
            weight[(lo - class_start) * centers : (hi - class_start) * centers].copy_(src)


class _AllGather(torch.autograd.Function):
    """Concatenate a (B, ...) tensor of every rank; backward: the sum of the ranks' gradients
    for this rank's rows (each rank's loss part contributes to every rank's embeddings)."""

    @staticmethod
    def forward(ctx, tensor, group, world_size, rank):
        ctx.group, ctx.world_size, ctx.rank = group, world_size, rank
        return all_gather_tensor(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        rows = grad.shape[0] // ctx.world_size
        if dist.get_backend(ctx.group) == "nccl":  # gloo has no reduce-scatter
            return reduce_scatter_tensor(grad, ctx.group), None, None, None
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * rows : (ctx.rank + 1) * rows], None, None, None


class _PrototypeCosines(torch.autograd.Function):
    """Cosines between the embeddings and a row/column selection of the prototypes.

    ``embeddings`` (N, d') are restricted to ``features`` already, not normalised;
    ``prototypes`` (R, d) is the whole local matrix, of which rows ``rows`` (sorted, unique;
    None = all) and columns ``features`` (None = all) take part. Forward: the embeddings
    normalised, e = x / |x| (as ``F.normalize``), the prototypes gathered once, and
    cos = (E Wᵀ) / |w| (each selected prototype normalised through a column scale, not a
    normalised copy). Norms are clamped to at least 1e-12. Backward, with G = dL/dcos:

        dL/de = (G / |w|) W
        dL/dx = (dL/de − e (e · dL/de)) / |x|   (dL/de / 1e-12 for rows with |x| under 1e-12)
        dL/dw_j = Σ_b G_bj e_b / |w_j| − w_j Σ_b G_bj cos_bj / |w_j|²

    The prototypes' gradient is returned for the selected rows only: a coalesced sparse COO
    gradient when ``sparse``, else dense. Under CUDA autocast the two backward products run in
    the autocast dtype. (The normalisation's backward written out is 6 device operations where
    autograd's of ``F.normalize`` is 13: a step that is mostly the host launching kernels is
    shorter.)
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, embeddings, prototypes, rows, features, sparse):
        saved = _cosines_forward(ctx, embeddings, prototypes, rows, features, sparse)
        ctx.save_for_backward(*saved, rows, features)
        return saved[-1]

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        unit, lengths, clamped, selected, norms, cosines, rows, features = ctx.saved_tensors
        dtype = torch.promote_types(grad.dtype, torch.float32)
        grad = grad.to(dtype)
        row_term = (grad * cosines.to(dtype)).sum(dim=0).div_(norms * norms)  # (R',)
        scaled = grad / norms  # G / |w|
        return (*_cosines_backward(ctx, scaled, row_term, unit, lengths, clamped, selected, rows, features), None, None, None)


def _cosines_forward(ctx, embeddings, prototypes, rows, features, sparse):
    """:class:`_PrototypeCosines`' forward: ``(unit, lengths, clamped, selected, norms, cosines)``,
    what its backward reads (``sparse``, the prototypes' shape and the embeddings' dtype go to ``ctx``)."""
    weight = prototypes.detach()
    if rows is not None and features is not None:
        selected = weight[rows[:, None], features[None, :]]
    elif rows is not None:
        selected = weight.index_select(0, rows)
    elif features is not None:
        selected = weight.index_select(1, features)
    else:
        selected = weight
    lengths = torch.linalg.vector_norm(embeddings, dim=1, keepdim=True)  # (N, 1), unclamped
    clamped = lengths.clamp_min(1e-12)
    unit = embeddings / clamped
    norms = torch.linalg.vector_norm(selected, dim=1).clamp_min_(1e-12)
    cosines = F.linear(unit, selected)
    cosines = cosines.div_(norms.to(cosines.dtype))
    ctx.sparse, ctx.shape, ctx.dtype = sparse, prototypes.shape, embeddings.dtype
    return unit, lengths, clamped, selected, norms, cosines


def _cosines_backward(ctx, scaled, row_term, unit, lengths, clamped, selected, rows, features):
    """:class:`_PrototypeCosines`' backward from ``scaled`` = G / |w| (B, R') and ``row_term`` =
    Σ_b G_bj cos_bj / |w_j|² (R',): ``(dL/d embeddings, dL/d prototypes)``, None where not needed."""
    dtype = torch.float32 if selected.dtype != torch.float64 else torch.float64
    grad_embeddings = grad_selected = None
    if ctx.needs_input_grad[0]:
        grad_unit = F.linear(scaled, selected.t().to(dtype))
        # the radial part of dL/de, which the normalisation removes (none where |x| was clamped)
        radial = (grad_unit * unit).sum(dim=1, keepdim=True).masked_fill_(lengths < 1e-12, 0.0)
        grad_embeddings = torch.addcmul(grad_unit, unit, radial, value=-1).div_(clamped)
        grad_embeddings = grad_embeddings.to(ctx.dtype)
    if ctx.needs_input_grad[1]:
        grad_selected = F.linear(scaled.t(), unit.t().to(dtype)).to(dtype)
        grad_selected.sub_(selected * row_term[:, None])
        grad_selected = grad_selected.to(selected.dtype)
        if features is not None:
            width = torch.zeros(grad_selected.shape[0], ctx.shape[1], dtype=grad_selected.dtype, device=grad_selected.device)
            grad_selected = width.index_copy_(1, features, grad_selected)
        if rows is None:
            pass
        elif ctx.sparse:
            grad_selected = torch.sparse_coo_tensor(
                rows[None], grad_selected, ctx.shape, is_coalesced=True, check_invariants=False
            )
        else:
            full = torch.zeros(ctx.shape, dtype=grad_selected.dtype, device=grad_selected.device)
            grad_selected = full.index_copy_(0, rows, grad_selected)
    return grad_embeddings, grad_selected


class _ShardedSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of a softmax whose columns are split over the ranks.

    ``logits`` (N, C_local) float; ``targets`` (N,) column of the target on this rank or -1
    (never -1 with one rank). Every row's target lives on exactly one rank. Forward: global max and sum of
    exponentials by all-reduce; loss = mean(max + log Σ exp(z − max) − z_target).
    Backward: (softmax − one_hot) / N on the local columns, recomputed from the logits.
    """

    @staticmethod
    def forward(ctx, logits, targets, group, world_size):
        with torch.no_grad():
            row_max = logits.max(dim=1, keepdim=True).values
            if world_size > 1:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            sum_exp = (logits - row_max).exp_().sum(dim=1, keepdim=True)
            # gathered at column 0 for rows whose target is on another rank, then zeroed:
            # no data-dependent shape, so the host never waits for the device
            target_logit = logits.gather(1, (targets if world_size == 1 else targets.clamp_min(0))[:, None])
            if world_size > 1:
                target_logit = torch.where(targets[:, None] >= 0, target_logit, 0.0)
                packed = torch.cat([sum_exp, target_logit], dim=1)
                dist.all_reduce(packed, group=group)
                sum_exp, target_logit = packed[:, :1], packed[:, 1:]
            loss = (row_max + sum_exp.log() - target_logit).mean()
        ctx.save_for_backward(logits, targets, row_max, sum_exp)
        ctx.world_size = world_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, row_max, sum_exp = ctx.saved_tensors
        scale = grad_loss / logits.shape[0]
        grad = (logits - row_max).exp_().mul_(scale / sum_exp)  # softmax · dL/dloss / N
        if ctx.world_size > 1:
            minus_one_hot = (targets[:, None] >= 0).to(grad.dtype).mul_(-scale)  # 0 where the target is on another rank
            targets = targets.clamp_min(0)
        else:  # one rank holds every row's target
            minus_one_hot = (-scale).to(grad.dtype).expand(grad.shape[0], 1)
        grad.scatter_add_(1, targets[:, None], minus_one_hot)
        return grad, None, None, None


# the margin softmax of one shard as two Triton kernels on CUDA (unicom.kernels); False: PyTorch ops
FUSED_SOFTMAX = True
_FUSED_FORWARD = Fused("PartialFC: the fused margin softmax", "computing it with PyTorch operations instead")
_FUSED_BACKWARD = Fused("PartialFC: the fused margin softmax's backward", "computing it with PyTorch operations instead")


def _fused_softmax(margin: nn.Module, embeddings: torch.Tensor, prototypes: torch.Tensor) -> dict | None:
    """The margin's kernel parameters when the fused margin softmax computes this step's loss
    (the caller checks: one shard, one centre per class): a margin it computes
    (:func:`~unicom.losses.margins.fused_softmax_margin`), float32 / bfloat16 / float16
    embeddings and prototypes (so cosines) on a CUDA device, Triton importable."""
    if not (FUSED_SOFTMAX and _FUSED_FORWARD.enabled and _FUSED_BACKWARD.enabled) or embeddings.shape[0] == 0:
        return None
    low = (torch.float32, torch.bfloat16, torch.float16)
    if embeddings.dtype not in low or prototypes.dtype not in low or not triton_usable(embeddings, prototypes):
        return None
    return fused_softmax_margin(margin)


class _FusedCosineSoftmax(torch.autograd.Function):
    """:class:`_PrototypeCosines` followed by the mean cross-entropy of the margin softmax of
    one shard, the softmax in two Triton kernels (:func:`unicom.kernels.margin_softmax_forward`
    and ``_backward``). The forward kernel reads each row of cosines once (its loss, maximum
    and sum of exponentials); the backward kernel reads them again and writes G / |w| (in the
    products' dtype) and Σ_b G_bj cos_bj / |w_j|², what the normalisation's backward takes,
    where the PyTorch operations make about thirty passes over (B, C) tensors; nothing of
    (B, C) is kept between them but the cosines. ``twin(embeddings, prototypes)``: the same
    loss with PyTorch operations, used when a kernel cannot be built here."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, embeddings, prototypes, rows, features, targets, sparse, margin, exact, twin):
        from unicom.kernels import margin_softmax_forward

        saved = _cosines_forward(ctx, embeddings, prototypes, rows, features, sparse)
        cosines = saved[-1]
        stats = torch.empty(5, cosines.shape[0], dtype=torch.float32, device=cosines.device)
        ctx.margin, ctx.twin, ctx.twin_graph = margin, twin, None
        if not _FUSED_FORWARD.launch(margin_softmax_forward, cosines, targets, margin, exact, stats):
            ctx.twin_graph = _twin_graph(twin, embeddings, prototypes)
            return ctx.twin_graph[-1].detach()
        ctx.save_for_backward(*saved, rows, features, targets, stats, embeddings, prototypes)
        return stats[0].mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_loss):
        from unicom.kernels import margin_softmax_backward

        if ctx.twin_graph is None:
            unit, lengths, clamped, selected, norms, cosines, rows, features, targets, stats, embeddings, prototypes = (
                ctx.saved_tensors)
            # the products' dtype: autocast's (restored for the backward: the cosines came out of
            # its product), else float32
            low = cosines.dtype if cosines.is_cuda and torch.is_autocast_enabled() else torch.float32
            scaled = torch.empty(cosines.shape, dtype=low, device=cosines.device)
            row_term = torch.empty(cosines.shape[1], dtype=torch.float32, device=cosines.device)
            if _FUSED_BACKWARD.launch(margin_softmax_backward, cosines, targets, stats, norms,
                                      grad_loss.float().contiguous(), ctx.margin, scaled, row_term):
                grads = _cosines_backward(ctx, scaled, row_term, unit, lengths, clamped, selected, rows, features)
                return (*grads, None, None, None, None, None, None, None)
            ctx.twin_graph = _twin_graph(ctx.twin, embeddings, prototypes)
        x, weight, loss = ctx.twin_graph
        wanted = [t for t, need in zip((x, weight), ctx.needs_input_grad[:2]) if need]
        found = iter(torch.autograd.grad(loss, wanted, grad_loss))
        grads = [next(found) if need else None for need in ctx.needs_input_grad[:2]]
        return (*grads, None, None, None, None, None, None, None)


def _twin_graph(twin, embeddings, prototypes):
    """``(x, w, loss)``: the twin's loss with a graph from leaves x, w holding the values of
    ``embeddings`` and ``prototypes`` (for a step whose kernels cannot run)."""
    x, weight = embeddings.detach().requires_grad_(), prototypes.detach().requires_grad_()
    with torch.enable_grad():
        return x, weight, twin(x, weight)


class PartialFC(nn.Module):
    """Margin softmax over ``num_classes`` prototypes sharded over a process group.

    Args:
        embedding_size: d, the size of the embeddings.
        num_classes: K, the number of classes (all ranks together).
        margin: a margin head from :mod:`unicom.losses.margins` (default ``ArcFace(0.3, 64)``).
        sample_rate: r1 in (0, 1], the fraction of each shard's classes used per step
            (positives always included). 1.0 uses every class.
        feature_rate: r2 in (0, 1], the fraction of feature dimensions used per step.
        centers: prototypes per class (sub-center ArcFace takes the max over them).
        process_group: the ranks over which prototypes are sharded (default: the world
            when ``torch.distributed`` is initialised, else none).
        seed: seeds the prototypes' initialisation and the feature selection, which must
            agree over ranks (default: drawn on rank 0 and broadcast).
        sparse_gradient: give the prototypes a row-sparse gradient (only selected rows);
            False gives a dense gradient of the full matrix (for dense optimisers).
        check_inputs: validate labels, shapes, finiteness and cross-rank agreement at each
            call (one small all-gather and a device-to-host read); errors are raised on
            every rank, so none hangs. Without it the labels are still checked, on the
            device: see :meth:`take_label_bounds`.
        margin_gradient: ``"exact"`` differentiates the margin function; ``"straight_through"``
            applies it as a constant (d logit / d cos = scale for every logit), as the
            reference Partial FC code does (:func:`unicom.losses.margins.straight_through`).
            The loss is the same either way.
        prototype_init: ``"normal"`` (N(0, 0.01²)) or ``"xavier"`` (xavier-uniform over the
            whole matrix, as the UniFEx heads); see :func:`init_prototypes`.

    Call ``loss = pfc(embeddings, labels)`` with embeddings (B, d) and labels (B,) int64
    global class ids; every rank must pass the same B. The loss is the mean over the global
    batch (B · world_size rows), identical on every rank.

    With DDP around the backbone: the gradient that reaches each rank's embeddings is the
    exact gradient of the global loss, so the backbone's gradients must be *summed* over
    ranks, not averaged (see :mod:`unicom.engine.ddp`); PartialFC itself must not be wrapped in DDP.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: nn.Module | None = None,
        sample_rate: float = 1.0,
        feature_rate: float = 1.0,
        centers: int = 1,
        process_group=None,
        seed: int | None = None,
        sparse_gradient: bool = True,
        check_inputs: bool = True,
        margin_gradient: str = "exact",
        prototype_init: str = "normal",
    ):
        super().__init__()
        if margin_gradient not in MARGIN_GRADIENTS:
            raise InputError(f"PartialFC: margin_gradient must be one of {', '.join(MARGIN_GRADIENTS)}, got {margin_gradient!r}")
        for name, rate in (("sample_rate", sample_rate), ("feature_rate", feature_rate)):
            if not (0.0 < float(rate) <= 1.0):
                raise InputError(f"PartialFC: {name} must be in (0, 1], got {rate}")
        if int(embedding_size) < 1 or int(num_classes) < 1 or int(centers) < 1:
            raise InputError(
                f"PartialFC: embedding_size, num_classes and centers must be positive, "
                f"got {embedding_size}, {num_classes}, {centers}"
            )
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.margin = margin if margin is not None else ArcFace(0.3, 64.0)
        self.sample_rate = float(sample_rate)
        self.feature_rate = float(feature_rate)
        self.centers = int(centers)
        self.sparse_gradient = bool(sparse_gradient)
        self.check_inputs = bool(check_inputs)
        self.margin_gradient = margin_gradient
        self.num_features = max(1, round(self.feature_rate * self.embedding_size))

        distributed = dist.is_available() and dist.is_initialized()
        self.process_group = process_group if process_group is not None else (dist.group.WORLD if distributed else None)
        self.world_size = dist.get_world_size(self.process_group) if self.process_group is not None else 1
        self.rank = dist.get_rank(self.process_group) if self.process_group is not None else 0
        if self.num_classes < self.world_size:
            raise InputError(f"PartialFC: {self.num_classes} classes cannot be split over {self.world_size} ranks")
        self.class_start, self.num_local = shard_range(self.num_classes, self.rank, self.world_size)

        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
            if self.world_size > 1:
                holder = torch.tensor([seed], dtype=torch.int64)
                # gloo takes CPU tensors; NCCL groups need CUDA ones
                if dist.get_backend(self.process_group) == "nccl":
                    holder = holder.cuda()
                dist.broadcast(holder, src=dist.get_global_rank(self.process_group, 0), group=self.process_group)
                seed = int(holder.item())
        self.seed = int(seed)

        self.prototypes = nn.Parameter(torch.empty(self.num_local * self.centers, self.embedding_size))
        init_prototypes(self.prototypes.data, self.class_start, self.centers, self.seed, kind=prototype_init,
                        num_classes=self.num_classes)

        self._feature_generator: torch.Generator | None = None
        self._class_generator: torch.Generator | None = None
        self.last_class_index: torch.Tensor | None = None  # global ids of the classes of the last step
        self.last_feature_index: torch.Tensor | None = None
        self._label_bounds: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"classes_on_rank={self.class_start}..{self.class_start + self.num_local - 1}, "
            f"sample_rate={self.sample_rate}, feature_rate={self.feature_rate}, centers={self.centers}"
            + (f", margin_gradient={self.margin_gradient}" if self.margin_gradient != "exact" else "")
        )

    # -- random selection -------------------------------------------------------------

    def generators(self, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        """The generators of the feature and the class selection on ``device`` (made on first
        use, seeded from :attr:`seed`); a step captured in a CUDA graph registers them
        (:class:`unicom.engine.graph.CapturedStep`)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # the generators' own device has an index
            device = torch.device("cuda", torch.cuda.current_device())
        if self._feature_generator is None or self._feature_generator.device != device:
            self._feature_generator = torch.Generator(device=device).manual_seed(self.seed + 1)
            self._class_generator = torch.Generator(device=device).manual_seed(self.seed + 2 + self.rank)
        return self._feature_generator, self._class_generator

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The selection generators' states (to resume a run exactly)."""
        if self._feature_generator is None:
            return {}
        return {"feature": self._feature_generator.get_state(), "classes": self._class_generator.get_state()}

    def set_rng_state(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        feature, classes = self.generators(torch.device(device))
        if "feature" in state:
            feature.set_state(state["feature"])
        if "classes" in state:
            classes.set_state(state["classes"])

    def select_features(self, device: torch.device) -> torch.Tensor | None:
        """(round(feature_rate · d),) sorted feature indices for this step, or None for all."""
        if self.num_features == self.embedding_size:
            return None
        feature_generator, _ = self.generators(device)
        perm = torch.randperm(self.embedding_size, generator=feature_generator, device=device)
        return perm[: self.num_features].sort().values

    def select_classes(self, local_labels: torch.Tensor, in_shard: torch.Tensor | None) -> torch.Tensor | None:
        """Sorted local class indices used this step, or None for all classes on the shard.

        ``local_labels`` (N,) are the global batch's labels minus ``class_start``;
        ``in_shard`` (N,) marks those that belong to this shard (None: all of them).

        Every class on the shard gets a uniform random score, the positives a score above
        all of them; the top ``max(ceil(sample_rate · classes), positives)`` are the
        positives plus a uniformly random subset of the negatives. When the batch has no
        more rows than ``ceil(sample_rate · classes)`` (the usual case: a batch of
        thousands against tens of thousands of classes or more) that count is known
        without looking at the labels, so the selection never makes the host wait for
        the device; otherwise the positives are counted first (one device-to-host read).
        """
        if self.sample_rate >= 1.0:
            return None
        device = local_labels.device
        _, class_generator = self.generators(device)
        num_sample = sampled_classes(self.sample_rate, self.num_local)
        # out-of-shard labels score into a spare slot past the last class
        slots = local_labels if in_shard is None else torch.where(in_shard, local_labels, self.num_local)
        if local_labels.numel() > num_sample:
            marked = torch.zeros(self.num_local + 1, dtype=torch.int32, device=device).scatter_(0, slots, 1)
            num_sample = max(num_sample, int(marked[: self.num_local].sum()))
        if num_sample >= self.num_local:
            return torch.arange(self.num_local, device=device)
        scores = torch.rand(self.num_local + 1, generator=class_generator, device=device)
        scores.scatter_(0, slots, 2.0)
        return torch.topk(scores[: self.num_local], num_sample, sorted=False).indices.sort().values

    # -- checks -----------------------------------------------------------------------

    def _check(self, embeddings: torch.Tensor, labels: torch.Tensor, feature_index: torch.Tensor | None) -> None:
        """Validate on every rank with one all-gather, then raise the same error everywhere."""
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise InputError(f"PartialFC: labels must be integers, got {labels.dtype}")
        if embeddings.dim() != 2 or labels.dim() != 1:
            raise InputError(
                f"PartialFC: expected embeddings (B, d) and labels (B,), got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
            )
        batch = embeddings.shape[0]
        with torch.no_grad():
            # one device-to-host copy for everything computed on the embeddings' device
            nonfinite = (~torch.isfinite(embeddings).all(dim=1)).sum() if batch else labels.new_zeros(())
            label_min = labels.min() if batch else labels.new_zeros(())
            label_max = labels.max() if batch else labels.new_zeros(())
            feature_sum = feature_index.sum() if feature_index is not None else labels.new_full((), -1)
            measured = torch.stack([nonfinite.double(), label_min.double(), label_max.double(), feature_sum.double()]).cpu()
        configured = torch.tensor(
            [batch, embeddings.shape[1], labels.shape[0], self.num_classes, self.embedding_size,
             self.sample_rate, self.feature_rate, self.centers],
            dtype=torch.float64,
        )
        status = torch.cat([configured[:3], measured[:3], configured[3:], measured[3:]])
        if self.world_size > 1:
            device = embeddings.device if dist.get_backend(self.process_group) == "nccl" else torch.device("cpu")
            table = all_gather_tensor(status.to(device), self.process_group).view(self.world_size, -1).cpu()
        else:
            table = status[None]
        problems = []
        for rank, row in enumerate(table.tolist()):
            b, d, n_labels, nonfinite, lo, hi, k, e, r1, r2, centers, fsum = row
            where = f" on rank {rank}" if self.world_size > 1 else ""
            if n_labels != b:
                problems.append(f"{int(b)} embeddings but {int(n_labels)} labels{where}")
            if d != self.embedding_size:
                problems.append(f"embeddings have dimension {int(d)}{where}, expected embedding_size={self.embedding_size}")
            if nonfinite:
                problems.append(f"{int(nonfinite)} of {int(b)} embedding rows contain NaN or Inf{where}")
            if b and (lo < 0 or hi >= self.num_classes):
                problems.append(self._label_range_problem(lo, hi, where))
        first = table[0]
        names = ["batch size", None, None, None, None, None, "num_classes", "embedding_size", "sample_rate", "feature_rate", "centers", "feature selection"]
        for column, name in enumerate(names):
            if name is not None and not torch.all(table[:, column] == first[column]):
                values = ", ".join(f"rank {r}: {v:g}" for r, v in enumerate(table[:, column].tolist()))
                problems.append(f"{name} differs across ranks ({values}); it must be the same on every rank")
        if problems:
            raise InputError("PartialFC: " + "; ".join(problems))

    def _label_range_problem(self, lo: float, hi: float, where: str = "") -> str:
        return f"labels range from {int(lo)} to {int(hi)}{where}; they must lie in 0..{self.num_classes - 1}"

    def take_label_bounds(self) -> torch.Tensor | None:
        """(2,) int64 on the device: the smallest and largest label of the calls since the
        last :meth:`take_label_bounds` made without ``check_inputs`` (None if none).

        Out-of-range labels of those calls were clamped for the computation, so their loss
        is meaningless: :class:`unicom.engine.step.TrainStep` skips such a step on the
        device and raises :meth:`check_label_bounds`'s error when its result is read.
        """
        bounds = self._label_bounds
        self.__dict__["_label_bounds"] = None  # a plain attribute: see forward
        return bounds

    def check_label_bounds(self, lo: float, hi: float) -> None:
        """Raise :class:`InputError` if labels from ``lo`` to ``hi`` are out of range."""
        if lo < 0 or hi >= self.num_classes:
            raise InputError("PartialFC: " + self._label_range_problem(lo, hi))

    def flag_sorted_gradient(self) -> None:
        """Mark the prototypes' sparse gradient as coalesced, as it is after ONE backward.

        Its rows are sorted and unique, but autograd's accumulation into ``.grad`` drops
        the flag, and coalescing again (a sort with a data-dependent size) would make the
        host wait for the device. Call it only when a single backward wrote the gradient.
        """
        grad = self.prototypes.grad
        if grad is not None and grad.is_sparse and not grad.is_coalesced():
            grad._coalesced_(True)

    # -- forward ----------------------------------------------------------------------

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss (scalar) for embeddings (B, d) and labels (B,) of this rank."""
        feature_index = self.select_features(embeddings.device)
        if self.check_inputs:
            self._check(embeddings, labels, feature_index)
        labels = labels.long()
        if self.world_size > 1:
            embeddings = _AllGather.apply(embeddings, self.process_group, self.world_size, self.rank)
            labels = all_gather_tensor(labels, self.process_group)
        if not self.check_inputs and labels.numel():
            # checked on the device: the bounds are read with the step's result (take_label_bounds)
            bounds = torch.stack(torch.aminmax(labels))
            if self._label_bounds is not None:
                bounds = torch.stack([torch.minimum(bounds[0], self._label_bounds[0]),
                                      torch.maximum(bounds[1], self._label_bounds[1])])
            # plain attributes that change every step are set past nn.Module.__setattr__, whose
            # checks for parameters, buffers and submodules take as long as a small operation
            self.__dict__["_label_bounds"] = bounds
            labels = labels.clamp(0, self.num_classes - 1)

        if self.world_size == 1:  # one shard, and the labels are in range (checked, or clamped above)
            local_labels, in_shard = labels, None
        else:
            local_labels = labels - self.class_start
            in_shard = (local_labels >= 0) & (local_labels < self.num_local)
        class_index = self.select_classes(local_labels, in_shard)
        if class_index is None:
            targets = local_labels if in_shard is None else torch.where(in_shard, local_labels, -1)
            rows = None
            column_classes = torch.arange(self.class_start, self.class_start + self.num_local, device=labels.device)
        else:
            # labels of other shards are clamped into this one for the search, then masked
            position = torch.searchsorted(class_index, local_labels if in_shard is None
                                          else local_labels.clamp(0, self.num_local - 1))
            targets = position if in_shard is None else torch.where(in_shard, position, -1)
            rows = class_index
            if self.centers > 1:
                rows = (class_index[:, None] * self.centers + torch.arange(self.centers, device=rows.device)).flatten()
            column_classes = class_index + self.class_start if self.class_start else class_index
        self.__dict__.update(last_class_index=column_classes.detach(), last_feature_index=feature_index)

        norms = None  # the embeddings' norms, for heads that read them (AdaFace; any head not of this module)
        if getattr(self.margin, "uses_norms", True):
            norms = torch.linalg.vector_norm(embeddings.detach().float(), dim=1)
        if feature_index is not None:
            embeddings = embeddings.index_select(1, feature_index)
        context = MarginContext(
            class_ids=labels,
            column_classes=column_classes,
            norms=norms,
            group=self.process_group,
            world_size=self.world_size,
            all_targets_local=self.world_size == 1,
        )
        fused = self.world_size == 1 and self.centers == 1 and _fused_softmax(self.margin, embeddings, self.prototypes)
        if fused:
            twin = lambda x, weight: self._margin_cross_entropy(x, weight, rows, feature_index, targets, context)  # noqa: E731
            return _FusedCosineSoftmax.apply(embeddings, self.prototypes, rows, feature_index, targets,
                                             self.sparse_gradient, fused, self.margin_gradient == "exact", twin)
        return self._margin_cross_entropy(embeddings, self.prototypes, rows, feature_index, targets, context)

    def _margin_cross_entropy(self, embeddings, prototypes, rows, feature_index, targets, context) -> torch.Tensor:
        """The mean loss with PyTorch operations: the cosines of ``embeddings`` (restricted to
        the features already) with the selected ``prototypes``, the margin head, then the
        softmax cross-entropy over the shards."""
        cosines = _PrototypeCosines.apply(embeddings, prototypes, rows, feature_index, self.sparse_gradient)
        if self.centers > 1:
            cosines = cosines.view(cosines.shape[0], -1, self.centers).amax(dim=2)
        return self._loss_from_cosines(cosines, targets, context)

    def _loss_from_cosines(self, cosines, targets, context) -> torch.Tensor:
        """The mean loss from the (B, C) cosines with PyTorch operations: the margin head, then
        the softmax cross-entropy over the shards."""
        if self.margin_gradient == "straight_through":
            logits = straight_through(self.margin, cosines, targets, context)
        else:
            logits = self.margin(cosines, targets, context)
        return _ShardedSoftmaxCrossEntropy.apply(logits, targets, self.process_group, self.world_size)

    # -- prototypes in a rank-independent layout ----------------------------------------

    def prototype_block(self) -> tuple[int, torch.Tensor]:
        """``(first class, (classes on this rank, centers, d) tensor)`` for checkpoints."""
        return self.class_start, self.prototypes.detach().view(self.num_local, self.centers, self.embedding_size)
