"""``unicom evaluate`` end to end: precomputed embedding folders, benchmark folders, a real model file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from unicom.cli import main
from unicom.evaluate import retrieval_metrics
from unicom.evaluate.dims import PCA
from unicom.formats.embeddings import write_part


def clustered(n, dim, classes, noise, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = rng.standard_normal((classes, dim))[labels] + noise * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def embedding_folder(root: Path, x: np.ndarray, keys, labels=None, parts: int = 2) -> Path:
    """``x`` written as ``parts`` layout parts, metadata with key (and label)."""
    for number, rows in enumerate(np.array_split(np.arange(len(x)), parts)):
        columns = {"key": [keys[i] for i in rows]}
        if labels is not None:
            columns["label"] = [labels[i] for i in rows]
        write_part(root, number, image=x[rows].astype(np.float16), metadata=pa.table(columns))
    return root


def tiny_model_file(path: Path, seed: int = 0) -> Path:
    """A random one-block Unicom ViT (32 px, 16-d embeddings) saved as a released-style fp16 checkpoint."""
    import torch
    from support import random_unicom_vit

    from unicom.models.unicom_vit import ViTSettings

    settings = ViTSettings(image_size=32, patch_size=16, width=64, depth=1, heads=2, mlp_dim=128, embedding_dim=16)
    torch.save({k: v.half() for k, v in random_unicom_vit(settings, seed=seed).state_dict().items()}, path)
    return path


def test_embeddings_folder_leave_one_out_with_dimension_curve(tmp_path, capsys):
    x, labels = clustered(90, 48, 9, 0.9, seed=0)
    train, _ = clustered(200, 48, 20, 0.9, seed=1)
    embedding_folder(tmp_path / "test", x, [f"img{i}" for i in range(90)], labels.tolist())
    embedding_folder(tmp_path / "train", train, [f"t{i}" for i in range(200)])
    out = tmp_path / "report"
    code = main(["evaluate", "--embeddings", str(tmp_path / "test"), "--train-embeddings", str(tmp_path / "train"),
                 "--dims", "8,16,32", "--ks", "1,5", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    stored = x.astype(np.float16).astype(np.float32)  # the folder holds float16
    expected = retrieval_metrics(stored, labels, ks=(1, 5))
    assert report["metrics"] == pytest.approx(expected)
    assert report["protocol"]["leave_one_out"] and report["protocol"]["embedding_dim"] == 48

    rows = {(r["method"], r["dimension"]): r for r in report["dimensions"]}
    assert set(rows) == {(m, d) for m in ("first", "pca") for d in (8, 16, 32, 48)}
    assert rows[("first", 16)]["recall@1"] == pytest.approx(retrieval_metrics(stored[:, :16], labels, ks=(1,))["recall@1"])
    pca = PCA.fit(train.astype(np.float16).astype(np.float32))
    expected_pca = retrieval_metrics(pca.transform(stored, 8), labels, ks=(1,))
    assert rows[("pca", 8)]["recall@1"] == pytest.approx(expected_pca["recall@1"])
    assert rows[("first", 48)]["recall@1"] == pytest.approx(expected["recall@1"])

    with Image.open(out / "recall_vs_dimension.png") as image:
        assert image.format == "PNG" and image.width > 400
    markdown = (out / "metrics.md").read_text()
    assert f"| all | {100 * expected['recall@1']:.2f} |" in markdown
    assert "| 16 |" in markdown and "PCA to d" in markdown
    assert "recall@1" in capsys.readouterr().out


@pytest.mark.parametrize("again", [["--dims", "none"], ["--train-embeddings", "TRAIN", "--task", "classification", "--no-probe"]])
def test_a_report_without_a_curve_leaves_no_earlier_curve_beside_it(tmp_path, again):
    x, labels = clustered(40, 16, 4, 0.5, seed=0)
    embedding_folder(tmp_path / "test", x, [f"img{i}" for i in range(40)], labels.tolist())
    embedding_folder(tmp_path / "train", x, [f"t{i}" for i in range(40)], labels.tolist())
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "test"), "--dims", "8", "--out", str(out)]) == 0
    assert (out / "recall_vs_dimension.png").is_file()
    again = [str(tmp_path / "train") if a == "TRAIN" else a for a in again]
    assert main(["evaluate", "--embeddings", str(tmp_path / "test"), *again, "--out", str(out)]) == 0
    assert "dimensions" not in json.loads((out / "metrics.json").read_text())
    assert not (out / "recall_vs_dimension.png").exists()


@pytest.mark.parametrize("option", ["--gallery-embeddings", "--train-embeddings"])
def test_a_folder_of_another_dimension_is_refused_naming_both_folders(tmp_path, capsys, option):
    x, labels = clustered(40, 16, 4, 0.5, seed=0)
    other, _ = clustered(40, 8, 4, 0.5, seed=1)
    embedding_folder(tmp_path / "test", x, [f"img{i}" for i in range(40)], labels.tolist())
    embedding_folder(tmp_path / "other", other, [f"o{i}" for i in range(40)], labels.tolist())
    code = main(["evaluate", "--embeddings", str(tmp_path / "test"), option, str(tmp_path / "other"), "--dims", "4",
                 "--out", str(tmp_path / "report")])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{tmp_path / 'other'} ({option}) holds 8-dimensional embeddings, {tmp_path / 'test'} (--embeddings) "
        "16-dimensional ones: they were made by different models; give folders embedded with the same model")
    assert not (tmp_path / "report").exists()


def images_folder(root: Path, x: np.ndarray, images: Path, labels) -> Path:
    """``x`` as ``unicom embed --input IMAGES`` writes it: keys relative to ``images``, absolute image paths."""
    names = [f"{i:04d}.jpg" for i in range(len(x))]
    write_part(root, 0, image=x.astype(np.float16), metadata=pa.table(
        {"key": names, "image_path": [str(images / n) for n in names], "label": list(labels)}))
    return root


def test_a_gallery_holding_query_images_is_refused_as_each_would_find_itself(tmp_path, capsys):
    x, labels = clustered(40, 16, 4, 3.0, seed=0)  # noisy: a query's nearest other image is often of another class
    images_folder(tmp_path / "query", x[:10], tmp_path / "photos", labels[:10])
    images_folder(tmp_path / "gallery", x, tmp_path / "photos", labels)  # the queries' 10 images among its 40
    for gallery, what in ((tmp_path / "query", "is the folder of the queries"),
                          (tmp_path / "gallery", f"holds 10 of the query images of {tmp_path / 'query'} (e.g. "
                                                 "0000.jpg, 0001.jpg, 0002.jpg)")):
        code = main(["evaluate", "--embeddings", str(tmp_path / "query"), "--gallery-embeddings", str(gallery),
                     "--dims", "none", "--out", str(tmp_path / "report")])
        assert code == 2
        assert capsys.readouterr().err.strip().endswith(
            f"{gallery} (--gallery-embeddings) {what}: each query would find itself first and lift every score; leave "
            "--gallery-embeddings out to search the queries leave-one-out, or give a gallery without them")
    assert not (tmp_path / "report").exists()


def assert_first_ten_scored_against_the_rest(tmp_path, x, labels) -> None:
    """`unicom evaluate` of tmp_path/query (rows 0..9 of ``x``) against tmp_path/gallery (the
    rest, float16 as stored) gives retrieval_metrics' numbers on the same rows."""
    assert main(["evaluate", "--embeddings", str(tmp_path / "query"), "--gallery-embeddings", str(tmp_path / "gallery"),
                 "--dims", "none", "--out", str(tmp_path / "report")]) == 0
    stored = x.astype(np.float16).astype(np.float32)
    expected = retrieval_metrics(stored[:10], labels[:10], stored[10:], labels[10:], ks=(1, 2, 4, 8))
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["metrics"] == pytest.approx(expected)


