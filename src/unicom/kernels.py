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
    def row_adamw(param, exp_avg, exp_avg_sq, grad, rows, steps, correction1, correction2, grad_scale, found_inf,
                  dim, lr, decay, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                  DECOUPLED: tl.constexpr, SCALED: tl.constexpr, SKIPPABLE: tl.constexpr, BLOCK: tl.constexpr):
        # the scalars come as float32 values of what the caller computed in double precision
        # (1 - 0.999 in float32 arithmetic would be 1.3e-5 off), as PyTorch's ops receive them;
        # so do the bias corrections, a table indexed by the step count.
        # One program per selected row: its count, then its columns block by block (gather,
        # update, scatter in one pass), then the count written back: no other program reads it.
        # A step skipped (found_inf != 0) writes nothing: its stores are masked off.
        i = tl.program_id(0)
        row = tl.load(rows + i).to(tl.int64)
        t = tl.load(steps + row) + 1
        c1 = tl.load(correction1 + t)
        c2 = tl.load(correction2 + t)
        written = dim  # the columns stored: none in a skipped step
        if SKIPPABLE:
            go = (tl.load(found_inf) == 0).to(tl.int32)
            written = dim * go
        for start in range(0, dim, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < dim
            at = row * dim + offsets
            p = tl.load(param + at, mask=mask)
            m = tl.load(exp_avg + at, mask=mask)
            v = tl.load(exp_avg_sq + at, mask=mask)
            g = tl.load(grad + i.to(tl.int64) * dim + offsets, mask=mask).to(tl.float32)
            if SCALED:
                g = g / tl.load(grad_scale)
            if DECOUPLED:
                p = p * decay
            else:
                g = g + p * weight_decay
            m = m + one_minus_beta1 * (g - m)
            v = v * beta2 + one_minus_beta2 * (g * g)
            denom = tl.sqrt(v) / c2 + eps
            p = p - (1 / denom) * m * (lr / c1)
            stored = offsets < written
            tl.store(param + at, p, mask=stored)
            tl.store(exp_avg + at, m, mask=stored)
            tl.store(exp_avg_sq + at, v, mask=stored)
        if SKIPPABLE:
            tl.store(steps + row, t, mask=go != 0)
        else:
            tl.store(steps + row, t)

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
              rows: torch.Tensor, steps: torch.Tensor, correction1: torch.Tensor, correction2: torch.Tensor,
              grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, lr: float, beta1: float, beta2: float,
              eps: float, weight_decay: float, decoupled: bool = True) -> None:
    """AdamW on rows ``rows`` (R,) of ``param`` (N, d) float32 and its moments, in place, with
    ``grad`` (R, d) their gradient: what :func:`unicom.optim._adamw_update` does on gathered
    rows, in one pass over the bytes (read p, m, v, g; write p, m, v) and one launch instead
    of a gather, the bias corrections, ten elementwise passes and four scatters.

    ``steps`` (N,) int64, each row's step count, is advanced by one on the rows in place;
    ``correction1`` and ``correction2`` (float32) hold ``1 - beta1^t`` and ``sqrt(1 - beta2^t)``
    at index t and must reach the largest count after the step. ``rows`` must be unique.
    ``grad_scale`` (a float32 device scalar or None) divides the gradient; a non-zero
    ``found_inf`` (likewise) skips the step: nothing is written, the counts included."""
    dim = param.shape[1]
    block = min(1024, 1 << max(4, (dim - 1).bit_length()))
    _row_adamw_kernel()[(rows.numel(),)](
        param, exp_avg, exp_avg_sq, grad, rows, steps, correction1, correction2,
        correction1 if grad_scale is None else grad_scale, correction1 if found_inf is None else found_inf,
        dim, lr, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps, weight_decay,
        DECOUPLED=decoupled, SCALED=grad_scale is not None, SKIPPABLE=found_inf is not None, BLOCK=block)
