"""Every retrieval benchmark read from its folder as downloaded and unpacked, and from the common
flattened alternative: the same splits, keys and labels either way; a clear error otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from benchmark_layouts import INSHOP_ROWS, LAYOUTS, WRITERS

from unicom.data.benchmarks import load_retrieval_benchmark
from unicom.errors import InputError


def summary(images):
    if images is None:
        return None
    names = [images.class_names[i] for i in images.labels] if images.labels is not None else None
    return images.keys, names


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_the_download_and_the_flat_layout_read_the_same(name, tmp_path):
    protocols = {}
    for layout in LAYOUTS:
        root = WRITERS[name](tmp_path / layout, layout)
        protocols[layout] = protocol = load_retrieval_benchmark(name, root)
        for images in (protocol.query, protocol.gallery, protocol.train):
            if images is not None and name != "gldv2":  # GLDv2's training images are optional
                assert all(Path(p).is_file() for p in images.paths)
    download, flat = protocols["download"], protocols["flat"]
    for split in ("query", "gallery", "train"):
        ours, theirs = summary(getattr(download, split)), summary(getattr(flat, split))
        if ours is not None and name == "inshop":  # keys are relative to the dataset folder: Img/img/... there
            ours = ([key.removeprefix("Img/") for key in ours[0]], ours[1])
        assert ours == theirs, split
    if name == "gldv2":
        assert [r.tolist() for r in download.relevant] == [r.tolist() for r in flat.relevant] == [[1, 3], [0]]
    else:
        assert len(np.unique(download.train.labels)) == 3


def test_inshop_images_are_found_under_img_as_img_zip_unpacks(tmp_path):
    protocol = load_retrieval_benchmark("inshop", WRITERS["inshop"](tmp_path, "download"))
    assert protocol.query.keys[0] == f"Img/{INSHOP_ROWS[6][0]}"  # relative to the dataset folder
    assert protocol.query.paths[0] == str(tmp_path / "Img" / INSHOP_ROWS[6][0])


def test_cars196_classes_are_their_numbers(tmp_path):
    protocol = load_retrieval_benchmark("cars196", WRITERS["cars196"](tmp_path, "download"))
    assert protocol.train.class_names[:3] == ["1", "2", "3"]
    assert sorted({protocol.query.class_names[i] for i in protocol.query.labels}) == ["196", "99"]


def test_gldv2_without_test_csv_takes_the_test_ids_from_the_solution(tmp_path):
    protocol = load_retrieval_benchmark("gldv2", WRITERS["gldv2"](tmp_path, "download"))
    assert protocol.query.keys == ["test/a/0/0/a000000000000001.jpg", "test/c/0/0/c000000000000003.jpg"]
    assert {k: v.tolist() for k, v in protocol.subsets.items()} == {"public": [0], "private": [1]}


@pytest.mark.parametrize("name,looked", [
    ("inshop", ["Eval/list_eval_partition.txt", "Inshop_Clothes/Eval/list_eval_partition.txt", "/list_eval_partition.txt"]),
    ("inaturalist", ["Inat_dataset_splits/Inaturalist_train_set1.txt", "iNaturalist/Inaturalist_train_set1.txt"]),
    ("gldv2", ["index/index.csv", "/index.csv", "metadata/index.csv"]),
    ("sop", ["/Ebay_train.txt", "Stanford_Online_Products/Ebay_train.txt"]),
    ("cub", ["/images.txt", "CUB_200_2011/images.txt"]),
    ("cars196", ["/cars_annos.mat", "cars196/cars_annos.mat"]),
])
def test_a_folder_without_the_dataset_lists_every_place_looked_at(name, looked, tmp_path):
    with pytest.raises(InputError) as caught:
        load_retrieval_benchmark(name, tmp_path)
    message = str(caught.value)
    assert "looked for:" in message and "expected layout:" in message
    for place in looked:
        assert place in message, place


def test_inshop_images_missing_from_both_places_are_named(tmp_path):
    WRITERS["inshop"](tmp_path, "download")
    (tmp_path / "Img").rename(tmp_path / "Images")
    with pytest.raises(InputError, match=r"found in none of:\n.*Img/img/MEN/Denim"):
        load_retrieval_benchmark("inshop", tmp_path)


@pytest.mark.parametrize("name", sorted(set(WRITERS) - {"cars196"}))  # cars196's list is a .mat file
def test_list_files_saved_on_windows_read_the_same(name, tmp_path):
    # Windows editors save UTF-8 text with a byte-order mark and CRLF line endings
    original = load_retrieval_benchmark(name, WRITERS[name](tmp_path / "original", "download"))
    root = WRITERS[name](tmp_path / "windows", "download")
    lists = [p for p in root.rglob("*") if p.suffix in (".txt", ".csv")]
    assert lists
    for path in lists:
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    windows = load_retrieval_benchmark(name, root)
    for split in ("query", "gallery", "train"):
        assert summary(getattr(windows, split)) == summary(getattr(original, split)), split


@pytest.mark.parametrize("name,header", [("train_clean.csv", "landmark,imgs"), ("train.csv", "id,url,landmark")])
def test_gldv2_train_list_without_its_columns_is_named(name, header, tmp_path):
    WRITERS["gldv2"](tmp_path, "download")
    (tmp_path / name).write_text(f"{header}\n1,a000000000000009\n")
    with pytest.raises(InputError, match=rf"{name}: no column 'landmark_id'.* \(header: .*\); expected layout"):
        load_retrieval_benchmark("gldv2", tmp_path)


@pytest.mark.parametrize("name,listed_in", [
    ("sop", "Stanford_Online_Products/Ebay_test.txt"), ("cub", "CUB_200_2011/images.txt"),
    ("cars196", "cars196/cars_annos.mat"), ("inshop", "Eval/list_eval_partition.txt"),
    ("inaturalist", "Inat_dataset_splits/Inaturalist_test_set1.txt"),
    ("vehicleid-small", "train_test_split/test_list_800.txt"), ("gldv2", "test/retrieval_solution_v2.1.csv"),
])
def test_a_missing_evaluation_image_names_the_list_that_lists_it(name, listed_in, tmp_path):
    root = WRITERS[name](tmp_path, "download")
    protocol = load_retrieval_benchmark(name, root)
    Path(protocol.query.paths[-1]).unlink()
    with pytest.raises(InputError) as caught:
        load_retrieval_benchmark(name, root)
    first_line = str(caught.value).splitlines()[0]
    assert first_line.startswith(str(tmp_path)) and first_line.endswith(f"{listed_in}: 1 of the images it lists are "
                                                                        "missing, e.g.:")
    assert protocol.query.paths[-1] in str(caught.value) and "expected layout:" in str(caught.value)


@pytest.mark.parametrize("level", ["parent", "stanford_cars"])
def test_cars196_from_the_devkit_takes_the_train_and_test_annotations_together(level, tmp_path):
    from benchmark_layouts import cars196_devkit

    root = cars196_devkit(tmp_path)
    protocol = load_retrieval_benchmark("cars196", root if level == "parent" else root / "stanford_cars")
    assert summary(protocol.train) == (
        ["cars_train/00001.jpg", "cars_train/00003.jpg", "cars_test/00001.jpg", "cars_test/00003.jpg"],
        ["1", "2", "1", "2"])
    assert summary(protocol.query) == (
        ["cars_train/00002.jpg", "cars_train/00004.jpg", "cars_test/00002.jpg", "cars_test/00004.jpg"],
        ["99", "196", "99", "196"])
    assert protocol.query.paths[0] == str(tmp_path / "stanford_cars" / "cars_train" / "00002.jpg")


def test_cars196_from_the_devkit_without_its_images_reads_the_annotations_alone(tmp_path):
    """Scoring stored embeddings (check_images=False) needs the annotations, not the image folders."""
    import shutil

    from benchmark_layouts import cars196_devkit

    root = cars196_devkit(tmp_path)
    whole = load_retrieval_benchmark("cars196", root)
    for folder in ("cars_train", "cars_test"):
        shutil.rmtree(root / "stanford_cars" / folder)
    protocol = load_retrieval_benchmark("cars196", root, check_images=False)
    assert summary(protocol.query) == summary(whole.query) and summary(protocol.train) == summary(whole.train)
    assert protocol.query.paths == whole.query.paths
    with pytest.raises(InputError, match=r"cars_train: image folder not found \(listed in cars_train_annos\.mat\)"):
        load_retrieval_benchmark("cars196", root)


def test_cars196_devkit_in_a_folder_torchvision_cannot_read_says_to_rename_it(tmp_path):
    from benchmark_layouts import cars196_devkit

    (cars196_devkit(tmp_path) / "stanford_cars").rename(tmp_path / "cars196")
    with pytest.raises(InputError, match=r"cars196: the devkit layout .* folder named stanford_cars; rename"):
        load_retrieval_benchmark("cars196", tmp_path)


def test_cub_class_ids_counted_from_0_are_refused_naming_the_line(tmp_path):
    # counted from 0, class 100 would be scored as a test class and class 0 would not exist
    root = WRITERS["cub"](tmp_path, "download") / "CUB_200_2011"
    labels = root / "image_class_labels.txt"
    labels.write_text("".join(f"{i} {int(c) - 1}\n" for i, c in (line.split() for line in labels.read_text().splitlines())))
    with pytest.raises(InputError, match=r"image_class_labels\.txt: line 1: class '0' is not a number from 1 to 200"):
        load_retrieval_benchmark("cub", tmp_path)
    labels.write_text("1\n")
    with pytest.raises(InputError, match=r"image_class_labels\.txt: line 1 \('1'\) is not '<image id> <class id>'"):
        load_retrieval_benchmark("cub", tmp_path)


def test_cars196_class_0_is_refused_naming_the_annotation(tmp_path):
    from scipy.io import loadmat, savemat

    root = WRITERS["cars196"](tmp_path, "download") / "cars196"
    mat = loadmat(root / "cars_annos.mat")
    mat["annotations"]["class"][0, 2] = 0
    savemat(root / "cars_annos.mat", {"annotations": mat["annotations"]})
    with pytest.raises(InputError, match=r"cars_annos\.mat: annotation 3: class '0' is not a number from 1 to 196"):
        load_retrieval_benchmark("cars196", tmp_path)


@pytest.mark.parametrize("rows, error", [
    ([("00001.jpg", 0)], r"annotation 1: class '0' is not a number from 1 to 196; the official files count classes from 1"),
    ([("00001.jpg", 5), ("00002.jpg", 197)], r"annotation 2: class '197' is not a number from 1 to 196"),
    (None, r"the records of 'annotations' have no 'class' field \(they have fname, bbox_x1\)"),
])
def test_cars196_devkit_annotations_without_a_class_or_out_of_range_are_refused_naming_the_annotation(rows, error, tmp_path):
    """A test annotation file without labels (the devkit's cars_test_annos.mat under the other
    name), or class numbers outside 1..196 (a copy counting from 0): an error naming the file
    and the annotation, for retrieval and classification alike, not a ValueError traceback nor
    a label of -1 or an image moved into the wrong metric-learning split."""
    from benchmark_layouts import cars196_devkit
    from scipy.io import savemat

    from unicom.data.benchmarks.classification import load_stanford_cars

    root = cars196_devkit(tmp_path)
    annotations = root / "stanford_cars" / "cars_test_annos_withlabels.mat"
    if rows is None:
        record = np.dtype([("fname", object), ("bbox_x1", np.int32)])
        savemat(annotations, {"annotations": np.array([("00001.jpg", 3)], dtype=record)})
    else:
        savemat(annotations, {"annotations": np.array(rows, dtype=[("fname", object), ("class", np.int32)])})
    with pytest.raises(InputError, match=error) as caught:
        load_retrieval_benchmark("cars196", root)
    assert str(caught.value).startswith(f"{annotations}: ")
    with pytest.raises(InputError, match=error):
        load_stanford_cars(root, check_images=False)


def test_cars196_annos_mat_without_image_paths_is_refused_naming_the_field(tmp_path):
    from scipy.io import savemat

    record = np.dtype([("fname", object), ("class", np.int32)])
    savemat(tmp_path / "cars_annos.mat", {"annotations": np.array([("car_ims/000001.jpg", 1)], dtype=record)})
    with pytest.raises(InputError, match=r"cars_annos\.mat: the records of 'annotations' have no 'relative_im_path' "
                                         r"field \(they have fname, class\)"):
        load_retrieval_benchmark("cars196", tmp_path, check_images=False)
