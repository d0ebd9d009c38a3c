"""Benchmark readers on tiny trees in the official layouts (real JPEG files, official split files)."""

from __future__ import annotations

import codecs
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from support import class_image, encode_image

from unicom.data.benchmarks import (
    CLASSIFICATION_BENCHMARKS,
    RETRIEVAL_BENCHMARKS,
    load_classification_benchmark,
    load_retrieval_benchmark,
)
from unicom.errors import InputError


def jpeg(path: Path, label: int = 0, index: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_image(class_image(label, index, size=16)))
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def class_counts(images) -> dict[str, int]:
    names, counts = np.unique([images.class_names[i] for i in images.labels], return_counts=True)
    return dict(zip(names.tolist(), counts.tolist()))


# --------------------------------------------------------------------------- retrieval


def test_cub_splits_by_class_id_not_by_the_official_split_file(tmp_path):
    root = tmp_path / "CUB_200_2011"
    classes = {1: 2, 2: 1, 100: 2, 101: 3, 150: 1, 200: 2}  # class id -> images
    images, labels, names = [], [], []
    image_id = 0
    for class_id, count in classes.items():
        folder = f"{class_id:03d}.Bird_{class_id}"
        names.append(f"{class_id} {folder}")
        for i in range(count):
            image_id += 1
            jpeg(root / "images" / folder / f"Bird_{i}.jpg", class_id, i)
            images.append(f"{image_id} {folder}/Bird_{i}.jpg")
            labels.append(f"{image_id} {class_id}")
    write(root / "images.txt", "\n".join(images) + "\n")
    write(root / "image_class_labels.txt", "\n".join(labels) + "\n")
    write(root / "classes.txt", "\n".join(names) + "\n")
    write(root / "train_test_split.txt", "\n".join(f"{i} 1" for i in range(1, image_id + 1)))  # ignored

    protocol = load_retrieval_benchmark("cub", tmp_path)  # the parent folder works too
    assert protocol.gallery is None and protocol.ks == (1, 2, 4, 8) and protocol.metric == "recall@1"
    assert class_counts(protocol.train) == {"001.Bird_1": 2, "002.Bird_2": 1, "100.Bird_100": 2}
    assert class_counts(protocol.query) == {"101.Bird_101": 3, "150.Bird_150": 1, "200.Bird_200": 2}
    assert sorted(set(protocol.train.labels)) == [0, 1, 2]  # train labels are 0..C_train-1
    assert protocol.query.keys[0] == "images/101.Bird_101/Bird_0.jpg"
    assert Path(protocol.query.paths[0]).is_file()


def test_cars196_from_cars_annos_mat(tmp_path):
    from scipy.io import savemat

    class_ids = [1, 1, 98, 99, 99, 196]
    annotations = np.zeros(len(class_ids), dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")])
    for i, class_id in enumerate(class_ids):
        path = f"car_ims/{i + 1:06d}.jpg"
        jpeg(tmp_path / path, class_id, i)
        annotations[i] = (path, class_id, i % 2)  # the official test flag is not the protocol's split
    names = np.array([f"Car {c}" for c in range(1, 197)], dtype=object)
    names[195] = "Car 99"  # two classes under one name: the number tells them apart
    savemat(tmp_path / "cars_annos.mat", {"annotations": annotations[None, :], "class_names": names[None, :]})

    protocol = load_retrieval_benchmark("cars196", tmp_path)
    assert class_counts(protocol.train) == {"1": 2, "98": 1}
    assert class_counts(protocol.query) == {"99": 2, "196": 1}
    assert protocol.query.keys == ["car_ims/000004.jpg", "car_ims/000005.jpg", "car_ims/000006.jpg"]


def test_sop_reads_ebay_lists(tmp_path):
    header = "image_id class_id super_class_id path\n"
    train = [(1, 1, 1, "bicycle_final/111_0.JPG"), (2, 1, 1, "bicycle_final/111_1.JPG"), (3, 2, 2, "chair_final/222_0.JPG")]
    test = [(4, 11319, 1, "bicycle_final/333_0.JPG"), (5, 11319, 1, "bicycle_final/333_1.JPG"),
            (6, 11320, 3, "sofa_final/444_0.JPG"), (7, 11320, 3, "sofa_final/444_1.JPG")]
    for rows, name in ((train, "Ebay_train.txt"), (test, "Ebay_test.txt")):
        write(tmp_path / name, header + "".join(f"{a} {b} {c} {d}\n" for a, b, c, d in rows))
        for _, class_id, _, path in rows:
            jpeg(tmp_path / path, class_id)
    protocol = load_retrieval_benchmark("sop", tmp_path)
    assert protocol.ks == (1, 10, 100, 1000) and protocol.gallery is None
    assert (len(protocol.train), len(protocol.query)) == (3, 4)
    assert class_counts(protocol.query) == {"11319": 2, "11320": 2}
    assert protocol.train.labels.tolist() == [0, 0, 1]


@pytest.mark.parametrize("line", ["5 x11319 1 bicycle_final/333_1.JPG", "5 11319 bike bicycle_final/333_1.JPG",
                                  "bicycle_final/333_1.JPG 11319 1 5"])
def test_an_ebay_line_whose_ids_are_not_numbers_is_refused_naming_it(tmp_path, line):
    # "x11319" would otherwise be a class of its own, of one image, silently left out of the scores
    header = "image_id class_id super_class_id path\n"
    write(tmp_path / "Ebay_train.txt", header + "1 1 1 bicycle_final/111_0.JPG\n2 1 1 bicycle_final/111_1.JPG\n")
    write(tmp_path / "Ebay_test.txt", header + f"4 11319 1 bicycle_final/333_0.JPG\n{line}\n")
    with pytest.raises(InputError, match=rf"Ebay_test.txt: line 3 \({line!r}\) does not start with the numbers "
                                         r"image_id class_id super_class_id; restore the line"):
        load_retrieval_benchmark("sop", tmp_path, check_images=False)


def test_inshop_query_and_gallery_share_item_labels(tmp_path):
    rows = [
        ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
        ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
        ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "query"),
        ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "gallery"),
        ("img/MEN/Denim/id_00000080/01_3_back.jpg", "id_00000080", "gallery"),
        ("img/WOMEN/Tees/id_00000091/03_1_front.jpg", "id_00000091", "query"),
        ("img/WOMEN/Tees/id_00000091/03_2_side.jpg", "id_00000091", "gallery"),
    ]
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(f"{p}    {i}    {s}\n" for p, i, s in rows)
    write(tmp_path / "Eval" / "list_eval_partition.txt", text)
    for n, (path, _, _) in enumerate(rows):
        jpeg(tmp_path / path, n)
    protocol = load_retrieval_benchmark("inshop", tmp_path)
    assert protocol.ks == (1, 10, 20, 30, 40, 50)
    assert (len(protocol.train), len(protocol.query), len(protocol.gallery)) == (2, 2, 3)
    assert [protocol.query.class_names[i] for i in protocol.query.labels] == ["id_00000080", "id_00000091"]
    assert [protocol.gallery.class_names[i] for i in protocol.gallery.labels] == ["id_00000080", "id_00000080", "id_00000091"]
    assert protocol.query.labels[0] == protocol.gallery.labels[0]


