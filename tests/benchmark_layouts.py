"""Tiny retrieval benchmarks on disk, as their archives unpack (``download``) or in the common
flattened alternative (``flat``): official list files, real JPEGs.

Every dataset has the same content in both layouts: 3 training classes of 2 images and 2
test classes (in-shop and GLDv2: queries and a gallery), so a reader must give the same
splits, keys and labels from either.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from support import class_image, encode_image

LAYOUTS = ("download", "flat")


def jpeg(path: Path, label: int = 0, index: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_image(class_image(label, index, size=16)))


def text(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)


def sop(root: Path, layout: str) -> Path:
    """``Stanford_Online_Products/`` (the zip's folder) or its files directly under ``root``."""
    folder = root / "Stanford_Online_Products" if layout == "download" else root
    header = "image_id class_id super_class_id path\n"
    train = [(1, 1, "bicycle_final/1_0.JPG"), (2, 1, "bicycle_final/1_1.JPG"), (3, 2, "chair_final/2_0.JPG"),
             (4, 2, "chair_final/2_1.JPG"), (5, 3, "sofa_final/3_0.JPG"), (6, 3, "sofa_final/3_1.JPG")]
    test = [(7, 11319, "bicycle_final/9_0.JPG"), (8, 11319, "bicycle_final/9_1.JPG"), (9, 11320, "sofa_final/8_0.JPG"),
            (10, 11320, "sofa_final/8_1.JPG")]
    for rows, name in ((train, "Ebay_train.txt"), (test, "Ebay_test.txt")):
        text(folder / name, header + "".join(f"{i} {c} 1 {p}\n" for i, c, p in rows))
        for i, c, p in rows:
            jpeg(folder / p, c, i)
    return root


def cub(root: Path, layout: str) -> Path:
    """``CUB_200_2011/`` under ``root`` (as CUB_200_2011.tgz unpacks) or its files in ``root``."""
    folder = root / "CUB_200_2011" if layout == "download" else root
    images, labels = [], []
    for class_id in (1, 2, 3, 101, 102):
        for i in range(2):
            image_id = len(images) + 1
            name = f"{class_id:03d}.Bird_{class_id}/Bird_{i}.jpg"
            jpeg(folder / "images" / name, class_id, i)
            images.append(f"{image_id} {name}")
            labels.append(f"{image_id} {class_id}")
    text(folder / "images.txt", "\n".join(images) + "\n")
    text(folder / "image_class_labels.txt", "\n".join(labels) + "\n")
    return root


def cars196(root: Path, layout: str) -> Path:
    """``cars_annos.mat`` and ``car_ims/`` in ``root/cars196`` or in ``root``."""
    from scipy.io import savemat

    folder = root / "cars196" if layout == "download" else root
    class_ids = [1, 1, 2, 2, 3, 3, 99, 99, 196, 196]
    annotations = np.zeros(len(class_ids), dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")])
    for i, class_id in enumerate(class_ids):
        path = f"car_ims/{i + 1:06d}.jpg"
        jpeg(folder / path, class_id, i)
        annotations[i] = (path, class_id, i % 2)
    folder.mkdir(parents=True, exist_ok=True)
    names = np.array([f"Car {c}" for c in range(1, 197)], dtype=object)
    savemat(folder / "cars_annos.mat", {"annotations": annotations[None, :], "class_names": names[None, :]})
    return root


INSHOP_ROWS = [
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
    ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
    ("img/WOMEN/Tees/id_00000003/03_1_front.jpg", "id_00000003", "train"),
    ("img/WOMEN/Tees/id_00000003/03_2_side.jpg", "id_00000003", "train"),
    ("img/MEN/Pants/id_00000004/04_1_front.jpg", "id_00000004", "train"),
    ("img/MEN/Pants/id_00000004/04_2_side.jpg", "id_00000004", "train"),
    ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "query"),
    ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "gallery"),
    ("img/WOMEN/Tees/id_00000091/03_1_front.jpg", "id_00000091", "query"),
    ("img/WOMEN/Tees/id_00000091/03_2_side.jpg", "id_00000091", "gallery"),
]


def inshop(root: Path, layout: str) -> Path:
    """download: ``Eval/list_eval_partition.txt`` and ``Img/img/...`` (Img/img.zip unpacked in
    place); flat: the list and ``img/...`` side by side."""
    content = f"{len(INSHOP_ROWS)}\nimage_name item_id evaluation_status\n" + "".join(
        f"{p}    {i}    {s}\n" for p, i, s in INSHOP_ROWS)
    text(root / ("Eval/list_eval_partition.txt" if layout == "download" else "list_eval_partition.txt"), content)
    images = root / "Img" if layout == "download" else root
    for n, (path, _, _) in enumerate(INSHOP_ROWS):
        jpeg(images / path, n)
    return root