def test_a_gallery_of_other_images_under_the_same_keys_is_scored(tmp_path):
    x, labels = clustered(40, 16, 4, 3.0, seed=0)
    images_folder(tmp_path / "query", x[:10], tmp_path / "query-photos", labels[:10])
    images_folder(tmp_path / "gallery", x[10:], tmp_path / "gallery-photos", labels[10:])  # keys 0000.jpg... too
    assert_first_ten_scored_against_the_rest(tmp_path, x, labels)


def test_clip_retrieval_folders_of_two_webdatasets_whose_sample_keys_coincide_are_scored(tmp_path):
    # clip-retrieval writes a webdataset sample's key as image_path (and no key column): two
    # img2dataset runs both number their samples 000000000, 000000001, ... yet hold other images
    x, labels = clustered(40, 16, 4, 3.0, seed=0)
    for folder, rows in (("query", slice(0, 10)), ("gallery", slice(10, 40))):
        names = [f"{i:09d}" for i in range(len(x[rows]))]
        write_part(tmp_path / folder, 0, image=x[rows].astype(np.float16),
                   metadata=pa.table({"image_path": names, "label": list(labels[rows])}))
    assert_first_ten_scored_against_the_rest(tmp_path, x, labels)


def shards_folder(root: Path, x: np.ndarray, labels, site: str | None, first: int = 0) -> Path:
    """``x`` as ``unicom embed --input SHARDS`` writes it, 10 samples per shard from shard ``first`` on: the
    webdataset key, the url of the sample's JSON (at ``site``; None: shards without JSON), the shard's file name."""
    rows = range(len(x))
    write_part(root, 0, image=x.astype(np.float16), metadata=pa.table({
        "key": [f"{first + i // 10:05d}{i % 10:04d}" for i in rows], "caption": [f"caption {i}" for i in rows],
        "url": pa.array([None if site is None else f"https://{site}/{first + i // 10}/{i % 10}.jpg" for i in rows],
                        type=pa.string()),
        "shard": [f"{first + i // 10:05d}.tar" for i in rows], "label": list(labels)}))
    return root


def test_a_gallery_embedded_from_the_query_shards_is_refused_as_each_would_find_itself(tmp_path, capsys):
    x, labels = clustered(40, 16, 4, 3.0, seed=0)
    shards_folder(tmp_path / "query", x[:10], labels[:10], "images.example")  # shard 00000.tar
    shards_folder(tmp_path / "gallery", x, labels, "images.example")  # 00000.tar again, then 00001-00003.tar
    assert main(["evaluate", "--embeddings", str(tmp_path / "query"), "--gallery-embeddings", str(tmp_path / "gallery"),
                 "--dims", "none", "--out", str(tmp_path / "report")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{tmp_path / 'gallery'} (--gallery-embeddings) holds 10 of the query images of {tmp_path / 'query'} (e.g. "
        "000000000, 000000001, 000000002): each query would find itself first and lift every score; leave "
        "--gallery-embeddings out to search the queries leave-one-out, or give a gallery without them")
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("sites", [("query.example", "gallery.example"), (None, None)])
def test_shard_folders_of_two_datasets_whose_shard_names_and_keys_coincide_are_scored(tmp_path, sites):
    # two img2dataset runs both name their shards 00000.tar... and their samples 000000000...: other images,
    # told apart by their urls; without urls (shards without JSON) nothing tells them apart, and none is refused
    x, labels = clustered(40, 16, 4, 3.0, seed=0)
    shards_folder(tmp_path / "query", x[:10], labels[:10], sites[0])
    shards_folder(tmp_path / "gallery", x[10:], labels[10:], sites[1])
    assert_first_ten_scored_against_the_rest(tmp_path, x, labels)


def test_labels_file_and_gallery_folder(tmp_path):
    x, labels = clustered(60, 16, 6, 0.8, seed=2)
    keys = [f"k{i}" for i in range(60)]
    embedding_folder(tmp_path / "query", x[:20], keys[:20], parts=1)
    embedding_folder(tmp_path / "gallery", x[20:], keys[20:], parts=3)
    names = np.array(["cat", "dog", "cow", "eel", "fox", "gnu"])
    (tmp_path / "labels.csv").write_text("key,label\n" + "".join(f"{k},{names[y]}\n" for k, y in zip(keys, labels)))
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "query"), "--gallery-embeddings", str(tmp_path / "gallery"),
                 "--labels", str(tmp_path / "labels.csv"), "--dims", "none", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    stored = x.astype(np.float16).astype(np.float32)
    expected = retrieval_metrics(stored[:20], labels[:20], stored[20:], labels[20:], ks=(1, 2, 4, 8))
    assert report["metrics"] == pytest.approx(expected)
    assert report["protocol"]["gallery"] == 40
    assert not (out / "recall_vs_dimension.png").exists() and "dimensions" not in report


def test_labels_file_keys_without_an_embedding_are_named_in_the_report(tmp_path, capsys):
    # two images of the labels file never made it into the folders (their embedding failed)
    x, labels = clustered(30, 16, 3, 0.5, seed=2)
    keys = [f"img{i}" for i in range(30)]
    embedding_folder(tmp_path / "query", x[:10], keys[:10])
    embedding_folder(tmp_path / "gallery", x[10:28], keys[10:28])
    embedding_folder(tmp_path / "train", x[:28], keys[:28])
    table = tmp_path / "labels.csv"
    table.write_text("key,label\n" + "".join(f"{k},{v}\n" for k, v in zip(keys, labels)))
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "query"), "--gallery-embeddings", str(tmp_path / "gallery"),
                 "--train-embeddings", str(tmp_path / "train"), "--labels", str(table), "--out", str(out)]) == 0
    note = json.loads((out / "metrics.json").read_text())["note"]
    assert note.startswith(f"2 of the 30 keys of {table} have no embedding in {tmp_path / 'query'}, "
                           f"{tmp_path / 'gallery'}, {tmp_path / 'train'} and are not scored, e.g. 'img28', 'img29'")
    assert note in capsys.readouterr().out


