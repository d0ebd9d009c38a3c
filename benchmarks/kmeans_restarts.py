"""How often k-means lands in a poor optimum, and what restarts and k-means++ seeding do about it.

A mixture of 20 classes (random unit directions in 8-d plus Gaussian noise of 0.05 per
coordinate, 10,000 points, L2-normalised) is clustered into k = 40 spherical clusters for 20 iterations,
from 30 seeds, with random initial centroids and 1, 2, 3, 5 or 10 restarts (the best fit
kept, as faiss's nredo) and with greedy k-means++ seeding. Purity: the share of points
whose cluster's majority class is their own (1.0 when no cluster mixes two classes).
A second table does the same at a larger k: 2,000 classes in 32-d (100,000 points,
k = 2,000, 10 iterations, 5 seeds), where every run has many small defects of this kind
and restarts change the fit by little while multiplying the training time. The default of
``--restarts`` in ``unicom cluster`` rests on these two tables.

Usage: python benchmarks/kmeans_restarts.py [--seeds 30] [--backend cpu]
Writes benchmarks/results/kmeans_restarts.txt.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

CLASSES, K, DIM, POINTS, NOISE, ITERATIONS = 20, 40, 8, 10_000, 0.05, 20


LARGE = {"classes": 2000, "k": 2000, "dim": 32, "points": 100_000, "noise": 0.1, "iterations": 10, "seeds": 5}


def mixture(seed: int = 0, classes: int = CLASSES, dim: int = DIM, points: int = POINTS,
            noise: float = NOISE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(0, classes, points)
    rows = centres[truth] + noise * rng.standard_normal((points, dim))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows.astype(np.float32), truth


def purity(labels: np.ndarray, truth: np.ndarray) -> float:
    counts = np.zeros((labels.max() + 1, truth.max() + 1), dtype=np.int64)
    np.add.at(counts, (labels, truth), 1)
    return float(counts.max(axis=1).sum() / len(labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--backend", default="cpu", help="cpu, faiss-gpu, torch-cuda or torch-cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--large-only", action="store_true", help="only the larger-k table")
    args = parser.parse_args()
    os.environ.setdefault("UNICOM_PROGRESS", "0")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from unicom.cluster.kmeans import CentroidSearch, train_kmeans

    lines = [
        "# k-means restarts and seeding (spherical)",
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, backend {args.backend}",
        "",
    ]
    table = "| initial centroids | restarts | mean purity | worst purity | seeds below 0.99 | mean cosine to centroid | s per run |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"

    def run(points, truth, k, iterations, seeds, cases):
        for init, restarts in cases:
            purities, fits, seconds = [], [], []
            for seed in range(seeds):
                started = time.perf_counter()
                result = train_kmeans(points, k, iterations=iterations, seed=seed, init=init, restarts=restarts,
                                      backend=args.backend)
                seconds.append(time.perf_counter() - started)
                labels, _ = CentroidSearch(result.centroids).search(points)
                purities.append(purity(labels, truth))
                fits.append(result.mean_similarity)
            purities = np.array(purities)
            lines.append(f"| {init} | {restarts} | {purities.mean():.4f} | {purities.min():.4f} | "
                         f"{int((purities < 0.99).sum())} of {seeds} | {np.mean(fits):.5f} | {np.median(seconds):.2f} |")
            print(lines[-1], flush=True)

    if not args.large_only:
        points, truth = mixture()
        lines += [f"## {CLASSES} classes, k = {K}: {POINTS:,} points x {DIM}-d, noise {NOISE}, {ITERATIONS} iterations, "
                  f"seeds 0..{args.seeds - 1}", "", table, rule]
        run(points, truth, K, ITERATIONS, args.seeds,
            [("random", 1), ("random", 2), ("random", 3), ("random", 5), ("random", 10), ("kmeans++", 1)])
        lines.append("")
    large = LARGE
    points, truth = mixture(1, large["classes"], large["dim"], large["points"], large["noise"])
    lines += [f"## {large['classes']:,} classes, k = {large['k']:,}: {large['points']:,} points x {large['dim']}-d, "
              f"noise {large['noise']}, {large['iterations']} iterations, seeds 0..{large['seeds'] - 1}", "", table, rule]
    run(points, truth, large["k"], large["iterations"], large["seeds"], [("random", 1), ("random", 3)])
    text = "\n".join(lines) + "\n"
    out = Path(args.out or Path(__file__).resolve().parent / "results" / "kmeans_restarts.txt")
    if args.large_only and out.exists():  # replace the larger-k table only
        kept = out.read_text().split("\n## ")[:2]
        text = "\n## ".join(kept).rstrip("\n") + "\n\n## " + text.split("\n## ")[-1]
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