def test_inaturalist_classes_are_supercategory_and_category(tmp_path):
    train = ["train_val2018/Plantae/7477/a.jpg", "train_val2018/Plantae/7477/b.jpg", "train_val2018/Aves/2000/c.jpg"]
    test = ["train_val2018/Aves/3000/d.jpg", "train_val2018/Aves/3000/e.jpg", "train_val2018/Insecta/3000/f.jpg"]
    write(tmp_path / "Inaturalist_train_set1.txt", "\n".join(train) + "\n")
    write(tmp_path / "Inaturalist_test_set1.txt", "\n".join(test) + "\n")
    for n, path in enumerate(train + test):
        jpeg(tmp_path / path, n)
    protocol = load_retrieval_benchmark("inaturalist", tmp_path)
    assert protocol.ks == (1, 4, 16, 32)
    assert class_counts(protocol.train) == {"Aves/2000": 1, "Plantae/7477": 2}
    # the same category number under two supercategories is two classes
    assert class_counts(protocol.query) == {"Aves/3000": 2, "Insecta/3000": 1}


@pytest.mark.parametrize("size,listed", [("small", 800), ("medium", 1600), ("large", 2400)])
def test_vehicleid_reads_each_test_list(tmp_path, size, listed):
    split_dir = tmp_path / "train_test_split"
    write(split_dir / "train_list.txt", "0001 1\n0002 1\n0003 2\n")
    for n in (800, 1600, 2400):
        vehicles = {800: [10, 10, 11], 1600: [10, 10, 11, 11, 12], 2400: [10, 11, 12, 13, 13, 13, 13]}[n]
        write(split_dir / f"test_list_{n}.txt", "".join(f"{n}{i:03d} {v}\n" for i, v in enumerate(vehicles)))
        for i, v in enumerate(vehicles):
            jpeg(tmp_path / "image" / f"{n}{i:03d}.jpg", v, i)
    protocol = load_retrieval_benchmark(f"vehicleid-{size}", tmp_path)
    assert protocol.gallery is None and protocol.ks == (1, 5)
    expected = {800: {"10": 2, "11": 1}, 1600: {"10": 2, "11": 2, "12": 1}, 2400: {"10": 1, "11": 1, "12": 1, "13": 4}}
    assert class_counts(protocol.query) == expected[listed]
    assert protocol.query.keys[0] == f"image/{listed}000.jpg"
    assert len(protocol.train) == 3


