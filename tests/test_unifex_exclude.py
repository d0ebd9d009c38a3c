"""`unicom probe`'s ``data.exclude``: rows of the training lists whose path, as the list
writes it, a table lists (``unicom dedup --against``'s ``duplicates.parquet`` of the list's
embeddings) are left out; the whole decontamination through the commands, and what is refused."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_evaluate_cli import tiny_model_file

from support import write_class_folder
from unicom.cli import main
from unicom.engine.recipe import RECIPE_FOLDER
from unicom.errors import InputError
from unicom.unifex.config import load_probe_config
from unicom.unifex.data import exclude_listed, read_domain_lists
from unicom.unifex.trainer import read_probe_data


def write(path, text):
    path.write_text(text)
    return path


def config(*overrides: str):
    return load_probe_config(RECIPE_FOLDER / "unifex_tiny.yaml", ["out=/tmp/unused", "eval.holdout_classes=0", *overrides])


def test_the_listed_paths_of_the_lists_are_left_out_and_the_classes_renumbered(tmp_path):
    first = write(tmp_path / "m4d.csv", "dataset,path,class\nproducts,p/a.jpg,10\nproducts,p/b.jpg,9\n"
                                        "landmarks,l/a.jpg,10\nproducts,p/c.jpg,10\n")
    second = write(tmp_path / "cars.csv", "path,class\nc/a.jpg,red\nc/b.jpg,blue\nc/c.jpg,blue\n")
    data = read_domain_lists([first, second])
    pq.write_table(pa.table({"key": ["p/b.jpg", "c/b.jpg"]}), tmp_path / "duplicates.parquet")
    write(tmp_path / "more.csv", "key\nl/a.jpg\nnot/listed.jpg\n")
    kept, excluded = exclude_listed(data, [tmp_path / "duplicates.parquet", tmp_path / "more.csv"])
    assert excluded == 3 and kept.written == ["p/a.jpg", "p/c.jpg", "c/a.jpg", "c/c.jpg"]
    assert kept.images.keys == ["products/p/a.jpg", "products/p/c.jpg", "cars/c/a.jpg", "cars/c/c.jpg"]
    # products/9 and landmarks/10 have no image left: products/10 -> 0, cars/blue -> 1, cars/red -> 2
    assert kept.images.class_names == ["products/10", "cars/blue", "cars/red"]
    assert kept.labels.tolist() == [0, 0, 2, 1] and kept.datasets == ["products", "cars"]
    assert kept.source.tolist() == [0, 0, 1, 1]
    assert exclude_listed(data, None) == (data, 0)
    # through the recipe: per-list limits still count the lists given, one of which lost every row
    only_first = write(tmp_path / "first_only.csv", "key\nc/a.jpg\nc/b.jpg\nc/c.jpg\n")
    probe_data = read_probe_data(config(f"data.train=[{first},{second}]", f"data.exclude=[{only_first}]",
                                        "data.min_images_per_class=[1,5]"))
    assert probe_data.train.images.keys == data.images.keys[:4]  # the second value counts the second list
    assert probe_data.notes == ["data.exclude: 3 of the 7 images of data.train left out"]
    assert len(probe_data.all_train) == 7  # the feature cache still holds every listed image


def test_training_images_that_copy_test_images_are_left_out_through_dedup(tmp_path, capsys):
    checkpoint = tiny_model_file(tmp_path / "model.pt")
    write_class_folder(tmp_path / "data" / "train", [0, 1, 2], 4)
    write_class_folder(tmp_path / "test", [5, 6], 3)
    rows = sorted(p.relative_to(tmp_path / "data").as_posix() for p in (tmp_path / "data" / "train").rglob("*.jpg"))
    listing = write(tmp_path / "data" / "train.csv",
                    "dataset,path,class\n" + "".join(f"shop,{row},{row.split('/')[1]}\n" for row in rows))
    copied = ["train/class_001/0002.jpg", "train/class_002/0000.jpg"]  # two training images found again in the test set
    for number, row in enumerate(copied):
        shutil.copy(tmp_path / "data" / row, tmp_path / "test" / f"class_005/copy_{number}.jpg")
    for name, given in (("train", listing), ("test", tmp_path / "test")):
        assert main(["embed", "--input", str(given), "--out", str(tmp_path / f"emb_{name}"), "--model", str(checkpoint),
                     "--workers", "0"]) == 0
    assert main(["dedup", "--emb", str(tmp_path / "emb_train"), "--against", str(tmp_path / "emb_test"),
                 "--threshold", "0.9999", "--out", str(tmp_path / "decontaminated")]) == 0
    capsys.readouterr()
    duplicates = tmp_path / "decontaminated" / "duplicates.parquet"
    assert sorted(pq.read_table(duplicates).column("key").to_pylist()) == copied
    whole = read_probe_data(config(f"data.train=[{listing}]")).train
    kept = read_probe_data(config(f"data.train=[{listing}]", f"data.exclude={duplicates}")).train
    assert kept.images.keys == [key for key in whole.images.keys if key.removeprefix("shop/") not in copied]
    assert len(kept) == len(whole) - 2
    np.testing.assert_array_equal(kept.labels, [label for key, label in zip(whole.images.keys, whole.labels)
                                                if key.removeprefix("shop/") not in copied])


def test_what_data_exclude_cannot_do_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write(tmp_path / "a" / "list.csv", "path,class\nimg/1.jpg,x\nimg/2.jpg,y\n")
    second = write(tmp_path / "b" / "list.csv", "path,class\nimg/1.jpg,z\nimg/3.jpg,z\n")
    other = write(tmp_path / "other.csv", "key\nelsewhere/1.jpg\n")
    with pytest.raises(InputError, match=r"data.train: none of the 1 keys that data.exclude lists .*'elsewhere/1.jpg'.*"
                                         r"of its 2 images \(keys like 'img/1.jpg'\).*unicom embed --input LIST"):
        read_probe_data(config(f"data.train=[{first}]", f"data.exclude={other}"))
    # one path as written, two images (each list's own folder): a key names one image
    shared = write(tmp_path / "shared.csv", "key\nimg/1.jpg\n")
    with pytest.raises(InputError, match=r"lists 'img/1.jpg', the path of 2 different images of data.train"):
        read_probe_data(config(f"data.train=[{first},{second}]", f"data.exclude={shared}"))
    everything = write(tmp_path / "all.csv", "key\nimg/1.jpg\nimg/2.jpg\n")
    with pytest.raises(InputError, match="lists every image of data.train"):
        read_probe_data(config(f"data.train=[{first}]", f"data.exclude={everything}"))
