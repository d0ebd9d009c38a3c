"""Optimisers: AdamW that updates only the rows present in a sparse gradient.

With random negative-class selection only ~10 % of the prototype rows take part in a step.
A dense optimiser would still decay, and move by its momentum, every row of a matrix that
can hold a billion numbers; :class:`SparseAdamW` touches the sampled rows only.
"""

from __future__ import annotations

import contextlib

import torch
from torch.optim import Optimizer

from unicom.kernels import Fused

FUSED_ROWS = True  # the row update of sparse gradients as one Triton kernel where it runs (False: PyTorch ops)
_ROW_UPDATE = Fused("SparseAdamW: the fused row update", "updating rows with PyTorch operations instead")
_CORRECTIONS_MIN = 1024  # first length of a table of bias corrections (it doubles when the counts reach its end)


class SparseAdamW(Optimizer):
    """AdamW (decoupled weight decay, Loshchilov & Hutter) applied row by row.

    For a parameter whose gradient is sparse (``torch.sparse_coo``, rows along dim 0, as
    produced by ``F.embedding(..., sparse=True)`` and :class:`unicom.losses.PartialFC`), only
    the rows present in the gradient change: their value, their moments and their step
    count. Every other row, and its optimiser state, stays bit-identical. Each row keeps its
    own step count, so a row's trajectory is exactly AdamW's over the steps in which it took
    part. For a dense gradient every row is present and the update is plain AdamW.

    Like torch's fused optimisers it takes two optional device tensors, set as attributes
    before :meth:`step` (``torch.amp.GradScaler`` sets them): ``grad_scale``, by which the
    gradients are divided (loss scale, clipping), and ``found_inf``, a step that is skipped
    when it is non-zero (parameters, moments and step counts unchanged). Neither is read
    on the host, so a step never makes the host wait for the device.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator for numerical stability.
        weight_decay: decoupled weight decay (the parameter is multiplied by 1 − lr·wd).
        decoupled_weight_decay: False adds ``weight_decay · param`` to the gradient instead
            (L2 regularisation, ``torch.optim.Adam``'s ``weight_decay``), still row by row.
    """

    _step_supports_amp_scaling = True  # takes grad_scale and found_inf (torch.amp.GradScaler's protocol)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, decoupled_weight_decay: bool = True):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid eps {eps} or weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay))
        # for the fused row update: per parameter, (its "step" tensor, a bound on its counts
        # known on the host), and per (betas, device) the bias corrections indexed by count
        self._count_bounds: dict[torch.Tensor, tuple[torch.Tensor, int]] = {}
        self._corrections: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # while a step is captured (see :meth:`capturing`): the replays it is made for, and
        # each group's learning rate as a float32 device scalar
        self._replays: int | None = None
        self._device_lrs: list[torch.Tensor | None] = []

    @contextlib.contextmanager
    def capturing(self, replays: int):
        """Steps taken inside are made to be captured in a CUDA graph and replayed up to
        ``replays`` times (:class:`unicom.engine.graph.CapturedStep`).

        Inside, a step reads each group's learning rate from a float32 device scalar
        (:meth:`load_learning_rates` sets it from ``group["lr"]`` before each replay) and
        advances every step count in place; the tables of bias corrections are made long
        enough for ``replays`` more steps before the capture starts. The other
        hyperparameters are baked in: change them and capture again. Every parameter must
        have taken one step already (its state exists), and sparse gradients must be flagged
        coalesced (:meth:`unicom.losses.PartialFC.flag_sorted_gradient`): coalescing
        cannot be captured.
        """
        if int(replays) < 1:
            raise ValueError(f"replays must be at least 1, got {replays}")
        self._device_lrs = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p in self.state]
            self._device_lrs.append(None if not params else
                                    torch.full((), float(group["lr"]), dtype=torch.float32, device=params[0].device))
            beta1, beta2 = group["betas"]
            for param in params:
                if isinstance(self.state[param].get("step"), torch.Tensor):
                    self._correction_tables(beta1, beta2, self._count_bound(param, self.state[param]) + int(replays),
                                            param.device)
        self._replays = int(replays)
        try:
            yield self
        finally:
            self._replays = None

    def load_learning_rates(self) -> None:
        """Copy each group's ``lr`` to the device scalar that captured steps read (one small
        kernel per group; the host does not wait)."""
        for group, device_lr in zip(self.param_groups, self._device_lrs):
            if device_lr is not None:
                device_lr.fill_(float(group["lr"]))

    def _state_for(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            rows = param.shape[0] if param.dim() > 0 else 1
            state["step"] = torch.zeros(rows, dtype=torch.int64, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            # while every row has taken every step (dense gradients only), their common
            # count as a Python int: scalar bias corrections and no device sync
            state["common_step"] = 0
            self._count_bounds[param] = (state["step"], 0)
        return state

    def _count_bound(self, param: torch.Tensor, state: dict) -> int:
        """The largest step count of ``param``'s rows, or more: kept on the host while this
        optimiser advances the counts, read from the device once after its state was
        replaced (a resume)."""
        known = self._count_bounds.get(param)
        if known is not None and known[0] is state["step"]:
            return known[1]
        return int(state["step"].max()) if state["step"].numel() else 0

    def _correction_tables(self, beta1: float, beta2: float, count: int, device: torch.device):
        """``(1 - beta1^t, sqrt(1 - beta2^t))`` float32 at index t = 0.. at least ``count``
        (:func:`_bias_corrections` of each t), made again twice as long when outgrown."""
        key = (beta1, beta2, device)
        tables = self._corrections.get(key)
        if tables is None or tables[0].numel() <= count:
            length = max(_CORRECTIONS_MIN, count + 1, 2 * tables[0].numel() if tables is not None else 0)
            counts = torch.arange(length, dtype=torch.int64, device=device)
            tables = self._corrections[key] = _bias_corrections(counts, beta1, beta2, torch.float32)
        return tables

    def load_state_dict(self, state_dict) -> None:
        """As ``torch.optim.Optimizer``'s, but the per-row step counts follow their parameter
        onto its device (the base class leaves every ``step`` entry where it was saved,
        usually the CPU)."""
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            if isinstance(state.get("step"), torch.Tensor) and state["step"].device != param.device:
                state["step"] = state["step"].to(param.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        captured = self._replays is not None
        for number, group in enumerate(self.param_groups):
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            decoupled = group.get("decoupled_weight_decay", True)
            if captured:
                lr = self._device_lrs[number]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if captured and param not in self.state:
                    raise RuntimeError("SparseAdamW: a parameter without optimiser state in a captured step; "
                                       "take one step before capturing")
                state = self._state_for(param)
                if grad.is_sparse:
                    rows, values = _unique_rows(grad)
                    if rows.numel() == 0:
                        continue
                    # no row counts more after this step (after the replays of a captured one)
                    bound = self._count_bound(param, state) + (self._replays if captured else 1)
                    if _fused_rows(param, state, values, grad_scale, found_inf, *((lr,) if captured else ())):
                        if _fused_row_update(param, state["exp_avg"], state["exp_avg_sq"], values.contiguous(), rows,
                                             state["step"], *self._correction_tables(beta1, beta2, bound, param.device),
                                             grad_scale, found_inf, lr, beta1, beta2, eps, weight_decay, decoupled):
                            state["common_step"] = None
                            self._count_bounds[param] = (state["step"], bound)
                            continue
                    apply = None if found_inf is None else found_inf.to(param.device).eq(0)
                    p_rows = param.index_select(0, rows)
                    m_rows = state["exp_avg"].index_select(0, rows)
                    v_rows = state["exp_avg_sq"].index_select(0, rows)
                    steps = state["step"].index_select(0, rows)
                    state["common_step"] = None
                    values = _unscaled(values, grad_scale)
                    steps = _adamw_update(p_rows, m_rows, v_rows, values, steps, lr, beta1, beta2, eps, weight_decay,
                                          decoupled, apply)
                    param.index_copy_(0, rows, p_rows)
                    state["exp_avg"].index_copy_(0, rows, m_rows)
                    state["exp_avg_sq"].index_copy_(0, rows, v_rows)
                    state["step"].index_copy_(0, rows, steps)
                    self._count_bounds[param] = (state["step"], bound)
                else:
                    self._count_bounds.pop(param, None)
                    apply = None if found_inf is None else found_inf.to(param.device).eq(0)
                    if apply is not None or captured:  # the count is known on the device only
                        state["common_step"] = None
                    view = (lambda t: t.view(1)) if param.dim() == 0 else (lambda t: t)
                    tensors = (view(param), view(state["exp_avg"]), view(state["exp_avg_sq"]), view(_unscaled(grad, grad_scale)))
                    if state["common_step"] is not None:
                        state["common_step"] = _adamw_update(*tensors, state["common_step"], lr, beta1, beta2, eps,
                                                             weight_decay, decoupled)
                        state["step"] += 1
                    else:
                        steps = _adamw_update(*tensors, state["step"], lr, beta1, beta2, eps, weight_decay, decoupled, apply)
                        if captured:  # a replay reads the counts where the capture read them
                            state["step"].copy_(steps)
                        else:
                            state["step"] = steps
        return loss


def _fused_rows(param: torch.Tensor, state: dict, values: torch.Tensor, *scalars: torch.Tensor | None) -> bool:
    """Whether the row update runs as one fused kernel (:func:`unicom.kernels.row_adamw`): a
    2-D float32 parameter and moments on a CUDA device, ``grad_scale`` and ``found_inf``
    (``scalars``, when given) float32 scalars on it, Triton importable. The arithmetic is
    :func:`_adamw_update`'s, in the same order; results agree to float32 rounding."""
    if not (FUSED_ROWS and _ROW_UPDATE.enabled) or param.dim() != 2 or param.dtype != torch.float32 or values.dtype not in (
            torch.float32, torch.bfloat16, torch.float16):
        return False
    given = [s for s in scalars if s is not None]
    if any(s.numel() != 1 or s.dtype != torch.float32 or s.device != param.device for s in given):
        return False
    from unicom.kernels import triton_usable

    return triton_usable(param, state["exp_avg"], state["exp_avg_sq"], *given)


def _fused_row_update(*args) -> bool:
    """:func:`unicom.kernels.row_adamw` on ``args``; False when it cannot be built here (then
    the fused update is off, with a warning, and nothing was written)."""
    import unicom.kernels

    return _ROW_UPDATE.launch(unicom.kernels.row_adamw, *args)


def _bias_corrections(steps: torch.Tensor, beta1: float, beta2: float, dtype: torch.dtype):
    """Per-row ``(1 - beta1^t, sqrt(1 - beta2^t))`` for (R,) step counts ``t`` after the step,
    computed in float64 and given in ``dtype`` (a row skipped before it ever took a step has
    t = 0 and counts as 1: its update is zero either way)."""
    counts = steps.clamp_min(1).to(torch.float64)
    return (1 - torch.pow(beta1, counts)).to(dtype), (1 - torch.pow(beta2, counts)).sqrt().to(dtype)


def _unscaled(grad: torch.Tensor, grad_scale: torch.Tensor | None) -> torch.Tensor:
    return grad if grad_scale is None else grad / grad_scale.to(grad.device)


def _unique_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, values)`` of a sparse gradient with each row once.

    Autograd's accumulation drops the "coalesced" flag even when the rows are already
    sorted and unique (as PartialFC produces them; see
    :meth:`unicom.losses.PartialFC.flag_sorted_gradient`); checking that is far cheaper
    than coalescing, which sorts and copies every value.
    """
    rows = grad._indices()[0]
    if grad.is_coalesced() or rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
        return rows, grad._values()
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


def _adamw_update(param, exp_avg, exp_avg_sq, grad, steps, lr, beta1, beta2, eps, weight_decay,
                  decoupled: bool = True, apply=None):
    """In-place AdamW (or, not ``decoupled``, Adam with L2) on rows; returns the step
    counts after it.

    ``steps`` is the step count before this one: an int shared by all rows (then the
    update is applied), or a (rows,) int64 tensor with each row's own count. ``apply``:
    None, or a bool device scalar; False leaves every tensor unchanged (the arithmetic
    runs with neutral factors, so nothing is read on the host).

    The order of operations follows ``torch.optim.AdamW``'s (``Adam``'s) single-tensor path.
    """
    if not decoupled and weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    if apply is not None:
        # a skipped step multiplies by 1, adds 0 and counts nothing; its gradient (maybe
        # NaN, the reason for the skip) is replaced by 0 so that 0 · NaN cannot appear
        grad = torch.where(apply, grad, 0.0)
    if isinstance(steps, int):
        steps += 1
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**steps
        bias_correction2_sqrt = (1 - beta2**steps) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        return steps
    shape = (-1,) + (1,) * (param.dim() - 1)
    if apply is None:
        steps = steps + 1
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = None
    else:
        steps = steps + apply.long()
        one = torch.ones((), dtype=param.dtype, device=param.device)
        if decoupled:
            param.mul_(torch.where(apply, one * (1 - lr * weight_decay), one))
        exp_avg.lerp_(grad, torch.where(apply, one * (1 - beta1), 0.0))
        exp_avg_sq.mul_(torch.where(apply, one * beta2, one)).addcmul_(grad, grad, value=1 - beta2)
        step_size = torch.where(apply, lr, 0.0)
    bias_correction1, bias_correction2_sqrt = (c.view(shape) for c in _bias_corrections(steps, beta1, beta2, param.dtype))
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    lr_term = lr / bias_correction1 if step_size is None else step_size.to(param.dtype) / bias_correction1
    param.sub_(denom.reciprocal_().mul_(exp_avg).mul_(lr_term))
    return steps
