"""Cluster-size statistics and their histogram (the paper's distribution of samples per
pseudo-class)."""

from __future__ import annotations

import os

import numpy as np

from unicom.files import atomic_path

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def size_statistics(sizes: np.ndarray, tiny_cluster_size: int = 10, list_empty: int = 20) -> dict:
    """Summary of ``sizes`` (k,) int: samples per cluster.

    ``tiny`` counts the non-empty clusters with fewer than ``tiny_cluster_size`` samples;
    ``imbalance_factor`` is k·Σ sizes² / N² (1 when every cluster has N/k samples, as
    faiss reports it). The first ``list_empty`` empty cluster ids are listed.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    empty = np.flatnonzero(sizes == 0)
    tiny = (sizes > 0) & (sizes < tiny_cluster_size)
    return {
        "clusters": int(len(sizes)),
        "samples": total,
        "mean": total / len(sizes),
        "std": float(sizes.std()),
        "min": int(sizes.min()),
        "max": int(sizes.max()),
        "percentiles": {str(p): float(np.percentile(sizes, p)) for p in PERCENTILES},
        "imbalance_factor": float(len(sizes) * np.square(sizes, dtype=np.float64).sum() / total**2) if total else float("nan"),
        "empty": int(len(empty)),
        "empty_clusters": empty[:list_empty].tolist(),
        "tiny_threshold": int(tiny_cluster_size),
        "tiny": int(tiny.sum()),
        "tiny_samples": int(sizes[tiny].sum()),
    }


def plot_cluster_sizes(
    sizes: np.ndarray,
    path: str | os.PathLike,
    *,
    tiny_cluster_size: int | None = None,
    min_cluster_size: int | None = None,
    title: str | None = None,
) -> None:
    """Write a PNG histogram of ``sizes`` (number of clusters per size) to ``path``, atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    sizes = np.asarray(sizes, dtype=np.int64)
    largest = int(sizes.max()) if len(sizes) else 0
    # at most 100 bins, each covering the same whole number of sizes (no aliasing stripes)
    width = max(1, -(-(largest + 1) // 100))
    bins = np.arange(0, largest + width + 1, width) - 0.5
    counts, edges = np.histogram(sizes, bins=bins)
    figure = Figure(figsize=(7, 4), dpi=120)
    axes = figure.subplots()
    axes.stairs(counts, edges, fill=True, color="#4C72B0")
    if counts.max(initial=0) > 50 * max(counts[counts > 0].min(initial=1), 1):
        axes.set_yscale("log")  # long tails: a few huge clusters beside many small ones
    axes.set_xlabel("samples per cluster")
    axes.set_ylabel("clusters")
    mean = sizes.mean() if len(sizes) else 0.0
    axes.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.1f}")
    if tiny_cluster_size:
        axes.axvline(tiny_cluster_size, color="#DD8452", linestyle=":", linewidth=1, label=f"tiny < {tiny_cluster_size}")
    if min_cluster_size:
        axes.axvline(min_cluster_size, color="#C44E52", linewidth=1, label=f"dropped < {min_cluster_size}")
    axes.legend(loc="upper right", fontsize=8)
    empty = int((sizes == 0).sum())
    axes.set_title(title or f"{len(sizes):,} clusters, {int(sizes.sum()):,} samples, {empty:,} empty", fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