def test_gldv2_relevance_subsets_and_ignored_queries(tmp_path):
    index_ids = ["0123456789abcdef", "1123456789abcdef", "2223456789abcdef", "3333456789abcdef"]
    test_ids = ["a000000000000001", "b000000000000002", "c000000000000003"]
    write(tmp_path / "index.csv", "id\n" + "\n".join(index_ids) + "\n")
    write(tmp_path / "test.csv", "id\n" + "\n".join(test_ids) + "\n")
    write(tmp_path / "retrieval_solution_v2.1.csv",
          "id,images,Usage\n"
          f"{test_ids[0]},{index_ids[1]} {index_ids[3]},Public\n"
          f"{test_ids[1]},None,Ignored\n"
          f"{test_ids[2]},{index_ids[0]},Private\n")
    for n, image_id in enumerate(index_ids):
        jpeg(tmp_path / "index" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg", n)
    for n, image_id in enumerate(test_ids):
        jpeg(tmp_path / "test" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg", n)
    protocol = load_retrieval_benchmark("gldv2", tmp_path)
    assert protocol.metric == "map@100" and protocol.train is None
    assert protocol.query.keys == ["test/a/0/0/a000000000000001.jpg", "test/c/0/0/c000000000000003.jpg"]
    assert len(protocol.gallery) == 4
    assert [r.tolist() for r in protocol.relevant] == [[1, 3], [0]]
    assert {k: v.tolist() for k, v in protocol.subsets.items()} == {"public": [0], "private": [1]}


@pytest.mark.parametrize("listed, error", [
    ("index.csv", r"index\.csv: the index split lists 1 image more than once, e\.g\. index/1/1/2/1123456789abcdef\.jpg"),
    ("retrieval_solution_v2.1.csv", r"retrieval_solution_v2\.1\.csv: the query split lists 1 image more than once"),
])
def test_gldv2_id_listed_twice_is_refused(tmp_path, listed, error):
    # a second copy of a relevant index image would rank as a wrong answer: relevance names one row
    from benchmark_layouts import GLD_INDEX, GLD_TEST, gldv2

    gldv2(tmp_path, "flat")
    extra = f"{GLD_INDEX[1]}\n" if listed == "index.csv" else f"{GLD_TEST[2]},{GLD_INDEX[0]},Private\n"
    with open(tmp_path / listed, "a") as file:
        file.write(extra)
    with pytest.raises(InputError, match=error):
        load_retrieval_benchmark("gldv2", tmp_path)


def test_generic_folder_and_csv_with_split_column(tmp_path):
    from support import write_class_folder

    write_class_folder(tmp_path / "folder", [0, 1, 2], per_class=2, size=16)
    protocol = load_retrieval_benchmark("folder", tmp_path / "folder")
    assert len(protocol.query) == 6 and protocol.gallery is None and protocol.train is None

    rows = ["path,label,split"]
    for n, (label, split) in enumerate([("cat", "train"), ("cat", "train"), ("dog", "query"), ("dog", "gallery"),
                                         ("cow", "gallery")]):
        jpeg(tmp_path / "table" / f"{n}.jpg", n)
        rows.append(f"{n}.jpg,{label},{split}")
    write(tmp_path / "table" / "list.csv", "\n".join(rows) + "\n")
    protocol = load_retrieval_benchmark("csv", tmp_path / "table" / "list.csv")
    assert (len(protocol.train), len(protocol.query), len(protocol.gallery)) == (2, 1, 2)
    assert protocol.query.class_names[protocol.query.labels[0]] == "dog"


@pytest.mark.parametrize("table", [
    "path,label\na b/0.jpg,x\na b/1.jpg,x\nmissing.jpg,y\n",
    "path,label,split\nnot here.jpg,z,train\na b/0.jpg,x,test\na b/1.jpg,x,test\nmissing.jpg,y,test\n",
    "path,label,split\nnot here.jpg,z,train\na b/0.jpg,x,query\na b/1.jpg,x,gallery\nmissing.jpg,y,gallery\n",
])
def test_csv_listing_a_missing_evaluation_image_is_refused_before_anything_runs(table, tmp_path):
    # a missing train image is no error: the train split only feeds the PCA baseline
    jpeg(tmp_path / "a b" / "0.jpg")
    jpeg(tmp_path / "a b" / "1.jpg")
    write(tmp_path / "list.csv", table)
    with pytest.raises(InputError, match=r"list\.csv: 1 of the images it lists are missing, e\.g\.:\n.*/missing\.jpg\n"):
        load_retrieval_benchmark("csv", tmp_path / "list.csv")
    jpeg(tmp_path / "missing.jpg")
    assert load_retrieval_benchmark("csv", tmp_path / "list.csv").query.keys[0] == "a b/0.jpg"


@pytest.mark.parametrize("table, split", [
    ("path,label\n0.jpg,x\n1.jpg,x\n0.jpg,x\n", "leave-one-out"),
    ("path,label,split\n0.jpg,x,test\n1.jpg,x,test\n0.jpg,x,test\n", "test"),
    ("path,label,split\n0.jpg,x,query\n1.jpg,x,gallery\n1.jpg,x,gallery\n", "gallery"),
])
def test_csv_listing_an_evaluation_image_twice_is_refused(table, split, tmp_path):
    for name in ("0", "1"):
        jpeg(tmp_path / f"{name}.jpg")
    write(tmp_path / "list.csv", table)
    with pytest.raises(InputError, match=rf"list\.csv: the {split} split lists 1 image more than once, e\.g\. "):
        load_retrieval_benchmark("csv", tmp_path / "list.csv")


def test_csv_refuses_an_image_marked_both_query_and_gallery_as_it_would_find_itself(tmp_path):
    """As `unicom evaluate --gallery-embeddings` refuses a gallery holding query images: the
    query's own gallery row would rank first (similarity 1) and lift every score."""
    for name in ("0", "1", "2"):
        jpeg(tmp_path / f"{name}.jpg")
    write(tmp_path / "list.csv", "path,label,split\n0.jpg,x,query\n2.jpg,y,query\n0.jpg,x,gallery\n1.jpg,x,gallery\n")
    with pytest.raises(InputError) as error:
        load_retrieval_benchmark("csv", tmp_path / "list.csv")
    assert str(error.value) == (
        f"{tmp_path / 'list.csv'}: 1 image marked query is also marked gallery, e.g. 0.jpg; each would find itself first "
        "and lift every score: mark the images split=test to search them leave-one-out, or keep the queries out of the gallery")
    write(tmp_path / "list.csv", "path,label,split\n2.jpg,x,query\n0.jpg,x,gallery\n1.jpg,x,gallery\n")
    assert len(load_retrieval_benchmark("csv", tmp_path / "list.csv").gallery) == 2


def test_csv_refuses_a_query_image_listed_in_the_gallery_under_another_spelling_of_its_path(tmp_path):
    """The same file written ./0.jpg and sub/../0.jpg is one image: it would find itself first."""
    for name in ("0", "1"):
        jpeg(tmp_path / f"{name}.jpg")
    (tmp_path / "sub").mkdir()
    for gallery_row in ("./0.jpg", "sub/../0.jpg"):
        write(tmp_path / "list.csv", f"path,label,split\n0.jpg,x,query\n{gallery_row},x,gallery\n1.jpg,x,gallery\n")
        with pytest.raises(InputError, match=r"list.csv: 1 image marked query is also marked gallery, e.g. 0.jpg; "):
            load_retrieval_benchmark("csv", tmp_path / "list.csv")


def test_missing_index_file_names_it_and_shows_the_layout(tmp_path):
    with pytest.raises(InputError, match=r"Ebay_train\.txt: not found; looked for:\n(.|\n)*expected layout:\n.*image_id class_id"):
        load_retrieval_benchmark("sop", tmp_path)


def test_missing_images_are_listed_before_anything_runs(tmp_path):
    header = "image_id class_id super_class_id path\n"
    write(tmp_path / "Ebay_train.txt", header + "1 1 1 a_final/1.JPG\n")
    write(tmp_path / "Ebay_test.txt", header + "2 2 1 a_final/2.JPG\n3 2 1 a_final/3.JPG\n")
    jpeg(tmp_path / "a_final" / "2.JPG")
    with pytest.raises(InputError, match=r"Ebay_test\.txt: 1 of the images it lists are missing, e\.g\.:\n.*a_final/3\.JPG"):
        load_retrieval_benchmark("sop", tmp_path)


def _sop_lists(root: Path, train: list[str], test: list[str]) -> None:
    """Ebay_train.txt (class 1) and Ebay_test.txt (class 2) listing a_final/<name>.JPG for each name, in order."""
    header = "image_id class_id super_class_id path\n"
    for name, class_id, names, first in (("Ebay_train.txt", 1, train, 1), ("Ebay_test.txt", 2, test, 1 + len(train))):
        write(root / name, header + "".join(f"{first + i} {class_id} 1 a_final/{n}.JPG\n" for i, n in enumerate(names)))
    for name in set(train + test):
        jpeg(root / "a_final" / f"{name}.JPG")


@pytest.mark.parametrize("check_images", [True, False])
def test_an_image_listed_twice_in_a_split_is_refused_naming_it(tmp_path, check_images):
    # searched leave-one-out, the second copy would be the first one's nearest neighbour
    _sop_lists(tmp_path, ["1"], ["2", "3", "3"])
    with pytest.raises(InputError, match=r"Ebay_test\.txt: the test split lists 1 image more than once, e\.g\. "
                                         r"a_final/3\.JPG \(2 times\)"):
        load_retrieval_benchmark("sop", tmp_path, check_images=check_images)


@pytest.mark.parametrize("check_images", [True, False])
def test_an_image_listed_twice_in_the_train_split_is_kept(tmp_path, check_images):
    # the train split is not searched (PCA baseline, fine-tuning): a repeated line there harms no score
    _sop_lists(tmp_path, ["1", "1"], ["2", "3"])
    protocol = load_retrieval_benchmark("sop", tmp_path, check_images=check_images)
    assert protocol.train.keys == ["a_final/1.JPG", "a_final/1.JPG"]
    assert protocol.query.keys == ["a_final/2.JPG", "a_final/3.JPG"]


def _cub_files(root: Path, images: str, labels: str, classes: str) -> Path:
    for image_id, name in (("1", "001.A/a.jpg"), ("2", "101.B/b.jpg"), ("3", "101.B/c.jpg")):
        jpeg(root / "images" / name)
    write(root / "images.txt", images)
    write(root / "image_class_labels.txt", labels)
    write(root / "classes.txt", classes)
    return root


@pytest.mark.parametrize("images, labels, classes, error", [
    ("1 001.A/a.jpg\n2 101.B/b.jpg\n3 101.B/c.jpg\n", "1 1\n2 101\n3 101\n1 101\n", "1 001.A\n101 101.B\n",
     r"image_class_labels\.txt: line 4 gives image 1 a class again"),
    ("1 001.A/a.jpg\n2 101.B/b.jpg\n3 101.B/c.jpg\n2 101.B/c.jpg\n", "1 1\n2 101\n3 101\n", "1 001.A\n101 101.B\n",
     r"images\.txt: line 4 names image id 2 again"),
    ("1 001.A/a.jpg\n2 101.B/b.jpg\n3 101.B/c.jpg\n", "1 1\n2 101\n3 101\n", "1 001.A\n101\n",
     r"classes\.txt: line 2 \('101'\) is not '<class id> <class folder>'"),
])
def test_cub_lines_that_repeat_an_id_or_lack_a_field_are_named(tmp_path, images, labels, classes, error):
    root = _cub_files(tmp_path / "CUB_200_2011", images, labels, classes)
    with pytest.raises(InputError, match=error):
        load_retrieval_benchmark("cub", root)


@pytest.mark.parametrize("name", ["sop", "gldv2"])
def test_a_list_file_that_is_not_utf8_is_named_with_the_line_and_byte(name, tmp_path):
    # a list saved again by an editor in Latin-1 ("é" is the single byte 0xe9), the CSV with
    # a byte-order mark before it: the byte offset counts from the start of the file
    from benchmark_layouts import WRITERS

    root = WRITERS[name](tmp_path, "flat")
    listed = root / ("Ebay_test.txt" if name == "sop" else "index.csv")
    lines = listed.read_bytes().split(b"\n")
    lines[2] += " caf\u00e9".encode("latin-1")
    bom = b"\xef\xbb\xbf" if name == "gldv2" else b""
    listed.write_bytes(bom + b"\n".join(lines))
    offset = len(bom) + len(b"\n".join(lines[:2])) + 1 + len(lines[2]) - 1
    with pytest.raises(InputError, match=rf"{listed.name}: line 3 \(byte {offset}, b'\\xe9'\) is not UTF-8; save the file "
                                         "as UTF-8"):
        load_retrieval_benchmark(name, root)


LATIN1 = r"table\.csv: line 1 \(byte 8, b'\\xe9'\) is not UTF-8; save the file as UTF-8"
UTF16 = (r"table\.csv: the file is UTF-16 \(it starts with a UTF-16 byte-order mark\), not UTF-8; save it as UTF-8 "
         r"\(e\.g\. iconv -f utf-16 -t utf-8\)")


@pytest.mark.parametrize("text, encoding, error", [
    ("path,cat\u00e9gorie\na.png,0\n", "latin-1", LATIN1),
    ("path,label\na.png,0\nb.png,1\n", "utf-16", UTF16),
    ("path\n", "utf-16", UTF16),
])
def test_a_csv_table_whose_header_is_not_utf8_names_the_encoding_not_a_traceback(text, encoding, error, tmp_path):
    """A header column name in Latin-1 (pyarrow fails only when its names are read) and a table a
    spreadsheet saved as 'Unicode text' (UTF-16: pyarrow counts its columns wrong, or names a
    column with the byte-order mark): the file and what to do, not a UnicodeDecodeError."""
    table = tmp_path / "table.csv"
    table.write_bytes(text.encode(encoding))
    with pytest.raises(InputError, match=error):
        load_retrieval_benchmark("csv", table, check_images=False)


@pytest.mark.parametrize("label", ["", " "])
def test_a_csv_table_with_an_empty_class_name_is_refused_naming_its_row(label, tmp_path):
    """An empty cell among class names was read as a class named '' (its images one more class
    of the evaluation, without a word), where an empty cell among class ids is refused."""
    table = tmp_path / "list.csv"
    table.write_text(f"path,label\na.png,dog\nb.png,{label}\nc.png,cat\n")
    with pytest.raises(InputError, match=r"list\.csv: rows \[2\] have no 'label'; fill them or drop the rows"):
        load_retrieval_benchmark("csv", table, check_images=False)
    table.write_text("path,label\na.png,1\nb.png,\nc.png,2\n")
    with pytest.raises(InputError, match=r"list\.csv: rows \[2\] have no 'label'; fill them or drop the rows"):
        load_retrieval_benchmark("csv", table, check_images=False)


def test_a_csv_table_that_is_not_utf8_is_named_with_the_line_and_byte(tmp_path):
    # pyarrow says only "invalid UTF8 data"; the byte is found in the file itself
    table = tmp_path / "list.csv"
    table.write_bytes("path,label\na.png,0\ncaf\u00e9.png,1\n".encode("latin-1"))
    with pytest.raises(InputError) as caught:
        load_retrieval_benchmark("csv", table)
    assert str(caught.value) == (f"{table}: line 3 (byte 22, b'\\xe9') is not UTF-8; save the file as UTF-8 "
                                 "(e.g. iconv -f latin1 -t utf-8) and run again")
    # in a column read as it is (class names), not only in one read as text (the paths)
    table.write_bytes("path,label\na.png,dog\nb.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"list\.csv: line 3 \(byte 30, b'\\xe9'\) is not UTF-8; save the file as UTF-8"):
        load_retrieval_benchmark("csv", table)
    table.write_bytes(b"")  # any other failure says what pyarrow says
    with pytest.raises(InputError, match=r"list\.csv: cannot be read as CSV \(Empty CSV file.*\)"):
        load_retrieval_benchmark("csv", table)


@pytest.mark.parametrize("text, where, written, fields", [
    ("key,label\nk0,1\nk1\nk2,3\n", "line 3", "'k1'", "1 field"),  # a short row
    ("key,label\nk0,1\nk1,2,5\n", "line 3", "'k1,2,5'", "3 fields"),  # a comma too many
    # the line as an editor numbers it: blank lines and a quoted value that holds a newline count
    ("key,label\n\nk0,1\n\"a\nb\",2\n\nk1\nk2,3\n", "line 7", "'k1'", "1 field"),
    ("key,label\nk0,1\n\"a\nb\"\nk2,3\n", "lines 3-4 (a quoted value holds a line break)", "'\"a\\nb\"'", "1 field"),
    ("path,label\n\"a.png,0\n", "line 2", "'\"a.png,0'", "1 field"),  # a quote never closed
])
def test_a_csv_list_with_a_row_of_another_width_is_refused_naming_the_line(text, where, written, fields, tmp_path):
    """pyarrow says only "Expected 2 columns, got 1: k1": the file, the line and what to do."""
    from unicom.data.lists import read_table

    table = tmp_path / "labels.csv"
    table.write_text(text)
    header = text.split("\n", 1)[0]
    with pytest.raises(InputError) as caught:
        read_table(table, path_column="key", caption_column=None, key_column=None)
    assert str(caught.value) == (f"{table}: the row on {where} has {fields} ({written}) where the header has 2 "
                                 f"({header}); give every line one value per column (quote a value that holds a "
                                 "comma) or drop the line, and run again")


def test_registry_rows_name_importable_readers():
    import importlib

    for name, spec in RETRIEVAL_BENCHMARKS.items():
        module, function = spec.reader.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
        assert spec.metric in {"recall@1", "map@100", "map_medium", "map_all", "r_precision", "map_strong"}


# --------------------------------------------------------------------------- classification


def test_cifar10_from_pickled_batches(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    # torchvision checks the official files' MD5 sums; these batches are tiny stand-ins
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n, offset in [(f"data_batch_{i}", 2, i) for i in range(1, 6)] + [("test_batch", 3, 7)]:
        labels = [(offset + j) % 10 for j in range(n)]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)

    train, test, metric = load_classification_benchmark("cifar10", tmp_path)
    assert metric == "accuracy"
    assert (len(train), len(test)) == (10, 3)
    assert train.labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert test.labels.tolist() == [7, 8, 9] and test.class_names[9] == "class9"
    assert train.images[0].size == (32, 32)
    first = np.asarray(train.images[0]).transpose(2, 0, 1).reshape(-1)  # CHW order in the batch
    with open(folder / "data_batch_1", "rb") as f:
        assert np.array_equal(first, pickle.load(f)["data"][0])


def test_eurosat_is_split_two_thirds_one_third(tmp_path):
    for c, name in enumerate(["Forest", "River", "SeaLake"]):
        for i in range(4):
            jpeg(tmp_path / "eurosat" / "2750" / name / f"{name}_{i}.jpg", c, i)
    train, test, _ = load_classification_benchmark("eurosat", tmp_path)
    assert (len(train), len(test)) == (8, 4)
    assert not set(train.images) & set(test.images)
    assert train.class_names == ["Forest", "River", "SeaLake"]
    assert all(Path(p).parent.name == train.class_names[y] for p, y in zip(train.images, train.labels))


def test_dtd_train_is_train_plus_val_of_partition_1(tmp_path):
    base = tmp_path / "dtd" / "dtd"
    files = {"train1.txt": ["banded/banded_0001.jpg", "dotted/dotted_0001.jpg"],
             "val1.txt": ["banded/banded_0002.jpg"], "test1.txt": ["dotted/dotted_0002.jpg", "banded/banded_0003.jpg"]}
    for name, lines in files.items():
        write(base / "labels" / name, "\n".join(lines) + "\n")
        for line in lines:
            jpeg(base / "images" / line)
    train, test, metric = load_classification_benchmark("dtd", tmp_path)
    assert metric == "accuracy"
    assert [Path(p).name for p in train.images] == ["banded_0001.jpg", "dotted_0001.jpg", "banded_0002.jpg"]
    assert [train.class_names[y] for y in test.labels] == ["dotted", "banded"]


def test_food101_from_meta_json(tmp_path):
    base = tmp_path / "food-101"
    meta = {"train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "ramen": ["ramen/3"]},
            "test": {"apple_pie": ["apple_pie/4"], "ramen": ["ramen/5", "ramen/6"]}}
    for split, classes in meta.items():
        write(base / "meta" / f"{split}.json", json.dumps(classes))
        for items in classes.values():
            for item in items:
                jpeg(base / "images" / f"{item}.jpg")
    train, test, _ = load_classification_benchmark("food101", tmp_path)
    assert train.labels.tolist() == [0, 0, 1] and test.labels.tolist() == [0, 1, 1]
    assert all(Path(p).is_file() for p in train.images + test.images)


def test_pets_trainval_and_test_lists(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    write(base / "annotations" / "trainval.txt", "Abyssinian_1 1 1 1\nbasset_hound_2 2 2 1\nAbyssinian_3 1 1 1\n")
    write(base / "annotations" / "test.txt", "basset_hound_4 2 2 1\n")
    for name in ("Abyssinian_1", "basset_hound_2", "Abyssinian_3", "basset_hound_4"):
        jpeg(base / "images" / f"{name}.jpg")
    train, test, metric = load_classification_benchmark("pets", tmp_path)
    assert metric == "mean_per_class"
    assert train.labels.tolist() == [0, 1, 0] and test.labels.tolist() == [1]
    assert train.class_names == ["Abyssinian", "Basset Hound"]
    assert Path(test.images[0]).name == "basset_hound_4.jpg"


def test_caltech101_keeps_30_per_class_for_training(tmp_path):
    base = tmp_path / "caltech101" / "101_ObjectCategories"
    for c, (name, count) in enumerate([("BACKGROUND_Google", 3), ("accordion", 32), ("ant", 31)]):
        for i in range(1, count + 1):
            jpeg(base / name / f"image_{i:04d}.jpg", c, i)
    train, test, metric = load_classification_benchmark("caltech101", tmp_path)
    assert metric == "mean_per_class" and train.class_names == ["accordion", "ant"]
    assert np.bincount(train.labels).tolist() == [30, 30]
    assert np.bincount(test.labels).tolist() == [2, 1]
    assert not set(train.images) & set(test.images)


def test_sun397_uses_partition_1(tmp_path):
    base = tmp_path / "SUN397"
    write(base / "ClassName.txt", "/a/abbey\n/b/beach\n")
    names = {"/a/abbey/sun_aaa.jpg": 0, "/a/abbey/sun_aab.jpg": 0, "/b/beach/sun_bba.jpg": 1, "/b/beach/sun_bbb.jpg": 1,
             "/b/beach/sun_bbc.jpg": 1}
    for n, name in enumerate(names):
        jpeg(base / name.lstrip("/"), names[name], n)
    write(tmp_path / "Partitions" / "Training_01.txt", "/a/abbey/sun_aaa.jpg\n/b/beach/sun_bba.jpg\n")
    write(tmp_path / "Partitions" / "Testing_01.txt", "/a/abbey/sun_aab.jpg\n/b/beach/sun_bbb.jpg\n")
    train, test, _ = load_classification_benchmark("sun397", tmp_path)
    assert sorted(Path(p).name for p in train.images) == ["sun_aaa.jpg", "sun_bba.jpg"]
    assert sorted(zip((Path(p).name for p in test.images), test.labels.tolist())) == [("sun_aab.jpg", 0), ("sun_bbb.jpg", 1)]


def test_fgvc_aircraft_variants(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    write(data / "variants.txt", "707-320\n727-200\n")
    write(data / "images_variant_trainval.txt", "1000001 707-320\n1000002 727-200\n")
    write(data / "images_variant_test.txt", "1000003 727-200\n")
    for n in (1, 2, 3):
        jpeg(data / "images" / f"100000{n}.jpg", n)
    train, test, metric = load_classification_benchmark("fgvc_aircraft", tmp_path)
    assert metric == "mean_per_class"
    assert train.labels.tolist() == [0, 1] and test.labels.tolist() == [1]


def test_birdsnap_from_its_file_list_skips_images_not_downloaded(tmp_path):
    header = "url\tmd5\tpath\tspecies_id\tbb_x1\n"
    rows = [("Blue_Jay/1.jpg", 7), ("Blue_Jay/2.jpg", 7), ("Barn_Owl/3.jpg", 3), ("Barn_Owl/4.jpg", 3), ("Barn_Owl/5.jpg", 3)]
    write(tmp_path / "images.txt", header + "".join(f"http://x/{p}\t0\t{p}\t{s}\t1\n" for p, s in rows))
    write(tmp_path / "test_images.txt", "path\nBlue_Jay/2.jpg\nBarn_Owl/4.jpg\n")
    write(tmp_path / "species.txt", "id\tcommon\tscientific\tdir\n3\tBarn Owl\tTyto alba\tBarn_Owl\n7\tBlue Jay\tC. cristata\tBlue_Jay\n")
    for path, species in rows[:4]:  # 5.jpg was never downloaded
        jpeg(tmp_path / "download" / "images" / path, species)
    with pytest.warns(UserWarning, match="1 of 5 images"):
        train, test, _ = load_classification_benchmark("birdsnap", tmp_path)
    assert train.class_names == ["Barn Owl", "Blue Jay"]
    assert sorted(Path(p).name for p in train.images) == ["1.jpg", "3.jpg"]
    assert sorted(zip((Path(p).name for p in test.images), test.labels.tolist())) == [("2.jpg", 1), ("4.jpg", 0)]


@pytest.mark.parametrize("bad_row, error", [
    ("http://x/Barn_Owl/5.jpg\t0\tBarn_Owl/5.jpg\towl\t1\n", "line 4 has species_id 'owl', not a number"),
    ("http://x/Barn_Owl/5.jpg\t0\tBarn_Owl/5.jpg\n", "line 4 has 3 tab-separated fields where the header has 5: no species_id"),
])
def test_birdsnap_row_without_a_species_number_is_named_by_line(tmp_path, bad_row, error):
    header = "url\tmd5\tpath\tspecies_id\tbb_x1\n"  # a blank line 3: lines are numbered as the file has them
    write(tmp_path / "images.txt", header + "http://x/Blue_Jay/1.jpg\t0\tBlue_Jay/1.jpg\t7\t1\n\n" + bad_row)
    write(tmp_path / "test_images.txt", "path\nBlue_Jay/1.jpg\n")
    jpeg(tmp_path / "download" / "images" / "Blue_Jay" / "1.jpg")
    with pytest.raises(InputError) as caught:
        load_classification_benchmark("birdsnap", tmp_path)
    assert str(caught.value) == f"{tmp_path / 'images.txt'}: {error}; fix the line or drop it"


@pytest.mark.parametrize("bad_row, error", [
    ("Barn owl\tBarn Owl\tTyto alba\tBarn_Owl\n", "line 3 has id 'Barn owl', not a number"),
    ("3\n", "line 3 has 1 tab-separated field where the header has 4: no common"),
])
def test_birdsnap_species_row_without_an_id_number_or_a_name_is_named_by_line(tmp_path, bad_row, error):
    header = "url\tmd5\tpath\tspecies_id\tbb_x1\n"
    rows = [("Blue_Jay/1.jpg", 7), ("Blue_Jay/2.jpg", 7)]
    write(tmp_path / "images.txt", header + "".join(f"http://x/{p}\t0\t{p}\t{s}\t1\n" for p, s in rows))
    write(tmp_path / "test_images.txt", "path\nBlue_Jay/2.jpg\n")
    write(tmp_path / "species.txt", "id\tcommon\tscientific\tdir\n7\tBlue Jay\tC. cristata\tBlue_Jay\n" + bad_row)
    for path, species in rows:
        jpeg(tmp_path / "download" / "images" / path, species)
    with pytest.raises(InputError) as caught:
        load_classification_benchmark("birdsnap", tmp_path)
    assert str(caught.value) == f"{tmp_path / 'species.txt'}: {error}; fix the line or drop it"


def test_classification_dataset_not_found_shows_the_layout(tmp_path):
    with pytest.raises(InputError, match="Food101 not found under .*\n.*food-101/meta"):
        load_classification_benchmark("food101", tmp_path)
    assert len(CLASSIFICATION_BENCHMARKS) == 13


def test_stanford_cars_from_its_mat_annotations(tmp_path):
    from scipy.io import savemat

    base = tmp_path / "stanford_cars"
    record = np.dtype([("fname", object), ("class", np.int32)])
    annotations = {"train": [("00001.jpg", 2), ("00002.jpg", 1), ("00003.jpg", 2)], "test": [("00001.jpg", 1), ("00002.jpg", 2)]}
    for split, rows in annotations.items():
        for name, label in rows:
            jpeg(base / f"cars_{split}" / name, label)
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": np.array(annotations["train"], dtype=record)})
    savemat(base / "cars_test_annos_withlabels.mat", {"annotations": np.array(annotations["test"], dtype=record)})
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], dtype=object)})
    train, test, metric = load_classification_benchmark("cars", tmp_path)
    assert metric == "accuracy"
    assert train.labels.tolist() == [1, 0, 1] and test.labels.tolist() == [0, 1]  # the files count classes from 1
    assert train.class_names == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    assert [Path(p).relative_to(base).as_posix() for p in train.images] == ["cars_train/00001.jpg", "cars_train/00002.jpg", "cars_train/00003.jpg"]
    assert Path(test.images[0]).relative_to(base).as_posix() == "cars_test/00001.jpg"


def test_flowers102_train_is_train_plus_val_of_setid(tmp_path, monkeypatch):
    from scipy.io import savemat
    import torchvision.datasets.flowers102 as flowers

    # torchvision checks the official files' MD5 sums; these are written by the test
    monkeypatch.setattr(flowers, "check_integrity", lambda path, md5=None: Path(path).is_file())
    base = tmp_path / "flowers-102"
    labels = [3, 1, 2, 1, 3, 2, 1]  # image_00001 .. image_00007, classes counted from 1
    for image_id, label in enumerate(labels, 1):
        jpeg(base / "jpg" / f"image_{image_id:05d}.jpg", label)
    savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
    savemat(base / "setid.mat", {"trnid": np.array([1, 4]), "valid": np.array([2, 7]), "tstid": np.array([3, 5, 6])})
    train, test, metric = load_classification_benchmark("flowers", tmp_path)
    assert metric == "mean_per_class"
    assert [Path(p).name for p in train.images] == ["image_00001.jpg", "image_00004.jpg", "image_00002.jpg", "image_00007.jpg"]
    assert train.labels.tolist() == [2, 0, 0, 0] and test.labels.tolist() == [1, 2, 1]


def test_imagenet_from_its_folders_and_meta_file(tmp_path):
    import torch

    wnids = ["n01440764", "n01443537"]
    torch.save(({"n01440764": ("tench", "Tinca tinca"), "n01443537": ("goldfish", "Carassius auratus")},
                ["n01443537", "n01440764"]), tmp_path / "meta.bin")
    for label, wnid in enumerate(wnids):
        for index in range(2):
            jpeg(tmp_path / "train" / wnid / f"{wnid}_{index}.JPEG", label, index)
        jpeg(tmp_path / "val" / wnid / f"ILSVRC2012_val_0000000{label + 1}.JPEG", label)
    train, test, metric = load_classification_benchmark("imagenet-1k", tmp_path)
    assert metric == "accuracy"
    assert train.labels.tolist() == [0, 0, 1, 1] and test.labels.tolist() == [0, 1]
    assert all(Path(p).parent.name == wnids[y] for p, y in zip(train.images + test.images, np.concatenate([train.labels, test.labels])))
    assert [names[0] for names in train.class_names] == ["tench", "goldfish"]


def test_imagenet_cannot_be_downloaded(tmp_path):
    with pytest.raises(InputError, match="image-net.org"):
        load_classification_benchmark("imagenet", tmp_path, download=True)


def test_a_list_file_is_read_as_its_lines_are_taken_not_held_whole(tmp_path):
    """GLDv2's train.csv is half a gigabyte: its lines are decoded as they are read, the file
    and its text never in memory whole (read whole, a str and a StringIO of it took 5 times
    the file)."""
    import tracemalloc

    from unicom.data.lists import text_lines

    listed = tmp_path / "train.csv"
    row = "0123456789abcdef,https://upload.wikimedia.org/wikipedia/commons/a/ab/Some_landmark.jpg,12345\n"
    listed.write_bytes(codecs.BOM_UTF8 + ("id,url,landmark_id\n" + row * 200_000).encode())
    tracemalloc.start()
    try:
        lines = text_lines(listed, newline="")
        assert next(lines) == "id,url,landmark_id\n"
        assert sum(1 for line in lines if line == row) == 200_000
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < listed.stat().st_size / 20
