"""Zero-shot classification with a model's text tower (CLIP's protocol).

Each class is the mean of its prompts' embeddings: every template (``"a photo of a {c}."``)
is filled with the class name, embedded by the text tower and L2-normalised; their mean,
normalised again, is the class's prototype (open_clip's and clip_benchmark's classifier). An
image is given the class of the prototype nearest by cosine; a tie goes to the lower class.

Templates are open_clip's sets (``openai``: the 80 of CLIP's ImageNet evaluation, the
default; ``simple``: its 7), read from the installed open_clip; ``clip_benchmark``: the
dataset's own set as clip_benchmark evaluates it (18 for CIFAR, 3 for EuroSAT, ...), read
from an installed clip_benchmark (``pip install clip-benchmark``); or a file of one template
per line holding ``{c}``. Class names are the dataset's as torchvision gives them
(underscores as spaces; ImageNet's curated names from open_clip), clip_benchmark's list for
the dataset (``clip_benchmark``: EuroSAT, Flowers-102, Oxford Pets, ImageNet), or a file of
one name per line in label order.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from unicom.errors import InputError

TEMPLATE_SETS = {"openai": "OPENAI_IMAGENET_TEMPLATES", "simple": "SIMPLE_IMAGENET_TEMPLATES"}
CLIP_BENCHMARK = "clip_benchmark"  # the templates of each dataset, from the installed clip_benchmark
CLIP_BENCHMARK_TEMPLATES = "datasets/en_zeroshot_classification_templates.json"
CLIP_BENCHMARK_CLASSES = "datasets/en_classnames.json"
CLIP_BENCHMARK_NAMES = {"imagenet": "imagenet1k", "stanford_cars": "cars", "flowers102": "flowers"}  # ours -> its keys
PLACEHOLDER = "{c}"
TOP_K = 5  # the second accuracy reported: the true class among the 5 nearest prototypes
ROWS_AT_ONCE = 8192  # images scored against every prototype at once


def _lines(path: str | os.PathLike, option: str) -> list[str]:
    from unicom.data.lists import read_lines

    return read_lines(os.fspath(path), f"{option} {path}")


def read_templates(spec: str = "openai", dataset: str | None = None) -> list[str]:
    """``openai`` or ``simple`` (open_clip's sets), ``clip_benchmark`` (the set clip_benchmark
    uses for ``dataset``), or a file of one template per line, each holding ``{c}`` where the
    class name goes."""
    if spec in TEMPLATE_SETS:
        from open_clip import zero_shot_metadata

        return [template(PLACEHOLDER) for template in getattr(zero_shot_metadata, TEMPLATE_SETS[spec])]
    if spec == CLIP_BENCHMARK:
        return clip_benchmark_templates(dataset)
    templates = _lines(spec, "--templates")
    if not templates:
        raise InputError(f"--templates {spec}: no template in the file (one a line, each holding {PLACEHOLDER})")
    without = [number for number, line in enumerate(templates, 1) if PLACEHOLDER not in line]
    if without:
        raise InputError(f"--templates {spec}: template {without[0]} ({templates[without[0] - 1]!r}) has no {PLACEHOLDER}, "
                         "where the class name goes")
    return templates


def _clip_benchmark_sets(file: str, option: str) -> tuple[dict, "os.PathLike"]:
    """One of clip_benchmark's per-dataset JSON files (``{dataset: [...]}``) from its installed
    package, and its path (nothing of the package is imported)."""
    import importlib.util
    import json
    from pathlib import Path

    found = importlib.util.find_spec(CLIP_BENCHMARK)
    if found is None or not found.submodule_search_locations:
        raise InputError(f"{option} {CLIP_BENCHMARK} reads each dataset's lists from clip_benchmark, which is not "
                         f"installed: pip install clip-benchmark, or give {option} another value")
    path = Path(list(found.submodule_search_locations)[0]) / file
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: clip_benchmark's lists cannot be read ({error}); reinstall clip-benchmark") from error


def _clip_benchmark_list(file: str, option: str, dataset: str | None) -> tuple[list[str], "os.PathLike"]:
    sets, path = _clip_benchmark_sets(file, option)
    key = CLIP_BENCHMARK_NAMES.get(dataset, dataset)
    if key not in sets:
        raise InputError(f"{option} {CLIP_BENCHMARK}: clip_benchmark has none for {dataset} (it has "
                         f"{', '.join(sorted(sets))}); give {option} another value")
    return [str(value) for value in sets[key]], path


def clip_benchmark_templates(dataset: str | None) -> list[str]:
    """The templates clip_benchmark evaluates ``dataset`` with, from its installed package
    (its English set)."""
    templates, path = _clip_benchmark_list(CLIP_BENCHMARK_TEMPLATES, "--templates", dataset)
    if not templates or any(PLACEHOLDER not in template for template in templates):
        raise InputError(f"{path}: the prompts of {dataset} are not templates holding {PLACEHOLDER}; reinstall "
                         "clip-benchmark")
    return templates


def class_names(dataset: str, names: Sequence, count: int, path: str | os.PathLike | None = None) -> list[str]:
    """The ``count`` names the prompts say, in label order: from the file ``path`` (one a
    line), or clip_benchmark's list for the dataset (``path`` ``clip_benchmark``: in the label
    order of torchvision's dataset, which the readers here keep), else ImageNet's curated names
    (open_clip's), else the dataset's ``names`` with underscores as spaces (the first of a
    tuple of synonyms)."""
    if path == CLIP_BENCHMARK:
        found, source = _clip_benchmark_list(CLIP_BENCHMARK_CLASSES, "--class-names", dataset)
        if len(found) != count:
            raise InputError(f"--class-names {CLIP_BENCHMARK}: {source} names {len(found)} classes for {dataset}, which "
                             f"has {count} here (its version of the dataset differs); give --class-names FILE")
        return found
    if path is not None:
        found = _lines(path, "--class-names")
        if len(found) != count:
            raise InputError(f"--class-names {path}: {len(found)} names for the {count} classes of {dataset}; give one a "
                             "line, in the order of the class labels")
        return found
    if dataset == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = IMAGENET_CLASSNAMES
    if len(names) != count:
        raise InputError(f"{dataset}: the dataset names {len(names)} classes, not its {count}; give the names the prompts "
                         "should say with --class-names FILE (one a line, in label order)")
    return [str(name[0] if isinstance(name, (tuple, list)) else name).replace("_", " ") for name in names]


def class_prototypes(encoder, names: Sequence[str], templates: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """float32 (C, D), unit rows: each class's prompts embedded, normalised, averaged, normalised."""
    from unicom.embed import embed_texts

    prompts = [template.replace(PLACEHOLDER, name) for name in names for template in templates]
    embedded = embed_texts(encoder, prompts, batch_size)  # unit rows
    means = embedded.reshape(len(names), len(templates), -1).mean(axis=1)
    return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)


def zero_shot_scores(features, labels, prototypes: np.ndarray) -> dict:
    """Accuracy, mean per-class accuracy and top-5 accuracy of the nearest prototype, for
    ``features`` (N, D) with class ``labels`` (N,) and ``prototypes`` (C, D)."""
    import torch

    from unicom.evaluate.metrics import ranked_top_k
    from unicom.evaluate.probe import classification_scores

    features = torch.nn.functional.normalize(torch.as_tensor(np.asarray(features, dtype=np.float32)), dim=1)
    prototypes_t = torch.as_tensor(prototypes)
    labels = np.asarray(labels, dtype=np.int64)
    k = min(TOP_K, len(prototypes))
    nearest = np.empty((len(features), k), dtype=np.int64)
    for start in range(0, len(features), ROWS_AT_ONCE):
        _, indices = ranked_top_k(features[start:start + ROWS_AT_ONCE] @ prototypes_t.T, k)
        nearest[start:start + ROWS_AT_ONCE] = indices.numpy()
    scores = classification_scores(nearest[:, 0], labels)
    scores[f"top{TOP_K}"] = float((nearest == labels[:, None]).any(axis=1).mean())
    return scores
