"""One training step of the classification layer: PartialFC + SparseAdamW vs the usual ways.

For K classes (1,000,000 and 100,000), d = 512, batch 256, each variant runs in its own
process (so peak memory is its own) and times forward + backward + optimiser step:

  (a) PartialFC, sample_rate 0.1, SparseAdamW (row-sparse update)
  (b) PartialFC, sample_rate 1.0, SparseAdamW (dense update of every row)
  (c) pytorch-metric-learning ArcFaceLoss + torch.optim.AdamW (the full classifier)
  (d) PartialFC, sample_rate 0.1, dense gradient + torch.optim.AdamW over the whole matrix
      (what the reference Partial FC code does)
  (e) (a) captured as one CUDA graph and replayed (``unicom.engine.graph.CapturedStep``;
      CUDA only): one launch per step instead of one per kernel

PartialFC runs as in training: its full input check (a collective and a host read) is for
the first step only, the labels are checked on the device every step (their bounds taken
each step, as ``unicom.engine.step.TrainStep`` takes them), and the gradient
of one backward is flagged as sorted (what ``unicom.engine.step.TrainStep`` does), so a
step never waits for the device until the timer's synchronisation.

Usage: python benchmarks/partial_fc_step.py [--device cuda] [--classes 1000000 100000]
Writes benchmarks/results/partial_fc_step_{cpu,cuda}.txt. On CUDA the step runs under bf16
autocast and memory is torch.cuda.max_memory_allocated; beside the step time it gives the
host's time to queue a step (a step that takes no longer waits on the host, not the device)
and, with --profile, the kernels by family and the host's operators.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "a": "PartialFC r1=0.1 + SparseAdamW",
    "b": "PartialFC r1=1.0 + SparseAdamW",
    "c": "pml ArcFaceLoss + AdamW (full)",
    "d": "PartialFC r1=0.1 + dense AdamW",
    "e": "(a) as one CUDA graph",
}
CAPTURE_WARMUP = 2  # eager steps of (e) before its capture


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# aten operations that launch no device kernel (views, metadata, scalars wrapped on the host)
NO_KERNEL = {"detach", "t", "unsqueeze", "view", "expand", "_indices", "_values", "is_coalesced", "select", "slice",
             "promote_types", "scalar_tensor", "_sparse_coo_tensor_with_dims_and_tensors", "_coalesced_", "_unsafe_view",
             "_record_function_enter_new", "_record_function_exit", "as_strided", "alias", "permute", "transpose",
             "_reshape_alias", "squeeze", "lift_fresh"}


def count_operations(step) -> int:
    """The aten operations that ``step()`` dispatches and that compute (a device kernel each,
    about): the host's share of a step that the device does quickly. Triton kernels are not
    aten operations and are not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] not in NO_KERNEL:
                Count.total += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.total


