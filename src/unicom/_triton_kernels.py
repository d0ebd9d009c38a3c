"""The Triton kernels of :mod:`unicom.kernels` (this module imports Triton; only
:mod:`unicom.kernels` imports it, when a kernel first runs)."""

import triton
import triton.language as tl


@triton.jit
def row_adamw(param, exp_avg, exp_avg_sq, grad, rows, steps, correction1, correction2, grad_scale, found_inf,
              dim, lr, decay, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
              DECOUPLED: tl.constexpr, SCALED: tl.constexpr, SKIPPABLE: tl.constexpr, LR_LOADED: tl.constexpr,
              BLOCK: tl.constexpr):
    # the scalars come as float32 values of what the caller computed in double precision
    # (1 - 0.999 in float32 arithmetic would be 1.3e-5 off), as PyTorch's ops receive them;
    # so do the bias corrections, a table indexed by the step count. LR_LOADED: lr points to
    # a float32 device scalar (a step captured in a CUDA graph reads it at each replay) and the
    # decay 1 - lr * weight_decay is computed here, as PyTorch computes it from a tensor lr.
    # One program per selected row: its count, then its columns block by block (gather,
    # update, scatter in one pass), then the count written back: no other program reads it.
    # A step skipped (found_inf != 0) writes nothing: its stores are masked off.
    i = tl.program_id(0)
    if LR_LOADED:
        lr = tl.load(lr)
        decay = 1 - lr * weight_decay
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


@triton.jit
def target_logit(c, lower, upper, cos_m, sin_m, floor, m3, fallback_shift, ANGULAR: tl.constexpr,
                 EXACT: tl.constexpr):
    # (value, d value / d c) of the target cosine c: cos(θ + m) − m3 written as
    # c·cos m − sin θ·sin m; past θ + m = π (c below floor = −cos m) the fallback c − m3 − m·sin m
    if ANGULAR:
        inside = tl.minimum(tl.maximum(c, lower), upper)
        sine = tl.sqrt(1 - inside * inside)
        below_pi = inside >= floor
        value = tl.where(below_pi, inside * cos_m - sine * sin_m - m3, c - fallback_shift)
        if EXACT:  # sin(θ + m) / sin θ; 0 where c is clamped (θ constant there) and at the clamp's bounds
            slope = tl.where(below_pi, tl.where(tl.abs(c) < upper, cos_m + inside * sin_m / sine, 0.0), 1.0)
        else:
            slope = 1.0
    else:
        value = c - m3
        slope = 1.0
    return value, slope

@triton.jit
def margin_softmax_forward(cosines, targets, stats, rows, columns, scale, lower, upper, cos_m, sin_m, floor, m3,
                           fallback_shift, ANGULAR: tl.constexpr, EXACT: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row: the target logit, then the row's max and sum of exponentials in
    # one pass (a running max), then loss = max + log(sum) − target logit. stats (5, rows):
    # losses, maxima, sums, target logits, the target logits' slopes d logit / d cos / scale.
    i = tl.program_id(0)
    base = cosines + i.to(tl.int64) * columns
    t = tl.load(targets + i)
    value, slope = target_logit(tl.load(base + t).to(tl.float32), lower, upper, cos_m, sin_m, floor, m3,
                                fallback_shift, ANGULAR, EXACT)
    z_t = value * scale
    row_max = tl.full([], float("-inf"), tl.float32)
    row_sum = tl.full([], 0.0, tl.float32)
    for start in range(0, columns, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        z = tl.load(base + offsets, mask=offsets < columns, other=float("-inf")).to(tl.float32) * scale
        z = tl.where(offsets == t, z_t, z)
        new_max = tl.maximum(row_max, tl.max(z, axis=0))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        row_max = new_max
    tl.store(stats + i, row_max + tl.log(row_sum) - z_t)
    tl.store(stats + rows + i, row_max)
    tl.store(stats + 2 * rows + i, row_sum)
    tl.store(stats + 3 * rows + i, z_t)
    tl.store(stats + 4 * rows + i, slope)


@triton.jit
def margin_softmax_backward(cosines, targets, stats, norms, grad_loss, scaled, row_term, rows, columns, scale,
                            ROWS: tl.constexpr, COLUMNS: tl.constexpr):
    # One program per block of columns, over all rows: G = d (g · mean loss) / d cos =
    # (softmax − one-hot) · g / rows · scale, times the slope at the target; written as
    # G / |w| (scaled) and summed down the columns as Σ_b G_bj cos_bj / |w_j|² (row_term):
    # each column's sum in one program, in row order, so the same on every run.
    j = tl.program_id(0)
    cols = j * COLUMNS + tl.arange(0, COLUMNS)
    col_mask = cols < columns
    norm = tl.load(norms + cols, mask=col_mask, other=1.0)
    share = tl.load(grad_loss).to(tl.float32) / rows
    total = tl.zeros([COLUMNS], tl.float32)
    for start in range(0, rows, ROWS):
        r = start + tl.arange(0, ROWS)
        row_mask = r < rows
        t = tl.load(targets + r, mask=row_mask, other=-1)
        row_max = tl.load(stats + rows + r, mask=row_mask, other=0.0)
        weight = share / tl.load(stats + 2 * rows + r, mask=row_mask, other=1.0)
        z_t = tl.load(stats + 3 * rows + r, mask=row_mask, other=0.0)
        target_scale = tl.load(stats + 4 * rows + r, mask=row_mask, other=0.0) * scale
        mask = row_mask[:, None] & col_mask[None, :]
        at = r.to(tl.int64)[:, None] * columns + cols[None, :]
        c = tl.load(cosines + at, mask=mask, other=0.0).to(tl.float32)  # 0 outside: no share in the sums
        is_target = cols[None, :] == t[:, None]
        z = tl.where(is_target, z_t[:, None], c * scale)
        p = tl.exp(z - row_max[:, None]) * weight[:, None]
        g = tl.where(is_target, (p - share) * target_scale[:, None], p * scale)
        tl.store(scaled + at, g / norm[None, :], mask=mask)
        total += tl.sum(g * c, axis=0)
    tl.store(row_term + cols, total / (norm * norm), mask=col_mask)