def test_labels_file_note_reads_the_keys_not_the_embeddings_of_a_train_folder_left_unused(tmp_path):
    # --no-pca: the train folder (100,000 x 256, 51 MB as float16) only says which labelled keys were embedded
    import tracemalloc

    x, labels = clustered(30, 16, 3, 0.5, seed=2)
    keys = [f"img{i}" for i in range(30)]
    embedding_folder(tmp_path / "query", x[:10], keys[:10])
    embedding_folder(tmp_path / "gallery", x[10:28], keys[10:28])
    train_keys = keys[:28] + [f"t{i}" for i in range(100_000 - 28)]
    write_part(tmp_path / "train", 0, image=np.ones((100_000, 256), np.float16), metadata=pa.table({"key": train_keys}))
    table = tmp_path / "labels.csv"
    table.write_text("key,label\n" + "".join(f"{k},{v}\n" for k, v in zip(keys, labels)))
    out = tmp_path / "report"
    tracemalloc.start()
    try:
        assert main(["evaluate", "--embeddings", str(tmp_path / "query"), "--gallery-embeddings",
                     str(tmp_path / "gallery"), "--train-embeddings", str(tmp_path / "train"), "--labels", str(table),
                     "--no-pca", "--out", str(out)]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40e6  # the train embeddings as float32 would be 102 MB
    note = json.loads((out / "metrics.json").read_text())["note"]
    assert note == (f"2 of the 30 keys of {table} have no embedding in {tmp_path / 'query'}, {tmp_path / 'gallery'}, "
                    f"{tmp_path / 'train'} and are not scored, e.g. 'img28', 'img29'")  # --no-pca: no note on the PCA


def test_labels_file_keeps_webdataset_keys_as_written(tmp_path):
    # keys of shards (000000042) are digits: the labels file must match them as text, not as 42
    x, labels = clustered(24, 8, 4, 0.8, seed=4)
    keys = [f"{i:09d}" for i in range(24)]
    embedding_folder(tmp_path / "emb", x, keys, parts=1)
    (tmp_path / "labels.csv").write_text("key,label\n" + "".join(f"{k},{y}\n" for k, y in zip(keys, labels)))
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--labels", str(tmp_path / "labels.csv"),
                 "--dims", "none", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"] == pytest.approx(retrieval_metrics(x.astype(np.float16).astype(np.float32), labels))


def test_a_key_given_two_labels_is_refused_naming_the_row(tmp_path, capsys):
    x, labels = clustered(6, 8, 2, 0.5, seed=5)
    embedding_folder(tmp_path / "emb", x, [f"k{i}" for i in range(6)], parts=1)
    rows = "".join(f"k{i},{y}\n" for i, y in enumerate(labels)) + "k4,7\n"  # data row 7: k4 again, another label
    (tmp_path / "labels.csv").write_text("key,label\n" + rows)
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--labels", str(tmp_path / "labels.csv"),
                 "--dims", "none", "--out", str(tmp_path / "report")]) == 2
    assert "1 keys are given another label on a later row, e.g. 'k4' (data row 7)" in capsys.readouterr().err


def test_a_labels_file_with_a_short_row_is_refused_naming_the_line(tmp_path, capsys):
    x, _ = clustered(4, 8, 2, 0.5, seed=5)
    embedding_folder(tmp_path / "emb", x, [f"k{i}" for i in range(4)], parts=1)
    (tmp_path / "labels.csv").write_text("key,label\nk0,0\nk1\nk2,1\nk3,1\n")  # line 3: k1 lost its label
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--labels", str(tmp_path / "labels.csv"),
                 "--dims", "none", "--out", str(tmp_path / "report")]) == 2
    assert "labels.csv: the row on line 3 has 1 field ('k1') where the header has 2 (key,label)" in capsys.readouterr().err


