"""k-means pseudo-labels out of core: `unicom cluster` at N = 500,000 and 2,000,000.

Data: d = 512 float16 rows in 10 shards (img_emb_{i}.npy + metadata_{i}.parquet with a
LAION-style ``key``), drawn around 20,000 random unit "concepts"; generated once under
--data (default /tmp/unicom-cluster-bench, not the repository). Each size is clustered
by the real command, ``unicom cluster --fusion image --k 2000`` (spherical, 20
iterations, 256 points per centroid, CPU), in its own process; its peak RSS is that
process's ru_maxrss (os.wait4).

Beside it, in the same run:
  * the raw matrix-multiply rate of this CPU for the assignment's shapes
    (65,536 x 512 @ 512 x 2,000, float32; numpy and torch, the best of both), the limit;
  * scikit-learn KMeans (Lloyd) on the same training sample, from the same initial
    centroids, for the same iterations, against this library's k-means in the same
    (Euclidean) mode, and both sets of centroids measured by the same functions;
  * what 400M samples x 1M clusters needs on GPUs, computed from these figures.

Usage: flock /tmp/unicom-heavy.lock .venv/bin/python benchmarks/cluster_kmeans.py
Writes benchmarks/results/cluster_kmeans.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM, SHARDS, CONCEPTS = 512, 10, 20_000
ITERATIONS, POINTS_PER_CENTROID = 20, 256
CHUNK = 65_536
# Peak dense matrix-multiply rates of one NVIDIA H100 SXM (datasheet), FLOP/s.
GPU_PEAKS = {"H100 FP32": 67e12, "H100 FP16 tensor": 989e12}


def generate(root: Path, rows: int, seed: int = 0) -> None:
    """10 shards of ``rows // 10`` float16 rows around random unit concepts, once."""
    import pyarrow as pa

    from unicom.files import write_json_atomic
    from unicom.formats.embeddings import write_part

    marker = root / "complete.json"
    spec = {"rows": rows, "dim": DIM, "shards": SHARDS, "concepts": CONCEPTS, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return
    rng = np.random.default_rng(seed)
    concepts = rng.standard_normal((CONCEPTS, DIM)).astype(np.float32)
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    per_shard = rows // SHARDS
    for number in range(SHARDS):
        image = np.empty((per_shard, DIM), dtype=np.float16)
        for start in range(0, per_shard, 50_000):
            n = min(50_000, per_shard - start)
            # a concept, a per-sample spread and noise of about the concept's own length
            which = rng.integers(0, CONCEPTS, n)
            spread = rng.uniform(0.6, 1.2, (n, 1)).astype(np.float32)
            image[start:start + n] = concepts[which] + spread * rng.standard_normal((n, DIM), dtype=np.float32) / np.sqrt(DIM)
        keys = pa.array([f"{number * per_shard + r:09d}" for r in range(per_shard)])
        write_part(root, number, image=image, metadata=pa.table({"key": keys}))
    write_json_atomic(marker, spec)


def run_cluster(root: Path, out: Path, k: int) -> dict:
    """`unicom cluster` in a child process: its summary, records, wall time and peak RSS."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "unicom", "cluster", "--image-emb", str(root / "img_emb"),
               "--metadata", str(root / "metadata"), "--fusion", "image", "--k", str(k),
               "--iterations", str(ITERATIONS), "--points-per-centroid", str(POINTS_PER_CENTROID),
               "--device", "cpu", "--out", str(out)]
    started = time.perf_counter()
    child = subprocess.Popen(command, env={**os.environ, "UNICOM_PROGRESS": "0"}, stdout=subprocess.PIPE, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"unicom cluster failed:\n{output}")
    return {
        "summary": json.loads((out / "clusters.json").read_text()),
        "record": json.loads((out / "centroids.json").read_text()),
        "wall": wall,
        "peak_rss": usage.ru_maxrss * 1024,  # Linux reports KiB
        "output": output,
    }


def matmul_limit(k: int, repeats: int = 5) -> dict:
    """Best FLOP/s of (CHUNK x d) @ (d x k) float32 in numpy and torch, and faiss's search."""
    import faiss
    import torch

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((CHUNK, DIM), dtype=np.float32)
    centroids = rng.standard_normal((k, DIM), dtype=np.float32)
    flop = 2.0 * CHUNK * DIM * k

    def best(function) -> float:
        function()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            function()
            times.append(time.perf_counter() - started)
        return flop / min(times)

    product = np.empty((CHUNK, k), dtype=np.float32)
    rates = {"numpy": best(lambda: np.matmul(rows, centroids.T, out=product))}
    rows_t, centroids_t, product_t = torch.from_numpy(rows), torch.from_numpy(centroids), torch.from_numpy(product)
    rates["torch"] = best(lambda: torch.matmul(rows_t, centroids_t.T, out=product_t))
    index = faiss.IndexFlatIP(DIM)
    index.add(centroids)
    rates["faiss IndexFlatIP search (k=1)"] = best(lambda: index.search(rows, 1))
    return rates


def compare_with_sklearn(root: Path, k: int, spherical_centroids: np.ndarray, rounds: int = 2) -> dict:
    """This library's k-means and scikit-learn's on the same sample, init and iterations."""
    from sklearn import __version__ as sklearn_version
    from sklearn.cluster import KMeans

    from unicom.cluster import ClusterInputs, KMeansSettings, initial_centroids, train_kmeans
    from unicom.cluster.kmeans import CentroidSearch, fit_quality
    from unicom.cluster.pipeline import kmeans_seed, training_sample
    from unicom.formats.embeddings import EmbeddingFolders

    inputs = ClusterInputs(EmbeddingFolders(image=root / "img_emb", metadata=root / "metadata"), fusion="image")
    settings = KMeansSettings(k=k, iterations=ITERATIONS, points_per_centroid=POINTS_PER_CENTROID)
    sample = training_sample(inputs, settings).sample  # exactly what `unicom cluster` trained on
    init = initial_centroids(sample, k, kmeans_seed(settings), "random")  # ... and where it started

    # Alternate the two, twice, and keep each one's best time: this machine is shared, and
    # a burst of other work during one run would otherwise decide the ratio.
    ours_seconds = sklearn_seconds = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        ours = train_kmeans(sample, k, iterations=ITERATIONS, seed=kmeans_seed(settings), spherical=False, desc="unicom (L2)")
        ours_seconds = min(ours_seconds, time.perf_counter() - started)
        started = time.perf_counter()
        reference = KMeans(n_clusters=k, init=init, n_init=1, max_iter=ITERATIONS, tol=0.0, algorithm="lloyd").fit(sample)
        sklearn_seconds = min(sklearn_seconds, time.perf_counter() - started)

    def quality(centroids, spherical):
        _, similarity, distance = fit_quality(CentroidSearch(centroids, spherical=spherical), sample)
        return similarity, distance

    return {
        "sklearn": sklearn_version,
        "rounds": rounds,
        "points": len(sample),
        "ours_seconds": ours_seconds,
        "sklearn_seconds": sklearn_seconds,
        "sklearn_iterations": int(reference.n_iter_),
        "ours_l2": quality(ours.centroids, False),
        "sklearn_l2": quality(reference.cluster_centers_, False),
        "ours_spherical": quality(spherical_centroids, True),
        "sklearn_as_spherical": quality(reference.cluster_centers_, True),
    }


def gpu_plan(assign_efficiency: float, train_efficiency: float) -> list[str]:
    """FLOP, memory and GPU time of 400M samples x 1M clusters (d = 512), from the
    efficiencies measured here (fraction of the matrix-multiply peak actually reached)."""
    n, k, d, passes = 400e6, 1e6, 512, ITERATIONS + 1
    parts, part_k = 160, 62_500
    part_n, union = n / parts, parts * part_k
    # name, FLOP, efficiency, GPUs it spreads over, host memory
    stages = [
        (f"flat training, 39 points per centroid ({39 * k / 1e6:.0f}M points), 1 node", 2 * 39 * k * d * k * passes,
         train_efficiency, 8, f"{39 * k * d * 4 / 2**30:.0f} GiB sample"),
        (f"hierarchical: {parts} parts of {part_n / 1e6:.1f}M samples into {part_k:,} centroids", parts * 2 * part_n * d * part_k * passes,
         train_efficiency, parts, f"{part_n * d * 4 / 2**30:.1f} GiB per part"),
        (f"hierarchical: merge the {union / 1e6:.0f}M part centroids into 1M, 1 node", 2 * union * d * k * passes,
         train_efficiency, 8, f"{union * d * 4 / 2**30:.0f} GiB union"),
        ("assignment of all 400M samples", 2 * n * d * k, assign_efficiency, parts, "one chunk per GPU"),
    ]
    lines = [
        "| stage | PFLOP | " + " | ".join(f"{name}: GPU-hours, wall" for name in GPU_PEAKS) + " | host memory |",
        "|---|---:|" + "---:|" * len(GPU_PEAKS) + "---|",
    ]
    walls = {name: 0.0 for name in GPU_PEAKS}
    for name, flop, efficiency, gpus, memory in stages:
        cells = []
        for peak_name, peak in GPU_PEAKS.items():
            hours = flop / (peak * efficiency) / 3600
            cells.append(f"{hours:,.2f} h, {hours * 60 / gpus:,.1f} min on {gpus}")
            if not name.startswith("flat"):
                walls[peak_name] += hours * 60 / gpus
        lines.append(f"| {name} | {flop / 1e15:,.0f} | " + " | ".join(cells) + f" | {memory} |")
    lines.append("")
    lines.append(
        "Centroids on each GPU: 1M x 512 float32 = 1.9 GiB (0.95 GiB float16). Hierarchical wall time "
        "(parts and assignment on 160 GPUs, merge on 8): "
        + "; ".join(f"{name} {minutes:,.1f} min" for name, minutes in walls.items()) + "."
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/unicom-cluster-bench", help="where the shards are generated (not the repository)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500_000, 2_000_000])
    parser.add_argument("--k", type=int, default=2000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cluster_kmeans.txt"))
    args = parser.parse_args()

    import faiss
    import sklearn
    import torch

    data = Path(args.data)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    lines = [
        "# unicom cluster: k-means pseudo-labels out of core (CPU)",
        f"{cpu}, {os.cpu_count()} CPUs; python {platform.python_version()}, numpy {np.__version__}, "
        f"faiss {faiss.__version__} (omp threads {faiss.omp_get_max_threads()}), torch {torch.__version__}, "
        f"scikit-learn {sklearn.__version__}",
        f"data: d = {DIM} float16, {SHARDS} shards on disk, rows around {CONCEPTS:,} random concepts; "
        f"k = {args.k}, spherical, {ITERATIONS} iterations, {POINTS_PER_CENTROID} points per centroid",
        "",
        "## unicom cluster, each size in its own process",
        "",
        "| N | training points | read + sample (s) | k-means (s) | assign (s) | assign rate (samples/s) | assign GFLOP/s | process wall (s) | peak RSS (GiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    limits = [matmul_limit(args.k)]  # measured before and after the runs; the best is the limit
    load = [os.getloadavg()[0]]
    runs = {}
    for rows in args.sizes:
        root = data / f"n{rows}"
        generate(root, rows)
        run = runs[rows] = run_cluster(root, data / f"out-n{rows}", args.k)
        seconds = run["summary"]["seconds"]
        run["assign_flops"] = 2.0 * rows * DIM * args.k / seconds["assign"]
        lines.append(
            f"| {rows:,} | {run['record']['training_points']:,} | {seconds['read']:.1f} | {seconds['kmeans']:.1f} | "
            f"{seconds['assign']:.1f} | {rows / seconds['assign']:,.0f} | {run['assign_flops'] / 1e9:.1f} | "
            f"{run['wall']:.1f} | {run['peak_rss'] / 2**30:.2f} |"
        )
        print("\n".join(lines), flush=True)
    limits.append(matmul_limit(args.k))
    load.append(os.getloadavg()[0])
    limit_rates = {name: max(rates[name] for rates in limits) for name in limits[0]}
    limit = max(limit_rates["numpy"], limit_rates["torch"])
    largest = runs[max(runs)]
    train_flop = 2.0 * largest["record"]["training_points"] * DIM * args.k * (ITERATIONS + 1)
    train_efficiency = train_flop / largest["summary"]["seconds"]["kmeans"] / limit
    assign_efficiency = largest["assign_flops"] / limit
    lines += [
        "",
        f"## matrix-multiply limit ({CHUNK:,} x {DIM} @ {DIM} x {args.k:,} float32, best of 5, before and after the runs)",
        "",
        *[f"- {name}: {rate / 1e9:.1f} GFLOP/s" for name, rate in limit_rates.items()],
        f"- limit (best of numpy, torch): {limit / 1e9:.1f} GFLOP/s",
        "",
        "## targets",
        "",
    ]
    for rows, run in runs.items():
        lines.append(
            f"- N = {rows:,}: assignment at {run['assign_flops'] / limit:.0%} of the matrix-multiply limit "
            f"(target >= 50%: {'met' if run['assign_flops'] >= 0.5 * limit else 'NOT met'}); peak RSS "
            f"{run['peak_rss'] / 2**30:.2f} GiB (target <= 3 GiB: {'met' if run['peak_rss'] <= 3 * 2**30 else 'NOT met'})"
        )
    sizes = sorted(runs)
    if len(sizes) > 1:
        lines.append(
            f"- memory vs N: {sizes[-1] / sizes[0]:.0f}x the samples, {runs[sizes[-1]]['peak_rss'] / runs[sizes[0]]['peak_rss']:.2f}x the peak RSS"
        )
    print("\n".join(lines), flush=True)

    centroids = np.load(data / f"out-n{max(runs)}" / "centroids.npy")
    comparison = compare_with_sklearn(data / f"n{max(runs)}", args.k, centroids)
    load.append(os.getloadavg()[0])
    ours_l2, sklearn_l2 = comparison["ours_l2"][1], comparison["sklearn_l2"][1]
    lines += [
        f"- training vs scikit-learn (same {comparison['points']:,} points, same initial centroids, {ITERATIONS} Lloyd "
        f"iterations, Euclidean): {comparison['sklearn_seconds'] / comparison['ours_seconds']:.2f}x faster "
        f"(target > 1: {'met' if comparison['ours_seconds'] < comparison['sklearn_seconds'] else 'NOT met'}); objective "
        f"{(ours_l2 - sklearn_l2) / sklearn_l2:+.3%} (target within 1%: {'met' if abs(ours_l2 - sklearn_l2) <= 0.01 * sklearn_l2 else 'NOT met'})",
        "",
        f"## k-means vs scikit-learn {comparison['sklearn']} KMeans(algorithm='lloyd', init=<same centroids>, n_init=1, "
        f"max_iter={ITERATIONS}, tol=0)",
        "",
        "Objectives on the training sample, each set of centroids measured by the same code: the k-means objective "
        "(mean squared L2 distance to the nearest centroid, lower is better) and the spherical one (mean cosine to the "
        "nearest L2-normalised centroid, higher is better).",
        "",
        "| k-means | time (s) | iterations | mean squared distance | mean cosine |",
        "|---|---:|---:|---:|---:|",
        f"| unicom, Euclidean (faiss) | {comparison['ours_seconds']:.1f} | {ITERATIONS} | {ours_l2:.5f} | {comparison['ours_l2'][0]:.5f} |",
        f"| scikit-learn, Euclidean | {comparison['sklearn_seconds']:.1f} | {comparison['sklearn_iterations']} | {sklearn_l2:.5f} | "
        f"{comparison['sklearn_as_spherical'][0]:.5f} |",
        f"| unicom, spherical (the default; the run above) | {largest['summary']['seconds']['kmeans']:.1f} | {ITERATIONS} | "
        f"{comparison['ours_spherical'][1]:.5f} | {comparison['ours_spherical'][0]:.5f} |",
        "",
        f"time ratio scikit-learn / unicom (Euclidean): {comparison['sklearn_seconds'] / comparison['ours_seconds']:.2f}; "
        f"objective difference: {(ours_l2 - sklearn_l2) / sklearn_l2:+.3%}; times are the best of {comparison['rounds']} "
        f"alternating runs each",
        "",
        f"1-minute load average of this shared machine: {', '.join(f'{x:.1f}' for x in load)} "
        "(start, after the unicom runs, after the comparison); this job uses 2.",
        "",
        "## what 400M samples x 1M clusters needs on GPUs (d = 512, LAION-400M's ViT-B/32 embeddings)",
        "",
        f"Efficiencies measured above, assumed to carry over to a GPU's matrix-multiply peak: assignment "
        f"{assign_efficiency:.0%}, k-means training {train_efficiency:.0%} (FLOP = 2·n·d·k per pass, "
        f"{ITERATIONS} iterations + 1 final assignment). GPU peaks: NVIDIA's H100 SXM datasheet, dense. faiss's GPU "
        "flat index runs cuBLAS GEMMs in float32, or float16 with useFloat16.",
        "",
        *gpu_plan(assign_efficiency, train_efficiency),
        "",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
