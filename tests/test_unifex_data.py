"""UniFEx training lists: composing datasets with disjoint class ids, summaries, splits, sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unicom.errors import InputError
from unicom.unifex.data import (
    epoch_batches,
    epoch_order,
    holdout_split,
    read_domain_lists,
    select_training,
)


def write(path, text):
    path.write_text(text)
    return path


def test_classes_of_different_datasets_get_disjoint_ids(tmp_path):
    first = write(tmp_path / "m4d.csv", "dataset,path,class\nproducts,p/a.jpg,10\nproducts,p/b.jpg,9\n"
                                        "landmarks,l/a.jpg,10\nproducts,p/c.jpg,10\n")
    second = write(tmp_path / "cars.csv", "path,class\nc/a.jpg,red\nc/b.jpg,blue\n")
    data = read_domain_lists([first, second])
    assert data.datasets == ["products", "landmarks", "cars"]
    # products: 9 -> 0, 10 -> 1 (numeric order); landmarks: 10 -> 2; cars (the file name): blue -> 3, red -> 4
    assert data.labels.tolist() == [1, 0, 2, 1, 4, 3]
    assert data.images.class_names == ["products/9", "products/10", "landmarks/10", "cars/blue", "cars/red"]
    assert data.class_dataset.tolist() == [0, 0, 1, 2, 2]
    assert data.source.tolist() == [0, 0, 0, 0, 1, 1]
    assert data.images.paths[0] == str(tmp_path / "p/a.jpg")
    assert data.images.keys[:3] == ["products/p/a.jpg", "products/p/b.jpg", "landmarks/l/a.jpg"]


def test_class_ids_of_classes_written_as_one_number_do_not_depend_on_the_process(tmp_path):
    """"2" and "002" are two classes of one number: their ids must be the same in every run
    (a resumed run, the cache's labels), whatever the process's string hashing."""
    import os
    import subprocess
    import sys

    listing = write(tmp_path / "numbers.csv", "path,class\na.jpg,2\nb.jpg,002\nc.jpg,10\nd.jpg,1\n")
    script = f"from unicom.unifex.data import read_domain_lists; print(read_domain_lists({str(listing)!r}).class_values)"
    orders = {subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                             capture_output=True, text=True, check=True, timeout=120).stdout.strip() for seed in range(6)}
    assert orders == {"['1', '002', '2', '10']"}


def test_columns_and_root_are_configurable(tmp_path):
    listing = write(tmp_path / "m4d-35k_train.csv", "img_path,label\nx/1.jpg,3\nx/2.jpg,3\n")
    data = read_domain_lists(listing, root="/data/m4d", path_column="img_path", class_column="label")
    assert data.datasets == ["m4d-35k_train"]
    assert data.images.paths == ["/data/m4d/x/1.jpg", "/data/m4d/x/2.jpg"]
    assert data.labels.tolist() == [0, 0]


def test_repeated_rows_keep_unique_keys(tmp_path):
    listing = write(tmp_path / "l.csv", "dataset,path,class\nd,a.jpg,1\nd,a.jpg,2\n")
    assert read_domain_lists(listing).images.keys == ["d/a.jpg", "d/a.jpg#2"]


def test_a_missing_column_names_the_file_and_the_key(tmp_path):
    listing = write(tmp_path / "l.csv", "dataset,image,class\nd,a.jpg,1\n")
    with pytest.raises(InputError, match=r"l\.csv: no path column \('path' or 'img_path'.*data\.path_column="):
        read_domain_lists(listing)


def test_a_list_that_is_not_utf8_names_the_line_and_byte(tmp_path):
    listing = tmp_path / "l.csv"
    listing.write_bytes("dataset,path,class\nd,a.jpg,1\nd,caf\u00e9.jpg,2\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"l\.csv: line 3 \(byte 34, b'\\xe9'\) is not UTF-8; save the file as UTF-8"):
        read_domain_lists(listing)


def test_a_list_whose_header_is_not_utf8_names_the_line_and_byte(tmp_path):
    listing = tmp_path / "l.csv"
    listing.write_bytes("dataset,path,cat\u00e9gorie\nd,a.jpg,1\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"l\.csv: line 1 \(byte 16, b'\\xe9'\) is not UTF-8; save the file as UTF-8"):
        read_domain_lists(listing, class_column="catégorie")


def test_every_missing_column_is_named_at_once(tmp_path):
    listing = write(tmp_path / "l.csv", "image,category\na.jpg,1\n")
    with pytest.raises(InputError) as caught:
        read_domain_lists(listing)
    message = str(caught.value)
    assert "no path column" in message and "no class column ('class' or 'label'" in message
    assert "['image', 'category']" in message
    with pytest.raises(InputError, match=r"no class column \('kind'; set data\.class_column=\)"):
        read_domain_lists(write(tmp_path / "m.csv", "path,label\na.jpg,1\n"), class_column="kind")


def test_an_empty_class_names_its_row(tmp_path):
    listing = write(tmp_path / "l.csv", "dataset,path,class\nd,a.jpg,1\nd,b.jpg,\n")
    with pytest.raises(InputError, match=r"l\.csv: data rows 2 have an empty 'class'"):
        read_domain_lists(listing)


def test_a_list_without_rows_is_named(tmp_path):
    # among several lists: its per-list filters (data.min_images_per_class=[1,3]) must not shift to another list
    full = write(tmp_path / "m4d.csv", "img_path,label\na.jpg,1\nb.jpg,2\n")
    empty = write(tmp_path / "store fronts.csv", "img_path,label\n")
    with pytest.raises(InputError, match=r"store fronts\.csv: no rows \(only a header\)"):
        read_domain_lists([full, empty])


def test_per_dataset_summary(tmp_path):
    rows = ["dataset,path,class"] + [f"a,{i}.jpg,{c}" for i, c in enumerate([0, 0, 0, 1, 2, 2])] + ["b,x.jpg,7"]
    summary = read_domain_lists(write(tmp_path / "l.csv", "\n".join(rows) + "\n")).summary()
    assert summary == [
        {"dataset": "a", "images": 6, "classes": 3, "first_class": 0, "last_class": 2,
         "images_per_class": {"min": 1, "median": 2.0, "max": 3}},
        {"dataset": "b", "images": 1, "classes": 1, "first_class": 3, "last_class": 3,
         "images_per_class": {"min": 1, "median": 1.0, "max": 1}},
    ]


def test_selection_by_dataset_and_class_size_relabels_contiguously(tmp_path):
    rows = ["dataset,path,class", "a,1.jpg,0", "a,2.jpg,1", "a,3.jpg,1", "b,4.jpg,0", "b,5.jpg,0", "c,6.jpg,5", "c,7.jpg,5"]
    data = read_domain_lists(write(tmp_path / "l.csv", "\n".join(rows) + "\n"))
    kept = select_training(data, datasets=["a", "c"], min_images_per_class=2)
    assert kept.images.keys == ["a/2.jpg", "a/3.jpg", "c/6.jpg", "c/7.jpg"]
    assert kept.labels.tolist() == [0, 0, 1, 1]
    assert kept.datasets == ["a", "c"]
    assert kept.class_dataset.tolist() == [0, 1]
    with pytest.raises(InputError, match=r"\['z'\] are not in the lists"):
        select_training(data, datasets=["z"])


def test_holdout_split_keeps_held_out_classes_out_of_training(tmp_path):
    rows = ["dataset,path,class"] + [f"d,{c}_{i}.jpg,{c}" for c in range(10) for i in range(4)]
    data = read_domain_lists(write(tmp_path / "l.csv", "\n".join(rows) + "\n"))
    train, query, index = holdout_split(data, fraction=0.3, queries_per_class=1, seed=0)
    held = sorted(set(query.labels.tolist()))
    assert len(held) == 3 and sorted(set(index.labels.tolist())) == held
    assert len(query) == 3 and len(index) == 9  # one query per held-out class, the other 3 images indexed
    training_classes = {name for name in train.images.class_names}
    assert not training_classes & {data.images.class_names[c] for c in held}
    assert train.labels.tolist() == sorted(train.labels.tolist()) and set(train.labels.tolist()) == set(range(7))


def test_instance_sampling_is_a_seeded_permutation_per_epoch():
    labels = np.repeat(np.arange(5), 4)
    first = epoch_order(labels, epoch=0, seed=3)
    assert sorted(first.tolist()) == list(range(20))
    assert np.array_equal(first, epoch_order(labels, epoch=0, seed=3))
    assert not np.array_equal(first, epoch_order(labels, epoch=1, seed=3))


def test_class_balanced_sampling_draws_classes_uniformly():
    labels = np.array([0] * 900 + [1] * 100)
    order = epoch_order(labels, epoch=0, seed=0, sampling="class_balanced")
    assert len(order) == 1000
    drawn = labels[order]
    # each class about half the draws (binomial, sd 16) where instance sampling gives 900 / 100
    assert 420 < (drawn == 1).sum() < 580
    # every row drawn belongs to its class, and the rare class's rows are all reached
    assert set(order[drawn == 1].tolist()) == set(range(900, 1000))


def test_batches_drop_the_incomplete_tail_unless_it_is_all():
    assert [b.tolist() for b in epoch_batches(np.arange(7), 3)] == [[0, 1, 2], [3, 4, 5]]
    assert [b.tolist() for b in epoch_batches(np.arange(2), 3)] == [[0, 1]]
    assert epoch_batches(np.arange(1), 3) == []


def test_direct_mode_refuses_an_image_too_thin_for_the_resize_before_resizing_it(tmp_path):
    from PIL import Image
    from torchvision import transforms as T

    from unicom.unifex.trainer import _DecodedImages

    Image.new("L", (1, 1786), 128).save(tmp_path / "thin.png")  # 224 x 400,064 pixels after Resize(224)
    Image.new("RGB", (300, 200), (10, 200, 30)).save(tmp_path / "plain.png")
    images = _DecodedImages([str(tmp_path / "thin.png"), str(tmp_path / "plain.png")], np.array([3, 4]),
                            T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor()]))
    failure = images[0]
    assert failure["index"] == 0 and failure["path"] == str(tmp_path / "thin.png")
    assert "resizing its short side to 224 would make 89,614,336 pixels" in failure["reason"]
    tensor, label = images[1]
    assert tensor.shape == (3, 224, 224) and label == 4


@pytest.mark.parametrize("keep_last", [False, True])
def test_cached_feature_batches_are_the_epochs_order_cut_into_batches(keep_last):
    """Each batch of the cache mode holds the rows of its slice of the epoch's order, with
    their labels, each row in the view drawn for it (the order is on the device once an epoch)."""
    from unicom.unifex.trainer import FeatureBatches

    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3])
    views = torch.arange(3 * 11 * 2, dtype=torch.float32).view(3, 11, 2)  # value = (view * 11 + row) * 2 + column
    batches = FeatureBatches(views, labels, 4, "instance", seed=5, augment=True, keep_last=keep_last)
    for epoch in (0, 1):
        order = epoch_order(labels.numpy(), epoch=epoch, seed=5, sampling="instance")
        expected = epoch_batches(order, 4, keep_last)
        got = list(batches.epoch(epoch))
        assert len(got) == len(expected) == (3 if keep_last else 2)
        for (features, batch_labels), rows in zip(got, expected):
            row_of = (features[:, 0].long() // 2) % 11
            view_of = (features[:, 0].long() // 2) // 11
            assert row_of.tolist() == rows.tolist() and batch_labels.tolist() == labels[rows].tolist()
            assert torch.equal(features, views[view_of, row_of])
        drawn = torch.cat([(f[:, 0].long() // 2) // 11 for f, _ in got])
        assert len(set(drawn.tolist())) > 1  # rows read several views