def run_variant(variant: str, classes: int, dim: int, batch: int, steps: int, device: str, profile: bool = False) -> dict:
    import torch

    from unicom.losses import ArcFace, PartialFC
    from unicom.optim import SparseAdamW

    torch.manual_seed(0)
    cuda = device == "cuda"
    if variant == "c":
        from pytorch_metric_learning.losses import ArcFaceLoss

        head = ArcFaceLoss(classes, dim, margin=math.degrees(0.3), scale=64).to(device)
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    else:
        sample_rate = 1.0 if variant == "b" else 0.1
        if variant == "e" and not cuda:
            raise SystemExit("(e) captures a CUDA graph: CUDA only")
        head = PartialFC(dim, classes, ArcFace(0.3, 64.0), sample_rate=sample_rate, seed=0,
                         sparse_gradient=(variant != "d"), check_inputs=False).to(device)
        optimizer_class = torch.optim.AdamW if variant == "d" else SparseAdamW
        optimizer = optimizer_class(head.parameters(), lr=1e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(1)
    untimed = CAPTURE_WARMUP + 1 if variant == "e" else 1  # the first step allocates optimiser state; (e)'s capture
    inputs = [
        (torch.randn(batch, dim, generator=generator).to(device), torch.randint(0, classes, (batch,), generator=generator).to(device))
        for _ in range(steps + untimed)
    ]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    setup_rss = peak_rss_bytes()
    def one_step(x, labels):
        # a captured step without autocast's cache of casts, as PyTorch advises for captured regions
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda, cache_enabled=variant != "e"):
            loss = head(x.requires_grad_(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if variant != "c":
            head.flag_sorted_gradient()
            head.take_label_bounds()  # as a training step takes them (else every step folds in the last bounds)
        optimizer.step()
        return loss.detach()

    if variant == "e":
        from unicom.engine.graph import CapturedStep

        one_step = CapturedStep(one_step, optimizer, generators=head.generators(torch.device(device)),
                                warmup=CAPTURE_WARMUP)

    times, queued = [], []
    for i, (x, labels) in enumerate(inputs):
        start = time.perf_counter()
        loss = one_step(x, labels)
        returned = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
        if i >= untimed:
            times.append(time.perf_counter() - start)
            queued.append(returned - start)
    times.sort()
    queued.sort()
    x, labels = inputs[-1]
    operations = count_operations(lambda: one_step(x.detach(), labels))
    result = {
        "operations": operations,
        "variant": variant,
        "classes": classes,
        "seconds_per_step": times[len(times) // 2],
        # on a GPU: the host's time to queue a step's work (the step itself when it waits for nothing)
        "host_seconds_per_step": queued[len(queued) // 2],
        "loss": float(loss.detach()),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes(),
        "setup_memory_bytes": None if cuda else setup_rss,
    }
    if profile:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gpu_profile import profile_lines

        x, labels = inputs[-1]
        result["profile"], result["device_seconds"] = profile_lines(
            lambda: one_step(x.detach(), labels), title=f"where the time of ({variant}) goes at K = {classes:,}", host=True)
        if result["device_seconds"] is not None:
            result["device_seconds"] /= 1000
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--classes", type=int, nargs="+", default=[1_000_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=7, help="timed steps per variant (the median is reported; memory-bound steps vary on shared machines)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--variants", nargs="+", default=["abcd"],
                        help="which variants to run: one set for every K, or one per --classes value "
                             "(e.g. --classes 1000000 100000 --variants a ac) (default abcd)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile a few steps of (a) and write its kernel table under each K")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    if args.variant:  # child process: one variant, one size
        print(json.dumps(run_variant(args.variant, args.classes[0], args.dim, args.batch, args.steps, args.device,
                                     args.profile)))
        return

    import torch

    lines = [
        f"# PartialFC step benchmark ({args.device})",
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"threads {torch.get_num_threads()}"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        f"d = {args.dim}, batch = {args.batch}, median of {args.steps} steps after one warm-up step; "
        f"each variant in its own process; memory = "
        + ("torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS of the process"),
        "",
    ]
    if len(args.variants) not in (1, len(args.classes)):
        parser.error("--variants: give one set for all K or one per --classes value")
    chosen = args.variants * len(args.classes) if len(args.variants) == 1 else args.variants
    out = Path(args.out or Path(__file__).parent / "results" / f"partial_fc_step_{args.device}.txt")
    for classes, wanted in zip(args.classes, chosen):
        results = {}
        for variant in VARIANTS:
            if variant not in wanted or (variant == "e" and args.device != "cuda"):
                results[variant] = None
                continue
            command = [sys.executable, __file__, "--variant", variant, "--classes", str(classes), "--dim", str(args.dim),
                       "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device]
            command += ["--profile"] if args.profile and variant in "ac" else []
            output = subprocess.run(command, capture_output=True, text=True)
            if output.returncode != 0:
                results[variant] = None
                print(output.stderr, file=sys.stderr)
                continue
            results[variant] = json.loads(output.stdout.strip().splitlines()[-1])
        lines.append(f"## K = {classes:,}")
        lines.append("")
        lines.append("| variant | ms / step | peak memory (GiB) | loss | operations / step |")
        lines.append("|---|---:|---:|---:|---:|")
        for variant, label in VARIANTS.items():
            r = results[variant]
            if r is None:
                why = "not run" if variant not in wanted else "CUDA only" if args.device != "cuda" else "failed"
                lines.append(f"| ({variant}) {label} | {why} | | | |")
                continue
            lines.append(f"| ({variant}) {label} | {1000 * r['seconds_per_step']:.2f} | {r['peak_memory_bytes'] / 2**30:.2f} "
                         f"| {r['loss']:.3f} | {r['operations']} |")
        a, c, d, e = results["a"], results["c"], results["d"], results["e"]
        lines.append("")
        if a and e:
            lines.append(f"e/a time = {e['seconds_per_step'] / a['seconds_per_step']:.3f} (the same step, launched as one "
                         "CUDA graph)")

        if a and c:
            lines.append(f"a/c time = {a['seconds_per_step'] / c['seconds_per_step']:.3f}   "
                         f"a/c memory = {a['peak_memory_bytes'] / c['peak_memory_bytes']:.3f}")
        if a and d:
            lines.append(f"a/d time = {a['seconds_per_step'] / d['seconds_per_step']:.3f}")
        if classes == 1_000_000 and a and c and d:
            ok = (a["seconds_per_step"] / c["seconds_per_step"] <= 0.12 and a["seconds_per_step"] / d["seconds_per_step"] <= 0.4
                  and a["peak_memory_bytes"] < c["peak_memory_bytes"])
            lines.append(f"targets at K = 1M (a/c <= 0.12, a/d <= 0.4, memory a < c): {'met' if ok else 'NOT met'}")
        if args.device == "cuda":
            lines += gpu_target_lines(classes, results)
        if args.device == "cuda" and (a or c or e):
            queued = ", ".join(f"{v} {1000 * r['host_seconds_per_step']:.2f} ms" for v, r in (("a", a), ("c", c), ("e", e)) if r)
            lines.append(f"host time to queue a step (median, before the device is waited for): {queued}")
        if a and c and a.get("device_seconds") and c.get("device_seconds"):
            lines.append(f"device time (the kernels' busy time per step, profiled): a {1000 * a['device_seconds']:.2f} ms, "
                         f"c {1000 * c['device_seconds']:.2f} ms, a/c = {a['device_seconds'] / c['device_seconds']:.3f}")
        for r in (a, c):
            if r and "profile" in r:
                lines += ["", *r["profile"]]
        lines.append("")
        print("\n".join(lines[-12:]), flush=True)
        write(out, lines)  # after each K: what is done is kept if a later K runs out of time
    print("\n".join(lines))


def gpu_target_lines(classes: int, results: dict) -> list[str]:
    """The GPU targets at ``classes`` from the variants' ``results`` (None: not run): K = 1M,
    a step of at most 4 ms; K = 100k, at most half the time of (c). Both are for PartialFC +
    SparseAdamW's step, eager (a) or captured (e): the faster form counts, and is named."""
    best = min((r for r in (results.get("a"), results.get("e")) if r), key=lambda r: r["seconds_per_step"], default=None)
    if best is None:
        return []
    form, c = f" ({best['variant']})", results.get("c")
    if classes == 1_000_000:
        ok = best["seconds_per_step"] <= 0.004
        return [f"target on the GPU at K = 1M: <= 4 ms per step ({'met' if ok else 'NOT met'}: "
                f"{1000 * best['seconds_per_step']:.2f} ms{form})"]
    if classes == 100_000 and c:
        ratio = best["seconds_per_step"] / c["seconds_per_step"]
        return [f"target on the GPU at K = 100,000: <= 0.5x (c)'s time ({'met' if ratio <= 0.5 else 'NOT met'}: "
                f"{ratio:.3f}{form})"]
    return []


def write(out: Path, lines: list[str]) -> None:
    """The results so far, replacing the file whole."""
    from unicom.files import write_text_atomic

    write_text_atomic(out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