def test_benchmark_rows_are_matched_by_key(tmp_path):
    # a SOP tree, and embeddings of its images keyed by path relative to the dataset folder
    root = tmp_path / "sop"
    header = "image_id class_id super_class_id path\n"
    test_rows = [(i, 11319 + i // 3, f"chair_final/{i}.JPG") for i in range(12)]
    (root / "chair_final").mkdir(parents=True)
    (root / "Ebay_train.txt").write_text(header + "100 1 1 chair_final/t.JPG\n")
    (root / "Ebay_test.txt").write_text(header + "".join(f"{i} {c} 1 {p}\n" for i, c, p in test_rows))
    for _, _, path in test_rows:
        Image.new("RGB", (4, 4)).save(root / path, format="JPEG")
    x, _ = clustered(12, 16, 4, 0.5, seed=3)
    shuffled = np.random.default_rng(0).permutation(12)  # stored in another order than the lists
    embedding_folder(tmp_path / "emb", x[shuffled], [test_rows[i][2] for i in shuffled])
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "sop", "--root", str(root),
                 "--dims", "none", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    expected = retrieval_metrics(x.astype(np.float16).astype(np.float32), np.arange(12) // 3, ks=(1, 10, 100, 1000))
    assert report["metrics"] == pytest.approx(expected) and report["dataset"] == "sop"


def test_classification_on_embedding_folders(tmp_path):
    x, labels = clustered(120, 16, 4, 0.6, seed=4)
    embedding_folder(tmp_path / "train", x[:80], [f"a{i}" for i in range(80)], labels[:80].tolist())
    embedding_folder(tmp_path / "test", x[80:], [f"b{i}" for i in range(40)], labels[80:].tolist())
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "test"), "--train-embeddings", str(tmp_path / "train"),
                 "--task", "classification", "--knn-k", "5", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["knn"]["k"] == 5
    assert report["linear_probe"]["accuracy"] == 1.0 and report["knn"]["accuracy"] == 1.0
    assert "| linear probe | 100.00 |" in (out / "metrics.md").read_text()


@pytest.mark.parametrize("probe", [[], ["--no-probe"]], ids=["probe", "knn"])
def test_classification_names_the_folder_and_row_of_a_nan_or_a_dimension_mismatch(tmp_path, capsys, probe):
    x, labels = clustered(60, 16, 2, 0.6, seed=4)
    x[45, 3] = np.nan  # row 5 of the test split
    embedding_folder(tmp_path / "train", x[:40], [f"a{i}" for i in range(40)], labels[:40].tolist())
    embedding_folder(tmp_path / "test", x[40:], [f"b{i}" for i in range(20)], labels[40:].tolist())
    embedding_folder(tmp_path / "narrow", x[:20, :8], [f"c{i}" for i in range(20)], labels[:20].tolist())
    command = ["evaluate", "--train-embeddings", str(tmp_path / "train"), "--task", "classification", "--knn-k", "5",
               "--out", str(tmp_path / "report"), *probe]
    assert main([*command, "--embeddings", str(tmp_path / "test")]) == 2
    assert f"{tmp_path / 'test'} (--embeddings): row 5 holds NaN or infinite values" in capsys.readouterr().err
    assert main([*command, "--embeddings", str(tmp_path / "narrow")]) == 2
    assert (f"{tmp_path / 'train'} (--train-embeddings) features have 16 dimensions but {tmp_path / 'narrow'} "
            "(--embeddings) features 8") in capsys.readouterr().err


def test_classification_whose_test_classes_are_none_of_the_train_classes_is_refused(tmp_path, capsys):
    """A test folder labelled with class names against a train folder labelled with numbers (as an
    older unicom embed stored a list's names): no prediction can be right; an error naming both
    folders and their classes, not a report of 0 % accuracy."""
    x, labels = clustered(60, 16, 2, 0.6, seed=4)
    names = [["cat", "owl"][label] for label in labels.tolist()]
    embedding_folder(tmp_path / "train", x[:40], [f"a{i}" for i in range(40)], labels[:40].tolist())
    embedding_folder(tmp_path / "test", x[40:], [f"b{i}" for i in range(20)], names[40:])
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "test"), "--train-embeddings", str(tmp_path / "train"),
                 "--task", "classification", "--knn-k", "5", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert (f"{tmp_path / 'test'}: none of its 2 test classes (e.g. cat, owl) is a class of the train split "
            f"{tmp_path / 'train'} (e.g. 0, 1)") in error
    assert not out.exists()


def test_bad_input_is_reported_and_nothing_is_written(tmp_path, capsys):
    x, _ = clustered(10, 8, 2, 0.5, seed=5)
    embedding_folder(tmp_path / "emb", x, [f"k{i}" for i in range(10)])  # no labels anywhere
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--out", str(out)]) == 2
    assert "no 'label' column; give --labels FILE" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_model_file_is_embedded_with_its_own_transform_and_cached(tmp_path):
    from support import write_class_folder

    from unicom.embed import embed_images
    from unicom.models.encoders import load_encoder

    checkpoint = tiny_model_file(tmp_path / "FP16-ViT-tiny.pt")
    paths = write_class_folder(tmp_path / "images", [0, 1, 2, 3], per_class=3, size=40)
    out = tmp_path / "report"
    args = ["evaluate", "--model", str(checkpoint), "--dataset", "folder", "--root", str(tmp_path / "images"),
            "--dims", "4,8", "--batch-size", "5", "--num-workers", "0", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "metrics.json").read_text())
    expected_x = embed_images(load_encoder(str(checkpoint)), [str(p) for p in paths], num_workers=0)
    expected = retrieval_metrics(expected_x, np.repeat(np.arange(4), 3), ks=(1, 2, 4, 8))
    assert report["metrics"] == pytest.approx(expected)
    assert report["model"] == str(checkpoint)
    assert [r["dimension"] for r in report["dimensions"]] == [4, 8, 16]  # no train split: no PCA rows
    assert "PCA baseline is left out" in report["note"]

    cached = out / "embeddings" / "query" / "img_emb" / "img_emb_0.npy"
    np.testing.assert_allclose(np.load(cached), expected_x, atol=1e-6)
    stamp = cached.stat().st_mtime_ns
    assert main(args) == 0  # a second run reads the cached embeddings back
    assert cached.stat().st_mtime_ns == stamp
    assert json.loads((out / "metrics.json").read_text())["metrics"] == report["metrics"]
    # the cache is an embedding folder with labels: it can be evaluated on its own
    again = tmp_path / "again"
    assert main(["evaluate", "--embeddings", str(out / "embeddings" / "query"), "--dims", "none",
                 "--out", str(again)]) == 0
    assert json.loads((again / "metrics.json").read_text())["metrics"] == pytest.approx(report["metrics"])


