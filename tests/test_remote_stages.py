"""The stages after ``embed`` where the data lives: an embedding folder in S3 (moto's server on
127.0.0.1) gives the same clusters, index, search results, metrics and training records as
the same folder on disk."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from storage_servers import FileServer
from support import class_image, encode_image, without_build_id, write_separated_embeddings, write_tar_shard

from unicom.cli import main
from unicom.errors import InputError

PARTS = {0: 40, 1: 35, 3: 25}  # part number -> rows


@pytest.fixture(scope="module")
def local_folder(tmp_path_factory):
    """An embedding folder (image, text, metadata with keys and labels) of 4 separated classes."""
    root = tmp_path_factory.mktemp("remote_stages")
    write_separated_embeddings(root / "emb", PARTS)
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


def _index_files(folder) -> dict:
    """The files of an index folder but index.json (which records its own source), by relative name."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name not in ("index.json", "SOURCE")}


def _s3_files(s3, bucket: str, prefix: str) -> dict:
    return {key[len(prefix) + 1:]: s3.get(bucket, key) for key in s3.keys(bucket, prefix + "/")
            if not key.endswith("index.json")}


@pytest.mark.parametrize("layout", ["unicom", "clip-retrieval"])
def test_unicom_index_writes_into_s3_the_files_of_a_local_build(s3, local_folder, remote_folder, tmp_path, monkeypatch,
                                                                  layout):
    import json

    from unicom.search.index import Index

    emb, bucket = remote_folder
    prefix = f"index-{layout}"
    monkeypatch.setenv("UNICOM_CACHE", str(tmp_path / "cache"))
    options = ["--layout", layout, "--type", "hnsw", "--heldout", "10"]
    assert main(["index", "--emb", str(local_folder / "emb"), "--out", str(tmp_path / "local"), *options]) == 0
    assert main(["index", "--emb", emb, "--out", f"s3://{bucket}/{prefix}", *options]) == 0

    written = without_build_id(_s3_files(s3, bucket, prefix), json.loads(s3.get(bucket, f"{prefix}/index.json"))["build"])
    local = without_build_id(_index_files(tmp_path / "local"), json.loads((tmp_path / "local" / "index.json").read_text())["build"])
    if layout == "clip-retrieval":  # autofaiss' description names where the index file is
        for name in ("image.json", "text.json"):
            described = [json.loads(files.pop(name)) for files in (written, local)]
            assert described[0].pop("index_path") == f"s3://{bucket}/{prefix}/{name.split('.')[0]}.index"
            assert described[1].pop("index_path") == str(tmp_path / "local" / f"{name.split('.')[0]}.index")
            assert described[0] == described[1]
    assert written == local
    config = json.loads(s3.get(bucket, f"{prefix}/index.json"))
    assert config["source"] == emb and config["count"] == sum(PARTS.values())
    assert not any(key.rsplit("/", 1)[-1].startswith(".") for key in s3.keys(bucket))  # no temporaries

    queries = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    remote, mine = Index.load(f"s3://{bucket}/{prefix}"), Index.load(tmp_path / "local")
    np.testing.assert_array_equal(remote.search(queries, 5)[1], mine.search(queries, 5)[1])
    assert remote.location == f"s3://{bucket}/{prefix}"
    assert main(["index", "--emb", emb, "--out", f"s3://{bucket}/{prefix}", *options]) == 0  # nothing new: up to date


def test_an_index_into_a_read_only_url_is_refused_before_it_is_built(local_folder, capsys):
    code = main(["index", "--emb", str(local_folder / "emb"), "--out", "https://127.0.0.1:9/index"])
    assert code == 2
    assert "https://127.0.0.1:9/index: https URLs are read only" in capsys.readouterr().err


