"""Benchmark datasets in their official layouts, as data: name -> reader, protocol, metric.

Retrieval (:data:`RETRIEVAL_BENCHMARKS`): ``load_retrieval_benchmark(name, root)`` returns
a :class:`RetrievalProtocol` (query, gallery or ``None`` for leave-one-out, train, the k's
of Recall@K, the headline metric, and relevance lists where the benchmark has them).

Image-text retrieval (:data:`CAPTION_BENCHMARKS`): ``load_caption_benchmark(name, root)``
returns a :class:`~unicom.data.benchmarks.captions.CaptionSplit` (the images, every caption,
and which image each describes).

Classification (:data:`CLASSIFICATION_BENCHMARKS`, the 13 linear-probe datasets):
``load_classification_benchmark(name, root)`` returns the train and test splits through
torchvision's dataset classes (never downloading unless ``download=True``).

Add a dataset by adding a row: a reader ``"module:function"`` taking the folder (plus the
row's ``options`` and ``check_images``) and returning :class:`~unicom.data.benchmarks.retrieval.Splits`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unicom.data.lists import ImageList
from unicom.errors import InputError


@dataclass(frozen=True)
class RetrievalBenchmark:
    """One registry row: where to read it and how it is scored."""

    reader: str
    ks: tuple[int, ...]
    metric: str
    description: str
    options: dict[str, Any] = field(default_factory=dict)


_R = "unicom.data.benchmarks.retrieval:"
RETRIEVAL_BENCHMARKS: dict[str, RetrievalBenchmark] = {
    "cub": RetrievalBenchmark(
        _R + "read_cub", (1, 2, 4, 8), "recall@1", "CUB-200-2011, classes 101-200, leave-one-out"),
    "cars196": RetrievalBenchmark(
        _R + "read_cars196", (1, 2, 4, 8), "recall@1", "Cars196, classes 99-196, leave-one-out"),
    "sop": RetrievalBenchmark(
        _R + "read_sop", (1, 10, 100, 1000), "recall@1", "Stanford Online Products, Ebay_test, leave-one-out"),
    "inshop": RetrievalBenchmark(
        _R + "read_inshop", (1, 10, 20, 30, 40, 50), "recall@1", "DeepFashion In-Shop, query vs gallery"),
    "inaturalist": RetrievalBenchmark(
        _R + "read_inaturalist", (1, 4, 16, 32), "recall@1", "iNaturalist 2018 metric split, leave-one-out"),
    "vehicleid-small": RetrievalBenchmark(
        _R + "read_vehicleid", (1, 5), "recall@1", "PKU VehicleID, 800 vehicles, leave-one-out", {"size": "small"}),
    "vehicleid-medium": RetrievalBenchmark(
        _R + "read_vehicleid", (1, 5), "recall@1", "PKU VehicleID, 1600 vehicles, leave-one-out", {"size": "medium"}),
    "vehicleid-large": RetrievalBenchmark(
        _R + "read_vehicleid", (1, 5), "recall@1", "PKU VehicleID, 2400 vehicles, leave-one-out", {"size": "large"}),
    "gldv2": RetrievalBenchmark(
        _R + "read_gldv2", (1, 10, 100), "map@100", "Google Landmarks v2 retrieval, Public/Private vs index"),
    "roxford5k": RetrievalBenchmark(
        "unicom.data.benchmarks.revisited:read_revisited", (1, 5, 10), "map_medium",
        "Revisited Oxford5k, 70 cropped queries vs 4,993 images, easy/medium/hard", {"name": "roxford5k"}),
    "rparis6k": RetrievalBenchmark(
        "unicom.data.benchmarks.revisited:read_revisited", (1, 5, 10), "map_medium",
        "Revisited Paris6k, 70 cropped queries vs 6,322 images, easy/medium/hard", {"name": "rparis6k"}),
    "holidays": RetrievalBenchmark(
        _R + "read_holidays", (1, 5, 10), "map_all",
        "INRIA Holidays, 500 queries vs 1,491 images (each query's own left out), mAP"),
    "ukbench": RetrievalBenchmark(
        _R + "read_ukbench", (1, 4), "r_precision",
        "UKBench, each of 10,200 images vs all, its object's 4 images relevant; N-S score = 4 x R-precision"),
    "copydays": RetrievalBenchmark(
        _R + "read_copydays", (1, 5, 10), "map_strong",
        "INRIA Copydays copy detection, 229 strong (and JPEG, crop) copies vs 157 originals, mAP per attack"),
    "folder": RetrievalBenchmark(
        _R + "read_folder", (1, 2, 4, 8), "recall@1", "a folder with one sub-folder per class, leave-one-out"),
    "csv": RetrievalBenchmark(
        _R + "read_csv", (1, 2, 4, 8), "recall@1", "a CSV/parquet of path,label[,split]"),
}
_C = "unicom.data.benchmarks.captions:"
# image-text retrieval: captions search images and images search captions (metric: text-to-image recall@1)
CAPTION_BENCHMARKS: dict[str, RetrievalBenchmark] = {
    "coco-captions": RetrievalBenchmark(
        _C + "read_coco_captions", (1, 5, 10), "recall@1", "MS-COCO captions, Karpathy 5k test split"),
    "flickr30k": RetrievalBenchmark(
        _C + "read_flickr30k", (1, 5, 10), "recall@1", "Flickr30k, Karpathy 1k test split"),
    "captions": RetrievalBenchmark(
        _C + "read_caption_table", (1, 5, 10), "recall@1", "a CSV/parquet of path,caption"),
}
URL_ROOTS = ("folder",)  # the benchmarks whose root may be a URL (s3://…)
ALIASES = {"cars": "cars196", "stanford_online_products": "sop", "in-shop": "inshop", "inat": "inaturalist",
           "inat2018": "inaturalist", "vehicleid": "vehicleid-small", "gld": "gldv2", "gldv2-retrieval": "gldv2",
           "roxford": "roxford5k", "rparis": "rparis6k", "coco": "coco-captions", "mscoco": "coco-captions",
           "mscoco_captions": "coco-captions", "flickr": "flickr30k", "inria-holidays": "holidays",
           "ukb": "ukbench", "inria-copydays": "copydays"}


@dataclass
class RetrievalProtocol:
    """A retrieval benchmark ready to score.

    ``gallery is None``: leave-one-out over ``query``. ``relevant`` (GLDv2): per query, the
    gallery rows that count as relevant, instead of labels. ``subsets``: query rows
    reported separately (GLDv2 ``public``/``private``). ``setups`` (Revisited
    Oxford/Paris): name -> (positive rows, ignored rows) per query, instead of labels;
    ``query_boxes``: (Nq, 4) x1, y1, x2, y2, the crop of each query image to embed.
    ``train`` feeds fine-tuning and the PCA baseline.
    """

    name: str
    query: ImageList
    gallery: ImageList | None
    train: ImageList | None
    ks: tuple[int, ...]
    metric: str
    relevant: list[np.ndarray] | None = None
    subsets: dict[str, np.ndarray] = field(default_factory=dict)
    query_boxes: np.ndarray | None = None
    setups: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] | None = None


def _resolve(target: str):
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def canonical_name(name: str) -> str:
    name = name.lower()
    return ALIASES.get(name, name)


def local_root(root: str | os.PathLike, dataset: str) -> str | os.PathLike:
    """``root`` unchanged when it is a local folder. A URL (``s3://…``) is refused: the
    readers open list files and images on this machine, and ``Path`` would quietly turn
    ``s3://bucket/data`` into a missing local folder ``s3:/bucket/data``."""
    from unicom import storage

    if storage.is_url(os.fspath(root)):
        raise InputError(
            f"{os.fspath(root)}: benchmark {dataset} is read from this machine, not from a URL; "
            f"copy it here (aws s3 sync, gsutil -m rsync -r) and give the local copy; embeddings kept at a URL are "
            f"scored with unicom evaluate --embeddings URL --dataset {dataset} --root <a local copy of its list files>"
        )
    return root


def load_retrieval_benchmark(name: str, root: str | os.PathLike, check_images: bool = True) -> RetrievalProtocol:
    """Read benchmark ``name`` (a key of :data:`RETRIEVAL_BENCHMARKS`) from ``root``.

    ``check_images``: the evaluation images must exist (to embed them); ``False`` reads the
    lists alone, for embeddings computed earlier (matched by key).
    """
    key = canonical_name(name)
    if key not in RETRIEVAL_BENCHMARKS:
        raise InputError(f"unknown retrieval benchmark {name!r}; known: {', '.join(RETRIEVAL_BENCHMARKS)}")
    spec = RETRIEVAL_BENCHMARKS[key]
    # an image folder is listed where it is (read_image_folder lists a URL too); the others open list files here
    splits = _resolve(spec.reader)(root if key in URL_ROOTS else local_root(root, key), **spec.options,
                                   check_images=check_images)
    return RetrievalProtocol(
        name=key,
        query=splits.query,
        gallery=splits.gallery,
        train=splits.train,
        ks=spec.ks,
        metric=spec.metric,
        relevant=splits.relevant,
        subsets=splits.subsets,
        query_boxes=splits.query_boxes,
        setups=splits.setups,
    )


def load_caption_benchmark(name: str, root: str | os.PathLike, check_images: bool = True):
    """Read image-text benchmark ``name`` (a key of :data:`CAPTION_BENCHMARKS`) from ``root``:
    a :class:`~unicom.data.benchmarks.captions.CaptionSplit`."""
    key = canonical_name(name)
    if key not in CAPTION_BENCHMARKS:
        raise InputError(f"unknown image-text benchmark {name!r}; known: {', '.join(CAPTION_BENCHMARKS)}")
    return _resolve(CAPTION_BENCHMARKS[key].reader)(local_root(root, key), check_images=check_images)


from unicom.data.benchmarks.classification import (  # noqa: E402  (the table lives with its readers)
    CLASSIFICATION_BENCHMARKS,
    ClassificationBenchmark,
    ClassificationSplit,
    load_classification_benchmark,
)

__all__ = [
    "RETRIEVAL_BENCHMARKS",
    "CAPTION_BENCHMARKS",
    "CLASSIFICATION_BENCHMARKS",
    "ALIASES",
    "RetrievalBenchmark",
    "RetrievalProtocol",
    "ClassificationBenchmark",
    "ClassificationSplit",
    "canonical_name",
    "load_retrieval_benchmark",
    "load_caption_benchmark",
    "load_classification_benchmark",
    "local_root",
]