def _folder_evaluated_with_a_model(tmp_path) -> tuple:
    """(checkpoint, out, args): a tiny model evaluated on a folder of 3 classes into ``out``, its embeddings cached."""
    from support import write_class_folder

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    write_class_folder(tmp_path / "images", [0, 1, 2], per_class=3, size=40)
    out = tmp_path / "report"
    args = ["evaluate", "--model", str(checkpoint), "--dataset", "folder", "--root", str(tmp_path / "images"),
            "--dims", "none", "--num-workers", "0", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    return checkpoint, out, args


def test_model_written_again_in_place_is_not_read_from_the_cache(tmp_path, capsys):
    # train, evaluate, train on into the same model path, evaluate into the same --out: the
    # embeddings of the first model must not be scored as the second's
    checkpoint, out, args = _folder_evaluated_with_a_model(tmp_path)
    cached = np.load(out / "embeddings" / "query" / "img_emb" / "img_emb_0.npy")
    tiny_model_file(checkpoint, seed=1)
    assert main(args) == 2
    assert re.search(r"weights_sha256: '[0-9a-f]{64}' before, '[0-9a-f]{64}' now", capsys.readouterr().err)
    np.testing.assert_array_equal(np.load(out / "embeddings" / "query" / "img_emb" / "img_emb_0.npy"), cached)
    fresh = tmp_path / "fresh"
    assert main([*args[:-1], str(fresh)]) == 0
    assert not np.allclose(np.load(fresh / "embeddings" / "query" / "img_emb" / "img_emb_0.npy"), cached, atol=1e-3)


def test_relevance_protocol_reports_each_subset_like_a_separate_run(tmp_path):
    from unicom.evaluate import evaluate_retrieval, retrieval_metrics_from_relevance

    rng = np.random.default_rng(6)
    gallery = rng.standard_normal((50, 12)).astype(np.float32)
    query = gallery[:8] + 0.3 * rng.standard_normal((8, 12)).astype(np.float32)
    relevant = [np.array([i, (i + 7) % 50]) for i in range(8)]
    subsets = {"public": np.array([0, 2, 4]), "private": np.array([1, 3, 5, 6, 7])}
    report = evaluate_retrieval(query, gallery=gallery, relevant=relevant, subsets=subsets, ks=(1, 10), metric="map@100",
                                dims=(4,), out=tmp_path)
    for name, rows in subsets.items():
        alone = retrieval_metrics_from_relevance(query[rows], gallery, [relevant[i] for i in rows], ks=(1, 10))
        assert report["subsets"][name] == pytest.approx(alone), name
    assert [r["dimension"] for r in report["dimensions"]] == [4, 12]
    assert "| public |" in (tmp_path / "metrics.md").read_text()
    assert (tmp_path / "recall_vs_dimension.png").is_file()


def test_classification_dataset_with_a_model(tmp_path):
    from support import class_image, encode_image

    checkpoint = tiny_model_file(tmp_path / "FP16-ViT-tiny.pt")
    for c, name in enumerate(["Forest", "River", "SeaLake"]):
        folder = tmp_path / "data" / "eurosat" / "2750" / name
        folder.mkdir(parents=True)
        for i in range(8):
            (folder / f"{name}_{i}.jpg").write_bytes(encode_image(class_image(c, i, size=32)))
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "eurosat", "--root", str(tmp_path / "data"),
                 "--knn-k", "3", "--num-workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["protocol"]["train"] == 16 and report["protocol"]["test"] == 8
    assert 0 <= report["linear_probe"]["accuracy"] <= 1 and report["knn"]["k"] == 3
    keys = json.loads((out / "embeddings" / "train" / "evaluate_embeddings.json").read_text())
    assert keys["dataset"] == "eurosat" and keys["images"] == 16


@pytest.mark.parametrize("options, message", [
    (["--dataset", "sop", "--root", "DATA", "--gallery-embeddings", "EMB"], "--gallery-embeddings: for embedding folders "
     "without --dataset; with --dataset sop the benchmark gives the splits"),
    (["--dataset", "sop", "--root", "DATA", "--labels", "LABELS", "--train-embeddings", "EMB"],
     "--labels, --train-embeddings: for embedding folders without --dataset"),
    (["--dataset", "cifar10", "--root", "DATA", "--task", "classification"], "--task: for embedding folders"),
    (["--pretrained", "laion400m_e32"], "--pretrained names the weights of --model"),
    (["--dataset", "SOP", "--root", "DATA", "--no-probe", "--knn-k", "5"], "--no-probe, --knn-k: for classification "
     "(linear probe, kNN, zero-shot); --dataset SOP is a retrieval benchmark, which classifies nothing"),
    (["--no-knn", "--temperature", "0.1", "--train-embeddings", "EMB"], "--no-knn, --temperature: for classification "
     "(linear probe, kNN, zero-shot); embedding folders are scored as retrieval unless --task classification (with "
     "--train-embeddings), which classifies nothing"),
    (["--dataset", "sop", "--root", "DATA", "--download"], "--download: torchvision downloads the classification "
     "benchmarks only; --dataset sop is a retrieval benchmark, read from --root as it was placed there"),
    (["--download"], "--download: torchvision downloads the classification benchmarks only; embedding folders are read "
     "as they are"),
])
def test_options_that_the_run_would_not_use_are_refused(tmp_path, capsys, options, message):
    # each would otherwise be dropped without a word: the benchmark's own splits and labels are used
    x, labels = clustered(6, 8, 2, 0.5, seed=5)
    embedding_folder(tmp_path / "emb", x, [f"k{i}" for i in range(6)], labels.tolist(), parts=1)
    (tmp_path / "labels.csv").write_text("key,label\n")
    given = {"DATA": str(tmp_path), "EMB": str(tmp_path / "emb"), "LABELS": str(tmp_path / "labels.csv")}
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), *[given.get(o, o) for o in options],
                 "--out", str(tmp_path / "report")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--ks", "0", "expected positive integers, got '0'"),
    ("--ks", "none", "expected comma-separated integers, got 'none'"),
    ("--ks", "1,4,1", "'1,4,1' names 1 more than once"),
    ("--dims", "8,8", "'8,8' names 8 more than once"),
    ("--pca-samples", "1", "expected an integer of at least 2, got 1"),
    ("--knn-k", "0", "expected an integer of at least 1, got 0"),
    ("--batch-size", "0", "expected an integer of at least 1, got 0"),
])
def test_options_out_of_range_are_refused_before_anything_runs(tmp_path, capsys, option, value, message):
    x, labels = clustered(6, 8, 2, 0.5, seed=5)
    embedding_folder(tmp_path / "emb", x, [f"k{i}" for i in range(6)], parts=1)
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "--embeddings", str(tmp_path / "emb"), option, value, "--out", str(tmp_path / "report")])
    assert stop.value.code == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_train_images_missing_from_the_download_leave_the_pca_baseline_to_those_present(tmp_path):
    # the train split only feeds the PCA baseline: a missing train image must not fail the
    # run after the test split is embedded (GLDv2's train.csv often comes without train/)
    from benchmark_layouts import cub

    checkpoint = tiny_model_file(tmp_path / "FP16-ViT-tiny.pt")
    cub(tmp_path / "data", "download")
    (tmp_path / "data" / "CUB_200_2011" / "images" / "001.Bird_1" / "Bird_0.jpg").unlink()
    out = tmp_path / "report"
    args = ["evaluate", "--model", str(checkpoint), "--dataset", "cub", "--root", str(tmp_path / "data"),
            "--dims", "4", "--num-workers", "0", "--device", "cpu", "--out", str(out)]
    with pytest.warns(UserWarning, match=r"1 of 6 train images .* missing, e\.g\. \['images/001.Bird_1/Bird_0.jpg'\]"):
        assert main(args) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert {r["method"] for r in report["dimensions"] if r["dimension"] == 4} == {"first", "pca"}
    import pyarrow.parquet as pq
    keys = pq.read_table(out / "embeddings" / "train" / "metadata" / "metadata_0.parquet").column("key").to_pylist()
    assert keys == ["images/001.Bird_1/Bird_1.jpg", "images/002.Bird_2/Bird_0.jpg", "images/002.Bird_2/Bird_1.jpg",
                    "images/003.Bird_3/Bird_0.jpg", "images/003.Bird_3/Bird_1.jpg"]

    # with fewer than two train images there is no PCA baseline, and the report says so
    for image in (tmp_path / "data" / "CUB_200_2011" / "images").glob("00[1-3].*/*.jpg"):
        image.unlink()
    with pytest.warns(UserWarning, match="the PCA baseline is left out"):
        assert main([*args[:-1], str(tmp_path / "report2")]) == 0
    report = json.loads((tmp_path / "report2" / "metrics.json").read_text())
    assert {r["method"] for r in report["dimensions"]} == {"first"}
    assert "PCA baseline is left out" in report["note"]


