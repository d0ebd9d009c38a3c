"""k-means with faiss (spherical by default, on the GPUs when faiss sees any) and the
nearest-centroid search that turns centroids into pseudo-labels.

Training runs faiss's Lloyd iterations one at a time so that each shows on the progress
bar; every iteration is exactly faiss's (assignment, centroid update, split of empty
clusters, normalisation when spherical). faiss never subsamples here: the caller draws
the training sample and reports its size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from unicom.errors import InputError
from unicom.progress import progress

INITS = ("random", "kmeans++")
DEVICES = ("auto", "cpu", "gpu")


def faiss_gpus() -> int:
    """The number of GPUs this faiss build can use (0 for faiss-cpu)."""
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def use_gpu(device: str = "auto") -> bool:
    """``auto``: the GPUs when faiss sees any; ``gpu`` insists; ``cpu`` never."""
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return False
    gpus = faiss_gpus()
    if device == "gpu" and gpus == 0:
        raise InputError("--device gpu: this faiss build sees no GPU; install faiss-gpu (or faiss-gpu-cuvs) or use --device cpu")
    return gpus > 0


def _flat_index(dimension: int, spherical: bool, gpu: bool):
    import faiss

    index = faiss.IndexFlatIP(dimension) if spherical else faiss.IndexFlatL2(dimension)
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)  # replicas: queries are split over the GPUs
    return index


def _int_seed(seed) -> int:
    """A 31-bit integer drawn from ``seed`` (an int or a sequence of ints), for faiss."""
    return int(np.random.default_rng(seed).integers(2**31 - 1))


def initial_centroids(points: np.ndarray, k: int, seed=0, method: str = "random") -> np.ndarray:
    """(k, d) float32 starting centroids drawn from ``points`` (n, d).

    ``random``: k distinct points chosen uniformly (faiss's and the paper's choice);
    ``kmeans++``: greedy D²-weighted seeding (Arthur & Vassilvitskii 2007, as in
    scikit-learn): each next centroid is the best of a few points drawn with probability
    proportional to their squared distance to the nearest centroid so far. Better for
    small k; costs k sequential passes over the points.
    """
    if method == "random":
        rng = np.random.default_rng(seed)
        return np.array(points[rng.choice(len(points), k, replace=False)], dtype=np.float32)
    if method == "kmeans++":
        return _kmeans_plus_plus(points, k, seed)
    raise InputError(f"unknown k-means initialisation {method!r}; choose one of {', '.join(INITS)}")


def _kmeans_plus_plus(points: np.ndarray, k: int, seed) -> np.ndarray:
    # Greedy k-means++: of 2 + log(k) D²-drawn candidates, keep the one that lowers the
    # potential most; plain k-means++ often seeds two centroids in one of k equal clusters.
    rng = np.random.default_rng(seed)
    n = len(points)
    trials = 2 + int(np.log(k))
    squared_lengths = np.einsum("ij,ij->i", points, points, dtype=np.float64)

    def squared_distances(index: np.ndarray) -> np.ndarray:  # (len(index), n)
        dots = (points @ points[index].T).T.astype(np.float64)
        return np.maximum(squared_lengths[index][:, None] - 2.0 * dots + squared_lengths[None], 0.0)

    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    nearest = squared_distances(chosen[:1])[0]
    for i in range(1, k):
        cumulative = np.cumsum(nearest)
        if cumulative[-1] > 0:
            candidates = np.minimum(np.searchsorted(cumulative, rng.random(trials) * cumulative[-1], side="right"), n - 1)
        else:  # every point coincides with a centroid already: any point will do
            candidates = rng.integers(n, size=trials)
        potentials = np.minimum(nearest[None], squared_distances(candidates))
        best = int(np.argmin(potentials.sum(axis=1)))
        chosen[i] = candidates[best]
        nearest = potentials[best]
    return np.array(points[chosen], dtype=np.float32)


class CentroidSearch:
    """The nearest centroid of each row: by cosine (spherical) or by L2 distance.

    ``centroids`` is (k, d); spherical search normalises them. One faiss flat index, on
    the GPUs when ``gpu``; its blocked matrix products run at the machine's BLAS rate.
    """

    def __init__(self, centroids: np.ndarray, spherical: bool = True, gpu: bool = False):
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or len(centroids) == 0:
            raise InputError(f"centroids must be a non-empty (k, d) array, got shape {centroids.shape}")
        norms = np.linalg.norm(centroids, axis=1)
        if spherical:
            centroids = centroids / np.maximum(norms, np.finfo(np.float32).tiny)[:, None]
            norms = np.linalg.norm(centroids, axis=1)
        self.centroids, self.norms, self.spherical = centroids, norms, spherical
        self.index = _flat_index(centroids.shape[1], spherical, gpu)
        self.index.add(centroids)

    def search(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``rows`` (n, d) float32 -> (labels (n,) int64, cosine similarity (n,) float32)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        scores, labels = self.index.search(rows, 1)
        labels = labels[:, 0].astype(np.int64)
        if self.spherical:
            dots = scores[:, 0]
        else:
            dots = np.einsum("ij,ij->i", rows, self.centroids[labels])
        lengths = np.sqrt(np.einsum("ij,ij->i", rows, rows)) * self.norms[labels]
        similarity = dots / np.maximum(lengths, np.finfo(np.float32).tiny)
        return labels, similarity.astype(np.float32)


@dataclass
class KMeansResult:
    """Trained centroids and how well they fit their training points.

    ``objective`` holds faiss's per-iteration objective (sum of inner products when
    spherical, of squared L2 distances otherwise), measured before each update;
    ``sizes`` (k,) int64 counts the training points nearest to each final centroid;
    ``mean_similarity`` (cosine) and ``mean_squared_distance`` are measured with the final
    centroids (weighted means when the points had weights).
    """

    centroids: np.ndarray
    objective: list[float] = field(default_factory=list)
    sizes: np.ndarray | None = None
    mean_similarity: float = float("nan")
    mean_squared_distance: float = float("nan")
    training_points: int = 0
    seconds: float = 0.0

    @property
    def empty_clusters(self) -> int:
        return int((self.sizes == 0).sum())


def fit_quality(
    search: CentroidSearch, points: np.ndarray, weights: np.ndarray | None = None, chunk_rows: int = 65536
) -> tuple[np.ndarray, float, float]:
    """Assign ``points`` to ``search``'s centroids: (sizes (k,) int64, mean cosine, mean ||x - c||²)."""
    k = len(search.centroids)
    sizes = np.zeros(k, dtype=np.int64)
    total_similarity = total_distance = total_weight = 0.0
    for start in range(0, len(points), chunk_rows):
        rows = np.ascontiguousarray(points[start:start + chunk_rows], dtype=np.float32)
        labels, similarity = search.search(rows)
        sizes += np.bincount(labels, minlength=k)
        lengths = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        centroid_lengths = search.norms[labels]
        distance = lengths**2 + centroid_lengths**2 - 2.0 * similarity * lengths * centroid_lengths
        w = np.ones(len(rows)) if weights is None else np.asarray(weights[start:start + chunk_rows], dtype=np.float64)
        total_similarity += float(np.dot(w, similarity))
        total_distance += float(np.dot(w, np.maximum(distance, 0.0)))
        total_weight += float(w.sum())
    return sizes, total_similarity / total_weight, total_distance / total_weight


