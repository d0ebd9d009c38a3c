"""The stages after ``embed`` where the data lives: an embedding folder in S3 (moto's server on
127.0.0.1) gives the same clusters, index, search results, metrics and training records as
the same folder on disk."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from storage_servers import FileServer
from support import class_image, encode_image, write_tar_shard

from unicom.cli import main
from unicom.formats.embeddings import write_part

PARTS = {0: 40, 1: 35, 3: 25}  # part number -> rows


@pytest.fixture(scope="module")
def local_folder(tmp_path_factory):
    """An embedding folder (image, text, metadata with keys and labels) of 4 separated classes."""
    root = tmp_path_factory.mktemp("remote_stages")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 16))
    for number, rows in PARTS.items():
        labels = rng.integers(0, 4, rows)
        image = centres[labels] + 0.3 * rng.standard_normal((rows, 16))
        text = centres[labels] + 0.3 * rng.standard_normal((rows, 16))
        keys = [f"{number}-{i}" for i in range(rows)]
        write_part(root / "emb", number, image=image.astype(np.float16), text=text.astype(np.float16),
                   metadata=pa.table({"key": keys, "label": labels.astype(np.int64)}))
    return root


@pytest.fixture
def remote_folder(s3, local_folder, request):
    bucket = request.node.name.replace("_", "-")[:40].strip("-").lower()
    s3.bucket(bucket)
    return s3.upload_folder(local_folder / "emb", bucket, "emb"), bucket


def _same_files(s3, bucket: str, prefix: str, local, names) -> None:
    for name in names:
        assert s3.get(bucket, f"{prefix}/{name}") == (local / name).read_bytes(), name


def test_cluster_from_s3_into_s3_equals_the_local_run(s3, local_folder, remote_folder, tmp_path):
    emb, bucket = remote_folder
    options = ["--k", "4", "--fusion", "image+text", "--points-per-centroid", "20"]
    assert main(["cluster", "--embeddings", str(local_folder / "emb"), "--out", str(tmp_path / "local"), *options]) == 0
    assert main(["cluster", "--embeddings", emb, "--out", f"s3://{bucket}/clusters", *options]) == 0
    names = ["centroids.npy", "cluster_sizes.npy", *(f"labels/labels_{n}.parquet" for n in PARTS)]
    _same_files(s3, bucket, "clusters", tmp_path / "local", names)
    assert not any(key.rsplit("/", 1)[-1].startswith(".") for key in s3.keys(bucket, "clusters"))


def test_hierarchical_parts_merge_and_assign_in_s3_equal_the_local_run(s3, local_folder, remote_folder, tmp_path):
    emb, bucket = remote_folder
    for root, out in ((str(local_folder / "emb"), str(tmp_path / "local")), (emb, f"s3://{bucket}/clusters")):
        for part in range(2):
            assert main(["cluster", "part", "--embeddings", root, "--k", "6", "--part", f"{part}/2", "--out", out]) == 0
        assert main(["cluster", "merge", "--k", "4", "--out", out]) == 0
        assert main(["cluster", "assign", "--embeddings", root, "--out", out]) == 0
    names = ["centroids.npy", "parts/part_0.npy", "parts/part_1_sizes.npy", *(f"labels/labels_{n}.parquet" for n in PARTS)]
    _same_files(s3, bucket, "clusters", tmp_path / "local", names)


def test_an_index_of_s3_embeddings_and_an_index_read_from_s3_search_like_local_ones(s3, local_folder, remote_folder, tmp_path,
                                                                                   monkeypatch):
    from unicom.search.index import Index

    emb, bucket = remote_folder
    local = Index.build(local_folder / "emb", tmp_path / "local_index")
    remote = Index.build(emb, tmp_path / "remote_index")
    assert remote.config["source"] == emb
    queries = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    np.testing.assert_array_equal(remote.search(queries, 7)[1], local.search(queries, 7)[1])

    url = s3.upload_folder(tmp_path / "local_index", bucket, "index")
    monkeypatch.setenv("UNICOM_CACHE", str(tmp_path / "cache"))
    fetched = Index.load(url)
    assert fetched.path.is_relative_to(tmp_path / "cache")
    _, ids = fetched.search(queries, 7)
    np.testing.assert_array_equal(ids, local.search(queries, 7)[1])
    assert fetched.metadata(ids[0])[0]["key"] == local.metadata(ids[0])[0]["key"]
    faiss_file = fetched.path / fetched.config["file"]
    stamp = faiss_file.stat().st_mtime_ns
    assert Index.load(url).path == fetched.path and faiss_file.stat().st_mtime_ns == stamp  # not fetched again


def test_evaluate_embeddings_in_s3_gives_the_local_metrics(s3, local_folder, remote_folder, tmp_path):
    import json

    emb, _ = remote_folder
    options = ["--dims", "8", "--no-pca", "--ks", "1,2"]
    assert main(["evaluate", "--embeddings", str(local_folder / "emb"), "--out", str(tmp_path / "local"), *options]) == 0
    assert main(["evaluate", "--embeddings", emb, "--out", str(tmp_path / "remote"), *options]) == 0
    local = json.loads((tmp_path / "local" / "metrics.json").read_text())
    remote = json.loads((tmp_path / "remote" / "metrics.json").read_text())
    assert remote.pop("embeddings") == emb and local.pop("embeddings") == str(local_folder / "emb")
    assert remote == local


def test_training_reads_http_shards_with_s3_labels_as_it_reads_local_ones(s3, tmp_path):
    from types import SimpleNamespace

    from unicom.train.data import Counters, build_source

    for number in (0, 1):
        write_tar_shard(tmp_path / "shards" / f"{number:05d}.tar", [
            {"key": f"{number}-{i}", "jpg": encode_image(class_image(i % 3, i, 24))} for i in range(6)])
    labels = tmp_path / "clusters" / "labels"
    labels.mkdir(parents=True)
    for number in (0, 1):
        table = pa.table({"key": [f"{number}-{i}" for i in range(5)], "label": [i % 3 for i in range(5)]})
        pq.write_table(table, labels / f"labels_{number}.parquet")
    bucket = s3.bucket("train-labels")
    s3.upload_folder(tmp_path / "clusters", "train-labels", "clusters")

    def records(shards, label_folder):
        config = SimpleNamespace(
            data=SimpleNamespace(shards=shards, labels=label_folder, shuffle_buffer=4, folder=None, table=None, benchmark=None),
            loss=SimpleNamespace(num_classes=None))
        source = build_source(config)
        found = list(source.records(0, 0, 0, 1, 0, 1, 2, Counters()))
        return source.num_classes, [(r.uid, r.image, r.label, r.key, r.origin) for r in found]

    local = records(str(tmp_path / "shards" / "{00000..00001}.tar"), str(tmp_path / "clusters"))
    with FileServer(tmp_path / "shards") as http:
        remote = records(f"{http.url}/{{00000..00001}}.tar", f"{bucket}/clusters")
    assert remote == local and local[0] == 3 and len(local[1]) == 10


def test_probe_lists_in_s3_resolve_their_images_beside_them(s3, tmp_path):
    import pyarrow.csv as pacsv

    from unicom.unifex.data import read_domain_lists

    pacsv.write_csv(pa.table({"path": ["a/0.jpg", "b/1.jpg"], "class": ["x", "y"]}), tmp_path / "cars.csv")
    bucket = s3.bucket("probe-lists")
    s3.upload_folder(tmp_path, "probe-lists", "lists")
    images = read_domain_lists(f"{bucket}/lists/cars.csv")
    assert images.images.paths == [f"{bucket}/lists/a/0.jpg", f"{bucket}/lists/b/1.jpg"]
    assert images.datasets == ["cars"]


def test_a_class_folder_in_s3_reads_as_the_same_folder_on_disk(s3, tmp_path):
    from unicom.data.lists import read_image_folder

    for relative in ("cat/a.jpg", "cat/b.png", "dog/x/1.jpg", "dog/y/2.jpg", "dog/3.jpg", "dog/notes.txt"):
        (tmp_path / "pets" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pets" / relative).write_bytes(b"")
    bucket = s3.bucket("class-folder")
    s3.upload_folder(tmp_path / "pets", "class-folder", "pets")
    for classes in ("top", "leaf"):
        local = read_image_folder(tmp_path / "pets", classes)
        remote = read_image_folder(f"{bucket}/pets", classes)
        assert remote.keys == local.keys and remote.class_names == local.class_names
        assert remote.labels.tolist() == local.labels.tolist()
        assert remote.paths == [f"{bucket}/pets/{key}" for key in local.keys]