@pytest.mark.parametrize("name", ["sop", "cub", "cars196", "cars196 devkit", "inshop", "inaturalist", "vehicleid-small",
                                  "gldv2"])
def test_embeddings_made_elsewhere_are_scored_with_the_list_files_alone(name, tmp_path):
    # embeddings computed on another machine: the dataset's lists are here, its images are not
    import shutil

    from benchmark_layouts import WRITERS, cars196_devkit

    from unicom.data.benchmarks import load_retrieval_benchmark

    name, _, devkit = name.partition(" ")
    root = cars196_devkit(tmp_path / "data") if devkit else WRITERS[name](tmp_path / "data", "download")
    protocol = load_retrieval_benchmark(name, root)
    images = [*protocol.query.keys, *(protocol.gallery.keys if protocol.gallery is not None else [])]
    x = np.random.default_rng(0).standard_normal((len(images), 8)).astype(np.float32)
    embedding_folder(tmp_path / "emb", x, images, parts=1)
    for image in [*protocol.query.paths, *(protocol.gallery.paths if protocol.gallery is not None else [])]:
        Path(image).unlink()
    if devkit:  # nor are the image folders of the devkit layout
        for folder in ("cars_train", "cars_test"):
            shutil.rmtree(root / "stanford_cars" / folder)
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", name, "--root", str(root),
                 "--dims", "none", "--out", str(out)]) == 0
    x = x.astype(np.float16).astype(np.float32)
    n = len(protocol.query)
    if name == "gldv2":
        from unicom.evaluate import retrieval_metrics_from_relevance

        expected = retrieval_metrics_from_relevance(x[:n], x[n:], protocol.relevant, ks=protocol.ks)
    elif protocol.gallery is not None:
        expected = retrieval_metrics(x[:n], protocol.query.labels, x[n:], protocol.gallery.labels, ks=protocol.ks)
    else:
        expected = retrieval_metrics(x, protocol.query.labels, ks=protocol.ks)
    assert json.loads((out / "metrics.json").read_text())["metrics"] == pytest.approx(expected)


def test_a_benchmark_image_whose_embedding_holds_nan_is_named_by_key_and_folder_row(tmp_path, capsys):
    from benchmark_layouts import cub

    root = cub(tmp_path / "data", "download")
    keys = ["images/101.Bird_101/Bird_1.jpg", "images/001.Bird_1/Bird_0.jpg", "images/102.Bird_102/Bird_0.jpg",
            "images/101.Bird_101/Bird_0.jpg", "images/102.Bird_102/Bird_1.jpg"]
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    x[4] = np.nan  # the last test image, the fourth of the query split
    embedding_folder(tmp_path / "emb", x, keys, parts=1)
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "cub", "--root", str(root),
                 "--dims", "none", "--out", str(tmp_path / "report")]) == 2
    assert (f"{tmp_path / 'emb'}: 1 of the rows used hold NaN or infinite values or are all zeros, "
            "e.g. 'images/102.Bird_102/Bird_1.jpg' (row 4)") in capsys.readouterr().err


def test_a_benchmark_image_whose_embedding_holds_nan_in_a_class_left_out_is_not_scored(tmp_path):
    from benchmark_layouts import cub

    root = cub(tmp_path / "data", "download")
    keys = ["images/101.Bird_101/Bird_1.jpg", "images/001.Bird_1/Bird_0.jpg", "images/102.Bird_102/Bird_0.jpg",
            "images/101.Bird_101/Bird_0.jpg", "images/102.Bird_102/Bird_1.jpg"]
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    x[4] = np.nan  # an image of class 102, left out
    embedding_folder(tmp_path / "emb", x, keys, parts=1)
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "cub", "--root", str(root),
                 "--exclude-classes", "102", "--dims", "none", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["protocol"]["queries"] == 2 and report["metrics"]["recall@1"] == 1.0  # 101's two images