def test_new_parts_are_added_to_an_index_in_s3_and_the_old_generation_removed(s3, local_folder, remote_folder, tmp_path,
                                                                               monkeypatch):
    import json

    from unicom.formats.embeddings import write_part
    from unicom.search.index import Index

    emb, bucket = remote_folder
    monkeypatch.setenv("UNICOM_CACHE", str(tmp_path / "cache"))
    local_emb = tmp_path / "emb"
    import shutil

    shutil.copytree(local_folder / "emb", local_emb)
    options = ["--type", "hnsw", "--heldout", "10"]
    for source, out in ((str(local_emb), str(tmp_path / "local")), (emb, f"s3://{bucket}/index")):
        assert main(["index", "--emb", source, "--out", out, *options]) == 0
    first = json.loads(s3.get(bucket, "index/index.json"))["file"]

    rng = np.random.default_rng(5)
    write_part(local_emb, 7, image=rng.standard_normal((12, 16)).astype(np.float16),
               metadata=pa.table({"key": [f"7-{i}" for i in range(12)], "label": np.zeros(12, np.int64)}))
    s3.upload_folder(local_emb, bucket, "emb")
    for source, out in ((str(local_emb), str(tmp_path / "local")), (emb, f"s3://{bucket}/index")):
        assert main(["index", "--emb", source, "--out", out]) == 0

    config = json.loads(s3.get(bucket, "index/index.json"))
    assert config["count"] == sum(PARTS.values()) + 12 and config["file"] != first
    keys = s3.keys(bucket, "index/")
    assert f"index/{first}" not in keys and f"index/{config['file']}" in keys  # the old generation is gone
    assert (without_build_id(_s3_files(s3, bucket, "index"), config["build"])
            == without_build_id(_index_files(tmp_path / "local"), json.loads((tmp_path / "local" / "index.json").read_text())["build"]))
    queries = rng.standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_array_equal(Index.load(f"s3://{bucket}/index").search(queries, 5)[1],
                                  Index.load(tmp_path / "local").search(queries, 5)[1])


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_killed_while_adding_parts_to_an_index_in_s3_the_previous_one_stays_whole(s3, local_folder, remote_folder,
                                                                                   tmp_path, monkeypatch):
    """kill -9 as S3 answers the upload of the new index.json's temporary object (the commit
    is the rename after it): readers keep the previous index whole, and the rerun completes the
    grown one and leaves no temporaries and no file of the previous generation."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from storage_servers import kill_at_s3_response

    from unicom.formats.embeddings import write_part
    from unicom.search.index import Index

    emb, bucket = remote_folder
    monkeypatch.setenv("UNICOM_CACHE", str(tmp_path / "cache"))
    url = f"s3://{bucket}/index"
    assert main(["index", "--emb", emb, "--out", url, "--type", "hnsw", "--heldout", "10"]) == 0
    before = s3.get(bucket, "index/index.json")
    shutil.copytree(local_folder / "emb", tmp_path / "emb")
    rng = np.random.default_rng(8)
    write_part(tmp_path / "emb", 7, image=rng.standard_normal((12, 16)).astype(np.float16),
               metadata=pa.table({"key": [f"7-{i}" for i in range(12)], "label": np.zeros(12, np.int64)}))
    s3.upload_folder(tmp_path / "emb", bucket, "emb")
    command = [sys.executable, "-m", "unicom.cli", "index", "--emb", emb, "--out", url]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    kill_at_s3_response(s3, command, env, rb"PUT /" + bucket.encode() + rb"/index/\.index\.json\.[a-z0-9_]{8}\.tmp ")
    assert s3.get(bucket, "index/index.json") == before
    left = [key for key in s3.keys(bucket, "index/") if key.rsplit("/", 1)[-1].startswith(".")]
    assert len(left) == 1 and left[0].startswith("index/.index.json.")  # what the kill left, under its temporary name
    old = Index.load(url)
    assert len(old) == sum(PARTS.values()) and [part.number for part in old.parts] == sorted(PARTS)

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads(s3.get(bucket, "index/index.json"))
    assert config["count"] == sum(PARTS.values()) + 12 and config["generation"] == 1
    names = [key.split("/", 1)[1] for key in s3.keys(bucket, "index/")]
    assert sorted(n for n in names if n.endswith(".faiss")) == [config["file"]]  # generation 0's file is gone
    assert not any(name.rsplit("/", 1)[-1].startswith(".") for name in names)
    assert len(Index.load(url)) == sum(PARTS.values()) + 12


def test_two_machines_grow_one_index_in_s3_without_bringing_back_old_files(s3, local_folder, remote_folder, tmp_path,
                                                                          monkeypatch):
    """Each machine keeps its own cache: what one uploads is what the new index.json names,
    never an older generation's file left in its cache."""
    import shutil

    from unicom.formats.embeddings import write_part

    emb, bucket = remote_folder
    url = f"s3://{bucket}/index"
    shutil.copytree(local_folder / "emb", tmp_path / "emb")
    rng = np.random.default_rng(10)

    def grow(number: int) -> None:
        write_part(tmp_path / "emb", number, image=rng.standard_normal((6, 16)).astype(np.float16),
                   metadata=pa.table({"key": [f"{number}-{i}" for i in range(6)], "label": np.zeros(6, np.int64)}))
        s3.upload_folder(tmp_path / "emb", bucket, "emb")

    def on(machine: str, *args: str) -> None:
        monkeypatch.setenv("UNICOM_CACHE", str(tmp_path / machine))
        assert main(["index", "--emb", emb, "--out", url, *args]) == 0

    on("a", "--type", "hnsw", "--heldout", "10")
    grow(7)
    on("b")
    grow(8)
    on("a")
    faiss_files = [key for key in s3.keys(bucket, "index/") if key.endswith(".faiss")]
    assert faiss_files == ["index/index_2.faiss"]


