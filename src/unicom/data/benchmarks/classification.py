"""The 13 linear-probe datasets, read through torchvision's dataset classes.

Each loader returns the train and test :class:`ClassificationSplit` of CLIP's linear-probe
protocol: file paths (or in-memory images for CIFAR) with integer labels. torchvision
parses the official layouts and split files; it never downloads unless ``download=True``.
Images are listed, not decoded: the datasets are opened with a loader that returns the
file path, so listing ImageNet costs no image decoding. Stanford Cars' ``.mat`` annotations
are read here as torchvision reads them, so that they can be read without the images.

Splits (train / test):

* CIFAR-10, CIFAR-100, Food-101, Stanford Cars: the official train / test.
* Flowers-102, DTD (partition 1): official train + val / test.
* FGVC-Aircraft (variants), Oxford-IIIT Pets: trainval / test.
* ImageNet-1K: train / val.
* SUN397: partition 1 (``Training_01.txt`` / ``Testing_01.txt``, from the dataset's
  ``Partitions`` archive, in the root or the ``SUN397`` folder).
* Caltech-101: 30 images per class train (seeded), the rest test; torchvision's 101
  classes (``BACKGROUND_Google`` excluded).
* EuroSAT: a seeded draw of 15,000 images (all if fewer): two thirds train, one third test.
* Birdsnap: ``test_images.txt`` test, the other images of ``images.txt`` train; images
  that were not downloaded are skipped and counted (Flickr no longer serves many).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from unicom.data.lists import text_lines
from unicom.errors import InputError

SEED = 0


@dataclass
class ClassificationSplit:
    """``images``: file paths or PIL images (N); ``labels``: int64 (N,); ``class_names``."""

    images: list[Any]
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class ClassificationBenchmark:
    """One registry row. ``metric``: ``accuracy`` or ``mean_per_class`` (CLIP's choice)."""

    loader: Callable[..., tuple[ClassificationSplit, ClassificationSplit]]
    metric: str
    layout: str
    options: dict[str, Any] = field(default_factory=dict)


def _path(p, *rest):
    return p


def _open(cls_name: str, layout: str, *args, **kwargs):
    """A torchvision dataset, with 'not found' turned into an error that shows the layout."""
    import torchvision.datasets as tvd

    try:
        return getattr(tvd, cls_name)(*args, **kwargs)
    except (RuntimeError, FileNotFoundError) as error:
        raise InputError(f"{cls_name} not found under {args[0]} ({error}); expected layout:\n{layout}") from error


def _listed(dataset) -> tuple[list[str], np.ndarray]:
    """(paths, labels) of a torchvision dataset opened with the path-returning loader."""
    pairs = [dataset[i] for i in range(len(dataset))]
    return [str(p) for p, _ in pairs], np.asarray([int(y) for _, y in pairs], dtype=np.int64)


def _split(dataset, layout: str, **ignored) -> ClassificationSplit:
    paths, labels = _listed(dataset)
    return ClassificationSplit(paths, labels, list(getattr(dataset, "classes", [])))


def _concat(a: ClassificationSplit, b: ClassificationSplit) -> ClassificationSplit:
    return ClassificationSplit(a.images + b.images, np.concatenate([a.labels, b.labels]), a.class_names)


def _subset(split: ClassificationSplit, index: np.ndarray) -> ClassificationSplit:
    return ClassificationSplit([split.images[i] for i in index], split.labels[index], split.class_names)


# --------------------------------------------------------------------------- loaders


def _official(cls_name: str, train_splits: tuple, test_split, split_arg: str = "split", **extra):
    """Loader for datasets whose class takes a split argument (``split=`` or ``train=``)."""

    def load(root, download=False, layout=""):
        def part(value):
            kwargs = {split_arg: value, "download": download, "loader": _path, **extra}
            return _split(_open(cls_name, layout, root, **kwargs), layout)

        train = part(train_splits[0])
        for more in train_splits[1:]:
            train = _concat(train, part(more))
        return train, part(test_split)

    return load


def mat_variable(path: Path, name: str, layout: str, fields: Sequence[str] = ()) -> np.ndarray:
    """Variable ``name`` of the MATLAB file ``path`` (squeezed, at least 1-d), as scipy reads it;
    ``fields``: the struct fields each of its records must have."""
    from scipy.io import loadmat

    if not path.is_file():
        raise InputError(f"{path}: not found; expected layout:\n{layout}")
    try:
        mat = loadmat(str(path), squeeze_me=True)
    except Exception as error:  # scipy raises several types for damaged files
        raise InputError(f"{path}: not a readable MATLAB file ({error})") from error
    if name not in mat:
        raise InputError(f"{path}: no {name!r} variable; expected layout:\n{layout}")
    value = np.atleast_1d(mat[name])
    absent = [field for field in fields if field not in (value.dtype.names or ())]
    if absent:
        raise InputError(f"{path}: the records of {name!r} have no {absent[0]!r} field (they have "
                         f"{', '.join(value.dtype.names or ()) or 'none'}); expected layout:\n{layout}")
    return value


def load_stanford_cars(root, download=False, layout="", check_images=True):
    """Stanford Cars in torchvision's layout (``root/stanford_cars/``: ``devkit/cars_train_annos.mat``,
    ``devkit/cars_meta.mat``, ``cars_test_annos_withlabels.mat``, ``cars_train/``, ``cars_test/``),
    read as torchvision's StanfordCars reads it: labels are the annotations' class - 1, class
    names those of ``cars_meta.mat``. ``check_images=False`` reads the annotations alone (the
    image folders may be absent)."""
    if download:
        raise InputError(f"Stanford Cars cannot be downloaded (its original URL is gone); place it under {root}:\n{layout}")
    base = Path(root) / "stanford_cars"

    from unicom.data.benchmarks.retrieval import _class_number

    def part(annotations: Path, images: Path) -> ClassificationSplit:
        rows = mat_variable(annotations, "annotations", layout, fields=("fname", "class"))
        if check_images and not images.is_dir():
            raise InputError(f"{images}: image folder not found (listed in {annotations.name}); expected layout "
                             f"under {root}:\n{layout}")
        labels = [_class_number(row["class"], len(classes), annotations, f"annotation {number}") - 1
                  for number, row in enumerate(rows, 1)]
        return ClassificationSplit([str(images / str(row["fname"])) for row in rows],
                                   np.asarray(labels, dtype=np.int64), classes)

    classes = [str(name) for name in mat_variable(base / "devkit" / "cars_meta.mat", "class_names", layout)]
    return (part(base / "devkit" / "cars_train_annos.mat", base / "cars_train"),
            part(base / "cars_test_annos_withlabels.mat", base / "cars_test"))


def load_cifar(root, download=False, layout="", hundred=False):
    """CIFAR-10/100 from the pickled batches; images are PIL images in memory (60,000 small)."""
    from PIL import Image

    def part(train):
        dataset = _open("CIFAR100" if hundred else "CIFAR10", layout, root, train=train, download=download)
        images = [Image.fromarray(array) for array in dataset.data]
        return ClassificationSplit(images, np.asarray(dataset.targets, dtype=np.int64), list(dataset.classes))

    return part(True), part(False)


def load_pets(root, download=False, layout=""):
    def part(split):
        dataset = _open("OxfordIIITPet", layout, root, split=split, download=download)
        # the class has no loader argument: its image paths and labels are read directly
        paths = [str(p) for p in dataset._images]
        return ClassificationSplit(paths, np.asarray(dataset._labels, dtype=np.int64), list(dataset.classes))

    return part("trainval"), part("test")


def load_caltech101(root, download=False, layout="", per_class=30):
    dataset = _open("Caltech101", layout, root, download=download)
    paths = [
        os.path.join(dataset.root, "101_ObjectCategories", dataset.categories[y], f"image_{i:04d}.jpg")
        for i, y in zip(dataset.index, dataset.y)
    ]
    everything = ClassificationSplit(paths, np.asarray(dataset.y, dtype=np.int64), list(dataset.categories))
    rng = np.random.default_rng(SEED)
    train = []
    for label in range(len(everything.class_names)):
        members = np.flatnonzero(everything.labels == label)
        train.extend(rng.permutation(members)[:per_class].tolist())
    train = np.sort(np.asarray(train, dtype=np.int64))
    test = np.setdiff1d(np.arange(len(paths)), train)
    return _subset(everything, train), _subset(everything, test)


def load_eurosat(root, download=False, layout="", total=15_000):
    everything = _split(_open("EuroSAT", layout, root, download=download, loader=_path), layout)
    order = np.random.default_rng(SEED).permutation(len(everything))[:total]
    cut = round(len(order) * 2 / 3)
    return _subset(everything, np.sort(order[:cut])), _subset(everything, np.sort(order[cut:]))


def load_sun397(root, download=False, layout=""):
    dataset = _open("SUN397", layout, root, download=download, loader=_path)
    everything = _split(dataset, layout)
    data_dir = Path(root) / "SUN397"
    names = {}
    for split, file in (("train", "Training_01.txt"), ("test", "Testing_01.txt")):
        for folder in (Path(root), Path(root) / "Partitions", data_dir, data_dir / "Partitions"):
            if (folder / file).is_file():
                names[split] = {line.strip() for line in text_lines(folder / file) if line.strip()}
                break
        else:
            raise InputError(f"{Path(root) / file}: not found (SUN397's partition 1 file); expected layout:\n{layout}")
    relative = ["/" + Path(p).relative_to(data_dir).as_posix() for p in everything.images]
    train = np.asarray([i for i, r in enumerate(relative) if r in names["train"]], dtype=np.int64)
    test = np.asarray([i for i, r in enumerate(relative) if r in names["test"]], dtype=np.int64)
    if len(train) == 0 or len(test) == 0:
        raise InputError(f"{data_dir}: no image of Training_01.txt / Testing_01.txt was found under SUN397/")
    return _subset(everything, train), _subset(everything, test)


def load_imagenet(root, download=False, layout=""):
    if download:
        raise InputError("ImageNet cannot be downloaded automatically; get it from image-net.org")
    train = _split(_open("ImageNet", layout, root, split="train", loader=_path), layout)
    test = _split(_open("ImageNet", layout, root, split="val", loader=_path), layout)
    return train, test


def load_birdsnap(root, download=False, layout=""):
    """Birdsnap from ``images.txt`` and ``test_images.txt``; images under ``download/images``."""
    if download:
        raise InputError(
            "Birdsnap images come from Flickr URLs: run the dataset's get_birdsnap.py, then point --root at its folder"
        )
    root = Path(root)
    for name in ("images.txt", "test_images.txt"):
        if not (root / name).is_file():
            raise InputError(f"{root / name}: not found; expected layout:\n{layout}")
    image_dir = next((d for d in (root / "download" / "images", root / "images") if d.is_dir()), None)
    if image_dir is None:
        raise InputError(f"{root / 'download' / 'images'}: folder not found; expected layout:\n{layout}")
    rows = _birdsnap_rows(root / "images.txt", ("path", "species_id"), "species_id")
    test_paths = set(_read_test_list(root / "test_images.txt"))
    species = sorted({row["species_id"] for row in rows})
    names = _species_names(root, species)
    label_of = {s: i for i, s in enumerate(species)}
    splits = {"train": ([], []), "test": ([], [])}
    missing = 0
    for row in rows:
        path = image_dir / row["path"]
        if not path.is_file():
            missing += 1
            continue
        images, labels = splits["test" if row["path"] in test_paths else "train"]
        images.append(str(path))
        labels.append(label_of[row["species_id"]])
    if missing:
        warnings.warn(f"Birdsnap: {missing} of {len(rows)} images listed in images.txt are not under {image_dir}; skipped")
    for split, (images, _) in splits.items():
        if not images:
            raise InputError(f"{image_dir}: none of the Birdsnap {split} images was found")
    return tuple(ClassificationSplit(images, np.asarray(labels, dtype=np.int64), names) for images, labels in splits.values())


def _birdsnap_rows(path: Path, columns: tuple[str, ...], number: str) -> list[dict]:
    """The rows of a tab-separated Birdsnap list with a header (``images.txt``, ``species.txt``),
    each holding ``columns``, its ``number`` column as an int. A header without them, a row
    short of one (fewer fields than the header) or a ``number`` that is not a whole number
    is an :class:`InputError` naming the file and the line."""
    import csv

    reader = csv.DictReader(text_lines(path, newline=""), delimiter="\t")
    header = reader.fieldnames or []
    if not set(columns) <= set(header):
        raise InputError(f"{path}: expected tab-separated columns including {', '.join(columns)}; the header has "
                         f"{header}")
    rows = []
    for row in reader:
        absent = [column for column in columns if row.get(column) is None]
        if absent:
            fields = sum(value is not None for key, value in row.items() if key is not None)
            raise InputError(f"{path}: line {reader.line_num} has {fields} tab-separated field{'s' if fields != 1 else ''} where the header has "
                             f"{len(header)}: no {absent[0]}; fix the line or drop it")
        try:
            row[number] = int(row[number])
        except ValueError:
            raise InputError(f"{path}: line {reader.line_num} has {number} {row[number]!r}, not a number; fix the line "
                             "or drop it") from None
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no rows under the header")
    return rows


def _read_test_list(path: Path) -> list[str]:
    lines = [line.strip() for line in text_lines(path) if line.strip()]
    return lines[1:] if lines and lines[0] == "path" else lines


def _species_names(root: Path, species: list[int]) -> list[str]:
    if not (root / "species.txt").is_file():
        return [str(s) for s in species]
    common = {row["id"]: row["common"] for row in _birdsnap_rows(root / "species.txt", ("id", "common"), "id")}
    return [common.get(s, str(s)) for s in species]


# --------------------------------------------------------------------------- registry

CLASSIFICATION_BENCHMARKS: dict[str, ClassificationBenchmark] = {
    "cifar10": ClassificationBenchmark(
        load_cifar, "accuracy", "  cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta"),
    "cifar100": ClassificationBenchmark(
        load_cifar, "accuracy", "  cifar-100-python/train, test, meta", {"hundred": True}),
    "caltech101": ClassificationBenchmark(
        load_caltech101, "mean_per_class", "  caltech101/101_ObjectCategories/<class>/image_0001.jpg"),
    "stanford_cars": ClassificationBenchmark(
        load_stanford_cars, "accuracy",
        "  stanford_cars/devkit/cars_meta.mat, cars_train_annos.mat;\n"
        "  stanford_cars/cars_test_annos_withlabels.mat; cars_train/, cars_test/"),
    "flowers102": ClassificationBenchmark(
        _official("Flowers102", ("train", "val"), "test"), "mean_per_class",
        "  flowers-102/jpg/, imagelabels.mat, setid.mat"),
    "food101": ClassificationBenchmark(
        _official("Food101", ("train",), "test"), "accuracy",
        "  food-101/meta/train.json, test.json; food-101/images/<class>/<id>.jpg"),
    "sun397": ClassificationBenchmark(
        load_sun397, "accuracy",
        "  SUN397/ClassName.txt, SUN397/<letter>/<class>/sun_*.jpg; Training_01.txt, Testing_01.txt"),
    "dtd": ClassificationBenchmark(
        _official("DTD", ("train", "val"), "test", partition=1), "accuracy",
        "  dtd/dtd/images/<class>/<file>.jpg, dtd/dtd/labels/train1.txt, val1.txt, test1.txt"),
    "fgvc_aircraft": ClassificationBenchmark(
        _official("FGVCAircraft", ("trainval",), "test", annotation_level="variant"), "mean_per_class",
        "  fgvc-aircraft-2013b/data/images/, variants.txt, images_variant_trainval.txt, images_variant_test.txt"),
    "pets": ClassificationBenchmark(
        load_pets, "mean_per_class",
        "  oxford-iiit-pet/images/<name>.jpg, oxford-iiit-pet/annotations/trainval.txt, test.txt"),
    "eurosat": ClassificationBenchmark(
        load_eurosat, "accuracy", "  eurosat/2750/<class>/<file>.jpg"),
    "imagenet": ClassificationBenchmark(
        load_imagenet, "accuracy",
        "  train/<wnid>/*.JPEG, val/<wnid>/*.JPEG, ILSVRC2012_devkit_t12.tar.gz (or meta.bin)"),
    "birdsnap": ClassificationBenchmark(
        load_birdsnap, "accuracy", "  images.txt, test_images.txt, species.txt; download/images/<species dir>/<file>.jpg"),
}
CLASSIFICATION_ALIASES = {"cars": "stanford_cars", "flowers": "flowers102", "aircraft": "fgvc_aircraft",
                          "oxford_pets": "pets", "imagenet1k": "imagenet", "imagenet-1k": "imagenet", "food": "food101"}


def load_classification_benchmark(name: str, root: str | os.PathLike, download: bool = False) -> tuple[
        ClassificationSplit, ClassificationSplit, str]:
    """(train, test, metric) of a linear-probe dataset (a key of :data:`CLASSIFICATION_BENCHMARKS`)."""
    key = CLASSIFICATION_ALIASES.get(name.lower(), name.lower())
    if key not in CLASSIFICATION_BENCHMARKS:
        raise InputError(f"unknown classification dataset {name!r}; known: {', '.join(CLASSIFICATION_BENCHMARKS)}")
    from unicom.data.benchmarks import local_root

    spec = CLASSIFICATION_BENCHMARKS[key]
    root = os.path.expanduser(str(local_root(root, key)))
    if not download and not os.path.isdir(root):
        raise InputError(f"{root}: folder not found; expected layout inside it:\n{spec.layout}")
    train, test = spec.loader(root, download=download, layout=spec.layout, **spec.options)
    return train, test, spec.metric
