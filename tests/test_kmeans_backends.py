"""k-means backends, restarts and the memory check before a training sample is read.

The torch path (``torch-cuda`` on GPUs without faiss-gpu) runs here on the CPU
(``torch-cpu``) and is compared with faiss iteration by iteration from the same initial
centroids: the same objective, centroids and assignments.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unicom.cluster import ClusterInputs, KMeansSettings, cluster, compute_backend
from unicom.cluster.kmeans import (
    CentroidSearch,
    _FaissLloyd,
    _TorchLloyd,
    initial_centroids,
    split_empty_clusters,
    train_kmeans,
    training_memory,
)
from unicom.cluster.pipeline import check_training_memory
from unicom.errors import InputError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kmeans_restarts  # noqa: E402  (the mixture of the restarts benchmark)


def blobs(seed: int = 0, rows: int = 6000, dim: int = 24, classes: int = 12, normalise: bool = True):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    points = centres[rng.integers(0, classes, rows)] + 0.4 * rng.standard_normal((rows, dim))
    if normalise:
        points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)


@pytest.mark.parametrize("spherical", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_torch_iteration_is_faiss_iteration(spherical, weighted):
    points = blobs(normalise=spherical)
    weights = np.random.default_rng(1).uniform(0.5, 2.0, len(points)).astype(np.float32) if weighted else None
    faiss_step = _FaissLloyd(points, weights, spherical, "cpu")
    torch_step = _TorchLloyd(points, weights, spherical, "cpu")
    ours = theirs = initial_centroids(points, 24, seed=3)
    for _ in range(6):
        theirs, faiss_objective = faiss_step.iteration(theirs, 0)
        ours, torch_objective = torch_step.iteration(ours, 0)
        # faiss sums the objective in float32, the torch path in float64
        assert torch_objective == pytest.approx(faiss_objective, rel=2e-5)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)
    labels_faiss, similarity_faiss = CentroidSearch(theirs, spherical).search(points)
    labels_torch, similarity_torch = CentroidSearch(ours, spherical, backend="torch-cpu").search(points)
    assert (labels_faiss == labels_torch).mean() == 1.0
    np.testing.assert_allclose(similarity_torch, similarity_faiss, atol=1e-5)


@pytest.mark.parametrize("tile_rows", [65536, 64])
def test_the_nearest_centroid_search_in_tiles_of_rows_and_centroids_is_exact(tile_rows, monkeypatch):
    from unicom.cluster import kmeans
    from unicom.cluster.kmeans import TorchNearest

    monkeypatch.setattr(kmeans, "TILE_ROWS", tile_rows)
    points = blobs(rows=500)
    centroids = initial_centroids(points, 97, seed=0)
    small_tiles = TorchNearest(centroids, True, "cpu", tile_bytes=min(500, tile_rows) * 4 * 10)  # blocks of 10 centroids
    labels, scores = small_tiles.nearest(torch.from_numpy(points))
    expected = points @ centroids.T
    np.testing.assert_array_equal(labels.numpy(), expected.argmax(axis=1))
    np.testing.assert_allclose(scores.numpy(), expected.max(axis=1), rtol=1e-6)


def chunked_search_against_its_chunks(device: str, spherical: bool) -> None:
    """search_numpy over chunks (several, an uneven last one) gives, row for row, what
    nearest() gives for each chunk alone: on a GPU through its two page-locked buffers, each
    filled again twice over."""
    from unicom.cluster.kmeans import TorchNearest

    points = blobs(rows=20011 if device == "cuda" else 2011, normalise=spherical)
    search = TorchNearest(initial_centroids(points, 97, seed=0), spherical, device)
    chunk = len(points) // 9
    labels, scores = search.search_numpy(points, chunk_rows=chunk)
    expected = [search.nearest(torch.from_numpy(points[start:start + chunk]).to(device))
                for start in range(0, len(points), chunk)]
    np.testing.assert_array_equal(labels, torch.cat([e[0] for e in expected]).cpu().numpy())
    np.testing.assert_array_equal(scores, torch.cat([e[1] for e in expected]).cpu().numpy())
    assert search.search_numpy(points[:0])[0].shape == (0,)


@pytest.mark.parametrize("spherical", [True, False])
def test_the_search_of_rows_in_host_memory_takes_them_chunk_by_chunk(spherical):
    chunked_search_against_its_chunks("cpu", spherical)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spherical", [True, False])
def test_on_cuda_the_search_of_rows_in_host_memory_is_pipelined_exactly(spherical):
    chunked_search_against_its_chunks("cuda", spherical)


def test_an_empty_cluster_takes_half_of_a_cluster_as_faiss_splits_it():
    centroids = np.array([[0.0, 0.0], [1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    hassign = np.array([0.0, 9.0, 1.0], dtype=np.float32)
    # cluster 0 can never be chosen (p = -1/7), cluster 1 always (p = 8/7)
    assert split_empty_clusters(centroids, hassign, n=10) == 1
    eps = 1 / 1024
    np.testing.assert_allclose(centroids[0], [1 + eps, 2 * (1 - eps)], rtol=1e-7)
    np.testing.assert_allclose(centroids[1], [1 - eps, 2 * (1 + eps)], rtol=1e-7)
    assert hassign.tolist() == [4.5, 4.5, 1.0]


def _split_one_draw_at_a_time(centroids, hassign, n, seed=1234):
    """faiss's split of empty clusters written as its loop is: one draw per step of the walk."""
    k = len(centroids)
    rng = np.random.default_rng(seed)
    for ci in range(k):
        if hassign[ci] != 0:
            continue
        cj = 0
        while rng.random() >= (hassign[cj] - 1.0) / max(n - k, 1):
            cj = (cj + 1) % k
        up = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1 + 1 / 1024, 1 - 1 / 1024)
        centroids[ci] = centroids[cj] * up
        centroids[cj] *= 2 - up
        hassign[ci] = hassign[cj] / 2
        hassign[cj] -= hassign[ci]
    return rng