def inaturalist(root: Path, layout: str) -> Path:
    """download: the split files in ``Inat_dataset_splits/`` beside ``train_val2018/``; flat: at the top."""
    train = ["train_val2018/Plantae/7477/a.jpg", "train_val2018/Plantae/7477/b.jpg", "train_val2018/Aves/2000/c.jpg",
             "train_val2018/Aves/2000/d.jpg", "train_val2018/Fungi/100/e.jpg", "train_val2018/Fungi/100/f.jpg"]
    test = ["train_val2018/Aves/3000/g.jpg", "train_val2018/Aves/3000/h.jpg", "train_val2018/Insecta/4000/i.jpg",
            "train_val2018/Insecta/4000/j.jpg"]
    splits = root / "Inat_dataset_splits" if layout == "download" else root
    text(splits / "Inaturalist_train_set1.txt", "\n".join(train) + "\n")
    text(splits / "Inaturalist_test_set1.txt", "\n".join(test) + "\n")
    for n, path in enumerate(train + test):
        jpeg(root / path, n)
    return root


def vehicleid(root: Path, layout: str) -> Path:
    folder = root / "VehicleID_V1.0" if layout == "download" else root
    text(folder / "train_test_split" / "train_list.txt", "0001 1\n0002 1\n0003 2\n0004 2\n0005 3\n0006 3\n")
    text(folder / "train_test_split" / "test_list_800.txt", "0101 10\n0102 10\n0103 11\n0104 11\n")
    for n, name in enumerate(["0001", "0002", "0003", "0004", "0005", "0006", "0101", "0102", "0103", "0104"]):
        jpeg(folder / "image" / f"{name}.jpg", n)
    return root


GLD_INDEX = ["0123456789abcdef", "1123456789abcdef", "2223456789abcdef", "3333456789abcdef"]
GLD_TEST = ["a000000000000001", "b000000000000002", "c000000000000003"]


def gldv2(root: Path, layout: str) -> Path:
    """download: ``index/index.csv`` and ``test/retrieval_solution_v2.1.csv`` with the images
    (no test.csv); flat: ``index.csv``, ``test.csv`` and the solution at the top."""
    solution = ("id,images,Usage\n"
                f"{GLD_TEST[0]},{GLD_INDEX[1]} {GLD_INDEX[3]},Public\n"
                f"{GLD_TEST[1]},None,Ignored\n"
                f"{GLD_TEST[2]},{GLD_INDEX[0]},Private\n")
    if layout == "download":
        text(root / "index" / "index.csv", "id\n" + "\n".join(GLD_INDEX) + "\n")
        text(root / "test" / "retrieval_solution_v2.1.csv", solution)
    else:
        text(root / "index.csv", "id\n" + "\n".join(GLD_INDEX) + "\n")
        text(root / "test.csv", "id\n" + "\n".join(GLD_TEST) + "\n")
        text(root / "retrieval_solution_v2.1.csv", solution)
    for folder, ids in (("index", GLD_INDEX), ("test", GLD_TEST)):
        for n, image_id in enumerate(ids):
            jpeg(root / folder / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg", n)
    return root


def imagenet(root: Path, layout: str = "download") -> Path:
    """ILSVRC2012 as torchvision's ImageNet reads it: ``meta.bin``, ``train/<wnid>/``, ``val/<wnid>/``."""
    import torch

    wnids = ["n01440764", "n01443537", "n01484850"]
    torch.save(({w: (f"class {w}",) for w in wnids}, wnids), root / "meta.bin")
    for label, wnid in enumerate(wnids):
        for index in range(2):
            jpeg(root / "train" / wnid / f"{wnid}_{index}.JPEG", label, index)
        jpeg(root / "val" / wnid / f"ILSVRC2012_val_0000000{label + 1}.JPEG", label)
    return root


WRITERS = {"sop": sop, "cub": cub, "cars196": cars196, "inshop": inshop, "inaturalist": inaturalist,
           "vehicleid-small": vehicleid, "gldv2": gldv2}


def cars196_devkit(root: Path) -> Path:
    """Stanford Cars as torchvision's StanfordCars reads it: ``stanford_cars/devkit/``, the test
    annotations with labels, ``cars_train/`` and ``cars_test/``; each of the devkit's own
    train/test halves holds classes of both metric-learning splits."""
    from scipy.io import savemat

    folder = root / "stanford_cars"
    record = np.dtype([("fname", object), ("class", np.int32)])
    annotations = {"train": [("00001.jpg", 1), ("00002.jpg", 99), ("00003.jpg", 2), ("00004.jpg", 196)],
                   "test": [("00001.jpg", 1), ("00002.jpg", 99), ("00003.jpg", 2), ("00004.jpg", 196)]}
    for split, rows in annotations.items():
        for n, (name, class_id) in enumerate(rows):
            jpeg(folder / f"cars_{split}" / name, class_id, n)
    (folder / "devkit").mkdir(parents=True)
    savemat(folder / "devkit" / "cars_train_annos.mat", {"annotations": np.array(annotations["train"], dtype=record)})
    savemat(folder / "cars_test_annos_withlabels.mat", {"annotations": np.array(annotations["test"], dtype=record)})
    names = np.array([f"Car {c}" for c in range(1, 197)], dtype=object)
    savemat(folder / "devkit" / "cars_meta.mat", {"class_names": names})
    return root
