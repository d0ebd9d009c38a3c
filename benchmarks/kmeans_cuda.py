"""k-means on a GPU without faiss-gpu: the torch backend's assignment against the GPU's
float32 matrix-multiply rate, and its training against faiss on the CPU.

Side by side, in one process:

* the float32 matrix-multiply rate of the device (TF32 off, as in the assignment): an
  8192 x 8192 x 8192 product, and the assignment's own shape (rows x 512 @ 512 x k);
* the assignment (:class:`unicom.cluster.kmeans.TorchNearest`, a blocked product with a
  running arg-max): N = 1M unit rows resident on the GPU against k = 65,536 centroids,
  d = 512, and the same through ``CentroidSearch.search`` from host memory (what
  ``unicom cluster assign`` runs: chunks of 65,536 rows copied in, labels copied out);
  rate = 2·N·k·d / seconds;
* training (``train_kmeans(backend="torch-cuda")``) against faiss on this machine's CPUs
  (``backend="cpu"``): 256,000 points, k = 1,000, 10 iterations, the same initial
  centroids; time and final objective.

Usage: python benchmarks/kmeans_cuda.py [--device cuda] [--smoke]
Writes benchmarks/results/kmeans_cuda.txt (``--device cpu`` runs the torch path on the
CPU at small sizes to check the script; it writes kmeans_cuda_smoke_cpu.txt).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

DIM = 512


def timed(function, device, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``function()`` (synchronised on CUDA)."""
    import torch

    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def unit_rows(n: int, d: int, seed: int, device):
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    rows = torch.randn(n, d, generator=generator, device=device)
    return rows / rows.norm(dim=1, keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="small sizes (implied by --device cpu)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("UNICOM_PROGRESS", "0")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import torch

    from unicom.cluster.kmeans import CentroidSearch, TorchNearest, initial_centroids, train_kmeans

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    small = args.smoke or device.type == "cpu"
    square = 1024 if small else 8192
    n, k = (20_000, 2_048) if small else (1_000_000, 65_536)
    train_points, train_k, iterations = (20_000, 100, 3) if small else (256_000, 1_000, 10)
    backend = "torch-cuda" if device.type == "cuda" else "torch-cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # the assignment's float32, not TF32

    a, b = torch.randn(square, square, device=device), torch.randn(square, square, device=device)
    square_rate = 2 * square**3 / timed(lambda: a @ b, device)
    del a, b
    rows = unit_rows(n, DIM, 0, device)
    centroids = unit_rows(k, DIM, 1, device)
    chunk = rows[:65_536]
    shape_rate = 2 * len(chunk) * k * DIM / timed(lambda: chunk @ centroids.T, device)
    nearest = TorchNearest(centroids, True, device)
    assign_seconds = timed(lambda: nearest.nearest(rows), device, repeats=3)
    assign_rate = 2 * n * k * DIM / assign_seconds
    host_rows = rows.cpu().numpy()
    search = CentroidSearch(centroids.cpu().numpy(), True, backend)
    search_seconds = timed(lambda: search.search(host_rows), device, repeats=1)
    search_rate = 2 * n * k * DIM / search_seconds
    del rows, centroids, nearest, search, chunk
    if device.type == "cuda":
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    default = "kmeans_cuda.txt" if device.type == "cuda" and not args.smoke else f"kmeans_cuda_smoke_{device.type}.txt"
    out = Path(args.out or Path(__file__).resolve().parent / "results" / default)
    lines = [
        f"# k-means on {device.type} without faiss-gpu ({'smoke sizes' if small else 'full sizes'})",
        f"{name}; python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs; float32, TF32 off",
        "",
        "| what | GFLOP/s | share of the square product |",
        "|---|---:|---:|",
        f"| matrix product {square} x {square} x {square} (the float32 rate) | {square_rate / 1e9:,.0f} | 100% |",
        f"| matrix product {min(n, 65_536):,} x {DIM} @ {DIM} x {k:,} (the assignment's shape) | {shape_rate / 1e9:,.0f} | "
        f"{100 * shape_rate / square_rate:.0f}% |",
        f"| assignment, {n:,} rows on the device x {k:,} centroids (TorchNearest) | {assign_rate / 1e9:,.0f} | "
        f"{100 * assign_rate / square_rate:.0f}% |",
        f"| assignment from host memory (CentroidSearch.search, chunks of 65,536) | {search_rate / 1e9:,.0f} | "
        f"{100 * search_rate / square_rate:.0f}% |",
        "",
        f"target: assignment >= 50% of the GPU's float32 matrix-multiply rate "
        f"({'met' if assign_rate >= 0.5 * square_rate else 'NOT met'}: {100 * assign_rate / square_rate:.0f}%)",
        "",
    ]
    write(out, lines)  # kept if the training comparison below runs out of time

    points = unit_rows(train_points, DIM, 2, torch.device("cpu")).numpy()
    start = initial_centroids(points, train_k, seed=0)
    results = {}
    for name in (backend, "cpu"):
        began = time.perf_counter()
        result = train_kmeans(points, train_k, iterations=iterations, seed=0, backend=name)
        results[name] = (time.perf_counter() - began, result)
    assert np.array_equal(start, initial_centroids(points, train_k, seed=0))

    ours, faiss_cpu = results[backend], results["cpu"]
    lines += [
        f"training: {train_points:,} points x {DIM}, k = {train_k:,}, {iterations} iterations, spherical, same initial centroids",
        "",
        "| backend | seconds | final objective | mean cosine to centroid |",
        "|---|---:|---:|---:|",
        f"| {backend} | {ours[0]:.2f} | {ours[1].objective[-1]:.6g} | {ours[1].mean_similarity:.6f} |",
        f"| faiss cpu ({os.cpu_count()} CPUs) | {faiss_cpu[0]:.2f} | {faiss_cpu[1].objective[-1]:.6g} | "
        f"{faiss_cpu[1].mean_similarity:.6f} |",
        "",
        f"objective difference: {100 * (ours[1].objective[-1] / faiss_cpu[1].objective[-1] - 1):+.4f}%; "
        f"speed-up over faiss on the CPU: {faiss_cpu[0] / ours[0]:.1f}x",
    ]
    write(out, lines)
    print("\n".join(lines))


def write(out: Path, lines: list[str]) -> None:
    """The results so far, replacing the file whole."""
    from unicom.files import write_text_atomic

    write_text_atomic(out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