def test_embeddings_cached_by_a_benchmark_run_carry_its_class_names(tmp_path):
    # read again without the benchmark, --classes 102 must mean CUB's class 102, not this run's label id 102
    from benchmark_layouts import cub

    checkpoint = tiny_model_file(tmp_path / "FP16-ViT-tiny.pt")
    cub(tmp_path / "data", "download")  # classes 1, 2, 3 train; 101, 102 test; two images each
    (tmp_path / "data" / "CUB_200_2011" / "classes.txt").write_text(
        "1 001.A\n2 002.B\n3 003.C\n101 101.Common_Tern\n102 102.Sage_Thrasher\n")
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "cub", "--root", str(tmp_path / "data"),
                 "--no-pca", "--dims", "none", "--num-workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    import pyarrow.parquet as pq

    labels = pq.read_table(out / "embeddings" / "query" / "metadata" / "metadata_0.parquet").column("label").to_pylist()
    assert labels == ["101.Common_Tern", "101.Common_Tern", "102.Sage_Thrasher", "102.Sage_Thrasher"]
    again = tmp_path / "again"
    assert main(["evaluate", "--embeddings", str(out / "embeddings" / "query"), "--classes", "102.Sage_Thrasher",
                 "--dims", "none", "--out", str(again)]) == 0
    report = json.loads((again / "metrics.json").read_text())
    assert report["protocol"]["queries"] == 2 and report["class_subset"]["scored_classes"] == 1


def test_a_benchmark_cache_labelled_by_ids_is_relabelled_with_class_names_not_embedded_again(tmp_path):
    # the cache of an earlier unicom: the same embeddings, its labels this run's ids (0, 1 for CUB's 101, 102)
    import pyarrow.parquet as pq

    from benchmark_layouts import cub

    checkpoint = tiny_model_file(tmp_path / "FP16-ViT-tiny.pt")
    cub(tmp_path / "data", "download")
    out = tmp_path / "report"
    command = ["evaluate", "--model", str(checkpoint), "--dataset", "cub", "--root", str(tmp_path / "data"),
               "--no-pca", "--dims", "none", "--num-workers", "0", "--device", "cpu", "--out", str(out)]
    assert main(command) == 0
    cache = out / "embeddings" / "query"
    config = json.loads((cache / "evaluate_embeddings.json").read_text())
    del config["labels"]
    (cache / "evaluate_embeddings.json").write_text(json.dumps(config))
    metadata = cache / "metadata" / "metadata_0.parquet"
    keys = pq.read_table(metadata).column("key").to_pylist()
    pq.write_table(pa.table({"key": keys, "label": [3, 3, 4, 4]}), metadata)
    marked = np.eye(4, 16, dtype=np.float32)  # not what the model gives: found again only if the part is reused
    np.save(cache / "img_emb" / "img_emb_0.npy", marked)

    assert main(command) == 0
    assert pq.read_table(metadata).column("label").to_pylist() == ["101", "101", "102", "102"]
    np.testing.assert_array_equal(np.load(cache / "img_emb" / "img_emb_0.npy"), marked)
    assert json.loads((cache / "evaluate_embeddings.json").read_text())["labels"] == "class names"


def test_decoding_workers_are_spelt_as_unicom_embed_spells_them_or_as_before():
    from unicom.cli import Parser
    from unicom.commands import evaluate

    parser = Parser(prog="unicom evaluate")
    evaluate.add_arguments(parser)
    for option in ("--workers", "--num-workers"):
        args = parser.parse_args(["--model", "m", "--dataset", "cub", "--root", "r", option, "3", "--out", "o"])
        assert args.num_workers == 3


def test_an_out_that_is_a_url_is_refused_before_any_work_rather_than_written_to_a_local_folder_s3(tmp_path, capsys,
                                                                                              monkeypatch):
    x, labels = clustered(12, 8, 3, 0.1, seed=0)
    embedding_folder(tmp_path / "emb", x, [f"{i:04d}.jpg" for i in range(12)], labels)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dims", "none", "--out", "s3://bucket/eval"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "s3://bucket/eval: the evaluation report is written to a local path, not to a URL; write it here, then copy it "
        "(aws s3 cp --recursive, gsutil -m cp -r, or huggingface-cli upload for the Hub)")
    assert not (tmp_path / "s3:").exists()


def test_evaluate_retrieval_refuses_an_out_that_is_a_url_rather_than_writing_a_local_folder_s3(tmp_path, monkeypatch):
    from unicom.errors import InputError
    from unicom.evaluate.report import evaluate_retrieval

    x, labels = clustered(12, 8, 3, 0.1, seed=0)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"^gs://bucket/eval: the evaluation report is written to a local path"):
        evaluate_retrieval(x, labels, dims=(), out="gs://bucket/eval")
    assert not (tmp_path / "gs:").exists()


@pytest.mark.parametrize("dataset", ["sop", "cifar10"])
def test_a_root_that_is_a_url_is_refused_rather_than_read_from_a_local_folder_named_s3(tmp_path, capsys, monkeypatch,
                                                                                       dataset):
    from benchmark_layouts import sop

    # Path("s3://bench/data") is the local folder "s3:/bench/data": one that happens to exist must not be scored
    sop(tmp_path / "s3:" / "bench" / "data", "download")
    (tmp_path / "s3:" / "bench" / "data" / "cifar-10-batches-py").mkdir()
    checkpoint = tiny_model_file(tmp_path / "FP16-ViT-tiny.pt")
    monkeypatch.chdir(tmp_path)
    code = main(["evaluate", "--model", str(checkpoint), "--dataset", dataset, "--root", "s3://bench/data",
                 "--device", "cpu", "--workers", "0", "--dims", "none", "--out", str(tmp_path / "report")])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith(
        f"s3://bench/data: benchmark {dataset} is read from this machine, not from a URL; copy it here "
        "(aws s3 sync, gsutil -m rsync -r) and give the local copy; embeddings kept at a URL are scored with "
        f"unicom evaluate --embeddings URL --dataset {dataset} --root <a local copy of its list files>")
    assert not (tmp_path / "report").exists()


def test_an_image_folder_at_a_url_is_scored_as_the_same_folder_here(tmp_path, s3):
    # the folder benchmark lists its classes and images at a URL as well (read_image_folder): only the benchmarks
    # that open list files locally are refused a URL --root
    local = tmp_path / "images"
    keys, labels = [], []
    for name, count in (("cat", 3), ("dog", 2), ("owl", 3)):
        (local / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (4, 4)).save(local / name / f"{i}.png")
            keys.append(f"{name}/{i}.png")
            labels.append(name)
    x = np.random.default_rng(0).normal(size=(len(keys), 8)).astype(np.float16)
    write_part(tmp_path / "emb", 0, image=x, metadata=pa.table({"key": keys}))
    s3.bucket("bench")
    url = s3.upload_folder(local, "bench", "images")
    reports = []
    for root in (str(local), url):
        out = tmp_path / f"report-{len(reports)}"
        assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "folder", "--root", root,
                     "--dims", "none", "--out", str(out)]) == 0
        reports.append(json.loads((out / "metrics.json").read_text()))
    expected = retrieval_metrics(x.astype(np.float32), np.array(labels), ks=(1, 2, 4, 8))
    for report in reports:
        assert report["protocol"]["queries"] == len(keys)
        assert report["metrics"]["recall@1"] == pytest.approx(expected["recall@1"])