def test_a_rebuild_in_s3_that_fails_leaves_no_index_rather_than_a_mix_of_two(s3, local_folder, remote_folder, tmp_path,
                                                                            monkeypatch):
    """clip-retrieval's layout rewrites image.index and the metadata under their names: the
    previous index.json goes first, so a failed rebuild leaves a folder that says it holds
    no finished index (a reader never pairs the new vectors with the old metadata), and the
    rerun completes the rebuild."""
    import shutil

    from unicom import storage
    from unicom.formats.embeddings import write_part
    from unicom.search.index import Index

    emb, bucket = remote_folder
    monkeypatch.setenv("UNICOM_CACHE", str(tmp_path / "cache"))
    url = f"s3://{bucket}/index"
    options = ["--layout", "clip-retrieval", "--type", "flat"]
    assert main(["index", "--emb", emb, "--out", url, *options]) == 0
    shutil.copytree(local_folder / "emb", tmp_path / "emb")
    rng = np.random.default_rng(9)
    write_part(tmp_path / "emb", 7, image=rng.standard_normal((12, 16)).astype(np.float16),
               text=rng.standard_normal((12, 16)).astype(np.float16),
               metadata=pa.table({"key": [f"7-{i}" for i in range(12)], "label": np.zeros(12, np.int64)}))
    s3.upload_folder(tmp_path / "emb", bucket, "emb")

    upload = storage.upload_atomic

    def failing(local_file, destination):
        if storage.name(destination) == "index.json":
            raise ConnectionResetError("connection reset by peer")
        return upload(local_file, destination)

    monkeypatch.setattr(storage, "upload_atomic", failing)
    with pytest.raises(ConnectionResetError):
        main(["index", "--emb", emb, "--out", url, *options, "--rebuild"])
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(InputError, match="no index.json inside"):
        Index.load(url)
    monkeypatch.setattr(storage, "upload_atomic", upload)
    assert main(["index", "--emb", emb, "--out", url, *options, "--rebuild"]) == 0
    assert len(Index.load(url)) == sum(PARTS.values()) + 12


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
            data=SimpleNamespace(shards=shards, labels=label_folder, shuffle_buffer=4, folder=None, table=None, benchmark=None,
                                 image_column=None, key_column=None),
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


def test_dedup_of_an_s3_folder_equals_the_local_run_and_its_table_excludes_from_s3(s3, local_folder, remote_folder,
                                                                                   tmp_path, capsys):
    emb, bucket = remote_folder
    for root, out in ((str(local_folder / "emb"), tmp_path / "local"), (emb, tmp_path / "remote")):
        assert main(["dedup", "--emb", root, "--threshold", "0.9", "--out", str(out)]) == 0
    for name in ("pairs.parquet", "duplicates.parquet"):
        assert pq.read_table(tmp_path / "remote" / name).equals(pq.read_table(tmp_path / "local" / name)), name
    listed = pq.read_table(tmp_path / "local" / "duplicates.parquet").column("key").to_pylist()
    assert listed  # the classes are tight: there are near copies to leave out
    # through a flat index in S3 of the folder in S3, read a block at a time: the same pairs
    assert main(["index", "--emb", emb, "--out", f"s3://{bucket}/dedup-index", "--type", "flat", "--heldout", "5"]) == 0
    assert main(["dedup", "--emb", emb, "--index", f"s3://{bucket}/dedup-index", "--threshold", "0.9",
                 "--out", str(tmp_path / "indexed")]) == 0
    for name in ("pairs.parquet", "duplicates.parquet"):
        indexed, local = (pq.read_table(tmp_path / run / name).drop_columns(["similarity"]) for run in ("indexed", "local"))
        assert indexed.equals(local), name
    s3.put(bucket, "dedup/duplicates.parquet", (tmp_path / "local" / "duplicates.parquet").read_bytes())
    assert main(["cluster", "--embeddings", emb, "--k", "4", "--points-per-centroid", "20",
                 "--exclude", f"s3://{bucket}/dedup/duplicates.parquet", "--out", str(tmp_path / "clusters")]) == 0
    from unicom.cluster import load_labels

    assert not set(load_labels(tmp_path / "clusters").column("key").to_pylist()) & set(listed)
    assert main(["dedup", "--emb", emb, "--out", f"s3://{bucket}/dedup-out"]) == 2
    assert "the list of near duplicates is written to a local path, not to a URL" in capsys.readouterr().err
