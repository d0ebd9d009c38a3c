"""Readers for retrieval benchmarks in the layouts their authors distribute.

Each reader takes the dataset's folder and returns :class:`Splits`: the query images, the
gallery (``None`` for leave-one-out: every query searches all the other queries), the
training images, and for GLDv2 the relevance lists and the Public/Private subsets. The
k's and the headline metric of each benchmark live in the registry
(:data:`unicom.data.benchmarks.RETRIEVAL_BENCHMARKS`).

Labels of all splits share one vocabulary with the training classes first, so a train
split's labels are always ``0..C_train-1`` (ready for fine-tuning) and query and gallery
labels are directly comparable. Keys are image paths relative to the dataset's folder (the
one holding its list files: ``--root`` itself, or the archive's top folder inside it).

``root`` is the dataset's folder as downloaded and unpacked (In-Shop's ``Img/img/``,
iNaturalist's ``Inat_dataset_splits/``, GLDv2's ``index/index.csv`` and
``test/retrieval_solution_v2.1.csv`` ...), its parent, or the common flattened
alternatives; each reader's ``*_LAYOUT`` lists the places it looks. A missing index file
raises :class:`InputError` listing every place looked at and the expected layout; missing
evaluation images are listed (first five and a count, with the list file naming them)
before anything runs.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from unicom import storage
from unicom.data.lists import ImageList, read_image_folder, read_table, text_lines
from unicom.errors import InputError


@dataclass
class Splits:
    """What a reader found. ``relevant[q]``: gallery rows relevant to query q (GLDv2);
    ``subsets``: named arrays of query rows reported separately (GLDv2 Public/Private);
    ``query_boxes``: (Nq, 4) float64 x1, y1, x2, y2, the region of each query image that is
    the query (Revisited Oxford/Paris); ``setups``: name -> (positive gallery rows, ignored
    gallery rows) per query, each setup scored separately (Revisited Oxford/Paris)."""

    query: ImageList
    gallery: ImageList | None = None
    train: ImageList | None = None
    relevant: list[np.ndarray] | None = None
    subsets: dict[str, np.ndarray] = field(default_factory=dict)
    query_boxes: np.ndarray | None = None
    setups: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] | None = None


# --------------------------------------------------------------------------- helpers


def _natural(text: str):
    """Sort key that orders "class_2" before "class_10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _require(path: Path, layout: str) -> Path:
    if not path.exists():
        raise InputError(f"{path}: not found; expected layout:\n{layout}")
    return path


def _first_existing(root: Path, candidates: Sequence[str], layout: str) -> Path:
    """The first of ``root/candidate`` that exists (datasets unpack with or without a top
    folder, with their files at the top or in sub-folders); else an error listing them all."""
    for candidate in candidates:
        if (root / candidate).exists():
            return root / candidate
    looked = "\n  ".join(str(root / c) for c in candidates)
    raise InputError(f"{root / candidates[0]}: not found; looked for:\n  {looked}\nexpected layout:\n{layout}")


def _dataset_folder(root: Path, marker: Sequence[str], tops: Sequence[str], layout: str) -> Path:
    """``root`` itself, or the first of its sub-folders ``tops`` (the archive's own top
    folder), that holds one of the ``marker`` files; else an error listing every place."""
    folders = [root, *(root / top for top in tops)]
    for folder in folders:
        if any((folder / m).exists() for m in marker):
            return folder
    looked = "\n  ".join(str(folder / m) for folder in folders for m in marker)
    raise InputError(f"{root / marker[0]}: not found; looked for:\n  {looked}\nexpected layout:\n{layout}")


def _check_images(paths: Iterable[str], layout: str, listed_in: str | os.PathLike) -> None:
    """Every one of ``paths`` (listed in the file ``listed_in``) is a file; else an error
    naming the list, the first five missing and the layout."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = "\n  ".join(missing[:5])
        raise InputError(
            f"{listed_in}: {len(missing)} of the images it lists are missing, e.g.:\n  {shown}\n"
            f"unpack the dataset's image archive where the layout below puts it, or give --root the folder "
            f"that holds it; expected layout:\n{layout}"
        )


def _lines(path: Path) -> list[str]:
    # text_lines drops the byte-order mark a Windows editor writes, which would otherwise stick
    # to the first image id or header word (CRLF is stripped below)
    return [line.strip() for line in text_lines(path) if line.strip()]


def _csv_rows(path: Path, required: Sequence[str]) -> csv.DictReader:
    """The rows of the CSV list ``path`` (UTF-8), once its header is known to hold ``required``."""
    return _columns(csv.DictReader(text_lines(path, newline="")), path, required)


def _labelled_splits(root: Path, records: Sequence[tuple[str, str, str]], layout: str,
                     listed_in: dict[str, Path], check_images: bool = True) -> dict[str, ImageList]:
    """``records``: (path relative to ``root``, class name, split name) -> one ImageList per split.

    The vocabulary lists the training classes first, each group in natural order; each
    evaluation split (all but ``train``) lists an image once and, with ``check_images``, its
    images are checked to exist (without: embeddings computed earlier are matched by key, the
    images need not be here). ``listed_in``: the list file each evaluation split was read
    from, for the errors.
    """
    train_classes = sorted({c for _, c, s in records if s == "train"}, key=_natural)
    other_classes = sorted({c for _, c, s in records if s != "train"} - set(train_classes), key=_natural)
    class_names = train_classes + other_classes
    lookup = {name: i for i, name in enumerate(class_names)}
    out: dict[str, ImageList] = {}
    for split in dict.fromkeys(s for _, _, s in records):
        rows = [(p, c) for p, c, s in records if s == split]
        paths = [str(root / p) for p, _ in rows]
        if split != "train":  # the train split is not searched: a repeated line there harms no score
            _require_unique_images([p for p, _ in rows], split, listed_in[split])
            if check_images:
                _check_images(paths, layout, listed_in[split])
        out[split] = ImageList(
            paths=paths,
            keys=[p for p, _ in rows],
            labels=np.asarray([lookup[c] for _, c in rows], dtype=np.int64),
            class_names=class_names,
        )
    return out


def _require_unique_images(keys: Sequence[str], split: str, source) -> None:
    """An error naming the images that ``source`` lists more than once in ``split``: searched
    leave-one-out, each copy would be the other's nearest neighbour and lift every score."""
    counts = Counter(keys)
    repeated = [key for key, count in counts.items() if count > 1]
    if repeated:
        shown = ", ".join(f"{key} ({counts[key]} times)" for key in repeated[:5])
        raise InputError(f"{source}: the {split} split lists {len(repeated)} image{'s' if len(repeated) > 1 else ''} more than once, e.g. {shown}; "
                         "an image listed twice is its own nearest neighbour: keep one line per image")