@pytest.mark.parametrize("k, empty", [(5, 2), (300, 40), (40_000, 25)])
def test_the_walk_over_clusters_in_blocks_of_draws_splits_as_one_draw_at_a_time(k, empty):
    """The same clusters split and the same generator state after, with walks longer than a
    block of draws (k = 40,000) and walks that wrap around (k = 5)."""
    rng = np.random.default_rng(k)
    sizes = rng.integers(1, 6, k).astype(np.float32)
    sizes[rng.choice(k, empty, replace=False)] = 0
    n = int(sizes.sum())
    centroids = rng.standard_normal((k, 4)).astype(np.float32)
    expected_centroids, expected_sizes = centroids.copy(), sizes.copy()
    reference = _split_one_draw_at_a_time(expected_centroids, expected_sizes, n)
    assert split_empty_clusters(centroids, sizes, n) == empty
    np.testing.assert_array_equal(centroids, expected_centroids)
    np.testing.assert_array_equal(sizes, expected_sizes)


def test_a_walk_in_blocks_leaves_the_generator_where_single_draws_leave_it():
    from unicom.cluster.kmeans import _walk

    sizes = np.array([1.0, 1.0, 3.0, 1.0, 2.0])
    for seed in range(20):
        blocked, single = np.random.default_rng(seed), np.random.default_rng(seed)
        accepted = _walk(blocked, sizes, n=8, block=3)
        cj = 0
        while single.random() >= (sizes[cj] - 1.0) / 3:
            cj = (cj + 1) % 5
        assert accepted == cj and blocked.bit_generator.state == single.bit_generator.state


def test_the_torch_path_trains_without_empty_clusters_from_duplicated_starts():
    points = blobs(rows=2000)
    start = initial_centroids(points, 16, seed=0)
    start[5] = start[4]  # two identical centroids: one of them gets no point in the first assignment
    step = _TorchLloyd(points, None, True, "cpu")
    centroids, _ = step.iteration(start, 0)
    sizes = np.bincount(CentroidSearch(centroids).search(points)[0], minlength=16)
    assert (sizes > 0).sum() >= 15 and np.isfinite(centroids).all()


