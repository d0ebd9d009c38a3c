"""Fused GPU kernels (Triton) for steps that PyTorch runs as many small passes.

Triton is imported only when a kernel first runs (the kernels are in
``unicom._triton_kernels``): importing this module, or ``unicom``, never loads it. Each kernel has a PyTorch twin that computes the same function and is
used on the CPU, without Triton, or for inputs the kernel does not take; the tests compare
the two (on the CPU through Triton's interpreter, ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import warnings

import torch


class Fused:
    """The switch of one fused kernel: on until its first launch fails (Triton needs a C
    compiler and a GPU it supports to build it), then off with one warning, and the caller's
    PyTorch twin does the work. ``what`` names the kernel in the warning, ``instead`` says
    what happens instead."""

    def __init__(self, what: str, instead: str):
        self.what, self.instead = what, instead
        self.enabled = True
        self.ran = False  # once it has run, later failures are not build failures and are raised

    def launch(self, kernel, *args, **kwargs) -> bool:
        """``kernel(*args, **kwargs)``; False, with the warning and the switch turned off, when its
        first launch fails (then nothing was written)."""
        if self.ran:
            kernel(*args, **kwargs)
            return True
        try:
            kernel(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure to build or launch the first time
            self.enabled = False
            warnings.warn(f"{self.what} cannot run here ({type(error).__name__}: {error}); {self.instead}",
                          RuntimeWarning, stacklevel=3)
            return False
        self.ran = True
        return True


def _row_adamw_kernel():
    from unicom._triton_kernels import row_adamw

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
              grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, lr: float | torch.Tensor, beta1: float, beta2: float,
              eps: float, weight_decay: float, decoupled: bool = True) -> None:
    """AdamW on rows ``rows`` (R,) of ``param`` (N, d) float32 and its moments, in place, with
    ``grad`` (R, d) their gradient: what :func:`unicom.optim._adamw_update` does on gathered
    rows, in one pass over the bytes (read p, m, v, g; write p, m, v) and one launch instead
    of a gather, the bias corrections, ten elementwise passes and four scatters.

    ``steps`` (N,) int64, each row's step count, is advanced by one on the rows in place;
    ``correction1`` and ``correction2`` (float32) hold ``1 - beta1^t`` and ``sqrt(1 - beta2^t)``
    at index t and must reach the largest count after the step. ``rows`` must be unique.
    ``grad_scale`` (a float32 device scalar or None) divides the gradient; a non-zero
    ``found_inf`` (likewise) skips the step: nothing is written, the counts included. ``lr``
    may be a float32 device scalar, read when the kernel runs (a step captured in a CUDA graph)."""
    dim = param.shape[1]
    block = min(1024, 1 << max(4, (dim - 1).bit_length()))
    loaded = isinstance(lr, torch.Tensor)
    _row_adamw_kernel()[(rows.numel(),)](
        param, exp_avg, exp_avg_sq, grad, rows, steps, correction1, correction2,
        correction1 if grad_scale is None else grad_scale, correction1 if found_inf is None else found_inf,
        dim, lr, 0.0 if loaded else 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps, weight_decay,
        DECOUPLED=decoupled, SCALED=grad_scale is not None, SKIPPABLE=found_inf is not None, LR_LOADED=loaded,
        BLOCK=block)


def _margin_softmax_kernels():
    from unicom._triton_kernels import margin_softmax_backward, margin_softmax_forward

    return margin_softmax_forward, margin_softmax_backward


def _softmax_launch(columns: int) -> dict:
    """Block size (columns per iteration) and warps of the margin softmax's forward kernel: a
    row's columns in blocks of up to 4096, eight warps for blocks of 2048 and more."""
    block = min(4096, 1 << max(4, (columns - 1).bit_length()))
    return {"BLOCK": block, "num_warps": 8 if block >= 2048 else 4}


_BACKWARD_TILE = {"ROWS": 32, "COLUMNS": 128}  # rows x columns per iteration of the backward kernel


def margin_softmax_forward(cosines: torch.Tensor, targets: torch.Tensor, margin: dict, exact: bool,
                           stats: torch.Tensor) -> None:
    """Write the margin softmax's cross-entropy per row into ``stats`` (5, B) float32: losses,
    row maxima, sums of exponentials, the target logits and their slopes (what the backward reads).

    ``cosines`` (B, C) float32, bfloat16 or float16, contiguous; ``targets`` (B,) int64, every
    row's target column (all on this shard); ``margin``: :func:`unicom.losses.margins.fused_softmax_margin`;
    ``exact``: the slope is d target logit / d cos (else 1: ``margin_gradient="straight_through"``).
    The logits are ``scale · cos`` with the target's replaced by ``scale · (cos(θ + m) − m3)``
    (ArcFace's fallback past π), as :class:`unicom.losses.margins.CombinedMargin` with m1 = 1
    and :class:`unicom.losses.partial_fc.PartialFC`'s softmax cross-entropy compute them; the
    target cosine is clamped as theirs, cos(θ + m) is computed without the angle."""
    rows, columns = cosines.shape
    forward, _ = _margin_softmax_kernels()
    forward[(rows,)](cosines, targets, stats, rows, columns, **margin["values"], ANGULAR=margin["angular"],
                     EXACT=exact, **_softmax_launch(columns))


def margin_softmax_backward(cosines: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor, norms: torch.Tensor,
                            grad_loss: torch.Tensor, margin: dict, scaled: torch.Tensor, row_term: torch.Tensor) -> None:
    """From ``grad_loss`` (a float32 device scalar) and the forward's ``stats``, with G = d
    (grad_loss · mean loss) / d cosines: write G / norms into ``scaled`` (B, C, any float
    dtype) and Σ_b G_bj cos_bj / norms_j² into ``row_term`` (C,) float32, where ``norms`` (C,)
    float32 are the prototypes' norms (what :class:`unicom.losses.partial_fc.PartialFC`'s
    normalisation backward takes). Deterministic: each column is summed by one program."""
    rows, columns = cosines.shape
    _, backward = _margin_softmax_kernels()
    grid = (-(-columns // _BACKWARD_TILE["COLUMNS"]),)
    backward[grid](cosines, targets, stats, norms, grad_loss, scaled, row_term, rows, columns,
                   margin["values"]["scale"], **_BACKWARD_TILE)