def train_kmeans(
    points: np.ndarray,
    k: int,
    *,
    iterations: int = 20,
    seed=0,
    spherical: bool = True,
    init: str = "random",
    weights: np.ndarray | None = None,
    gpu: bool = False,
    desc: str = "k-means",
) -> KMeansResult:
    """Lloyd's k-means of ``points`` (n, d) float32 into ``k`` centroids with faiss.

    ``spherical`` (the default) clusters by cosine: assignment by inner product, centroids
    re-normalised after each update. ``weights`` (n,) weighs the points (used to merge the
    centroids of independent parts). Every point is used: sample before calling.
    """
    import faiss

    points = np.ascontiguousarray(points, dtype=np.float32)
    if points.ndim != 2:
        raise InputError(f"training points must be a (n, d) array, got shape {points.shape}")
    n, d = points.shape
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    if n < k:
        raise InputError(f"k = {k} is larger than the {n} training points; lower k or give more samples")
    if iterations < 1:
        raise InputError(f"iterations must be at least 1, got {iterations}")
    if weights is not None:
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if weights.shape != (n,) or not np.isfinite(weights).all() or (weights < 0).any():
            raise InputError(f"weights must be {n} finite non-negative numbers")
    started = time.perf_counter()
    centroids = initial_centroids(points, k, seed, init)
    parameters = faiss.ClusteringParameters()
    parameters.niter = 1
    parameters.seed = _int_seed(seed)
    parameters.spherical = spherical
    parameters.verbose = False
    parameters.max_points_per_centroid = 1 << 30  # no silent subsampling: the caller sampled
    parameters.min_points_per_centroid = 0  # the caller reports points per centroid itself
    if hasattr(parameters, "check_input_data_for_NaNs"):
        parameters.check_input_data_for_NaNs = False  # the rows were checked when read
    index = _flat_index(d, spherical, gpu)
    objective = []
    bar = progress(range(iterations), total=iterations, desc=desc, unit="iter")
    for _ in bar:
        clustering = faiss.Clustering(d, k, parameters)
        faiss.copy_array_to_vector(centroids.ravel(), clustering.centroids)
        clustering.train(points, index, weights)
        objective.append(float(clustering.iteration_stats.at(0).obj))
        centroids = faiss.vector_float_to_array(clustering.centroids).reshape(k, d)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(objective=f"{objective[-1]:.6g}", refresh=False)
    del index
    sizes, similarity, distance = fit_quality(CentroidSearch(centroids, spherical, gpu), points, weights)
    return KMeansResult(
        centroids=centroids,
        objective=objective,
        sizes=sizes,
        mean_similarity=similarity,
        mean_squared_distance=distance,
        training_points=n,
        seconds=time.perf_counter() - started,
    )