# --------------------------------------------------------------------------- CUB, Cars


CUB_LAYOUT = """  CUB_200_2011/images.txt              "<image id> <class folder>/<file>.jpg"
  CUB_200_2011/image_class_labels.txt  "<image id> <class id 1..200>"
  CUB_200_2011/classes.txt             "<class id> <class folder>" (optional)
  CUB_200_2011/images/<class folder>/<file>.jpg
  (--root: CUB_200_2011/ or the folder CUB_200_2011.tgz was unpacked in)"""


def read_cub(root: str | os.PathLike, check_images: bool = True) -> Splits:
    """CUB-200-2011: classes 1-100 train, 101-200 test (leave-one-out).

    ``root`` is the ``CUB_200_2011`` folder or its parent. The official
    ``train_test_split.txt`` is not used: the metric-learning protocol splits by class.
    """
    root = _dataset_folder(Path(root), ["images.txt"], ["CUB_200_2011"], CUB_LAYOUT)
    images = _lines(root / "images.txt")
    labels_path = _require(root / "image_class_labels.txt", CUB_LAYOUT)
    labels = {}
    for number, line in enumerate(_lines(labels_path), 1):
        parts = line.split()
        if len(parts) != 2:
            raise InputError(f"{labels_path}: line {number} ({line!r}) is not '<image id> <class id>'")
        if parts[0] in labels:
            raise InputError(f"{labels_path}: line {number} gives image {parts[0]} a class again; "
                             "keep one line per image id")
        labels[parts[0]] = _class_number(parts[1], 200, labels_path, number)
    names = {}
    if (root / "classes.txt").exists():
        for number, line in enumerate(_lines(root / "classes.txt"), 1):
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise InputError(f"{root / 'classes.txt'}: line {number} ({line!r}) is not '<class id> <class folder>'")
            names[parts[0]] = parts[1]
    records, seen = [], set()
    for number, line in enumerate(images, 1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or parts[0] not in labels:
            raise InputError(
                f"{root / 'images.txt'}: line {number} ({line!r}) has no '<id> <path>' with a class in "
                "image_class_labels.txt"
            )
        if parts[0] in seen:
            raise InputError(f"{root / 'images.txt'}: line {number} names image id {parts[0]} again; "
                             "keep one line per image id")
        seen.add(parts[0])
        image_id, path = parts
        class_id = labels[image_id]
        split = "train" if class_id <= 100 else "test"
        records.append((f"images/{path}", names.get(str(class_id), str(class_id)), split))
    _require_test_classes(records, "images.txt")
    splits = _labelled_splits(root, records, CUB_LAYOUT, {"test": root / "images.txt"}, check_images)
    return Splits(query=splits["test"], train=splits.get("train"))


def _class_number(value, last: int, path: Path, where: str | int) -> int:
    """A class number of the official files, 1..``last``; the metric-learning split is by
    number, so a file that counts from 0 would move a class across it: an error instead."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not 1 <= number <= last:
        where = f"line {where}" if isinstance(where, int) else where
        raise InputError(f"{path}: {where}: class {str(value)!r} is not a number from 1 to {last}; the official "
                         "files count classes from 1 (a copy that counts from 0 must be converted back)")
    return number


def _require_test_classes(records, source: str) -> None:
    if not any(s == "test" for _, _, s in records):
        raise InputError(f"{source}: no image of the test classes; is the file complete?")


CARS_LAYOUT = """  cars_annos.mat   annotations: relative_im_path, class (1..196), test; class_names
  car_ims/<file>.jpg   (car_ims.tgz unpacked beside it)
  or the devkit layout, as torchvision's StanfordCars reads it, in a folder named stanford_cars/:
  devkit/cars_train_annos.mat, devkit/cars_meta.mat, cars_test_annos_withlabels.mat, cars_train/, cars_test/
  (--root: that folder, or its parent holding cars196/ or stanford_cars/)"""
CARS_DEVKIT = "devkit/cars_train_annos.mat"


def read_cars196(root: str | os.PathLike, check_images: bool = True) -> Splits:
    """Cars196: classes 1-98 train, 99-196 test (leave-one-out), all 16,185 images.

    Read from ``cars_annos.mat`` or, without it, from the devkit's train and test
    annotations together (the same images and class numbers). Classes are told apart by
    their number (``class``), as the metric-learning code does: a name of ``class_names``
    may stand for more than one class. Class names are the numbers.
    """
    root = _dataset_folder(Path(root), ["cars_annos.mat", CARS_DEVKIT], ["cars196", "stanford_cars"], CARS_LAYOUT)
    if (root / "cars_annos.mat").exists():
        listed_in = root / "cars_annos.mat"
        records = _cars_annos(listed_in)
    else:
        listed_in = root / "cars_test_annos_withlabels.mat"
        records = _cars_devkit(root, check_images)
    _require_test_classes(records, str(listed_in))
    splits = _labelled_splits(root, records, CARS_LAYOUT, {"test": listed_in}, check_images)
    return Splits(query=splits["test"], train=splits.get("train"))


def _cars_split(class_id: int) -> str:
    return "train" if class_id <= 98 else "test"


def _cars_annos(mat_path: Path) -> list[tuple[str, str, str]]:
    from unicom.data.benchmarks.classification import mat_variable

    records = []
    for number, row in enumerate(mat_variable(mat_path, "annotations", CARS_LAYOUT, fields=("relative_im_path", "class")), 1):
        class_id = _class_number(row["class"], 196, mat_path, f"annotation {number}")
        records.append((str(row["relative_im_path"]), str(class_id), _cars_split(class_id)))
    return records


def _cars_devkit(root: Path, check_images: bool) -> list[tuple[str, str, str]]:
    """The devkit's train and test images, through the classification reader (which owns that
    format, read as torchvision's StanfordCars reads it); its labels count from 0, class
    numbers from 1. Without ``check_images`` the image folders need not exist."""
    from unicom.data.benchmarks.classification import load_stanford_cars

    if root.name != "stanford_cars":
        raise InputError(f"{root}: the devkit layout is read as torchvision reads it, from a folder named "
                         f"stanford_cars; rename the folder (or give cars_annos.mat); expected layout:\n{CARS_LAYOUT}")
    train, test = load_stanford_cars(root.parent, layout=CARS_LAYOUT, check_images=check_images)
    records = []
    for part in (train, test):
        for path, label in zip(part.images, part.labels.tolist()):
            records.append((Path(path).relative_to(root).as_posix(), str(label + 1), _cars_split(label + 1)))
    return records


# --------------------------------------------------------------------------- SOP, In-Shop


SOP_LAYOUT = """  Ebay_train.txt, Ebay_test.txt   header "image_id class_id super_class_id path", then one image per line
  <super class>_final/<file>.JPG
  (--root: Stanford_Online_Products/ or the folder its zip was unpacked in)"""


def _read_ebay(path: Path, split: str) -> list[tuple[str, str, str]]:
    lines = _lines(_require(path, SOP_LAYOUT))
    if not lines or lines[0].split()[:4] != ["image_id", "class_id", "super_class_id", "path"]:
        raise InputError(f"{path}: expected the header 'image_id class_id super_class_id path'")
    records = []
    for number, line in enumerate(lines[1:], 2):
        parts = line.split()
        if len(parts) != 4:
            raise InputError(f"{path}: line {number} ({line!r}) does not have 4 fields")
        if not all(field.isdigit() for field in parts[:3]):
            # a class id that is not a number is a damaged line, not a class of its own
            raise InputError(f"{path}: line {number} ({line!r}) does not start with the numbers image_id class_id "
                             "super_class_id; restore the line from the dataset's archive")
        records.append((parts[3], parts[1], split))
    return records


def read_sop(root: str | os.PathLike, check_images: bool = True) -> Splits:
    """Stanford Online Products: ``Ebay_test.txt`` leave-one-out, ``Ebay_train.txt`` train."""
    root = _dataset_folder(Path(root), ["Ebay_train.txt"], ["Stanford_Online_Products"], SOP_LAYOUT)
    test = _first_existing(root, ["Ebay_test.txt"], SOP_LAYOUT)
    records = _read_ebay(_first_existing(root, ["Ebay_train.txt"], SOP_LAYOUT), "train") + _read_ebay(test, "test")
    splits = _labelled_splits(root, records, SOP_LAYOUT, {"test": test}, check_images)
    return Splits(query=splits["test"], train=splits["train"])


INSHOP_LAYOUT = """  Eval/list_eval_partition.txt (or list_eval_partition.txt): a count line, the header
      "image_name item_id evaluation_status", then "<img/...jpg> <item id> <train|query|gallery>"
  Img/img/<...>.jpg   (Img/img.zip unpacked where it lies; or img/<...>.jpg beside the list)
  (--root: the benchmark's folder, or its parent holding Inshop_Clothes/)"""
INSHOP_LISTS = ["Eval/list_eval_partition.txt", "list_eval_partition.txt"]
INSHOP_IMAGE_FOLDERS = ["Img", "."]  # where the listed img/... paths start


def read_inshop(root: str | os.PathLike, check_images: bool = True) -> Splits:
    """DeepFashion In-Shop: query images against gallery images; item ids are the classes.

    The list names images ``img/...``: they are looked for under ``Img/`` (the download,
    ``Img/img.zip`` unpacked in place; keys ``Img/img/...``) and under the dataset folder
    itself (keys ``img/...``); without the images (``check_images=False``), under ``Img/``
    when the list is in ``Eval/`` as downloaded, else beside it.
    """
    root = _dataset_folder(Path(root), INSHOP_LISTS, ["Inshop_Clothes", "InShop", "In-shop Clothes Retrieval Benchmark"],
                           INSHOP_LAYOUT)
    path = _first_existing(root, INSHOP_LISTS, INSHOP_LAYOUT)
    lines = _lines(path)
    if len(lines) < 2 or not lines[0].isdigit() or lines[1].split() != ["image_name", "item_id", "evaluation_status"]:
        raise InputError(f"{path}: expected a count line and the header 'image_name item_id evaluation_status'")
    records = []
    for number, line in enumerate(lines[2:], 3):
        parts = line.split()
        if len(parts) != 3 or parts[2] not in ("train", "query", "gallery"):
            raise InputError(f"{path}: line {number} ({line!r}) is not '<image> <item id> train|query|gallery'")
        records.append((parts[0], parts[1], parts[2]))
    if int(lines[0]) != len(records):
        raise InputError(f"{path}: the first line announces {lines[0]} images but {len(records)} are listed")
    probe = next((p for p, _, s in records if s != "train"), records[0][0] if records else "")
    folder = next((f for f in INSHOP_IMAGE_FOLDERS if (root / f / probe).is_file()), None)
    if folder is None and not check_images:  # images not here: keys as the layout of the list puts them
        folder = INSHOP_IMAGE_FOLDERS[0] if path.parent.name == "Eval" else "."
    if folder is None:
        looked = "\n  ".join(str((root / f / probe).resolve()) for f in INSHOP_IMAGE_FOLDERS)
        raise InputError(f"{path} lists {probe}, found in none of:\n  {looked}\nexpected layout:\n{INSHOP_LAYOUT}")
    prefix = "" if folder == "." else f"{folder}/"
    splits = _labelled_splits(root, [(prefix + p, c, s) for p, c, s in records], INSHOP_LAYOUT,
                              {"query": path, "gallery": path}, check_images)
    for split in ("query", "gallery"):
        if split not in splits:
            raise InputError(f"{path}: no image has evaluation_status {split!r}")
    return Splits(query=splits["query"], gallery=splits["gallery"], train=splits.get("train"))


# --------------------------------------------------------------------------- iNaturalist, VehicleID


INAT_LAYOUT = """  Inat_dataset_splits/Inaturalist_train_set1.txt, Inaturalist_test_set1.txt (or beside
      train_val2018/): one image path per line, train_val2018/<supercategory>/<category>/<file>.jpg
  train_val2018/...   (train_val2018.tar.gz unpacked)
  (--root: that folder, or its parent holding iNaturalist/)"""
INAT_SPLIT_FOLDERS = ["Inat_dataset_splits/", ""]


def read_inaturalist(root: str | os.PathLike, check_images: bool = True) -> Splits:
    """iNaturalist 2018, metric-learning split (Brown et al., read from ``Inat_dataset_splits/``
    as pytorch-metric-learning and the Unicom code do): class = ``<supercategory>/<category>``."""
    marker = [f"{folder}Inaturalist_train_set1.txt" for folder in INAT_SPLIT_FOLDERS]
    root = _dataset_folder(Path(root), marker, ["iNaturalist", "inaturalist"], INAT_LAYOUT)
    records, lists = [], {}
    for split, name in (("train", "Inaturalist_train_set1.txt"), ("test", "Inaturalist_test_set1.txt")):
        path = lists[split] = _first_existing(root, [f"{folder}{name}" for folder in INAT_SPLIT_FOLDERS], INAT_LAYOUT)
        for number, line in enumerate(_lines(path), 1):
            parts = line.split("/")
            if len(parts) < 4:
                raise InputError(f"{path}: line {number} ({line!r}) is not <folder>/<supercategory>/<category>/<file>")
            records.append((line, f"{parts[-3]}/{parts[-2]}", split))
    splits = _labelled_splits(root, records, INAT_LAYOUT, lists, check_images)
    return Splits(query=splits["test"], train=splits["train"])


VEHICLEID_LAYOUT = """  train_test_split/train_list.txt, test_list_800.txt, test_list_1600.txt, test_list_2400.txt
      "<image name> <vehicle id>" per line
  image/<image name>.jpg
  (--root: that folder, or its parent holding VehicleID_V1.0/)"""
VEHICLEID_SIZES = {"small": 800, "medium": 1600, "large": 2400}


def read_vehicleid(root: str | os.PathLike, size: str = "small", check_images: bool = True) -> Splits:
    """PKU VehicleID: one test list (small 800, medium 1600, large 2400 vehicles), leave-one-out."""
    if size not in VEHICLEID_SIZES:
        raise InputError(f"VehicleID size must be one of {list(VEHICLEID_SIZES)}, got {size!r}")
    root = _dataset_folder(Path(root), ["train_test_split"], ["VehicleID_V1.0", "VehicleID"], VEHICLEID_LAYOUT)
    records, lists = [], {}
    for split, name in (("train", "train_list.txt"), ("test", f"test_list_{VEHICLEID_SIZES[size]}.txt")):
        path = lists[split] = _first_existing(root, [f"train_test_split/{name}"], VEHICLEID_LAYOUT)
        for number, line in enumerate(_lines(path), 1):
            parts = line.split()
            if len(parts) != 2:
                raise InputError(f"{path}: line {number} ({line!r}) is not '<image name> <vehicle id>'")
            records.append((f"image/{parts[0]}.jpg", parts[1], split))
    splits = _labelled_splits(root, records, VEHICLEID_LAYOUT, lists, check_images)
    return Splits(query=splits["test"], train=splits["train"])


# --------------------------------------------------------------------------- GLDv2


GLDV2_LAYOUT = """  index/index.csv (or index.csv, metadata/index.csv)   column "id" (16 hex characters)
  test/retrieval_solution_v2.1.csv (or retrieval_solution_v2.1.csv, ground_truth/, metadata/)
                                        "id,images,Usage": test id, relevant index ids
                                        separated by spaces, Public|Private|Ignored
  test/test.csv (or test.csv, metadata/test.csv)   optional: the test ids, checked when present
  index/<a>/<b>/<c>/<id>.jpg, test/<a>/<b>/<c>/<id>.jpg   (a, b, c: the id's first characters)
  train_clean.csv ("landmark_id,images") or train.csv ("id,url,landmark_id") (also under
  train/ or metadata/) and train/<a>/<b>/<c>/<id>.jpg   optional, for fine-tuning"""
GLDV2_PLACES = {
    "index": ["index/index.csv", "index.csv", "metadata/index.csv"],
    "test": ["test/test.csv", "test.csv", "metadata/test.csv"],
    "solution": ["test/retrieval_solution_v2.1.csv", "retrieval_solution_v2.1.csv",
                 "ground_truth/retrieval_solution_v2.1.csv", "metadata/retrieval_solution_v2.1.csv"],
    "train_clean": ["train_clean.csv", "train/train_clean.csv", "metadata/train_clean.csv"],
    "train": ["train.csv", "train/train.csv", "metadata/train.csv"],
}


def _gld_path(folder: str, image_id: str) -> str:
    return f"{folder}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def _columns(reader: csv.DictReader, path: Path, required: Sequence[str]) -> csv.DictReader:
    """``reader`` once its header is known to hold ``required``; else an error naming the file."""
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(f"{path}: no column {', '.join(map(repr, missing))} (header: {reader.fieldnames}); "
                         f"expected layout:\n{GLDV2_LAYOUT}")
    return reader


def _csv_ids(path: Path) -> list[str]:
    return [row["id"] for row in _csv_rows(_require(path, GLDV2_LAYOUT), ("id",))]


def _optional(root: Path, places: Sequence[str]) -> Path | None:
    return next((root / place for place in places if (root / place).is_file()), None)


def _gld_train(root: Path) -> ImageList | None:
    clean, full = _optional(root, GLDV2_PLACES["train_clean"]), _optional(root, GLDV2_PLACES["train"])
    if clean is not None:
        rows = []
        for row in _csv_rows(clean, ("landmark_id", "images")):
            rows += [(image_id, row["landmark_id"]) for image_id in row["images"].split()]
    elif full is not None:
        rows = [(row["id"], row["landmark_id"]) for row in _csv_rows(full, ("id", "landmark_id"))]
    else:
        return None
    classes = sorted({label for _, label in rows}, key=_natural)
    lookup = {name: i for i, name in enumerate(classes)}
    keys = [_gld_path("train", image_id) for image_id, _ in rows]
    return ImageList(
        paths=[str(root / key) for key in keys],
        keys=keys,
        labels=np.asarray([lookup[label] for _, label in rows], dtype=np.int64),
        class_names=classes,
    )


def read_gldv2(root: str | os.PathLike, check_images: bool = True) -> Splits:
    """GLDv2 retrieval: Public and Private test queries (``Ignored`` dropped) against the index.

    Relevance comes from ``retrieval_solution_v2.1.csv``; ``test.csv``, when present, must
    list every test id of it; ``train`` is the clean or full training list when present.
    """
    root = Path(root)
    index_list = _first_existing(root, GLDV2_PLACES["index"], GLDV2_LAYOUT)
    index_ids = _csv_ids(index_list)
    test_list = _optional(root, GLDV2_PLACES["test"])
    test_ids = set(_csv_ids(test_list)) if test_list is not None else None
    position = {image_id: i for i, image_id in enumerate(index_ids)}
    solution = _first_existing(root, GLDV2_PLACES["solution"], GLDV2_LAYOUT)
    queries, relevant, usage = [], [], []
    for number, row in enumerate(_csv_rows(solution, ("id", "images", "Usage")), 2):
        if row["Usage"] == "Ignored":
            continue
        if row["Usage"] not in ("Public", "Private"):
            raise InputError(f"{solution}: line {number} has Usage {row['Usage']!r}; expected Public, Private or Ignored")
        if test_ids is not None and row["id"] not in test_ids:
            raise InputError(f"{solution}: line {number}: test id {row['id']} is not in {test_list}")
        items = []
        for image_id in row["images"].split():
            if image_id not in position:
                raise InputError(f"{solution}: line {number}: index id {image_id} is not in index.csv")
            items.append(position[image_id])
        queries.append(row["id"])
        relevant.append(np.asarray(items, dtype=np.int64))
        usage.append(row["Usage"])
    if not queries:
        raise InputError(f"{solution}: no Public or Private query")
    query_keys = [_gld_path("test", image_id) for image_id in queries]
    gallery_keys = [_gld_path("index", image_id) for image_id in index_ids]
    _require_unique_images(gallery_keys, "index", index_list)  # relevance names one copy, the other would count as wrong
    _require_unique_images(query_keys, "query", solution)
    query = ImageList([str(root / k) for k in query_keys], query_keys)
    gallery = ImageList([str(root / k) for k in gallery_keys], gallery_keys)
    if check_images:
        _check_images(query.paths, GLDV2_LAYOUT, solution)
        _check_images(gallery.paths, GLDV2_LAYOUT, index_list)
    usage = np.asarray(usage)
    subsets = {name.lower(): np.flatnonzero(usage == name) for name in ("Public", "Private")}
    return Splits(query=query, gallery=gallery, train=_gld_train(root), relevant=relevant, subsets=subsets)


# --------------------------------------------------------------------------- INRIA Holidays

HOLIDAYS_LAYOUT = """  holidays/jpg/<6 digits>.jpg: the 1,491 images of jpg1.tar.gz and jpg2.tar.gz (100000.jpg, 100001.jpg, ...)
  an image's first 4 digits name its scene; the scene's image ending in 00 is its query
  (--root: the folder holding jpg/, or its parent holding holidays/)"""
HOLIDAYS_NAME = re.compile(r"(\d{4})(\d{2})\.jpg", re.IGNORECASE)


def read_holidays(root: str | os.PathLike, check_images: bool = True) -> Splits:
    """INRIA Holidays (Jégou, Douze and Schmid, ECCV 2008), as its archives unpack.

    The database is every image of ``jpg/`` (keys ``jpg/<name>``, by name); images of one
    scene share their first 4 digits, and the scene's image whose last two are ``00`` is its
    query. A query's positives are the other images of its scene, and its own image is
    removed from its ranking (setup ``all``, scored as Jégou's evaluation does: the AP of
    :func:`unicom.evaluate.revisited_metrics`). A name of another form, or a scene without
    its ``00`` image or without a second image, is an error: nothing is guessed.
    """
    folder = _dataset_folder(Path(root), ["jpg"], ["holidays", "Holidays"], HOLIDAYS_LAYOUT)
    images = folder / "jpg"
    names = sorted(entry.name for entry in os.scandir(images) if not entry.name.startswith("."))
    others = [name for name in names if not HOLIDAYS_NAME.fullmatch(name)]
    if others:
        raise InputError(f"{images}: {len(others)} files are not named as Holidays' images (6 digits, .jpg), e.g. "
                         f"{', '.join(others[:3])}; move them out of the folder. Expected layout:\n{HOLIDAYS_LAYOUT}")
    scenes: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        scenes.setdefault(HOLIDAYS_NAME.fullmatch(name).group(1), []).append(row)
    if not scenes:
        raise InputError(f"{images}: no images; expected layout:\n{HOLIDAYS_LAYOUT}")
    queries, positives, ignored = [], [], []
    for scene, rows in scenes.items():
        query = [row for row in rows if HOLIDAYS_NAME.fullmatch(names[row]).group(2) == "00"]
        if not query or len(rows) < 2:
            what = f"no query image ({scene}00.jpg)" if not query else "no image but its query"
            raise InputError(f"{images}: scene {scene} has {what}: a Holidays scene is its query {scene}00.jpg and at "
                             f"least one other image of the same first 4 digits; restore the archive's images")
        queries.append(query[0])
        positives.append(np.asarray([row for row in rows if row != query[0]], dtype=np.int64))
        ignored.append(np.asarray(query, dtype=np.int64))
    keys = [f"jpg/{name}" for name in names]
    gallery = ImageList([str(folder / k) for k in keys], keys)
    query = ImageList([gallery.paths[row] for row in queries], [keys[row] for row in queries])
    if check_images:
        _check_images(gallery.paths, HOLIDAYS_LAYOUT, images)
    return Splits(query=query, gallery=gallery, setups={"all": (positives, ignored)})


# --------------------------------------------------------------------------- UKBench

UKBENCH_LAYOUT = """  full/ukbench<5 digits>.jpg: the 10,200 images of ukbench.zip (ukbench00000.jpg ... ukbench10199.jpg)
  images 4n to 4n+3 show object n; every image is a query
  (--root: the folder holding full/, or its parent holding ukbench/)"""
UKBENCH_NAME = re.compile(r"ukbench(\d{5})\.jpg", re.IGNORECASE)
UKBENCH_GROUP = 4


def read_ukbench(root: str | os.PathLike, check_images: bool = True) -> Splits:
    """UKBench (Nistér and Stewénius, CVPR 2006), as ``ukbench.zip`` unpacks.

    The images of ``full/`` (keys ``full/<name>``, by number) are the database and, each in
    turn, the queries; images ``4n`` to ``4n + 3`` show the same object and are a query's
    relevant images, its own included, as in the N-S score: the number of them among the
    first 4 results (4 x the R-precision here, every R being 4). A name of another form, or an
    object of other than 4 images, is an error: nothing is guessed.
    """
    folder = _dataset_folder(Path(root), ["full"], ["ukbench", "UKBench"], UKBENCH_LAYOUT)
    images = folder / "full"
    names = [entry.name for entry in os.scandir(images) if not entry.name.startswith(".")]
    others = sorted(name for name in names if not UKBENCH_NAME.fullmatch(name))
    if others:
        raise InputError(f"{images}: {len(others)} files are not named as UKBench's images (ukbench<5 digits>.jpg), "
                         f"e.g. {', '.join(others[:3])}; move them out of the folder. Expected layout:\n{UKBENCH_LAYOUT}")
    if not names:
        raise InputError(f"{images}: no images; expected layout:\n{UKBENCH_LAYOUT}")
    by_name: dict[int, str] = {}
    for name in sorted(names):
        number = int(UKBENCH_NAME.fullmatch(name).group(1))
        if number in by_name:
            raise InputError(f"{images}: image number {number:05d} appears under 2 names ({by_name[number]}, {name}: "
                             "ukbench<number>.jpg in another case): keep one file per number")
        by_name[number] = name
    numbers = sorted(by_name)
    groups: dict[int, list[int]] = {}
    for row, number in enumerate(numbers):
        groups.setdefault(number // UKBENCH_GROUP, []).append(row)
    for group, rows in groups.items():
        if len(rows) != UKBENCH_GROUP:
            first = group * UKBENCH_GROUP
            missing = [f"ukbench{n:05d}.jpg" for n in range(first, first + UKBENCH_GROUP) if n not in by_name]
            raise InputError(f"{images}: object {group} has {len(rows)} of its {UKBENCH_GROUP} images (missing "
                             f"{', '.join(missing)}): every query's score counts its object's 4 images; restore them "
                             "from the archive")
    keys = [f"full/{by_name[number]}" for number in numbers]
    database = ImageList([str(folder / k) for k in keys], keys)
    if check_images:
        _check_images(database.paths, UKBENCH_LAYOUT, images)
    relevant = [np.asarray(groups[number // UKBENCH_GROUP], dtype=np.int64) for number in numbers]
    # one list for both sides: the query set is the database, each image ranked among all, its own included
    return Splits(query=database, gallery=database, relevant=relevant)


# --------------------------------------------------------------------------- INRIA Copydays

COPYDAYS_LAYOUT = """  original/<6 digits>.jpg: the 157 originals (200000.jpg, 200100.jpg, ...)
  strong/<6 digits>.jpg: the 229 strongly attacked copies (print-and-scan, paint, blur, ...)
  jpegqual/<quality>/<6 digits>.jpg, crops/<percent>/<6 digits>.jpg: the JPEG and crop attacks (optional)
  an image's first 4 digits name the original it copies
  (--root: the folder holding original/ and strong/, or its parent holding copydays/)"""
COPYDAYS_ATTACKS = ("strong", "jpegqual", "crops")  # strong is the benchmark's headline, the others optional


def _copydays_images(folder: Path, relative: str) -> list[str]:
    """The image names of ``folder`` (``relative`` to the dataset, for the keys), in order;
    a name of another form than Holidays' 6 digits is an error."""
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file() and not entry.name.startswith("."))
    others = [name for name in names if not HOLIDAYS_NAME.fullmatch(name)]
    if others:
        raise InputError(f"{folder}: {len(others)} files are not named as Copydays' images (6 digits, .jpg), e.g. "
                         f"{', '.join(others[:3])}; move them out of {relative}/. Expected layout:\n{COPYDAYS_LAYOUT}")
    if not names:
        raise InputError(f"{folder}: no images; expected layout:\n{COPYDAYS_LAYOUT}")
    return names


def read_copydays(root: str | os.PathLike, check_images: bool = True) -> Splits:
    """INRIA Copydays (Douze et al., CIVR 2009), as its archives unpack, for copy detection.

    The gallery is the originals (``original/``, keys ``original/<name>``); the queries are
    the attacked copies: ``strong/`` and, when present, every quality of ``jpegqual/`` and
    every percentage of ``crops/`` (keys ``strong/<name>``, ``jpegqual/<q>/<name>``, ...).
    A copy's one positive is the original of its first 4 digits. Each attack folder is a setup
    scored alone (``strong``, ``jpegqual/3``, ..., ``crops/80``), beside ``jpegqual`` and
    ``crops`` (all their folders) and ``all`` (every copy), with the AP of Jégou's evaluation
    (:func:`unicom.evaluate.revisited_metrics`), as DINO's copy-detection evaluation scores
    it. A name of another form, two originals of one number, or a copy of no original is an
    error: nothing is guessed.
    """
    folder = _dataset_folder(Path(root), ["original"], ["copydays", "Copydays"], COPYDAYS_LAYOUT)
    _require(folder / "strong", COPYDAYS_LAYOUT)
    originals = _copydays_images(folder / "original", "original")
    by_number: dict[str, int] = {}
    for row, name in enumerate(originals):
        number = HOLIDAYS_NAME.fullmatch(name).group(1)
        if number in by_number:
            raise InputError(f"{folder / 'original'}: {originals[by_number[number]]} and {name} are both originals "
                             f"{number}xx: a Copydays original is the one image of its first 4 digits; keep one")
        by_number[number] = row
    blocks = ["strong"]
    for attack in COPYDAYS_ATTACKS[1:]:
        if (folder / attack).is_dir():
            levels = sorted((entry.name for entry in os.scandir(folder / attack) if entry.is_dir()), key=_natural)
            if not levels:
                raise InputError(f"{folder / attack}: no sub-folders; expected layout:\n{COPYDAYS_LAYOUT}")
            blocks += [f"{attack}/{level}" for level in levels]
    keys, positives, block_rows = [], [], {}
    for block in blocks:
        names = _copydays_images(folder / block, block)
        block_rows[block] = np.arange(len(keys), len(keys) + len(names))
        for name in names:
            number = HOLIDAYS_NAME.fullmatch(name).group(1)
            if number not in by_number:
                raise InputError(f"{folder / block / name}: copies no original ({folder / 'original'} has no "
                                 f"{number}xx image); restore the originals from the archive")
            keys.append(f"{block}/{name}")
            positives.append(np.asarray([by_number[number]], dtype=np.int64))
    gallery = ImageList([str(folder / "original" / name) for name in originals], [f"original/{n}" for n in originals])
    query = ImageList([str(folder / key) for key in keys], keys)
    if check_images:
        _check_images(gallery.paths + query.paths, COPYDAYS_LAYOUT, folder)
    nothing = np.zeros(0, dtype=np.int64)
    setups = {"strong": block_rows["strong"]}
    for attack in COPYDAYS_ATTACKS[1:]:
        levels = [block for block in blocks if block.startswith(attack + "/")]
        if levels:
            setups |= {block: block_rows[block] for block in levels}
            setups[attack] = np.concatenate([block_rows[block] for block in levels])
    setups["all"] = np.arange(len(keys))

    def scored(rows: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The positives of the queries ``rows``, none for the others (left out of the setup)."""
        chosen = np.zeros(len(keys), dtype=bool)
        chosen[rows] = True
        return [positives[q] if chosen[q] else nothing for q in range(len(keys))], [nothing] * len(keys)

    return Splits(query=query, gallery=gallery, setups={name: scored(rows) for name, rows in setups.items()})


# --------------------------------------------------------------------------- generic


FOLDER_LAYOUT = "  <class>/<image files>, one sub-folder per class"
TABLE_LAYOUT = """  a CSV or parquet table with columns path, label and optionally split
      (train | test | query | gallery); paths relative to the table's folder"""


def read_folder(root: str | os.PathLike, check_images: bool = True) -> Splits:
    """Any folder with one sub-folder per class: leave-one-out over all its images (found by
    listing the folder, so ``check_images`` has nothing to check)."""
    return Splits(query=read_image_folder(root))


def read_csv(path: str | os.PathLike, check_images: bool = True) -> Splits:
    """A table of (path, label[, split]). Without ``split``: leave-one-out over all rows.

    With ``split``: ``query`` rows against ``gallery`` rows, or ``test`` rows leave-one-out;
    ``train`` rows form the train split.
    """
    path = Path(path)
    images = read_table(path, caption_column=None)
    if images.labels is None:
        raise InputError(f"{path}: no 'label' column; evaluation needs a class per image")
    split = _split_column(path)
    evaluated = np.ones(len(images), dtype=bool) if split is None else split != "train"
    if check_images:
        _check_images([p for p, e in zip(images.paths, evaluated) if e and not storage.is_url(p)], TABLE_LAYOUT, path)
    if split is None:
        _require_unique_images(images.keys, "leave-one-out", path)
        return Splits(query=images)
    known = {"train", "test", "query", "gallery"}
    unknown = sorted(set(split) - known)
    if unknown:
        raise InputError(f"{path}: column 'split' holds {unknown}; use train, test, query or gallery")
    parts = {name: images.subset(split == name) for name in known if (split == name).any()}
    for name in ("test", "query", "gallery"):
        if name in parts:
            _require_unique_images(parts[name].keys, name, path)
    if "query" in parts or "gallery" in parts:
        if not {"query", "gallery"} <= set(parts):
            raise InputError(f"{path}: rows marked query need rows marked gallery, and the reverse")
        # by key and by the file (the same image under another key, or written ./a.jpg and a.jpg)
        gallery_keys, gallery_paths = set(parts["gallery"].keys), {storage.same_file(p) for p in parts["gallery"].paths}
        shared = [key for key, p in zip(parts["query"].keys, parts["query"].paths)
                  if key in gallery_keys or storage.same_file(p) in gallery_paths]
        if shared:
            raise InputError(
                f"{path}: {len(shared)} image{'s' if len(shared) > 1 else ''} marked query {'are' if len(shared) > 1 else 'is'} "
                f"also marked gallery, e.g. {', '.join(shared[:3])}; each would find itself first and lift every score: "
                "mark the images split=test to search them leave-one-out, or keep the queries out of the gallery")
        return Splits(query=parts["query"], gallery=parts["gallery"], train=parts.get("train"))
    if "test" not in parts:
        raise InputError(f"{path}: no row is marked test (or query/gallery); nothing to evaluate")
    return Splits(query=parts["test"], train=parts.get("train"))


def _split_column(path: Path) -> np.ndarray | None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        names = pq.ParquetFile(path).schema_arrow.names
        table = pq.read_table(path, columns=["split"]) if "split" in names else None
    else:
        table = pacsv.read_csv(path)
        table = table.select(["split"]) if "split" in table.column_names else None
    if table is None:
        return None
    return np.asarray([str(v).strip().lower() for v in table.column("split").to_pylist()])
