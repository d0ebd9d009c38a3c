"""Samples that share a key keep their own labels from `unicom embed` through `unicom cluster`
to the trainer, when a sample of the key failed to embed.

The reference is independent of any key join: `unicom cluster` labels the embedding rows in
order, and the embedding rows are the input's samples in order less those listed in the
failures report, so the i-th sample that was embedded has the label of row i.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from support import class_image, encode_image, write_tar_shard

from unicom.cli import main
from unicom.train.config import load_config
from unicom.train.data import Counters, build_source

# shard 0: key "a" on four samples (the first a broken JPEG), "b" twice, and unique keys
SAMPLES = [("a", None), ("a", 1), ("u0", 2), ("b", 3), ("a", 4), ("u1", 5), ("b", 6), ("a", 7), ("u2", 8), ("u3", 9)]


def _embed_and_cluster(tmp_path, inputs: list[str], k: int = 5) -> tuple:
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_vit").state_dict(), weights)
    assert main(["embed", "--input", *inputs, "--model", "timm/test_vit", "--pretrained", str(weights),
                 "--out", str(tmp_path / "EMB"), "--workers", "0", "--batch-size", "4"]) == 0
    assert main(["cluster", "--embeddings", str(tmp_path / "EMB"), "--fusion", "image", "--k", str(k),
                 "--init", "kmeans++", "--out", str(tmp_path / "clusters")]) == 0
    return tmp_path / "EMB", tmp_path / "clusters"


def _reference(emb, clusters, count: int) -> dict[int, int | None]:
    """{position in the input: label}: the embedded samples in order take the label rows in order."""
    failed = set(pq.read_table(emb / "failures" / "failures_0.parquet").column("index").to_pylist())
    labels = pq.read_table(clusters / "labels" / "labels_0.parquet").column("label").to_pylist()
    embedded = [p for p in range(count) if p not in failed]
    assert len(embedded) == len(labels)  # no row dropped: row i is the i-th embedded sample
    return {p: (labels[embedded.index(p)] if p in embedded else None) for p in range(count)}


def test_each_sample_of_a_shard_keeps_the_label_cluster_gave_it_when_a_sample_of_its_key_failed(tmp_path):
    images = {i: encode_image(class_image(i, i, 40)) for _, i in SAMPLES if i is not None}
    broken = encode_image(class_image(0, 0, 40))[:200]  # a JPEG cut short: it cannot be embedded
    write_tar_shard(tmp_path / "shards" / "00000.tar",
                    [{"key": key, "jpg": broken if i is None else images[i]} for key, i in SAMPLES])
    emb, clusters = _embed_and_cluster(tmp_path, [str(tmp_path / "shards" / "00000.tar")])

    expected = _reference(emb, clusters, len(SAMPLES))
    assert expected[0] is None and sum(v is not None for v in expected.values()) == len(SAMPLES) - 1
    # the join is only tested where rows of one key differ: key a's labelled samples are not all alike
    assert len({expected[p] for p in (1, 4, 7)}) > 1, expected

    config = load_config(None, ["out=/tmp/unused", f"data.shards={tmp_path / 'shards'}", f"data.labels={clusters}"])
    counters = Counters()
    source = build_source(config)
    assert source.labels_note is None  # every label file names its samples by occurrence
    records = list(source.records(0, 0, 0, 1, 0, 1, 1, counters))
    found = {r.uid[1]: r.label for r in records}
    assert {p: found.get(p) for p in range(len(SAMPLES))} == expected
    assert counters.unlabelled == 1  # the broken sample, which has no row
    assert all(r.key == SAMPLES[r.uid[1]][0] for r in records)


def test_each_row_of_a_list_with_repeated_keys_keeps_its_label_when_one_image_failed(tmp_path):
    """A CSV list keyed by a column whose values repeat, one image broken, cut into parts of
    four rows: occurrences count over the whole list, across parts."""
    (tmp_path / "images").mkdir()
    rows = []
    for n, (key, i) in enumerate(SAMPLES):
        path = tmp_path / "images" / f"{n}.jpg"
        path.write_bytes(encode_image(class_image(0, 0, 40))[:200] if i is None else encode_image(class_image(i, i, 40)))
        rows.append(f"{key},{path}\n")
    (tmp_path / "list.csv").write_text("key,path\n" + "".join(rows))
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_vit").state_dict(), weights)
    assert main(["embed", "--input", str(tmp_path / "list.csv"), "--model", "timm/test_vit", "--pretrained",
                 str(weights), "--out", str(tmp_path / "EMB"), "--workers", "0", "--rows-per-part", "4"]) == 0
    assert main(["cluster", "--embeddings", str(tmp_path / "EMB"), "--fusion", "image", "--k", "5",
                 "--init", "kmeans++", "--out", str(tmp_path / "clusters")]) == 0
    # reference: part by part, the embedded rows take the label rows in order
    expected = {}
    for part in range(3):
        positions = range(4 * part, min(4 * part + 4, len(SAMPLES)))
        report = tmp_path / "EMB" / "failures" / f"failures_{part}.parquet"
        failed = {4 * part + i for i in pq.read_table(report).column("index").to_pylist()} if report.exists() else set()
        labels = iter(pq.read_table(tmp_path / "clusters" / "labels" / f"labels_{part}.parquet").column("label").to_pylist())
        expected.update({p: (None if p in failed else next(labels)) for p in positions})
    assert expected[0] is None and len({expected[p] for p in (1, 4, 7)}) > 1, expected

    config = load_config(None, ["out=/tmp/unused", f"data.table={tmp_path / 'list.csv'}", f"data.labels={tmp_path / 'clusters'}"])
    source = build_source(config)
    found = {int(str(path).rsplit("/", 1)[1].split(".")[0]): int(label) for path, label in zip(source.images, source.labels)}
    assert {p: found.get(p) for p in range(len(SAMPLES))} == expected
    assert source.unlabelled == 1


def test_a_label_file_of_an_earlier_version_still_joins_a_shard_whose_keys_have_all_their_rows(tmp_path):
    """No ``occurrence`` column, every sample embedded: the n-th sample of a key takes the
    n-th row of the key, as before."""
    images = {i: encode_image(class_image(i, i, 40)) for i in range(len(SAMPLES))}
    write_tar_shard(tmp_path / "shards" / "00000.tar", [{"key": key, "jpg": images[n]} for n, (key, _) in enumerate(SAMPLES)])
    emb, clusters = _embed_and_cluster(tmp_path, [str(tmp_path / "shards" / "00000.tar")])
    path = clusters / "labels" / "labels_0.parquet"
    table = pq.read_table(path)
    assert table.column("occurrence").to_pylist() == [0, 1, 0, 0, 2, 0, 1, 3, 0, 0]
    pq.write_table(table.drop(["occurrence"]), path)  # as an earlier version wrote it
    labels = table.column("label").to_pylist()

    config = load_config(None, ["out=/tmp/unused", f"data.shards={tmp_path / 'shards'}", f"data.labels={clusters}"])
    source = build_source(config)
    assert source.labels_note.startswith("1 of 1 label files have no 'occurrence' column (written by an earlier "
                                         "version, or from embeddings without it")
    found = {r.uid[1]: r.label for r in source.records(0, 0, 0, 1, 0, 1, 1, Counters())}
    assert found == dict(enumerate(labels))
    assert json.loads(pq.read_schema(path).metadata[b"unicom.labels"])["key_column"] == "key"
    assert np.unique(labels).size > 1


def test_an_embedding_folder_resumed_across_versions_is_refused_with_advice_that_works(tmp_path):
    """Part 0 embedded and clustered by an earlier version (no occurrence), key a's first
    sample broken: the refusal says to embed and cluster into new folders, because resumed
    into the old ones both keep that part as it is; followed, every sample is joined."""
    from unicom.errors import InputError

    images = {i: encode_image(class_image(i, i, 40)) for _, i in SAMPLES if i is not None}
    broken = encode_image(class_image(0, 0, 40))[:200]
    shard = tmp_path / "shards" / "00000.tar"
    write_tar_shard(shard, [{"key": key, "jpg": broken if i is None else images[i]} for key, i in SAMPLES])
    emb, clusters = _embed_and_cluster(tmp_path, [str(shard)])
    table = pq.read_table(clusters / "labels" / "labels_0.parquet")
    assert len({label for key, label in zip(table["key"].to_pylist(), table["label"].to_pylist()) if key == "a"}) > 1
    for path in (emb / "metadata" / "metadata_0.parquet", clusters / "labels" / "labels_0.parquet"):
        pq.write_table(pq.read_table(path).drop(["occurrence"]), path)  # as an earlier version wrote them
    assert main(["embed", "--input", str(shard), "--model", "timm/test_vit", "--pretrained", str(tmp_path / "w.pth"),
                 "--out", str(emb), "--workers", "0"]) == 0
    assert main(["cluster", "--embeddings", str(emb), "--fusion", "image", "--k", "5", "--init", "kmeans++",
                 "--out", str(clusters)]) == 0
    assert "occurrence" not in pq.read_schema(clusters / "labels" / "labels_0.parquet").names  # resumed: kept as it was

    config = load_config(None, ["out=/tmp/unused", f"data.shards={tmp_path / 'shards'}", f"data.labels={clusters}"])
    with pytest.raises(InputError) as error:
        list(build_source(config).records(0, 0, 0, 1, 0, 1, 1, Counters()))
    assert "key 'a' is on 3 label row(s) but more than 3 samples carry it" in str(error.value)
    assert "Run `unicom embed` with this version into a new --out, then `unicom cluster` on that into a new --out" \
        in str(error.value)

    (tmp_path / "new").mkdir()
    emb, clusters = _embed_and_cluster(tmp_path / "new", [str(shard)])
    config = load_config(None, ["out=/tmp/unused", f"data.shards={tmp_path / 'shards'}", f"data.labels={clusters}"])
    found = {r.uid[1]: r.label for r in build_source(config).records(0, 0, 0, 1, 0, 1, 1, Counters())}
    assert found == {p: v for p, v in _reference(emb, clusters, len(SAMPLES)).items() if v is not None}


def test_labels_of_embeddings_without_occurrences_join_unique_keys_and_the_note_says_so(tmp_path):
    """Embeddings whose metadata has no occurrence column (LAION's published ones), keys unique
    in the shard, clustered by this version: every sample takes its row, and the start of
    training says the join is exact for unique keys rather than only that files are old."""
    images = [encode_image(class_image(n, n, 40)) for n in range(6)]
    shard = tmp_path / "shards" / "00000.tar"
    write_tar_shard(shard, [{"key": f"k{n}", "jpg": image} for n, image in enumerate(images)])
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "w.pth")
    assert main(["embed", "--input", str(shard), "--model", "timm/test_vit", "--pretrained", str(tmp_path / "w.pth"),
                 "--out", str(tmp_path / "EMB"), "--workers", "0"]) == 0
    metadata = tmp_path / "EMB" / "metadata" / "metadata_0.parquet"
    pq.write_table(pq.read_table(metadata).drop(["occurrence"]), metadata)
    assert main(["cluster", "--embeddings", str(tmp_path / "EMB"), "--fusion", "image", "--k", "3", "--init", "kmeans++",
                 "--out", str(tmp_path / "clusters")]) == 0
    table = pq.read_table(tmp_path / "clusters" / "labels" / "labels_0.parquet")
    assert "occurrence" not in table.column_names

    config = load_config(None, ["out=/tmp/unused", f"data.shards={tmp_path / 'shards'}", f"data.labels={tmp_path / 'clusters'}"])
    source = build_source(config)
    assert "from embeddings without it such as LAION's published ones" in source.labels_note
    assert "exact where keys are unique in their shard" in source.labels_note
    found = {r.key: r.label for r in source.records(0, 0, 0, 1, 0, 1, 1, Counters())}
    assert found == dict(zip(table.column("key").to_pylist(), table.column("label").to_pylist()))
    assert len(found) == len(images)


def test_training_on_label_files_of_an_earlier_version_says_so_at_the_start(tmp_path, capsys):
    from unicom.train.trainer import train

    write_tar_shard(tmp_path / "shards" / "00000.tar",
                    [{"key": key, "jpg": encode_image(class_image(n, n, 16))} for n, (key, _) in enumerate(SAMPLES)])
    (tmp_path / "clusters" / "labels").mkdir(parents=True)
    pq.write_table(pa.table({"key": [key for key, _ in SAMPLES], "label": pa.array([n % 2 for n in range(len(SAMPLES))], pa.int64())}),
                   tmp_path / "clusters" / "labels" / "labels_0.parquet")
    (tmp_path / "clusters" / "centroids.json").write_text(json.dumps({"k": 2}))
    train(load_config(None, [f"out={tmp_path / 'run'}", f"data.shards={tmp_path / 'shards'}", f"data.labels={tmp_path / 'clusters'}",
                             "model.image_size=16", "model.patch_size=8", "model.width=48", "model.depth=1", "model.heads=2",
                             "model.embedding_dim=8", "data.batch_size=4", "data.workers=0", "train.steps=1",
                             "log.tensorboard=false", "train.device=cpu"]))
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  labels: ")]
    assert line.startswith("  labels: 1 of 1 label files have no 'occurrence' column (written by an earlier version, or from "
                           "embeddings without it such as LAION's published ones)")


def test_a_sample_that_cluster_leaves_out_leaves_its_own_label_out_and_no_other(tmp_path):
    """Every sample embedded, then the embedding of key a's second sample made invalid (NaN):
    `unicom cluster --skip-invalid` labels the other rows, and that sample alone is unlabelled."""
    images = {n: encode_image(class_image(n, n, 40)) for n in range(len(SAMPLES))}
    write_tar_shard(tmp_path / "shards" / "00000.tar", [{"key": key, "jpg": images[n]} for n, (key, _) in enumerate(SAMPLES)])
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_vit").state_dict(), weights)
    assert main(["embed", "--input", str(tmp_path / "shards" / "00000.tar"), "--model", "timm/test_vit", "--pretrained",
                 str(weights), "--out", str(tmp_path / "EMB"), "--workers", "0"]) == 0
    path = tmp_path / "EMB" / "img_emb" / "img_emb_0.npy"
    rows = np.load(path)
    rows[1] = np.nan  # position 1: key a, its second sample
    np.save(path, rows)
    assert main(["cluster", "--embeddings", str(tmp_path / "EMB"), "--fusion", "image", "--k", "5", "--init", "kmeans++",
                 "--skip-invalid", "--out", str(tmp_path / "clusters")]) == 0
    labels = pq.read_table(tmp_path / "clusters" / "labels" / "labels_0.parquet").column("label").to_pylist()
    kept = [p for p in range(len(SAMPLES)) if p != 1]  # the rows cluster labelled, in order
    expected = {p: (labels[kept.index(p)] if p in kept else None) for p in range(len(SAMPLES))}
    assert len({expected[p] for p in (0, 4, 7)}) > 1, expected

    config = load_config(None, ["out=/tmp/unused", f"data.shards={tmp_path / 'shards'}", f"data.labels={tmp_path / 'clusters'}"])
    counters = Counters()
    found = {r.uid[1]: r.label for r in build_source(config).records(0, 0, 0, 1, 0, 1, 1, counters)}
    assert {p: found.get(p) for p in range(len(SAMPLES))} == expected
    assert counters.unlabelled == 1


def test_the_search_page_reads_each_sample_of_a_repeated_key_from_its_own_members(tmp_path):
    """A shard holding key a twice and key b twice (b's first sample without an image): the
    image of a metadata row is that of the sample its occurrence names, not the key's first."""
    from unicom.search.item_images import ShardImages

    red, blue, green = (encode_image(class_image(n, n, 16), "PNG") for n in range(3))
    write_tar_shard(tmp_path / "shards" / "00000.tar", [
        {"key": "a", "png": red}, {"key": "b", "txt": "no image"}, {"key": "a", "png": blue, "txt": "x"},
        {"key": "b", "png": green}])
    shards = ShardImages(tmp_path / "shards")
    assert [shards.read("00000.tar", "a", occurrence=n) for n in range(3)] == [red, blue, None]
    assert [shards.read("00000.tar", "b", occurrence=n) for n in range(2)] == [None, green]
    assert shards.size("00000.tar", "a", 1) == len(blue) and shards.size("00000.tar", "b", 0) is None
    # metadata without occurrences (earlier versions): the key's first sample with an image, as then
    assert shards.read("00000.tar", "a") == red
    assert shards.read("00000.tar", "b") == green and shards.size("00000.tar", "b") == len(green)
