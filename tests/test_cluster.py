"""Multimodal k-means pseudo-labels: fusion, training, streaming assignment, resume, errors."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_rand_score

from unicom.cluster import (
    ClusterInputs,
    KMeansSettings,
    assign_labels,
    cluster,
    fuse,
    load_labels,
    merge_parts,
    plan_sample,
    size_statistics,
    summarize,
    train_centroids,
    train_kmeans,
    train_part,
    use_gpu,
)
from unicom.errors import InputError
from unicom.formats.clusters import PseudoLabels
from unicom.formats.embeddings import EmbeddingFolders, write_part


def mixture(rng, classes: int, rows: int, dim: int, noise: float):
    """``rows`` points around ``classes`` random unit directions: (points, true labels)."""
    centres = rng.standard_normal((classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(0, classes, rows)
    return centres[truth] + noise * rng.standard_normal((rows, dim)), truth


def write_collection(root, image=None, text=None, parts=3, dtype=np.float32, key_columns=("key",)):
    """Split aligned rows into ``parts`` shards under ``root``; keys are ``s{row}``."""
    rows = len(image if image is not None else text)
    bounds = np.linspace(0, rows, parts + 1).astype(int)
    for number, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        metadata = {}
        for column in key_columns:
            metadata[column] = [f"{column}-{row}" if column != "key" else f"s{row}" for row in range(lo, hi)]
        write_part(
            root, number,
            image=None if image is None else image[lo:hi].astype(dtype),
            text=None if text is None else text[lo:hi].astype(dtype),
            metadata=pa.table(metadata),
        )
    return root


def truth_of(labels: pa.Table, truth: np.ndarray) -> np.ndarray:
    return truth[[int(key[1:]) for key in labels.column("key").to_pylist()]]


def test_fuse_averages_the_normalised_image_and_text_rows():
    image = np.array([[3.0, 4.0]], dtype=np.float16)
    text = np.array([[0.0, 2.0]], dtype=np.float32)
    rows, valid = fuse(image=image, text=text, fusion="image+text")
    # (0.6, 0.8) + (0, 1) = (0.6, 1.8), normalised by sqrt(3.6)
    np.testing.assert_allclose(rows, [[0.6 / np.sqrt(3.6), 1.8 / np.sqrt(3.6)]], rtol=1e-6)
    assert rows.dtype == np.float32 and valid.tolist() == [True]
    np.testing.assert_allclose(fuse(image=image, fusion="image")[0], [[0.6, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(fuse(text=text, fusion="text")[0], [[0.0, 1.0]])


def test_fuse_marks_nan_inf_and_zero_rows_invalid_and_leaves_inputs_alone():
    image = np.array([[1.0, 0.0], [np.nan, 1.0], [np.inf, 0.0], [0.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    before = image.copy()
    rows, valid = fuse(image=image, fusion="image")
    assert valid.tolist() == [True, False, False, False, True]
    assert np.isfinite(rows).all() and (rows[~valid] == 0).all()
    np.testing.assert_array_equal(image, before)
    # image and text that cancel out cannot be normalised either
    _, valid = fuse(image=np.array([[1.0, 0.0]]), text=np.array([[-2.0, 0.0]]), fusion="image+text")
    assert valid.tolist() == [False]


def test_train_kmeans_recovers_a_synthetic_mixture():
    rng = np.random.default_rng(0)
    points, truth = mixture(rng, classes=8, rows=1600, dim=32, noise=0.05)
    points = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    result = train_kmeans(points, 8, iterations=10, seed=0, init="kmeans++")
    labels = np.argmax(points @ result.centroids.T, axis=1)
    assert adjusted_rand_score(truth, labels) >= 0.95
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, rtol=1e-5)
    assert result.training_points == 1600 and result.sizes.sum() == 1600
    assert len(result.objective) == 10


def test_cluster_labels_every_sample_of_a_mixture(tmp_path):
    rng = np.random.default_rng(1)
    image, truth = mixture(rng, classes=6, rows=900, dim=24, noise=0.08)
    write_collection(tmp_path / "emb", image=image, parts=3)
    inputs = ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), fusion="image")
    summary = cluster(inputs, tmp_path / "out", KMeansSettings(k=6, init="kmeans++"))
    labels = load_labels(tmp_path / "out")
    assert labels.column_names == ["key", "label", "similarity"]
    assert labels.schema.field("label").type == pa.int64() and labels.schema.field("similarity").type == pa.float32()
    assert labels.num_rows == 900
    assert adjusted_rand_score(truth_of(labels, truth), labels.column("label").to_numpy()) >= 0.95
    assert summary["labelled"] == 900 and summary["training_points"] == 900
    assert json.loads((tmp_path / "out" / "clusters.json").read_text())["k"] == 6
    assert np.load(tmp_path / "out" / "centroids.npy").shape == (6, 24)
    assert np.load(tmp_path / "out" / "cluster_sizes.npy").sum() == 900
    assert (tmp_path / "out" / "cluster_sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_text_fusion_separates_what_each_modality_alone_cannot(tmp_path):
    # Four pseudo-classes = (image group) x (text group): the images tell only the first
    # factor, the captions only the second; only their fusion sees all four classes.
    rng = np.random.default_rng(2)
    rows, dim = 800, 16
    image_factor, text_factor = rng.integers(0, 2, rows), rng.integers(0, 2, rows)
    truth = 2 * image_factor + text_factor
    directions = np.linalg.qr(rng.standard_normal((dim, 4)))[0].T  # orthonormal
    image = directions[image_factor] + 0.05 * rng.standard_normal((rows, dim))
    text = directions[2 + text_factor] + 0.05 * rng.standard_normal((rows, dim))
    write_collection(tmp_path / "emb", image=image, text=text, parts=2)
    folders = EmbeddingFolders.from_root(tmp_path / "emb")
    scores = {}
    for fusion in ("image", "text", "image+text"):
        cluster(ClusterInputs(folders, fusion=fusion), tmp_path / fusion, KMeansSettings(k=4, init="kmeans++"), plot=False)
        labels = load_labels(tmp_path / fusion)
        scores[fusion] = adjusted_rand_score(truth_of(labels, truth), labels.column("label").to_numpy())
    assert scores["image+text"] >= 0.95
    assert scores["image"] < 0.7 and scores["text"] < 0.7


def test_streaming_assignment_equals_an_in_memory_argmax(tmp_path):
    rng = np.random.default_rng(3)
    image, _ = mixture(rng, classes=5, rows=500, dim=12, noise=0.3)
    text, _ = mixture(rng, classes=5, rows=500, dim=12, noise=0.3)
    write_collection(tmp_path / "emb", image=image, text=text, parts=4, dtype=np.float16)
    inputs = ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), chunk_rows=7)  # many chunks per shard
    cluster(inputs, tmp_path / "out", KMeansSettings(k=5, points_per_centroid=40), plot=False)
    centroids = np.load(tmp_path / "out" / "centroids.npy").astype(np.float64)
    # the reference: every row in memory at once, fused by hand, one matrix product
    image16, text16 = image.astype(np.float16).astype(np.float64), text.astype(np.float16).astype(np.float64)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    fused = unit(unit(image16) + unit(text16))
    similarity = fused @ centroids.T
    labels = load_labels(tmp_path / "out")
    np.testing.assert_array_equal(labels.column("label").to_numpy(), similarity.argmax(axis=1))
    np.testing.assert_allclose(labels.column("similarity").to_numpy(), similarity.max(axis=1), atol=1e-5)
    assert labels.column("key").to_pylist() == [f"s{i}" for i in range(500)]


def test_a_run_killed_between_shards_resumes_with_identical_labels(tmp_path):
    rng = np.random.default_rng(4)
    image, _ = mixture(rng, classes=4, rows=600, dim=8, noise=0.4)
    write_collection(tmp_path / "emb", image=image, parts=4)
    inputs = ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), fusion="image")
    settings = KMeansSettings(k=4, points_per_centroid=50)
    cluster(inputs, tmp_path / "whole", settings, plot=False)

    class Killed(Exception):
        pass

    def kill_after_shard_1(number):
        if number == 1:
            raise Killed

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        cluster(inputs, out, settings, plot=False, on_shard_done=kill_after_shard_1)
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["labels_0.parquet", "labels_1.parquet"]
    assert not (out / "clusters.json").exists()
    (out / "labels" / ".labels_2.parquet.x1y2.tmp.parquet").write_bytes(b"half a file")  # a kill mid-write
    first = (out / "labels" / "labels_0.parquet").stat()
    written = []
    summary = cluster(inputs, out, settings, plot=False, on_shard_done=written.append)
    assert written == [2, 3]  # finished shards are skipped
    assert (out / "labels" / "labels_0.parquet").stat().st_mtime_ns == first.st_mtime_ns
    assert summary["seconds"]["train"] == 0.0  # the centroids were kept, not retrained
    assert load_labels(out).equals(load_labels(tmp_path / "whole"))


def test_resuming_with_other_settings_is_an_error(tmp_path):
    rng = np.random.default_rng(5)
    write_collection(tmp_path / "emb", image=mixture(rng, 3, 90, 6, 0.2)[0], parts=1)
    inputs = ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), fusion="image")
    cluster(inputs, tmp_path / "out", KMeansSettings(k=3), plot=False)
    with pytest.raises(InputError, match=r"centroids.json was written by a run with other settings \(settings"):
        cluster(inputs, tmp_path / "out", KMeansSettings(k=4), plot=False)


def _clustered_into_three(tmp_path) -> ClusterInputs:
    """tmp_path/out: 90 samples of 3 clusters in 2 parts, clustered with k = 3; their inputs."""
    rng = np.random.default_rng(5)
    write_collection(tmp_path / "emb", image=mixture(rng, 3, 90, 6, 0.2)[0], parts=2)
    inputs = ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), fusion="image")
    cluster(inputs, tmp_path / "out", KMeansSettings(k=3), plot=False)
    return inputs


@pytest.mark.parametrize("k", [2, 5])
def test_labels_of_centroids_trained_again_are_not_kept(tmp_path, k):
    # deleting the centroids to change k (as the error above suggests) but not the labels made from them
    inputs = _clustered_into_three(tmp_path)
    before = load_labels(tmp_path / "out")
    (tmp_path / "out" / "centroids.npy").unlink()
    (tmp_path / "out" / "centroids.json").unlink()
    labels, record = tmp_path / "out" / "labels", tmp_path / "out" / "assignment.json"
    with pytest.raises(InputError, match=rf"{labels}: the labels there were assigned with other centroids than those "
                                         rf"in .*centroids.npy \(trained again since\); delete {labels} and {record}"):
        cluster(inputs, tmp_path / "out", KMeansSettings(k=k), plot=False)
    assert load_labels(tmp_path / "out").equals(before)
    for path in (labels, record):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    summary = cluster(inputs, tmp_path / "out", KMeansSettings(k=k), plot=False)
    assert summary["k"] == k and summary["labelled"] == 90
    assert set(load_labels(tmp_path / "out").column("label").to_pylist()) <= set(range(k))


@pytest.mark.parametrize("k", [2, 5])
def test_stats_refuse_the_labels_of_centroids_trained_again(tmp_path, k):
    # `unicom cluster stats` (or the hierarchical assign's summary) after the centroids alone were
    # trained again: k = 5 reported the 3-cluster labels with 2 empty clusters, k = 2 crashed in bincount
    inputs = _clustered_into_three(tmp_path)
    summary = json.loads((tmp_path / "out" / "clusters.json").read_text())
    (tmp_path / "out" / "centroids.npy").unlink()
    (tmp_path / "out" / "centroids.json").unlink()
    train_centroids(inputs, tmp_path / "out", KMeansSettings(k=k))
    labels, record = tmp_path / "out" / "labels", tmp_path / "out" / "assignment.json"
    with pytest.raises(InputError, match=rf"{labels}: the labels there were assigned with other centroids than those "
                                         rf"in .*centroids.npy \(trained again since\); delete {labels} and {record}"):
        summarize(tmp_path / "out", plot=False)
    assert json.loads((tmp_path / "out" / "clusters.json").read_text()) == summary


def test_a_trainer_refuses_the_labels_of_centroids_trained_again(tmp_path):
    # centroids trained again with k = 5 and no assign after: the trainer took 5 classes of the 3-cluster labels
    inputs = _clustered_into_three(tmp_path)
    assert PseudoLabels(tmp_path / "out").num_classes == 3
    (tmp_path / "out" / "centroids.npy").unlink()
    (tmp_path / "out" / "centroids.json").unlink()
    train_centroids(inputs, tmp_path / "out", KMeansSettings(k=5))
    labels = tmp_path / "out" / "labels"
    with pytest.raises(InputError, match=rf"{labels}: the labels there were assigned with other centroids than those "
                                         rf"in .*centroids.npy \(trained again since\); delete {labels} and "):
        PseudoLabels(tmp_path / "out")
    assert PseudoLabels(labels).num_classes is None  # the label files alone carry no record to check


def test_stats_of_labels_recorded_without_a_centroid_digest_are_made(tmp_path):
    # a folder labelled before assignment.json kept the digest of the centroids
    _clustered_into_three(tmp_path)
    record = tmp_path / "out" / "assignment.json"
    record.write_text(json.dumps({key: value for key, value in json.loads(record.read_text()).items() if key != "centroids"}))
    summary = summarize(tmp_path / "out", min_cluster_size=2, plot=False)
    assert summary["labelled"] == 90 and summary["min_cluster_size"] == 2
    assert PseudoLabels(tmp_path / "out").num_classes == 3


def test_a_hierarchical_summary_into_the_out_of_a_run_keeps_none_of_its_times(tmp_path):
    # OUT cleared of the centroids and labels of a one-machine run, then clustered in hierarchical mode:
    # its clusters.json kept the seconds (k-means, assign) of the run whose labels were deleted
    inputs = _clustered_into_three(tmp_path)
    out = tmp_path / "out"
    assert "seconds" in json.loads((out / "clusters.json").read_text())
    for name in ("centroids.npy", "centroids.json", "assignment.json"):
        (out / name).unlink()
    shutil.rmtree(out / "labels")
    train_part(inputs, out, KMeansSettings(k=3), 0, 1)
    merge_parts(out, KMeansSettings(k=3))
    assign_labels(inputs, out)
    summary = summarize(out, plot=False)
    assert summary["mode"] == "hierarchical" and "seconds" not in summary
    assert "seconds" not in json.loads((out / "clusters.json").read_text())


def test_labels_of_the_same_centroids_trained_again_are_kept(tmp_path):
    inputs = _clustered_into_three(tmp_path)
    first = (tmp_path / "out" / "labels" / "labels_0.parquet").stat().st_mtime_ns
    (tmp_path / "out" / "centroids.npy").unlink()  # the same settings train the same centroids again
    cluster(inputs, tmp_path / "out", KMeansSettings(k=3), plot=False)
    assert (tmp_path / "out" / "labels" / "labels_0.parquet").stat().st_mtime_ns == first


def test_float16_and_float32_shards_give_the_same_labels(tmp_path):
    rng = np.random.default_rng(6)
    image, _ = mixture(rng, classes=4, rows=300, dim=16, noise=0.3)
    image = image.astype(np.float16)  # both files hold exactly the same values
    labels = {}
    for dtype in (np.float16, np.float32):
        root = write_collection(tmp_path / f"emb-{dtype.__name__}", image=image, parts=2, dtype=dtype)
        inputs = ClusterInputs(EmbeddingFolders.from_root(root), fusion="image")
        assert inputs.dtypes == {"image": dtype.__name__}
        cluster(inputs, tmp_path / f"out-{dtype.__name__}", KMeansSettings(k=4), plot=False)
        labels[dtype] = load_labels(tmp_path / f"out-{dtype.__name__}")
    assert labels[np.float16].equals(labels[np.float32])


@pytest.mark.parametrize("key_column", ["key", "image_path", "url"])
def test_labels_carry_the_chosen_key_column(tmp_path, key_column):
    rng = np.random.default_rng(7)
    image, _ = mixture(rng, classes=3, rows=60, dim=8, noise=0.2)
    write_collection(tmp_path / "emb", image=image, parts=2, key_columns=("key", "image_path", "url"))
    inputs = ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), fusion="image", key_column=key_column)
    summary = cluster(inputs, tmp_path / "out", KMeansSettings(k=3), plot=False)
    expected = [f"s{i}" if key_column == "key" else f"{key_column}-{i}" for i in range(60)]
    assert load_labels(tmp_path / "out").column("key").to_pylist() == expected
    assert summary["key_column"] == key_column


@pytest.mark.parametrize("present", [("image_path", "url"), ("url",)])
def test_the_key_column_defaults_to_the_first_of_key_image_path_url(tmp_path, present):
    write_collection(tmp_path / "emb", image=np.eye(4)[[0, 1, 2, 3] * 5], parts=1, key_columns=present)
    inputs = ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), fusion="image")
    assert inputs.key_column == present[0]


def test_shards_are_ordered_by_their_number_padded_or_not(tmp_path):
    folders = {kind: tmp_path / kind for kind in ("img", "meta")}
    for folder in folders.values():
        folder.mkdir()
    for number, name in ((10, "10"), (9, "9"), (2, "002")):
        np.save(folders["img"] / f"img_emb_{name}.npy", np.full((3, 4), number + 1, dtype=np.float32) + np.eye(3, 4))
        pq.write_table(pa.table({"key": [f"{number}-{r}" for r in range(3)]}), folders["meta"] / f"metadata_{name}.parquet")
    inputs = ClusterInputs(EmbeddingFolders(image=folders["img"], metadata=folders["meta"]), fusion="image")
    assert [shard.number for shard in inputs.shards] == [2, 9, 10]
    cluster(inputs, tmp_path / "out", KMeansSettings(k=2), plot=False)
    assert sorted(p.name for p in (tmp_path / "out" / "labels").iterdir()) == [
        "labels_10.parquet", "labels_2.parquet", "labels_9.parquet"]
    assert pq.read_table(tmp_path / "out" / "labels" / "labels_10.parquet").column("key").to_pylist() == ["10-0", "10-1", "10-2"]
    assert load_labels(tmp_path / "out").column("key").to_pylist()[:4] == ["2-0", "2-1", "2-2", "9-0"]


def test_the_number_of_training_points_is_reported(tmp_path):
    rng = np.random.default_rng(8)
    write_collection(tmp_path / "emb", image=mixture(rng, 4, 1000, 8, 0.3)[0], parts=3)
    inputs = ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), fusion="image")
    sampled = cluster(inputs, tmp_path / "sampled", KMeansSettings(k=4, points_per_centroid=10), plot=False)
    assert sampled["training_points"] == 40
    record = json.loads((tmp_path / "sampled" / "centroids.json").read_text())
    assert record["training_points"] == record["planned_training_points"] == 40
    everything = cluster(inputs, tmp_path / "all", KMeansSettings(k=4, points_per_centroid=1000), plot=False)
    assert everything["training_points"] == 1000


def test_plan_sample_draws_distinct_rows_from_every_shard_uniformly():
    plan = plan_sample([100, 300, 0, 600], 500, seed=0)
    assert [len(rows) for rows in plan] != [0, 0, 0, 500] and sum(len(rows) for rows in plan) == 500
    for rows, n in zip(plan, [100, 300, 0, 600]):
        assert np.all(np.diff(rows) > 0) and (len(rows) == 0 or (rows[0] >= 0 and rows[-1] < n))
    # over many draws each shard gets its share of the sample: 10%, 30%, 0%, 60%
    shares = np.mean([[len(r) for r in plan_sample([100, 300, 0, 600], 500, seed=s)] for s in range(200)], axis=0)
    np.testing.assert_allclose(shares, [50, 150, 0, 300], atol=3)
    assert all((a == b).all() for a, b in zip(plan, plan_sample([100, 300, 0, 600], 500, seed=0)))
    assert [len(rows) for rows in plan_sample([3, 4], 10, seed=0)] == [3, 4]


def test_size_statistics_of_a_hand_made_example():
    stats = size_statistics(np.array([0, 3, 5, 12]), tiny_cluster_size=5)
    assert stats["samples"] == 20 and stats["mean"] == 5.0
    assert (stats["min"], stats["max"], stats["percentiles"]["50"]) == (0, 12, 4.0)
    assert (stats["empty"], stats["empty_clusters"]) == (1, [0])
    assert (stats["tiny"], stats["tiny_samples"]) == (1, 3)
    assert stats["imbalance_factor"] == pytest.approx(4 * (9 + 25 + 144) / 400)


def test_min_cluster_size_drops_the_samples_of_small_clusters(tmp_path):
    # three well separated groups of 50, 30 and 5 samples
    rng = np.random.default_rng(9)
    directions = np.eye(8)[:3]
    group = np.repeat([0, 1, 2], [50, 30, 5])
    image = directions[group] + 0.01 * rng.standard_normal((85, 8))
    write_collection(tmp_path / "emb", image=image, parts=2)
    inputs = ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), fusion="image")
    summary = cluster(inputs, tmp_path / "out", KMeansSettings(k=3, init="kmeans++"), min_cluster_size=10, tiny_cluster_size=10)
    labels = load_labels(tmp_path / "out")
    assert labels.num_rows == 80
    assert set(truth_of(labels, group)) == {0, 1}
    assert (summary["dropped_clusters"], summary["dropped_samples"], summary["labelled"]) == (1, 5, 85)
    assert summary["cluster_sizes"]["tiny"] == 1
    sizes = np.load(tmp_path / "out" / "cluster_sizes.npy")
    assert sorted(sizes.tolist()) == [5, 30, 50]  # the clustering's sizes, before the drop
    # the labels keep their ids: they still index the centroids
    centroids = np.load(tmp_path / "out" / "centroids.npy")
    assert set(labels.column("label").to_pylist()) == set(np.flatnonzero(sizes >= 10).tolist())
    assert centroids.shape == (3, 8)
    again = cluster(inputs, tmp_path / "out", KMeansSettings(k=3, init="kmeans++"), min_cluster_size=10)
    assert again["dropped_samples"] == 5 and load_labels(tmp_path / "out").equals(labels)
    with pytest.raises(InputError, match="already filtered with --min-cluster-size 10"):
        cluster(inputs, tmp_path / "out", KMeansSettings(k=3, init="kmeans++"), min_cluster_size=4)


def test_recomputing_the_statistics_keeps_the_stage_times_of_the_run(tmp_path):
    rng = np.random.default_rng(9)
    write_collection(tmp_path / "emb", image=mixture(rng, 3, 90, 6, 0.2)[0], parts=2)
    inputs = ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), fusion="image")
    times = cluster(inputs, tmp_path / "out", KMeansSettings(k=3), plot=False)["seconds"]
    assert set(times) == {"read", "kmeans", "train", "assign"}
    summary = summarize(tmp_path / "out", min_cluster_size=40, plot=False)  # `unicom cluster stats`
    assert summary["min_cluster_size"] == 40 and summary["seconds"] == times
    assert json.loads((tmp_path / "out" / "clusters.json").read_text())["seconds"] == times


def test_euclidean_kmeans_reports_cosine_similarity(tmp_path):
    rng = np.random.default_rng(10)
    image, truth = mixture(rng, classes=3, rows=300, dim=8, noise=0.05)
    write_collection(tmp_path / "emb", image=image, parts=2)
    inputs = ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), fusion="image")
    cluster(inputs, tmp_path / "out", KMeansSettings(k=3, spherical=False, init="kmeans++"), plot=False)
    labels = load_labels(tmp_path / "out")
    centroids = np.load(tmp_path / "out" / "centroids.npy").astype(np.float64)
    fused = image / np.linalg.norm(image, axis=1, keepdims=True)
    distance = ((fused[:, None, :] - centroids[None]) ** 2).sum(-1)
    nearest = distance.argmin(axis=1)
    np.testing.assert_array_equal(labels.column("label").to_numpy(), nearest)
    cosine = (fused * centroids[nearest]).sum(1) / np.linalg.norm(centroids[nearest], axis=1)
    np.testing.assert_allclose(labels.column("similarity").to_numpy(), cosine, atol=1e-5)
    assert adjusted_rand_score(truth, nearest) >= 0.95


def test_skip_invalid_counts_and_leaves_out_bad_rows(tmp_path):
    rng = np.random.default_rng(11)
    image, _ = mixture(rng, classes=3, rows=90, dim=8, noise=0.2)
    image[[5, 70]] = np.nan
    image[40] = 0.0
    write_collection(tmp_path / "emb", image=image, parts=2)
    inputs = ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), fusion="image")
    summary = cluster(inputs, tmp_path / "out", KMeansSettings(k=3), skip_invalid=True, plot=False)
    keys = load_labels(tmp_path / "out").column("key").to_pylist()
    assert len(keys) == 87 and not {"s5", "s40", "s70"} & set(keys)
    assert summary["invalid_rows"] == 3 and summary["samples"] == 90 and summary["labelled"] == 87
    assert summary["training_points"] == 87


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_use_gpu_without_a_gpu_build_is_an_error():
    assert use_gpu("auto") is False and use_gpu("cpu") is False
    with pytest.raises(InputError, match="no GPU"):
        use_gpu("gpu")


def test_importing_the_stage_stays_light():
    code = "import sys, unicom.cluster; print(sorted(m for m in ('faiss', 'torch', 'matplotlib') if m in sys.modules))"
    import subprocess

    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ})
    assert output.stdout.strip() == "[]"
