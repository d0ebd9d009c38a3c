"""k-means (spherical by default) and the nearest-centroid search that turns centroids
into pseudo-labels, on one of three backends (:func:`compute_backend`):

* ``cpu``: faiss on the CPU;
* ``faiss-gpu``: faiss on every GPU it sees (a faiss-gpu build);
* ``torch-cuda``: the same Lloyd iterations in torch on this process's GPU, for machines
  whose faiss has no GPU support (the faiss-gpu wheels do not cover every CUDA version).
  The assignment is a blocked float32 matrix product with a running arg-max, the update
  a scatter-add; the objective, the split of empty clusters and the spherical
  normalisation are faiss's.

Training runs the Lloyd iterations one at a time so that each shows on the progress bar;
on faiss every iteration is exactly faiss's (assignment, centroid update, split of empty
clusters, normalisation when spherical). Several restarts (faiss's ``nredo``) keep the
centroids that fit the training points best. Nothing subsamples here: the caller draws
the training sample and reports its size (:func:`training_memory` says what it costs).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unicom.errors import InputError
from unicom.progress import progress

INITS = ("random", "kmeans++")
DEVICES = ("auto", "cpu", "gpu")
BACKENDS = ("cpu", "faiss-gpu", "torch-cuda", "torch-cpu")  # torch-cpu: the torch path on the CPU, for comparisons
EMPTY_CLUSTER_EPS = 1 / 1024  # faiss's perturbation when an empty cluster takes half of another


def faiss_gpus() -> int:
    """The number of GPUs this faiss build can use (0 for faiss-cpu)."""
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


# device files a GPU that torch can use shows on Linux: NVIDIA's driver, ROCm's, WSL's
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def _no_gpu_device_files() -> bool:
    """True on Linux when none of :data:`GPU_DEVICE_FILES` exists: no driver that CUDA (or
    ROCm) could reach, so there is no need to import torch (a second or two, and about
    0.85 GiB of libraries in the resident set for a CUDA build) to learn that."""
    return sys.platform.startswith("linux") and not any(os.path.exists(path) for path in GPU_DEVICE_FILES)


def _torch_cuda() -> bool:
    if "torch" not in sys.modules and _no_gpu_device_files():
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def compute_backend(device: str = "auto") -> str:
    """Where k-means and the nearest-centroid search run (one of :data:`BACKENDS`).

    ``auto``: faiss's GPUs when faiss sees any, else this process's GPU through torch when
    CUDA is available (torch is not imported where no GPU driver's device file is), else the CPU; ``gpu`` insists on one of the GPU backends; ``cpu``
    is faiss on the CPU.
    """
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    if faiss_gpus() > 0:
        return "faiss-gpu"
    if _torch_cuda():
        return "torch-cuda"
    if device == "gpu":
        raise InputError("--device gpu: no GPU here (faiss sees none and torch finds no CUDA device); use --device cpu")
    return "cpu"


def use_gpu(device: str = "auto") -> bool:
    """Whether :func:`compute_backend` puts the work on a GPU."""
    return compute_backend(device) != "cpu"


def _flat_index(dimension: int, spherical: bool, gpu: bool):
    import faiss

    index = faiss.IndexFlatIP(dimension) if spherical else faiss.IndexFlatL2(dimension)
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)  # replicas: queries are split over the GPUs
    return index


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InputError(f"unknown k-means backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def available_memory() -> int | None:
    """Bytes of memory this process may still take (the kernel's MemAvailable, bounded by a
    container's cgroup limit), or None where that cannot be read."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 1 << 60:
            free = int(limit) - int(usage)
            available = free if available is None else min(available, free)
        break
    return available


def training_memory(rows: int, dimension: int, k: int) -> int:
    """Bytes that training k-means on ``rows`` points of ``dimension`` takes on the host:
    the float32 sample, per-point assignment and distance, and the centroids with their
    update (a few copies of k x dimension)."""
    return rows * (4 * dimension + 16) + 4 * k * dimension * 4


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

    ``centroids`` is (k, d); spherical search normalises them. On faiss one flat index
    (on its GPUs for ``faiss-gpu``), whose blocked matrix products run at the machine's
    BLAS rate; on ``torch-cuda`` the centroids stay on the GPU and each call's rows go
    through :class:`TorchNearest`.
    """

    def __init__(self, centroids: np.ndarray, spherical: bool = True, backend: str = "cpu"):
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or len(centroids) == 0:
            raise InputError(f"centroids must be a non-empty (k, d) array, got shape {centroids.shape}")
        norms = np.linalg.norm(centroids, axis=1)
        if spherical:
            centroids = centroids / np.maximum(norms, np.finfo(np.float32).tiny)[:, None]
            norms = np.linalg.norm(centroids, axis=1)
        self.centroids, self.norms, self.spherical = centroids, norms, spherical
        self.backend = _check_backend(backend)
        if self.backend.startswith("torch"):
            self.torch = TorchNearest(centroids, spherical, self.backend.split("-")[1])
        else:
            self.index = _flat_index(centroids.shape[1], spherical, self.backend == "faiss-gpu")
            self.index.add(centroids)

    def search(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``rows`` (n, d) float32 -> (labels (n,) int64, cosine similarity (n,) float32)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if self.backend.startswith("torch"):
            labels, scores = self.torch.search_numpy(rows)
        else:
            scores, labels = self.index.search(rows, 1)
            labels, scores = labels[:, 0].astype(np.int64), scores[:, 0]
        if self.spherical:
            dots = scores
        else:
            dots = np.einsum("ij,ij->i", rows, self.centroids[labels])
        lengths = np.sqrt(np.einsum("ij,ij->i", rows, rows)) * self.norms[labels]
        similarity = dots / np.maximum(lengths, np.finfo(np.float32).tiny)
        return labels, similarity.astype(np.float32)


TILE_ROWS = 65536  # rows per score tile of TorchNearest


class TorchNearest:
    """Nearest centroids by float32 matrix products in torch (any device; CUDA in practice).

    Scores are ``x · c`` (spherical: inner product, as faiss's IndexFlatIP) or
    ``x · c − |c|²/2`` (L2: the arg-max is the nearest centroid, and
    ``|x|² − 2 · score`` its squared distance, as faiss's IndexFlatL2 returns). Rows and
    centroids are taken in blocks so that no score tile exceeds ``tile_bytes``; the best
    centroid so far is kept per row.
    """

    def __init__(self, centroids, spherical: bool, device, tile_bytes: int = 1 << 30):
        import torch

        self.device = torch.device(device)
        self.spherical = spherical
        self.tile_bytes = tile_bytes
        self.set_centroids(torch.as_tensor(centroids, dtype=torch.float32).to(self.device))

    def set_centroids(self, centroids) -> None:
        """(k, d) float32 on the device (used as they are: normalise them first if spherical)."""
        self.centroids = centroids
        self.half_squared = None if self.spherical else centroids.square().sum(dim=1).mul_(0.5)

    def nearest(self, rows):
        """(n, d) float32 on the device -> (labels (n,) int64, scores (n,) float32): the inner
        product (spherical) or the squared L2 distance to the nearest centroid.

        Tiles of at most :data:`TILE_ROWS` rows by as many centroids as ``tile_bytes`` of
        scores allow (a multiple of 256 when over 256, the matrix units' tile), in float32
        without TF32."""
        import torch

        from unicom.engine.device import exact_float32

        n, k = rows.shape[0], self.centroids.shape[0]
        row_block = max(1, min(n, TILE_ROWS))
        block = max(1, min(k, self.tile_bytes // (4 * row_block)))
        if 256 < block < k:
            block -= block % 256
        best = torch.full((n,), -torch.inf, dtype=torch.float32, device=rows.device)
        labels = torch.zeros(n, dtype=torch.int64, device=rows.device)
        with exact_float32():
            for first in range(0, n, row_block):
                tile_rows = rows[first:first + row_block]
                tile_best, tile_labels = best[first:first + row_block], labels[first:first + row_block]
                for start in range(0, k, block):
                    scores = tile_rows @ self.centroids[start:start + block].T
                    if self.half_squared is not None:
                        scores -= self.half_squared[start:start + block]
                    value, index = scores.max(dim=1)
                    better = value > tile_best  # ties keep the lower centroid index, as faiss does
                    tile_best.copy_(torch.where(better, value, tile_best))
                    tile_labels.copy_(torch.where(better, index + start, tile_labels))
        if self.half_squared is not None:
            best = (rows.square().sum(dim=1) - 2 * best).clamp_min_(0)
        return labels, best

    def search_numpy(self, rows: np.ndarray, chunk_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) rows in host memory -> (labels (n,) int64, scores (n,) float32), as
        :meth:`nearest` gives them for each chunk of ``chunk_rows`` rows.

        On a GPU the chunks are pipelined: each is copied into one of two page-locked
        buffers and from there to the GPU without waiting, and a chunk's results are read
        back (through page-locked memory) only once the next chunk is queued behind it, so
        the host reads rows while the GPU computes instead of both taking turns (a copy from
        or to pageable memory waits for the device).
        """
        import torch

        from unicom.engine.device import HostCopy

        n = len(rows)
        labels, scores = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float32)
        cuda = self.device.type == "cuda"
        if cuda and n:
            size = (min(chunk_rows, n), rows.shape[1])
            staging = [torch.empty(size, dtype=torch.float32, pin_memory=True) for _ in range(2)]
            copied = [None, None]  # events: the device has read staging[b], which may be filled again
        pending = None

        def store(start, stop, index, score):
            labels[start:stop], scores[start:stop] = index.array(), score.array()

        for number, start in enumerate(range(0, n, chunk_rows)):
            stop = min(start + chunk_rows, n)
            if cuda:
                buffer = number % 2
                if copied[buffer] is not None:
                    copied[buffer].synchronize()  # chunk number - 2's copy: long done
                host = staging[buffer][: stop - start]
                host.numpy()[...] = rows[start:stop]
                chunk = host.to(self.device, non_blocking=True)
                copied[buffer] = torch.cuda.Event()
                copied[buffer].record(torch.cuda.current_stream(self.device))
            else:
                chunk = torch.from_numpy(np.ascontiguousarray(rows[start:stop], dtype=np.float32)).to(self.device)
            index, score = self.nearest(chunk)
            if pending is not None:
                store(*pending)
            pending = (start, stop, HostCopy(index), HostCopy(score))
        if pending is not None:
            store(*pending)
        return labels, scores


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
    backend: str = "cpu",
    restarts: int = 1,
    desc: str = "k-means",
) -> KMeansResult:
    """Lloyd's k-means of ``points`` (n, d) float32 into ``k`` centroids.

    ``spherical`` (the default) clusters by cosine: assignment by inner product, centroids
    re-normalised after each update. ``weights`` (n,) weighs the points (used to merge the
    centroids of independent parts). ``backend``: see :func:`compute_backend`.
    ``restarts`` runs the whole training that many times from different initial centroids
    (restart 0 from ``seed``, restart r from ``(seed, r)``) and keeps the centroids with
    the best fit to the points (highest mean cosine when spherical, lowest mean squared
    distance otherwise), as faiss's ``nredo``. Every point is used: sample before calling.
    """
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
    if restarts < 1:
        raise InputError(f"restarts must be at least 1, got {restarts}")
    if weights is not None:
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if weights.shape != (n,) or not np.isfinite(weights).all() or (weights < 0).any():
            raise InputError(f"weights must be {n} finite non-negative numbers")
    _check_backend(backend)
    started = time.perf_counter()
    if backend.startswith("torch"):
        lloyd = _TorchLloyd(points, weights, spherical, backend.split("-")[1])
    else:
        lloyd = _FaissLloyd(points, weights, spherical, backend)
    best = None
    for restart in range(restarts):
        centroids = initial_centroids(points, k, seed if restart == 0 else (seed, restart), init)
        label = desc if restarts == 1 else f"{desc} ({restart + 1}/{restarts})"
        centroids, objective = _lloyd_iterations(lloyd, centroids, iterations, label,
                                                 _int_seed(seed if restart == 0 else (seed, restart)))
        search = CentroidSearch(centroids, spherical, backend)
        sizes, similarity, distance = fit_quality(search, points, weights)
        fit = similarity if spherical else -distance
        if best is None or fit > best[0]:
            best = (fit, centroids, objective, sizes, similarity, distance)
        del search
    lloyd.close()
    _, centroids, objective, sizes, similarity, distance = best
    return KMeansResult(
        centroids=centroids,
        objective=objective,
        sizes=sizes,
        mean_similarity=similarity,
        mean_squared_distance=distance,
        training_points=n,
        seconds=time.perf_counter() - started,
    )


def _lloyd_iterations(lloyd, centroids: np.ndarray, iterations: int, desc: str, seed: int) -> tuple[np.ndarray, list[float]]:
    objective = []
    bar = progress(range(iterations), total=iterations, desc=desc, unit="iter")
    for _ in bar:
        centroids, value = lloyd.iteration(centroids, seed)
        objective.append(value)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(objective=f"{objective[-1]:.6g}", refresh=False)
    return centroids, objective


class _FaissLloyd:
    """One faiss iteration at a time: faiss.Clustering with niter = 1 from given centroids."""

    def __init__(self, points: np.ndarray, weights: np.ndarray | None, spherical: bool, backend: str):
        import faiss

        self.points, self.weights, self.spherical = points, weights, spherical
        parameters = faiss.ClusteringParameters()
        parameters.niter = 1
        parameters.spherical = spherical
        parameters.verbose = False
        parameters.max_points_per_centroid = 1 << 30  # no silent subsampling: the caller sampled
        parameters.min_points_per_centroid = 0  # the caller reports points per centroid itself
        if hasattr(parameters, "check_input_data_for_NaNs"):
            parameters.check_input_data_for_NaNs = False  # the rows were checked when read
        self.parameters = parameters
        self.index = _flat_index(points.shape[1], spherical, backend == "faiss-gpu")

    def iteration(self, centroids: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
        import faiss

        k, d = centroids.shape
        self.parameters.seed = seed
        clustering = faiss.Clustering(d, k, self.parameters)
        faiss.copy_array_to_vector(np.ascontiguousarray(centroids, dtype=np.float32).ravel(), clustering.centroids)
        clustering.train(self.points, self.index, self.weights)
        return faiss.vector_float_to_array(clustering.centroids).reshape(k, d), float(clustering.iteration_stats.at(0).obj)

    def close(self) -> None:
        self.index = None


class _TorchLloyd:
    """faiss's Lloyd iteration in torch on this process's GPU.

    The points stay on the GPU when they take at most half of its free memory, else they
    are streamed from pinned host memory in chunks every iteration. The assignment is
    :class:`TorchNearest`; the update sums the (weighted) points of each centroid with a
    scatter-add; empty clusters are split as faiss splits them
    (:func:`split_empty_clusters`); spherical centroids are re-normalised.
    """

    def __init__(self, points: np.ndarray, weights: np.ndarray | None, spherical: bool, device="cuda",
                 chunk_rows: int = 1 << 16):
        import torch

        self.device = torch.device(device)
        self.spherical = spherical
        self.n = len(points)
        self.chunk_rows = chunk_rows
        host = torch.from_numpy(points)
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        resident = free is None or points.nbytes <= free // 2
        self.points = host.to(self.device) if resident else host.pin_memory()
        self.weights = None if weights is None else torch.from_numpy(weights).to(self.device)

    def _chunks(self):
        for start in range(0, self.n, self.chunk_rows):
            rows = self.points[start:start + self.chunk_rows].to(self.device, non_blocking=True)
            weights = None if self.weights is None else self.weights[start:start + self.chunk_rows]
            yield rows, weights

    def iteration(self, centroids: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
        import torch

        k, d = centroids.shape
        current = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(self.device)
        nearest = TorchNearest(current, self.spherical, self.device)
        sums = torch.zeros(k, d, dtype=torch.float32, device=self.device)
        counts = torch.zeros(k, dtype=torch.float32, device=self.device)
        objective = torch.zeros((), dtype=torch.float64, device=self.device)
        for rows, weights in self._chunks():
            labels, scores = nearest.nearest(rows)
            objective += scores.double().sum()
            if weights is None:
                sums.index_add_(0, labels, rows)
                counts.index_add_(0, labels, torch.ones_like(scores))
            else:
                sums.index_add_(0, labels, rows * weights[:, None])
                counts.index_add_(0, labels, weights)
        hassign = counts.cpu().numpy()
        updated = (sums / counts.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).cpu().numpy()
        updated[hassign == 0] = 0.0
        split_empty_clusters(updated, hassign, self.n)
        if self.spherical:
            updated /= np.maximum(np.linalg.norm(updated, axis=1, keepdims=True), np.finfo(np.float32).tiny)
        return updated, float(objective)

    def close(self) -> None:
        self.points = self.weights = None


def _walk(rng: np.random.Generator, hassign: np.ndarray, n: int, block: int = 1 << 14) -> int:
    """The cluster the walk of :func:`split_empty_clusters` accepts: from cluster 0 on, in
    turn (wrapping around), cluster j with probability (size_j − 1) / (n − k), one uniform
    draw per step. The draws are made a block at a time and the generator is then advanced
    by the steps taken, so the result and the generator's state are those of the walk done
    one draw at a time."""
    k = len(hassign)
    denominator = max(n - k, 1)
    bits = rng.bit_generator  # PCG64: one 64-bit output per float64 draw
    position = 0
    while True:
        state = bits.state
        steps = (position + np.arange(block)) % k
        # in float64, as the one-draw-at-a-time walk compares (numpy 1.x keeps float32 arrays in float32)
        accepted = np.flatnonzero(rng.random(block) < (hassign[steps].astype(np.float64) - 1.0) / denominator)
        if len(accepted):
            bits.state = state
            bits.advance(int(accepted[0]) + 1)
            return int(steps[accepted[0]])
        position = (position + block) % k


def split_empty_clusters(centroids: np.ndarray, hassign: np.ndarray, n: int, seed: int = 1234) -> int:
    """faiss's treatment of empty clusters, in place; returns how many were split.

    Each empty cluster takes a copy of a cluster chosen by walking the clusters in turn
    and accepting cluster j with probability (size_j − 1) / (n − k); the two copies are
    moved apart by a factor 1 ± 1/1024 alternating over the dimensions, and the size is
    shared between them. The random draws are numpy's, not faiss's generator.
    """
    k = len(centroids)
    rng = np.random.default_rng(seed)
    splits = 0
    for ci in np.flatnonzero(hassign == 0):
        if (hassign > 1).any():
            cj = _walk(rng, hassign, n)
        else:  # weighted points may leave no cluster with more than one unit of weight
            cj = int(np.argmax(hassign))
        centroids[ci] = centroids[cj]
        up = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1 + EMPTY_CLUSTER_EPS, 1 - EMPTY_CLUSTER_EPS)
        centroids[ci] *= up
        centroids[cj] *= 2 - up
        hassign[ci] = hassign[cj] / 2
        hassign[cj] -= hassign[ci]
        splits += 1
    return splits
