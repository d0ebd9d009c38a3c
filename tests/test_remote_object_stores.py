"""``gs://`` and ``az://`` URLs read and written through gcsfs and adlfs, against
gcp-storage-emulator's GCS server and Azurite's blob service on 127.0.0.1
(:class:`storage_servers.GCS`, :class:`storage_servers.Azure`): ``embed`` (and its
resumption), ``cluster`` and ``index`` into a bucket or container write the files of the same
commands on local folders, byte for byte, and leave no temporaries (S3's: ``test_remote_embed.py``
and ``test_remote_stages.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from support import class_image, encode_image, without_build_id, write_separated_embeddings, write_tar_shard

from unicom.cli import main

SHARDS = {0: 5, 1: 4}  # shard number -> samples
PARTS = {0: 30, 2: 25}  # embedding part number -> rows


def _local_files(folder, leave_out=()) -> dict:
    """The files under ``folder`` by relative name, but those named in ``leave_out``."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name not in leave_out}


def _bucket_files(store, bucket: str, prefix: str, leave_out=()) -> dict:
    return {key[len(prefix) + 1:]: store.get(bucket, key) for key in store.keys(bucket, prefix + "/")
            if key.rsplit("/", 1)[-1] not in leave_out}


def _no_temporaries(store, bucket: str) -> bool:
    return not any(key.rsplit("/", 1)[-1].startswith(".") for key in store.keys(bucket))


@pytest.fixture(params=["gcs", "azure"])
def store(request):
    """Each object store served here but S3: its server, this process pointed at it."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def embedding_folder(tmp_path_factory):
    """An embedding folder (image, text, metadata with keys and labels) of 4 separated classes."""
    return write_separated_embeddings(tmp_path_factory.mktemp("store_emb") / "emb", PARTS)


def test_embed_from_shards_in_a_bucket_into_it_writes_the_files_of_a_local_run(store, tmp_path, capsys):
    for number, count in SHARDS.items():
        write_tar_shard(tmp_path / "shards" / f"{number:05d}.tar", [
            {"key": f"{number}-{i}", "jpg": encode_image(class_image(i, number * 10 + i, 40)), "txt": f"caption {i}"}
            for i in range(count)
        ])
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "w.pth")
    common = ["--model", "timm/test_vit", "--pretrained", str(tmp_path / "w.pth"), "--batch-size", "2", "--workers", "0"]
    bucket = store.bucket("embed")
    store.upload_folder(tmp_path / "shards", "embed", "shards")
    assert main(["embed", "--input", str(tmp_path / "shards" / "{00000..00001}.tar"), "--out", str(tmp_path / "local"),
                 *common]) == 0
    assert main(["embed", "--input", f"{bucket}/shards/{{00000..00001}}.tar", "--out", f"{bucket}/emb", *common]) == 0, \
        capsys.readouterr().err

    written = _bucket_files(store, "embed", "emb")
    local = _local_files(tmp_path / "local")
    assert {"embed_config.json", "img_emb/img_emb_1.npy", "metadata/metadata_1.parquet"} <= set(local)
    assert written == local
    assert _no_temporaries(store, "embed")
    assert f"embedded 9 samples into 2 parts of {bucket}/emb" in capsys.readouterr().out
    # run again: every part is found finished in the bucket, nothing is written twice
    assert main(["embed", "--input", f"{bucket}/shards/{{00000..00001}}.tar", "--out", f"{bucket}/emb", *common]) == 0
    assert "(2 of 2 parts were already finished)" in capsys.readouterr().out
    assert _bucket_files(store, "embed", "emb") == local


def test_cluster_from_a_bucket_into_it_equals_the_local_run(store, embedding_folder, tmp_path, monkeypatch):
    """The endpoint or credentials given as storage options, not by the environment."""
    bucket = store.bucket("cluster")
    emb = store.upload_folder(embedding_folder, "cluster", "emb")
    options = ["--k", "4", "--fusion", "image+text", "--points-per-centroid", "10"]
    assert main(["cluster", "--embeddings", str(embedding_folder), "--out", str(tmp_path / "local"), *options]) == 0
    given = store.as_storage_options(monkeypatch)
    assert main(["cluster", "--embeddings", emb, "--out", f"{bucket}/clusters", *options,
                 "--storage-options", json.dumps(given)]) == 0

    written = _bucket_files(store, "cluster", "clusters")
    local = _local_files(tmp_path / "local")
    assert {"centroids.npy", "cluster_sizes.npy", "labels/labels_0.parquet", "labels/labels_2.parquet"} <= set(local)
    for name in ("centroids.json", "clusters.json"):  # the records, but for how long each step took
        remote_record, local_record = (json.loads(files.pop(name)) for files in (written, local))
        del remote_record["seconds"], local_record["seconds"]
        assert remote_record == local_record
    assert written == local
    assert _no_temporaries(store, "cluster")


def test_unicom_index_into_a_bucket_searches_like_a_local_build(store, embedding_folder, tmp_path, monkeypatch):
    from unicom.search.index import Index

    monkeypatch.setenv("UNICOM_CACHE", str(tmp_path / "cache"))
    bucket = store.bucket("index")
    emb = store.upload_folder(embedding_folder, "index", "emb")
    options = ["--type", "hnsw", "--heldout", "10"]
    assert main(["index", "--emb", str(embedding_folder), "--out", str(tmp_path / "local"), *options]) == 0
    assert main(["index", "--emb", emb, "--out", f"{bucket}/index", *options]) == 0

    leave_out = ("index.json",)  # it records its source
    config = json.loads(store.get("index", "index/index.json"))
    assert (without_build_id(_bucket_files(store, "index", "index", leave_out), config["build"])
            == without_build_id(_local_files(tmp_path / "local", leave_out), json.loads((tmp_path / "local" / "index.json").read_text())["build"]))
    assert config["source"] == emb and config["count"] == sum(PARTS.values())
    assert _no_temporaries(store, "index")

    queries = np.random.default_rng(2).standard_normal((6, 16)).astype(np.float32)
    remote, local = Index.load(f"{bucket}/index"), Index.load(tmp_path / "local")
    assert remote.location == f"{bucket}/index" and remote.path.is_relative_to(tmp_path / "cache")
    distances, ids = remote.search(queries, 5)
    np.testing.assert_array_equal(ids, local.search(queries, 5)[1])
    np.testing.assert_array_equal(distances, local.search(queries, 5)[0])
    assert remote.metadata(ids[0])[0]["key"] == local.metadata(ids[0])[0]["key"]


def test_a_file_past_gcsfs_single_request_size_is_uploaded_whole_in_chunks(gcs, tmp_path, caplog):
    """gcsfs sends a file of 50 MiB or more as a resumable upload: a session, then its chunks."""
    import logging

    from unicom import storage

    data = np.random.default_rng(3).integers(0, 256, (50 << 20) + 12345, dtype=np.uint8).tobytes()
    (tmp_path / "big.npy").write_bytes(data)
    bucket = gcs.bucket("large")
    with caplog.at_level(logging.INFO, logger="gcp_storage_emulator"):  # the server's request lines
        storage.upload_atomic(tmp_path / "big.npy", f"{bucket}/emb/big.npy")
    chunks = [record.getMessage().rsplit(" ", 2)[-2] for record in caplog.records
              if "uploadType=resumable&upload_id=" in record.getMessage()]
    assert chunks == ["308", "200"]  # the first 50 MiB ("resume incomplete"), then the rest
    assert gcs.keys("large") == ["emb/big.npy"]
    assert gcs.get("large", "emb/big.npy") == data