def test_restarts_keep_the_run_with_the_best_fit():
    points = blobs(seed=4, rows=3000)
    single = [train_kmeans(points, 30, iterations=5, seed=seed) for seed in (7, (7, 1), (7, 2))]
    best = train_kmeans(points, 30, iterations=5, seed=7, restarts=3)
    fits = [result.mean_similarity for result in single]
    assert best.mean_similarity == pytest.approx(max(fits), abs=1e-7)
    np.testing.assert_array_equal(best.centroids, single[int(np.argmax(fits))].centroids)


def test_restarts_escape_the_poor_optimum_of_the_restarts_benchmark():
    points, truth = kmeans_restarts.mixture()
    labels = lambda result: CentroidSearch(result.centroids).search(points)[0]  # noqa: E731
    one = train_kmeans(points, 40, iterations=20, seed=2, restarts=1)
    three = train_kmeans(points, 40, iterations=20, seed=2, restarts=3)
    assert kmeans_restarts.purity(labels(one), truth) < 0.96  # seed 2 alone merges two classes
    assert kmeans_restarts.purity(labels(three), truth) > 0.995
    assert three.mean_similarity > one.mean_similarity


def test_a_training_sample_larger_than_memory_is_refused_with_what_would_fit():
    settings = KMeansSettings(k=1_000_000)  # 256 points per centroid: 256M rows
    with pytest.raises(InputError) as error:
        check_training_memory(256_000_000, 512, settings, available=64 * 2**30)
    message = str(error.value)
    assert "256,000,000 points x 512 dims" in message and "64.0 GiB is available" in message
    fits = int(message.split("--points-per-centroid to ")[1].split()[0])
    assert training_memory(fits * 1_000_000, 512, 1_000_000) <= 64 * 2**30
    assert training_memory((fits + 1) * 1_000_000, 512, 1_000_000) > 64 * 2**30
    assert "unicom cluster part" in message
    check_training_memory(1000, 512, KMeansSettings(k=10), available=64 * 2**30)  # small samples pass


def test_cluster_stops_before_reading_when_the_sample_cannot_fit(tmp_path, monkeypatch):
    import pyarrow as pa

    from unicom.cluster import pipeline
    from unicom.formats.embeddings import EmbeddingFolders, write_part

    rows = blobs(rows=300, dim=8)
    write_part(tmp_path / "emb", 0, image=rows, metadata=pa.table({"key": [f"s{i}" for i in range(300)]}))
    monkeypatch.setattr(pipeline, "available_memory", lambda: 1024)
    inputs = ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), fusion="image")
    with pytest.raises(InputError, match="about .* GiB in memory"):
        cluster(inputs, tmp_path / "out", KMeansSettings(k=4), plot=False)
    assert not (tmp_path / "out" / "centroids.npy").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_auto_runs_on_the_cpu_and_gpu_is_refused():
    assert compute_backend("auto") == "cpu" and compute_backend("cpu") == "cpu"
    with pytest.raises(InputError, match="no GPU here"):
        compute_backend("gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_torch_backend_reaches_faiss_objective():
    points = blobs(rows=20000)
    gpu = train_kmeans(points, 64, iterations=8, seed=0, backend="torch-cuda")
    cpu = train_kmeans(points, 64, iterations=8, seed=0, backend="cpu")
    assert gpu.objective[-1] == pytest.approx(cpu.objective[-1], rel=1e-4)
    assert gpu.mean_similarity == pytest.approx(cpu.mean_similarity, rel=1e-5)
    search = CentroidSearch(gpu.centroids, backend="torch-cuda")
    # cuBLAS and the CPU's BLAS round differently: a near tie may go either way
    assert (search.search(points)[0] == CentroidSearch(gpu.centroids).search(points)[0]).mean() >= 0.999


def test_the_default_number_of_restarts_follows_k():
    assert KMeansSettings(k=40).restarts == 3 and KMeansSettings(k=999).restarts == 3
    assert KMeansSettings(k=1000).restarts == 1 and KMeansSettings(k=1_000_000).restarts == 1
    assert KMeansSettings(k=40, restarts=1).restarts == 1
    with pytest.raises(InputError, match="restarts must be at least 1"):
        KMeansSettings(k=40, restarts=0)
