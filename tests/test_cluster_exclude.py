"""unicom cluster --exclude: samples listed by key (unicom dedup's near duplicates) are left out
of the k-means sample and of the labels, as if the collection had never held them."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_cluster import mixture, write_collection

from unicom.cli import main
from unicom.cluster import ClusterInputs, KMeansSettings, cluster, load_labels
from unicom.formats.embeddings import EmbeddingFolders, write_part

LEFT_OUT = [*range(10, 20), *range(150, 165), 299, 300]  # rows of the collection, in all three parts


def collection(tmp_path):
    """340 rows around 3 directions, of which the rows LEFT_OUT lie along a fourth, far from
    the others (a pile of copies): written whole (keys s0..s339) and without them."""
    rng = np.random.default_rng(5)
    image, _ = mixture(rng, classes=3, rows=340, dim=16, noise=0.1)
    image[LEFT_OUT] = np.eye(16)[15] + 0.01 * rng.standard_normal((len(LEFT_OUT), 16))
    write_collection(tmp_path / "emb", image=image, parts=3)
    kept = np.setdiff1d(np.arange(340), LEFT_OUT)
    bounds = [0, 120, 230, len(kept)]
    for number, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        write_part(tmp_path / "without", number, image=image[kept[lo:hi]].astype(np.float32),
                   metadata=pa.table({"key": [f"s{row}" for row in kept[lo:hi]]}))
    return image, kept


def test_left_out_keys_are_clustered_as_if_they_were_not_there(tmp_path):
    _, kept = collection(tmp_path)
    settings = KMeansSettings(k=3, init="kmeans++")
    excluded = frozenset(f"s{row}" for row in LEFT_OUT) | {"not-a-key"}
    summary = cluster(ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), fusion="image", exclude=excluded),
                      tmp_path / "out", settings, plot=False)
    alone = cluster(ClusterInputs(EmbeddingFolders.from_root(tmp_path / "without"), fusion="image"),
                    tmp_path / "alone", settings, plot=False)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "centroids.npy"), np.load(tmp_path / "alone" / "centroids.npy"))
    labels, reference = load_labels(tmp_path / "out"), load_labels(tmp_path / "alone")
    assert labels.column("key").to_pylist() == [f"s{row}" for row in kept]
    assert labels.column("label").to_pylist() == reference.column("label").to_pylist()
    assert summary["training_points"] == alone["training_points"] == len(kept)
    assert (summary["samples"], summary["labelled"], summary["excluded_rows"], summary["invalid_rows"]) == (340, 313, 27, 0)
    assert "excluded_rows" not in alone


def test_dedup_then_cluster_leaves_every_listed_key_unlabelled(tmp_path, capsys):
    image, _ = collection(tmp_path)
    assert main(["dedup", "--emb", str(tmp_path / "emb"), "--out", str(tmp_path / "dedup"), "--threshold", "0.98"]) == 0
    listed = pq.read_table(tmp_path / "dedup" / "duplicates.parquet").column("key").to_pylist()
    assert {f"s{row}" for row in LEFT_OUT[1:]} <= set(listed)  # the pile but its first row (and a close pair)
    assert main(["cluster", "--embeddings", str(tmp_path / "emb"), "--fusion", "image", "--k", "4",
                 "--exclude", str(tmp_path / "dedup" / "duplicates.parquet"), "--out", str(tmp_path / "out")]) == 0
    assert f"({0:,} invalid rows skipped, {len(listed)} excluded)" in capsys.readouterr().out
    keys = load_labels(tmp_path / "out").column("key").to_pylist()
    assert keys == [f"s{row}" for row in range(340) if f"s{row}" not in set(listed)]
    # the assignment again, of the same folder: with other tables its record refuses it
    (tmp_path / "other.csv").write_text("key\ns3\n")
    assert main(["cluster", "assign", "--embeddings", str(tmp_path / "emb"), "--exclude", str(tmp_path / "other.csv"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "and this assignment is given --exclude tables of 1 keys" in err and f"of {len(listed)} keys" in err


def test_whole_number_keys_are_matched_as_text(tmp_path):
    rng = np.random.default_rng(6)
    image, _ = mixture(rng, classes=2, rows=40, dim=8, noise=0.1)
    write_part(tmp_path / "emb", 0, image=image.astype(np.float32),
               metadata=pa.table({"key": pa.array(np.arange(1000, 1040), pa.int64())}))
    (tmp_path / "drop.csv").write_text("key\n1003\n1017\n")
    assert main(["cluster", "--embeddings", str(tmp_path / "emb"), "--fusion", "image", "--k", "2",
                 "--exclude", str(tmp_path / "drop.csv"), "--out", str(tmp_path / "out")]) == 0
    keys = [int(key) for key in load_labels(tmp_path / "out").column("key").to_pylist()]
    assert keys == [key for key in range(1000, 1040) if key not in (1003, 1017)]
    assert json.loads((tmp_path / "out" / "clusters.json").read_text())["excluded_rows"] == 2


@pytest.mark.parametrize("stage", ["stats", "merge", "show"])
def test_stages_that_read_no_samples_refuse_it(stage, tmp_path, capsys):
    (tmp_path / "drop.csv").write_text("key\ns1\n")
    assert main(["cluster", stage, "--exclude", str(tmp_path / "drop.csv"), "--out", str(tmp_path / "out")]) == 2
    assert re.search(rf"--exclude leaves samples out .*not `{stage}`", capsys.readouterr().err)


def test_a_table_without_a_key_column_is_named(tmp_path, capsys):
    collection(tmp_path)
    (tmp_path / "drop.csv").write_text("path\ns1\n")
    assert main(["cluster", "--embeddings", str(tmp_path / "emb"), "--fusion", "image", "--k", "3",
                 "--exclude", str(tmp_path / "drop.csv"), "--out", str(tmp_path / "out")]) == 2
    assert "drop.csv" in capsys.readouterr().err
    assert not (tmp_path / "out" / "labels").exists()


def test_hierarchical_parts_and_their_assignment_leave_them_out(tmp_path, capsys):
    collection(tmp_path)
    (tmp_path / "drop.csv").write_text("key\n" + "".join(f"s{row}\n" for row in LEFT_OUT))
    emb, out, drop = str(tmp_path / "emb"), str(tmp_path / "out"), str(tmp_path / "drop.csv")
    for part in range(3):
        assert main(["cluster", "part", "--embeddings", emb, "--fusion", "image", "--k", "6", "--part", f"{part}/3",
                     "--exclude", drop, "--out", out]) == 0
    records = [json.loads((tmp_path / "out" / "parts" / f"part_{p}.json").read_text()) for p in range(3)]
    # the rows of each part (its shard) less those listed: 113, 113 and 114 rows, 10, 15 and 2 listed
    assert [r["training_points"] for r in records] == [103, 98, 112]
    assert [r["valid_samples"] for r in records] == [103, 98, 112] and [r["excluded_rows"] for r in records] == [10, 15, 2]
    assert main(["cluster", "merge", "--k", "3", "--init", "kmeans++", "--out", out]) == 0
    assert main(["cluster", "assign", "--embeddings", emb, "--out", out]) == 2  # the parts' inputs, less nothing
    assert re.search(r"the centroids were trained with --exclude tables of 27 keys \(digest [0-9a-f]{16}\), and this "
                     r"assignment is given no --exclude: give `assign` the same --exclude tables", capsys.readouterr().err)
    assert main(["cluster", "assign", "--embeddings", emb, "--exclude", drop, "--out", out]) == 0
    keys = set(load_labels(tmp_path / "out").column("key").to_pylist())
    assert keys == {f"s{row}" for row in range(340)} - {f"s{row}" for row in LEFT_OUT}
