"""Optimisers: AdamW that updates only the rows present in a sparse gradient.

With random negative-class selection only ~10 % of the prototype rows take part in a step.
A dense optimiser would still decay, and move by its momentum, every row of a matrix that
can hold a billion numbers; :class:`SparseAdamW` touches the sampled rows only.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class SparseAdamW(Optimizer):
    """AdamW (decoupled weight decay, Loshchilov & Hutter) applied row by row.

    For a parameter whose gradient is sparse (``torch.sparse_coo``, rows along dim 0, as
    produced by ``F.embedding(..., sparse=True)`` and :class:`unicom.losses.PartialFC`), only
    the rows present in the gradient change: their value, their moments and their step
    count. Every other row, and its optimiser state, stays bit-identical. Each row keeps its
    own step count, so a row's trajectory is exactly AdamW's over the steps in which it took
    part. For a dense gradient every row is present and the update is plain AdamW.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator for numerical stability.
        weight_decay: decoupled weight decay (the parameter is multiplied by 1 − lr·wd).
        decoupled_weight_decay: False adds ``weight_decay · param`` to the gradient instead
            (L2 regularisation, ``torch.optim.Adam``'s ``weight_decay``), still row by row.
    """

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
        return state

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
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            decoupled = group.get("decoupled_weight_decay", True)
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                state = self._state_for(param)
                if grad.is_sparse:
                    rows, values = _unique_rows(grad)
                    if rows.numel() == 0:
                        continue
                    p_rows = param.index_select(0, rows)
                    m_rows = state["exp_avg"].index_select(0, rows)
                    v_rows = state["exp_avg_sq"].index_select(0, rows)
                    steps = state["step"].index_select(0, rows) + 1
                    state["common_step"] = None
                    _adamw_update(p_rows, m_rows, v_rows, values, steps, lr, beta1, beta2, eps, weight_decay, decoupled)
                    param.index_copy_(0, rows, p_rows)
                    state["exp_avg"].index_copy_(0, rows, m_rows)
                    state["exp_avg_sq"].index_copy_(0, rows, v_rows)
                    state["step"].index_copy_(0, rows, steps)
                else:
                    state["step"] += 1
                    if state["common_step"] is not None:
                        state["common_step"] += 1
                    view = (lambda t: t.view(1)) if param.dim() == 0 else (lambda t: t)
                    _adamw_update(
                        view(param), view(state["exp_avg"]), view(state["exp_avg_sq"]), view(grad),
                        state["common_step"] if state["common_step"] is not None else state["step"],
                        lr, beta1, beta2, eps, weight_decay, decoupled,
                    )
        return loss


def _unique_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, values)`` of a sparse gradient with each row once.

    Autograd's accumulation drops the "coalesced" flag even when the rows are already
    sorted and unique (as PartialFC produces them); checking that is far cheaper than
    coalescing, which sorts and copies every value.
    """
    rows = grad._indices()[0]
    if grad.is_coalesced() or rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
        return rows, grad._values()
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


def _adamw_update(param, exp_avg, exp_avg_sq, grad, steps, lr, beta1, beta2, eps, weight_decay,
                  decoupled: bool = True) -> None:
    """In-place AdamW (or, not ``decoupled``, Adam with L2) on rows. ``steps`` is the step
    count after this one: an int shared by all rows, or a (rows,) tensor with each row's own count.

    The order of operations follows ``torch.optim.AdamW``'s (``Adam``'s) single-tensor path.
    """
    if decoupled:
        param.mul_(1 - lr * weight_decay)
    elif weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if isinstance(steps, int):
        bias_correction1 = 1 - beta1**steps
        bias_correction2_sqrt = (1 - beta2**steps) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        return
    shape = (-1,) + (1,) * (param.dim() - 1)
    steps = steps.to(torch.float64)
    bias_correction1 = (1 - torch.pow(beta1, steps)).to(param.dtype).view(shape)
    bias_correction2_sqrt = (1 - torch.pow(beta2, steps)).sqrt().to(param.dtype).view(shape)
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    param.sub_(denom.reciprocal_().mul_(exp_avg).mul_(lr / bias_correction1))
