"""Where a step's time goes: the kernels (on CUDA) or operators (on the CPU) of a few steps
under torch.profiler, as lines for a benchmark's result file.

The GPU benchmarks print this beside a figure that misses its target, so the next change can
be chosen from the committed output without another run on a GPU: the device's busy time
per step against the wall time per step says whether the step waits on the host (launches,
synchronisations) or on the device; the families' table says which kind of work the device
time goes to (matrix products, attention, compiled fusions, elementwise passes, ...) and the
kernels' table which kernels dominate.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


def _self_time_us(event, device: bool) -> float:
    if device:  # renamed from cuda_* to device_* in torch 2.4; both spellings are read
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))
    return float(event.self_cpu_time_total)


# (family, fragments of kernel names): the first family with a fragment in a kernel's name takes it
FAMILIES = (
    ("copies and fills", ("Memcpy", "Memset", "FillFunctor", "copy_kernel", "CatArrayBatchedCopy")),
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("image decoding and resizing", ("nvjpeg", "upsample")),
    ("sort and top-k", ("radix_sort", "RadixSort", "mbtopk", "topk", "bitonic")),
    ("unicom's Triton kernels", ("row_adamw", "margin_softmax_forward", "margin_softmax_backward")),
    ("compiled fusions (inductor)", ("triton_",)),
    ("matrix products and convolutions", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "s16816", "convolution", "dgrad", "wgrad")),
    ("layer norm and softmax", ("layer_norm", "LayerNorm", "SoftMax", "softmax")),
    ("optimiser", ("multi_tensor_apply", "fused_adam")),
    ("reductions", ("reduce_kernel",)),
    ("elementwise, gathers and scatters", ("elementwise_kernel", "gather", "scatter", "index")),
)


def kernel_family(name: str) -> str:
    """The kind of work a CUDA kernel does, from its name (``other`` when none matches)."""
    for family, fragments in FAMILIES:
        if any(fragment in name for fragment in fragments):
            return family
    return "other"


def family_lines(rows: list, steps: int, busy: float) -> list[str]:
    """The kernels' time per step summed by :func:`kernel_family`, largest first, as a table."""
    totals: dict[str, list[float]] = {}
    for event in rows:
        total = totals.setdefault(kernel_family(event.key), [0.0, 0.0])
        total[0] += event.count / steps
        total[1] += _self_time_us(event, True) / steps / 1000
    lines = ["| kernel family | calls / step | ms / step | share |", "|---|---:|---:|---:|"]
    for family, (calls, ms) in sorted(totals.items(), key=lambda item: -item[1][1]):
        lines.append(f"| {family} | {calls:.0f} | {ms:.3f} | {100 * ms / max(busy, 1e-9):.1f}% |")
    return lines


def profile_lines(step: Callable[[], object], steps: int = 3, top: int = 12, title: str = "profile",
                  host: bool = False) -> tuple[list[str], float | None]:
    """Run ``step()`` ``steps`` times under the profiler (after the caller's warm-up) and
    describe where the time went (lines, and the kernels' busy ms per step: None when the
    profiler failed or on the CPU): wall ms per step, device busy ms per step, kernel launches
    per step, on a GPU the kernels' time by family (:func:`family_lines`), and the ``top``
    kernels (or CPU operators) by self time; with ``host``, on a
    GPU also the ``top`` operators of this process by self CPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with profile(activities=activities) as prof:
            began = time.perf_counter()
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize()
            wall = (time.perf_counter() - began) / steps
        events = prof.key_averages()
    except Exception as error:  # a profiler that cannot start here must not cost the figures
        return [f"### {title}", "", f"profiler failed: {type(error).__name__}: {error}"], None
    if cuda:  # kernels; not the ranges that record_function marks on the device's timeline
        rows = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA
                and not getattr(e, "is_user_annotation", False) and "#" not in e.key and not e.key.startswith("## ")]
    else:
        rows = [e for e in events if e.self_cpu_time_total > 0]
    rows.sort(key=lambda e: _self_time_us(e, cuda), reverse=True)
    busy = sum(_self_time_us(e, cuda) for e in rows) / steps / 1000
    launches = sum(e.count for e in rows) / steps
    kind = "kernel" if cuda else "CPU operator"
    lines = [f"### {title}", "",
             f"wall {1000 * wall:.2f} ms per step; {kind}s busy {busy:.2f} ms per step "
             f"({100 * busy / max(1000 * wall, 1e-9):.0f}% of the wall time); {launches:.0f} {kind} calls per step", ""]
    if cuda:
        lines += family_lines(rows, steps, busy) + [""]
    lines += [f"| {kind} | calls / step | ms / step | share |", "|---|---:|---:|---:|"]
    lines += _table(rows, cuda, steps, top, busy)
    if host and cuda:
        operators = sorted((e for e in events if e.self_cpu_time_total > 0), key=lambda e: e.self_cpu_time_total,
                           reverse=True)
        cpu_busy = sum(e.self_cpu_time_total for e in operators) / steps / 1000
        lines += ["", f"this process's CPU operators: {cpu_busy:.2f} ms per step", "",
                  "| CPU operator | calls / step | ms / step | share |", "|---|---:|---:|---:|"]
        lines += _table(operators, False, steps, top, cpu_busy)
    return lines, busy if cuda else None


def _table(rows: list, device: bool, steps: int, top: int, busy: float) -> list[str]:
    lines = []
    for event in rows[:top]:
        ms = _self_time_us(event, device) / steps / 1000
        name = event.key if len(event.key) <= 90 else event.key[:87] + "..."
        name = name.replace("|", "/")
        lines.append(f"| {name} | {event.count / steps:.0f} | {ms:.3f} | {100 * ms / max(busy, 1e-9):.1f}% |")
    return lines
