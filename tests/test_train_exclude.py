"""`unicom train`'s ``data.exclude``: the images of a fine-tuning folder, table or benchmark
whose key a table lists (``unicom dedup --against``'s ``duplicates.parquet``: training images
that copy test images) are left out, every other row kept with its label; the whole
decontamination through the commands, and what is refused."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from benchmark_layouts import sop
from test_evaluate_cli import tiny_model_file

from support import write_class_folder
from unicom.cli import main
from unicom.errors import InputError
from unicom.formats.embeddings import read_embedding_folder
from unicom.train.config import load_config
from unicom.train.data import build_source


def source(*overrides: str):
    return build_source(load_config(None, ["out=/tmp/unused", *overrides]))


def test_the_listed_images_of_a_folder_are_left_out_and_the_others_keep_their_labels(tmp_path):
    write_class_folder(tmp_path / "images", [0, 1, 2], 4)
    whole = source(f"data.folder={tmp_path / 'images'}")
    listed = [whole.keys[1], whole.keys[9], "class_009/0000.jpg"]  # the last one is no image of the folder
    pq.write_table(pa.table({"key": listed[:2], "row": [1, 9]}), tmp_path / "duplicates.parquet")
    (tmp_path / "more.csv").write_text(f"key\n{listed[2]}\n")
    kept = source(f"data.folder={tmp_path / 'images'}",
                  f"data.exclude=[{tmp_path / 'duplicates.parquet'},{tmp_path / 'more.csv'}]")
    rows = [row for row, key in enumerate(whole.keys) if key not in listed]
    assert kept.keys == [whole.keys[row] for row in rows] and len(rows) == 10
    assert kept.images == [whole.images[row] for row in rows]
    np.testing.assert_array_equal(kept.labels, whole.labels[rows])
    assert kept.num_classes == 3 and kept.excluded == 2
    assert kept.describe().endswith(": 10 images, 3 classes, 2 left out by data.exclude")


def test_a_table_and_a_benchmarks_training_split_leave_out_the_listed_keys(tmp_path):
    write_class_folder(tmp_path / "images", [0, 1], 3)
    paths = sorted(str(p) for p in (tmp_path / "images").rglob("*.jpg"))
    keys = [f"{n:06d}" for n in range(len(paths))]  # keys of digits, compared as text
    (tmp_path / "list.csv").write_text("path,label,key\n" + "".join(
        f"{p},{'cat' if n < 3 else 'dog'},{k}\n" for n, (p, k) in enumerate(zip(paths, keys))))
    (tmp_path / "out.csv").write_text("key\n000001\n000005\n")
    table = source(f"data.table={tmp_path / 'list.csv'}", f"data.exclude={tmp_path / 'out.csv'}")
    assert table.keys == ["000000", "000002", "000003", "000004"] and table.excluded == 2
    assert table.labels.tolist() == [0, 0, 1, 1] and table.class_labels == ["cat", "dog"]

    root = sop(tmp_path / "sop", "download")
    whole = source("data.benchmark=sop", f"data.root={root}")
    # the benchmark's keys are its images' paths in its dataset folder, as unicom embed --input keys them
    assert main(["embed", "--input", str(root / "Stanford_Online_Products"), "--out", str(tmp_path / "emb"), "--model",
                 str(tiny_model_file(tmp_path / "model.pt")), "--workers", "0"]) == 0
    assert set(whole.keys) <= set(read_embedding_folder(tmp_path / "emb")[1].column("key").to_pylist())
    pq.write_table(pa.table({"key": [whole.keys[0], whole.keys[3]]}), tmp_path / "sop_out.parquet")
    kept = source("data.benchmark=sop", f"data.root={root}", f"data.exclude={tmp_path / 'sop_out.parquet'}")
    rows = [1, 2, 4, 5]
    assert kept.keys == [whole.keys[r] for r in rows] and kept.excluded == 2
    np.testing.assert_array_equal(kept.labels, whole.labels[rows])


def test_training_images_that_copy_test_images_are_left_out_through_dedup(tmp_path, capsys):
    checkpoint = tiny_model_file(tmp_path / "model.pt")
    write_class_folder(tmp_path / "train", [0, 1, 2], 4)
    write_class_folder(tmp_path / "test", [5, 6], 3)
    copied = ["class_001/0002.jpg", "class_002/0000.jpg"]  # two training images found again in the test set
    for number, key in enumerate(copied):
        shutil.copy(tmp_path / "train" / key, tmp_path / "test" / f"class_005/copy_{number}.jpg")
    for split in ("train", "test"):
        assert main(["embed", "--input", str(tmp_path / split), "--out", str(tmp_path / f"emb_{split}"), "--model",
                     str(checkpoint), "--workers", "0"]) == 0
    assert main(["dedup", "--emb", str(tmp_path / "emb_train"), "--against", str(tmp_path / "emb_test"),
                 "--threshold", "0.9999", "--out", str(tmp_path / "decontaminated")]) == 0
    capsys.readouterr()
    duplicates = tmp_path / "decontaminated" / "duplicates.parquet"
    assert sorted(pq.read_table(duplicates).column("key").to_pylist()) == copied
    kept = source(f"data.folder={tmp_path / 'train'}", f"data.exclude={duplicates}")
    whole = source(f"data.folder={tmp_path / 'train'}")
    assert kept.keys == [key for key in whole.keys if key not in copied] and kept.excluded == 2


def test_what_data_exclude_cannot_do_is_refused_with_what_to_do(tmp_path):
    write_class_folder(tmp_path / "images", [0, 1], 2)
    pq.write_table(pa.table({"key": ["other/0001.jpg", "other/0002.jpg"]}), tmp_path / "other.parquet")
    with pytest.raises(InputError, match=r"none of the 2 keys that data.exclude lists .*'other/0001.jpg'.*of its 4 "
                                         r"images \(keys like 'class_000/0000.jpg'\)"):
        source(f"data.folder={tmp_path / 'images'}", f"data.exclude={tmp_path / 'other.parquet'}")
    with pytest.raises(InputError, match="unicom cluster --exclude TABLE"):
        load_config(None, ["out=/tmp/unused", f"data.shards={tmp_path}", f"data.labels={tmp_path}",
                           f"data.exclude={tmp_path / 'other.parquet'}"])
    (tmp_path / "nokey.csv").write_text("path\na.jpg\n")
    with pytest.raises(InputError, match="nokey.csv"):
        source(f"data.folder={tmp_path / 'images'}", f"data.exclude={tmp_path / 'nokey.csv'}")
    # an empty table (a dedup that found no copy) leaves everything in
    pq.write_table(pa.table({"key": pa.array([], pa.string())}), tmp_path / "none.parquet")
    assert source(f"data.folder={tmp_path / 'images'}", f"data.exclude={tmp_path / 'none.parquet'}").excluded == 0