def test_a_damaged_record_of_a_model_run_cache_is_named_with_what_to_do_and_nothing_is_removed(tmp_path, capsys):
    _, out, args = _folder_evaluated_with_a_model(tmp_path)
    cache = out / "embeddings" / "query"
    record = cache / "evaluate_embeddings.json"
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    for damaged in (record.read_text()[:-5], "[]"):  # cut short, as a full disk leaves it; not an object
        record.write_text(damaged)
        capsys.readouterr()
        assert main(args) == 2
        error = capsys.readouterr().err
        assert f"{record}: " in error and f"remove {cache} (its embeddings are made again) or use another --out" in error
        assert record.read_text() == damaged
        assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before


def test_a_cache_drawn_with_fewer_pca_samples_is_scored_on_all_its_train_rows_with_a_warning_naming_both(tmp_path):
    from benchmark_layouts import cub

    checkpoint = tiny_model_file(tmp_path / "FP16-ViT-tiny.pt")
    cub(tmp_path / "data", "download")  # six train images
    first = tmp_path / "first"
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "cub", "--root", str(tmp_path / "data"),
                 "--dims", "2", "--pca-samples", "4", "--num-workers", "0", "--device", "cpu", "--out", str(first)]) == 0
    fitted_on_four = json.loads((first / "metrics.json").read_text())["dimensions"]
    both = r"fitted on 4 train embeddings, fewer than the 5 that --pca-samples 5 asks for \(.*--pca-samples 4\)"
    again = tmp_path / "again"
    with pytest.warns(UserWarning, match=both):
        assert main(["evaluate", "--embeddings", str(first / "embeddings"), "--dataset", "cub", "--root",
                     str(tmp_path / "data"), "--dims", "2", "--pca-samples", "5", "--out", str(again)]) == 0
    assert json.loads((again / "metrics.json").read_text())["dimensions"] == fitted_on_four
    assert "the 4 train embeddings vary along 3 principal axes" in (again / "metrics.md").read_text()
    with pytest.warns(UserWarning, match=both):
        assert main(["evaluate", "--embeddings", str(first / "embeddings" / "query"), "--train-embeddings",
                     str(first / "embeddings" / "train"), "--dims", "2", "--pca-samples", "5",
                     "--out", str(tmp_path / "folders")]) == 0


def test_a_cache_drawn_with_fewer_pca_samples_gives_all_its_train_rows_not_those_a_larger_draw_shares(tmp_path):
    # seeded draws of 10 and of 50 of 100 train images share only some rows: the PCA is fitted on the cache's 10
    from unicom.evaluate.benchmark import _sample

    folder = tmp_path / "data" / "CUB_200_2011"  # the lists alone: embeddings are matched by key
    names = ([f"{c:03d}.Bird_{c}/Bird_0.jpg" for c in range(1, 101)]  # train: classes 1-100, test: 101-200
             + [f"{c:03d}.Bird_{c}/Bird_{i}.jpg" for c in (101, 102) for i in range(2)])
    folder.mkdir(parents=True)
    (folder / "images.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    (folder / "image_class_labels.txt").write_text("".join(f"{i + 1} {int(n[:3])}\n" for i, n in enumerate(names)))
    keys = [f"images/{n}" for n in names]
    cache = tmp_path / "first" / "embeddings"
    rng = np.random.default_rng(0)
    embedding_folder(cache / "query", rng.standard_normal((4, 16)).astype(np.float32), keys[100:],
                     [k.split("/")[1] for k in keys[100:]], parts=1)
    drawn = _sample(100, 10)
    assert len(set(drawn) & set(_sample(100, 50))) < 10  # the draws differ: the case this test is for
    embedding_folder(cache / "train", rng.standard_normal((10, 16)).astype(np.float32), [keys[i] for i in drawn],
                     parts=1)
    (cache / "train" / "evaluate_embeddings.json").write_text(json.dumps({"split": "train", "sample": 10}))
    again = tmp_path / "again"
    with pytest.warns(UserWarning, match=r"fitted on 10 train embeddings, fewer than the 50 that --pca-samples 50"):
        assert main(["evaluate", "--embeddings", str(cache), "--dataset", "cub", "--root", str(tmp_path / "data"),
                     "--dims", "12", "--pca-samples", "50", "--out", str(again)]) == 0
    assert "the 10 train embeddings vary along 9 principal axes" in (again / "metrics.md").read_text()


def test_an_image_of_the_dataset_that_cannot_be_decoded_is_named_with_what_to_do(tmp_path, capsys):
    from support import write_class_folder

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    paths = write_class_folder(tmp_path / "images", [0, 1], per_class=2, size=40)
    Path(paths[1]).write_bytes(Path(paths[1]).read_bytes()[:100])  # a download cut short
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "folder", "--root", str(tmp_path / "images"),
                 "--dims", "none", "--num-workers", "0", "--device", "cpu", "--out", str(tmp_path / "report")]) == 2
    error = capsys.readouterr().err
    assert f"{paths[1]}: image 1 cannot be used: " in error
    assert "download the image again (it may be damaged, cut short or missing), or remove it from the images" in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU scores there")
def test_the_searches_run_on_the_device_asked_for_and_a_missing_gpu_is_named(tmp_path, capsys):
    x, labels = clustered(40, 8, 4, 0.9, seed=2)
    embedding_folder(tmp_path / "emb", x, [f"img{i}" for i in range(40)], labels.tolist())
    argv = ["evaluate", "--embeddings", str(tmp_path / "emb"), "--dims", "none", "--out", str(tmp_path / "report")]
    assert main(argv + ["--device", "cuda"]) == 2
    assert "--device='cuda' but CUDA is not available; use --device=cpu" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()
    assert main(argv) == 0  # by default this rank's GPU, else the CPU
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["protocol"]["device"] == "cpu"
