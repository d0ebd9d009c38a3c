"""Fused GPU kernels (Triton) for steps that PyTorch runs as many small passes.

Imported only where a CUDA step uses them (Triton is imported lazily: ``import unicom``
never loads it). Each kernel has a PyTorch twin that computes the same function and is
used on the CPU, without Triton, or for inputs the kernel does not take; the tests compare
the two (on the CPU through Triton's interpreter, ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _row_adamw_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def row_adamw(param, exp_avg, exp_avg_sq, grad, rows, bias_correction1, bias_correction2_sqrt,
                  dim, lr, decay, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                  DECOUPLED: tl.constexpr, BLOCK: tl.constexpr):
        # the scalars come as float32 values of what the caller computed in double precision
        # (1 - 0.999 in float32 arithmetic would be 1.3e-5 off), as PyTorch's ops receive them
        # one program per (selected row, block of columns): gather, update, scatter in one pass
        i = tl.program_id(0)
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < dim
        row = tl.load(rows + i).to(tl.int64)
        at = row * dim + offsets
        p = tl.load(param + at, mask=mask)
        m = tl.load(exp_avg + at, mask=mask)
        v = tl.load(exp_avg_sq + at, mask=mask)
        g = tl.load(grad + i.to(tl.int64) * dim + offsets, mask=mask).to(tl.float32)
        if DECOUPLED:
            p = p * decay
        else:
            g = g + p * weight_decay
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * (g * g)
        c1 = tl.load(bias_correction1 + i)
        c2 = tl.load(bias_correction2_sqrt + i)
        denom = tl.sqrt(v) / c2 + eps
        p = p - (1 / denom) * m * (lr / c1)
        tl.store(param + at, p, mask=mask)
        tl.store(exp_avg + at, m, mask=mask)
        tl.store(exp_avg_sq + at, v, mask=mask)

    return row_adamw


def triton_usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernel can run on these tensors: contiguous, on a CUDA device (or on
    the CPU under Triton's interpreter), with Triton importable (the caller checks dtypes)."""
    import os

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not all(t.is_contiguous() and (t.is_cuda or interpreted) for t in tensors):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def row_adamw(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
              rows: torch.Tensor, bias_correction1: torch.Tensor, bias_correction2_sqrt: torch.Tensor, lr: float,
              beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool = True) -> None:
    """AdamW on rows ``rows`` (R,) of ``param`` (N, d) float32 and its moments, in place, with
    ``grad`` (R, d) their gradient and (R,) float32 bias corrections per row: what
    :func:`unicom.optim._adamw_update` does on gathered rows, in one pass over the bytes
    (read p, m, v, g; write p, m, v) instead of a gather, ten elementwise passes and a
    scatter. ``rows`` must be unique."""
    dim = param.shape[1]
    block = min(1024, 1 << max(4, (dim - 1).bit_length()))
    grid = (rows.numel(), (dim + block - 1) // block)
    _row_adamw_kernel()[grid](param, exp_avg, exp_avg_sq, grad, rows, bias_correction1, bias_correction2_sqrt,
                              dim, lr, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps, weight_decay,
                              DECOUPLED=decoupled, BLOCK=block)
