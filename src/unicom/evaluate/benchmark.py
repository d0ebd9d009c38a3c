"""Benchmark runs: a model (or precomputed embeddings) on a benchmark, end to end.

This is what ``unicom evaluate`` calls. With a model, each split is embedded with the
model's own ``image_transform`` (:func:`unicom.embed.embed_images`) into
``OUT/embeddings/<split>/`` as embedding folders (:mod:`unicom.formats.embeddings`), in
parts of :data:`PART_ROWS` images: a killed run resumes at the first missing part, and
the folders can be given back later as ``--embeddings``. With embeddings, rows are found
by their metadata ``key`` (the reader's keys: paths relative to the dataset folder), or
by an absolute ``path``/``image_path`` column.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from unicom import storage
from unicom.errors import InputError
from unicom.files import sweep_temporaries, write_json_atomic
from unicom.formats.embeddings import (
    CONFIG_FILE,
    OCCURRENCE,
    SHARD_COLUMNS,
    WEIGHTS_CHECKSUM,
    EmbeddingFolders,
    describe_views,
    part_complete,
    read_config,
    read_embedding_folder,
    read_record,
    recorded_flip,
    recorded_scales,
    require_usable_rows,
    row_keys,
    sweep_writer_temporaries,
    views_record,
    write_part,
)
from unicom.progress import progress

PART_ROWS = 10_000
CACHE_CONFIG = "evaluate_embeddings.json"
# the benchmarks whose relevant images are listed per query, so that images of none (distractors) can join the
# gallery: Revisited Oxford/Paris (+1M, Radenović et al.'s revisitop1m), GLDv2, Holidays (+Flickr1M) and UKBench
DISTRACTED = ("roxford5k", "rparis6k", "gldv2", "holidays", "ukbench", "copydays")
WHITENING_METHODS = ("pca", "discriminative")


@dataclass(frozen=True)
class Whitening:
    """What ``whiten`` learns on the embedding folder ``folder`` (a path or URL): a PCA
    whitening (``method="pca"``, :meth:`unicom.evaluate.dims.PCA.whiten`) or a discriminative
    one from its classes (``"discriminative"``,
    :class:`~unicom.evaluate.whitening.DiscriminativeWhitening`), the classes its metadata's
    ``label`` column, or ``labels``, a key,label file. A bare folder means PCA."""

    folder: str | os.PathLike
    method: str = "pca"
    labels: str | os.PathLike | None = None

    def __post_init__(self):
        if self.method not in WHITENING_METHODS:
            raise InputError(f"a whitening is one of {', '.join(WHITENING_METHODS)}; got {self.method!r}")
        if self.labels is not None and self.method != "discriminative":
            raise InputError("labels name the classes a discriminative whitening learns from; a PCA whitening takes "
                             "none: leave the labels out, or ask for the discriminative whitening")
PCA_SEED = 0


# --------------------------------------------------------------------------- embedding folders


def read_labels(labels_file: str | os.PathLike, label_column: str = "label") -> dict:
    """key -> label of a labels file (CSV/parquet with ``key`` and ``label_column``)."""
    from unicom.data.lists import read_table

    table = read_table(labels_file, path_column="key", label_column=label_column, caption_column=None, key_column=None)
    if table.labels is None:
        raise InputError(f"{labels_file}: no {label_column!r} column")
    # labels that are names stay names, as in the metadata: --classes names them
    values = table.labels.tolist() if table.class_names is None else [table.class_names[i] for i in table.labels]
    lookup, conflicts = {}, []
    for row, (key, label) in enumerate(zip(table.keys, values)):
        if lookup.setdefault(key, label) != label:
            conflicts.append(f"{key!r} (data row {row + 1})")
    if conflicts:
        raise InputError(f"{labels_file}: {len(conflicts)} keys are given another label on a later row, e.g. "
                         f"{', '.join(conflicts[:3])}; give each key one label")
    return lookup


def labels_of(metadata, root, labels_file: str | os.PathLike | None = None, label_column: str = "label",
              lookup: dict | None = None) -> np.ndarray:
    """Labels of an embedding folder's rows: from ``labels_file`` (key,label; ``lookup``: the
    file as :func:`read_labels` read it) or its metadata."""
    keys = row_keys(metadata, root)
    if labels_file is not None:
        lookup = read_labels(labels_file, label_column) if lookup is None else lookup
        missing = [k for k in keys if k not in lookup]
        if missing:
            raise InputError(f"{labels_file}: no label for {len(missing)} keys of {root}, e.g. {missing[:3]}")
        return np.asarray([lookup[k] for k in keys])
    if label_column not in metadata.column_names:
        raise InputError(f"{root}: metadata has no {label_column!r} column; give --labels FILE with key,label columns")
    values = metadata.column(label_column).to_pylist()
    missing = [keys[i] for i, v in enumerate(values) if v is None]
    if missing:
        raise InputError(f"{root}: rows {missing[:3]} have no {label_column!r}")
    return np.asarray(values)


class _RowIndex:
    """key -> row and absolute path -> row of an embedding folder."""

    def __init__(self, metadata, root):
        from unicom.data.benchmarks.revisited import CROP_SUFFIX

        self.root = root
        keys = row_keys(metadata, root)
        self.by_key = {k: i for i, k in enumerate(keys)}
        self.by_path = {}
        for column in ("path", "image_path"):
            if column in metadata.column_names:
                for i, p in enumerate(metadata.column(column).to_pylist()):
                    if p and not keys[i].endswith(CROP_SUFFIX):  # a crop's path is of the whole image
                        self.by_path.setdefault(os.path.realpath(p), i)

    def rows(self, keys: Sequence[str], paths: Sequence[str], split: str, required: bool = True,
             remedy: str = "embed the whole dataset folder, or evaluate with --model") -> np.ndarray:
        rows = []
        missing = []
        for key, path in zip(keys, paths):
            row = self.by_key.get(key)
            if row is None and path:
                row = self.by_path.get(os.path.realpath(path))
            if row is None:
                missing.append(key)
            rows.append(-1 if row is None else row)
        rows = np.asarray(rows, dtype=np.int64)
        if missing and required:
            raise InputError(
                f"{self.root}: {len(missing)} {split} images of the benchmark have no embedding (by key or path), "
                f"e.g. {missing[:3]}; {remedy}"
            )
        return rows


# --------------------------------------------------------------------------- embedding with a model


def embed_cached(
    encoder,
    images: Sequence[Any],
    keys: Sequence[str],
    folder: str | os.PathLike,
    config: dict,
    *,
    labels: Sequence[int | str] | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    desc: str = "embed",
    modality: str = "image",
) -> np.ndarray:
    """Embeddings float32 (N, D) of ``images`` (paths or PIL images; with ``modality="text"``,
    captions embedded by the model's text tower into ``text_emb/``), cached under ``folder``.

    The folder is an embedding folder: metadata holds ``key`` (and ``label`` when given),
    so it can be evaluated again with ``--embeddings``. Parts of :data:`PART_ROWS` rows
    already written by an earlier run with the same ``config`` and keys are read back
    instead of recomputed; those of a run whose ``config`` lacked only ``labels`` (an earlier
    unicom's, labelled by label ids) are read back and given ``labels`` anew.
    """
    import pyarrow as pa

    from unicom.embed import embed_images, embed_texts

    folder = Path(folder)
    config = dict(config, images=len(images))
    config_path = folder / CACHE_CONFIG
    sweep_writer_temporaries(folder, range(-(-len(images) // PART_ROWS)))
    sweep_temporaries(folder, [CACHE_CONFIG])
    relabel = False  # a cache of an earlier unicom: the same embeddings, labelled by this run's ids
    previous = read_record(config_path, f"remove {folder} (its embeddings are made again) or use another --out")
    if previous is not None:
        relabel = "labels" in config and previous == {k: v for k, v in config.items() if k != "labels"}
        if previous != config and not relabel:
            changed = ", ".join(f"{key}: {previous.get(key)!r} before, {config.get(key)!r} now"
                                for key in sorted(set(previous) | set(config)) if previous.get(key) != config.get(key))
            raise InputError(
                f"{folder} holds embeddings made otherwise ({changed}); use another --out or delete that folder"
            )
    if not relabel:  # else once every part holds the class names: a run stopped halfway relabels again
        write_json_atomic(config_path, config)

    def metadata(start: int, stop: int):
        columns = {"key": [str(k) for k in keys[start:stop]]}
        if labels is not None:
            columns["label"] = [v if isinstance(v, str) else int(v) for v in labels[start:stop]]
        return pa.table(columns)

    parts = []
    bar = progress(total=len(images), desc=desc, unit="img" if modality == "image" else "text")
    try:
        for number, start in enumerate(range(0, len(images), PART_ROWS)):
            stop = min(start + PART_ROWS, len(images))
            part_keys = [str(k) for k in keys[start:stop]]
            if part_complete(folder, number, [modality, "metadata"]):
                stored = EmbeddingFolders.from_root(folder)
                if stored.load("metadata", number, columns=["key"]).column("key").to_pylist() == part_keys:
                    parts.append(np.asarray(stored.load(modality, number, mmap=False)))
                    if relabel:
                        write_part(folder, number, metadata=metadata(start, stop))
                    bar.update(stop - start)
                    continue
            if modality == "text":
                embeddings = embed_texts(encoder, list(images[start:stop]), batch_size)
            else:
                embeddings = embed_images(encoder, list(images[start:stop]), batch_size, num_workers=num_workers)
            write_part(folder, number, **{modality: embeddings}, metadata=metadata(start, stop))
            parts.append(embeddings)
            bar.update(stop - start)
    finally:
        bar.close()
    if relabel:
        write_json_atomic(config_path, config)
    return np.concatenate(parts) if parts else np.zeros((0, encoder.embedding_dim), np.float32)


def _sample(n: int, limit: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(PCA_SEED).choice(n, limit, replace=False))


# --------------------------------------------------------------------------- runs


def _parse_dims(dims) -> tuple[int, ...]:
    return tuple(int(d) for d in dims or ())


def evaluate_benchmark(
    dataset: str,
    root: str | os.PathLike,
    *,
    out: str | os.PathLike,
    model: str | None = None,
    pretrained: str | None = None,
    embeddings: str | os.PathLike | None = None,
    ks: Sequence[int] | None = None,
    dims: Sequence[int] = (32, 64, 128, 256),
    pca: bool = True,
    pca_samples: int = 50_000,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | None = None,
    chunk_size: int | None = None,
    download: bool = False,
    probe: bool = True,
    knn: bool = True,
    knn_k: int = 20,
    temperature: float = 0.07,
    classes: Sequence[str] | None = None,
    exclude_classes: Sequence[str] | None = None,
    zero_shot: bool = False,
    templates: str = "openai",
    class_names: str | os.PathLike | None = None,
    expansion=None,
    distractors: str | os.PathLike | None = None,
    whiten: str | os.PathLike | None = None,
    flip: bool = False,
    examples=None,
    per_query: bool = False,
    scales=None,
) -> dict:
    """Evaluate ``model`` (or the ``embeddings`` folder) on benchmark ``dataset`` read from ``root``.

    Retrieval benchmarks write metrics, the markdown table and the Recall@1-vs-dimension
    PNG under ``out``; classification datasets the linear probe and kNN results, and with
    ``zero_shot`` the model's zero-shot accuracy (:mod:`unicom.evaluate.zero_shot`: the
    ``templates`` set or file, the ``class_names`` file or the dataset's names).
    ``classes``/``exclude_classes``: score a subset of a retrieval benchmark's classes
    (by label or class name; :func:`unicom.evaluate.report.select_classes`). ``expansion``:
    an :class:`~unicom.evaluate.expansion.Expansion` re-ranking a retrieval benchmark's
    searches (database-side augmentation, α-query expansion). ``distractors``: an embedding
    folder whose rows join the gallery of a benchmark whose relevance is listed per query
    (Revisited Oxford/Paris + 1M, GLDv2), made by the same model. ``whiten``: an embedding
    folder, made by the same model, on which a PCA whitening of every retrieval embedding is
    learned (:func:`learned_whitening`), or a :class:`Whitening` (a discriminative one).
    ``flip``: with ``model``, each image embedding the mean of the image's features and its
    mirror image's (:class:`unicom.models.encoders.FlipAveraged`; ``flip`` in the report);
    ``scales``: with ``model``, each image embedding the mean of its normalised embeddings at
    these scales of the model input (:class:`unicom.models.encoders.MultiScale`; ``scales``).
    ``examples``: an :class:`~unicom.evaluate.examples.Examples` of a retrieval benchmark:
    queries beside their first results, drawn from the benchmark's images where they are on
    this machine (:func:`unicom.evaluate.report.evaluate_retrieval`). ``per_query``: a retrieval
    benchmark's metrics of each query, as ``per_query.parquet`` under ``out``.
    """
    from unicom.data.benchmarks import CAPTION_BENCHMARKS, RETRIEVAL_BENCHMARKS

    name, classification, scales = check_benchmark(
        dataset, model=model, embeddings=embeddings, flip=flip, scales=scales, expansion=expansion, whiten=whiten,
        examples=examples, per_query=per_query, distractors=distractors, classes=classes,
        exclude_classes=exclude_classes, zero_shot=zero_shot)
    if name in CAPTION_BENCHMARKS:  # images and captions: no classes, no compact dimensions, no probe
        from unicom.evaluate.image_text import evaluate_image_text

        return evaluate_image_text(name, root, out=out, model=model, pretrained=pretrained, ks=ks,
                                   batch_size=batch_size, num_workers=num_workers, device=device, chunk_size=chunk_size,
                                   flip=flip, scales=scales)
    if name in RETRIEVAL_BENCHMARKS:
        return _retrieval_benchmark(name, root, out, model, pretrained, embeddings, ks, dims, pca, pca_samples,
                                    batch_size, num_workers, device, chunk_size, classes, exclude_classes, expansion,
                                    distractors, whiten, flip, examples, per_query, scales)
    return _classification_benchmark(classification, root, out, model, pretrained, embeddings, batch_size,
                                     num_workers, device, download, probe, knn, knn_k, temperature,
                                     zero_shot, templates, class_names, flip, scales)


def check_benchmark(dataset: str, *, model=None, embeddings=None, flip: bool = False, scales=None, expansion=None,
                    whiten=None, examples=None, per_query: bool = False, distractors=None, classes=None,
                    exclude_classes=None, zero_shot: bool = False, **_others) -> tuple[str, str, tuple | None]:
    """The options of :func:`evaluate_benchmark` (any of its keywords; the others are not
    checked here) that ``dataset`` cannot take refused, before anything is read or embedded;
    returns its canonical name, its name among the classification datasets and the checked
    scales."""
    from unicom.data.benchmarks import CAPTION_BENCHMARKS, CLASSIFICATION_BENCHMARKS, RETRIEVAL_BENCHMARKS, canonical_name
    from unicom.data.benchmarks.classification import CLASSIFICATION_ALIASES

    if (model is None) == (embeddings is None):
        raise InputError("give either a model or an embeddings folder")
    if flip and model is None:
        raise InputError("--flip averages each image's embedding with its mirror image's as --model embeds them; "
                         "embeddings already made are read as they are: embed them with unicom embed --flip, or give "
                         "--model")
    from unicom.models.encoders import check_scales

    scales = check_scales(scales)
    if scales is not None and model is None:
        raise InputError("--scales embeds each image at several sizes as --model embeds them; embeddings already made "
                         "are read as they are: embed them with unicom embed --scales, or give --model")
    name = canonical_name(dataset)
    classification = CLASSIFICATION_ALIASES.get(dataset.lower(), dataset.lower())
    if expansion and name not in RETRIEVAL_BENCHMARKS:
        raise InputError(f"query expansion, database-side augmentation, k-reciprocal re-ranking and diffusion re-rank "
                         f"an image retrieval benchmark's searches ({', '.join(RETRIEVAL_BENCHMARKS)}); {dataset} is "
                         "not one: leave --qe, --dba, --k-reciprocal and --diffusion out")
    if whiten is not None and name not in RETRIEVAL_BENCHMARKS:
        raise InputError(f"--whiten whitens the embeddings of an image retrieval benchmark's searches; {dataset} is "
                         "not one: leave --whiten out")
    if examples is not None and name not in RETRIEVAL_BENCHMARKS:
        raise InputError(f"--examples draws queries beside their first results in an image retrieval benchmark's "
                         f"search; {dataset} is not one: leave --examples out")
    if per_query and name not in RETRIEVAL_BENCHMARKS:
        raise InputError(f"--per-query writes the metrics of each query of an image retrieval benchmark; {dataset} is "
                         "not one: leave --per-query out")
    if distractors is not None and name not in RETRIEVAL_BENCHMARKS:
        raise InputError(f"--distractors join the gallery of an image retrieval benchmark ({', '.join(DISTRACTED)}); "
                         f"{dataset} is not one: leave --distractors out")
    if name in CAPTION_BENCHMARKS:
        if model is None:
            raise InputError(
                f"--dataset {name} embeds its images and captions with --model (both cached under OUT/embeddings, "
                "read back by a rerun with the same --out); it takes no --embeddings")
        if classes is not None or exclude_classes is not None:
            raise InputError(f"--classes and --exclude-classes score a subset of a retrieval protocol's classes; "
                             f"--dataset {name} has images and captions, not classes")
        return name, classification, scales
    if zero_shot and classification not in CLASSIFICATION_BENCHMARKS:
        raise InputError(f"zero-shot classification names the classes of a classification dataset "
                         f"({', '.join(CLASSIFICATION_BENCHMARKS)}); {dataset} is not one")
    if name in RETRIEVAL_BENCHMARKS:
        return name, classification, scales
    if classification in CLASSIFICATION_BENCHMARKS:
        _retrieval_only(classes, exclude_classes)
        return name, classification, scales
    raise InputError(
        f"unknown dataset {dataset!r}; retrieval: {', '.join(RETRIEVAL_BENCHMARKS)}; "
        f"image-text: {', '.join(CAPTION_BENCHMARKS)}; classification: {', '.join(CLASSIFICATION_BENCHMARKS)}"
    )


_LOADED: dict | None = None  # within one_load_per_model: the encoders loaded, by (model, weights, device)


@contextlib.contextmanager
def one_load_per_model():
    """Within it, the benchmarks that embed with the same model (and weights, on the same
    device) load it once: ``unicom evaluate --dataset A,B,...``."""
    global _LOADED
    _LOADED = {}
    try:
        yield
    finally:
        _LOADED = None


def _encoder(model, pretrained, device, flip: bool = False, scales=None):
    from unicom import distributed
    from unicom.models.encoders import load_encoder, with_views

    device = device or distributed.local_device()
    key = (os.fspath(model), None if pretrained is None else os.fspath(pretrained), str(device))
    if _LOADED is not None and key in _LOADED:
        return with_views(_LOADED[key], flip, scales)
    encoder = load_encoder(model, pretrained, device)
    if _LOADED is not None:
        _LOADED[key] = encoder
    return with_views(encoder, flip, scales)


def _embedding_identity(encoder, model, pretrained, dataset: str, flip: bool = False, scales=None) -> dict:
    """What cached embeddings were made with: the model and weights as given, the digest of
    the loaded weights (as ``unicom embed`` records it), so that a model trained again in
    place is not read back from an earlier run's embeddings, and ``flip`` and ``scales`` when set."""
    identity = {"model": model, "pretrained": pretrained, "dataset": dataset, WEIGHTS_CHECKSUM: encoder.weights_sha256()}
    return {**identity, **views_record(flip, scales)}


def _model_info(model, pretrained, embeddings, flip: bool = False, scales=None) -> dict:
    """The report's fields of what was evaluated: the model, or the embeddings folder, and
    ``flip`` when each image was averaged with its mirror (``--flip``, or the folder's record),
    ``scales`` when at several scales (``--scales``, or the folder's record)."""
    if model is not None:
        from unicom.models.foundation import recorded_spec

        info = {"model": recorded_spec(model), "pretrained": storage.recorded(pretrained)}
    else:
        info = {"embeddings": storage.absolute(embeddings)}
    return {**info, **views_record(flip, scales)}


def _retrieval_only(classes, exclude_classes) -> None:
    if classes is not None or exclude_classes is not None:
        raise InputError("--classes and --exclude-classes score a subset of a retrieval protocol; they do not apply "
                         "to classification")


def _scored_rows(query_labels, gallery_labels, classes, exclude_classes, class_names=None) -> tuple:
    """(query rows, gallery rows) that ``classes``/``exclude_classes`` score; ``(None, None)``,
    every row, without a class subset."""
    from unicom.evaluate.report import select_classes

    if classes is None and exclude_classes is None:
        return None, None
    query_rows, gallery_rows, _ = select_classes(query_labels, gallery_labels, classes=classes,
                                                 exclude_classes=exclude_classes, class_names=class_names)
    return query_rows, gallery_rows


def _retrieval_benchmark(name, root, out, model, pretrained, embeddings, ks, dims, pca, pca_samples, batch_size,
                         num_workers, device, chunk_size, classes=None, exclude_classes=None, expansion=None,
                         distractors=None, whiten=None, flip=False, examples=None, per_query=False,
                         scales=None) -> dict:
    from unicom.data.benchmarks import load_retrieval_benchmark
    from unicom.evaluate.report import class_labelled

    # precomputed embeddings are matched by key: the lists are needed, not the images
    protocol = load_retrieval_benchmark(name, root, check_images=model is not None)
    if expansion and expansion.qe and protocol.gallery is None:  # before anything is embedded
        raise InputError(f"--qe: {name} searches its images leave-one-out, with no gallery apart from the queries, and "
                         "an expanded query would no longer be left out of its own search; leave --qe out (--dba "
                         "augments the searched set itself)")
    if distractors is not None and name not in DISTRACTED:  # before anything is embedded
        raise InputError(f"--distractors: {name} finds a query's relevant images by class label, and images of no "
                         f"class have none; distractors join the gallery of {', '.join(DISTRACTED)}, whose relevant "
                         "images are listed per query: leave --distractors out")
    class_labelled(protocol.query.labels, classes, exclude_classes,  # before anything is embedded
                   protocol.relevant if protocol.setups is None else protocol.setups)
    out = Path(out)
    splits = {"query": protocol.query, "gallery": protocol.gallery}
    train = protocol.train if (pca and dims and protocol.train is not None and len(protocol.train) >= 2) else None
    train_rows = None if train is None else _sample(len(train), pca_samples)
    vectors: dict[str, np.ndarray | None] = {}
    if model is not None and train is not None:
        train_rows = _present_train_rows(train, train_rows)
        if len(train_rows) < 2:
            train = train_rows = None
    if model is not None:
        encoder = _encoder(model, pretrained, device, flip, scales)
        config = _embedding_identity(encoder, model, pretrained, name, flip, scales)
        for split, images in splits.items():
            if images is None:
                vectors[split] = None
                continue
            if split == "gallery" and images is protocol.query and protocol.query_boxes is None:
                vectors[split] = vectors["query"]  # the queries are the database (UKBench): embedded once
                continue
            inputs, identity = images.paths, dict(config, split=split)
            if split == "query" and protocol.query_boxes is not None:  # the query is the box, not the whole image
                from unicom.data.benchmarks.revisited import cropped_queries, query_boxes_sha256

                inputs = cropped_queries(images, protocol.query_boxes)
                identity["query_boxes_sha256"] = query_boxes_sha256(protocol.query_boxes)
            labels = images.labels
            if labels is not None and images.class_names is not None:
                # the folder is read again without the benchmark (--embeddings, --classes): its labels are the
                # benchmark's class names (CUB's 150.Sage_Thrasher, SOP's 11319), not this run's vocabulary ids
                labels = [images.class_names[i] for i in labels.tolist()]
                identity["labels"] = "class names"
            vectors[split] = embed_cached(
                encoder, inputs, images.keys, out / "embeddings" / split, identity,
                labels=labels, batch_size=batch_size, num_workers=num_workers, desc=f"embed {name} {split}")
        if train is not None:
            vectors["train"] = embed_cached(
                encoder, [train.paths[i] for i in train_rows], [train.keys[i] for i in train_rows],
                out / "embeddings" / "train", dict(config, split="train", sample=int(pca_samples)),
                batch_size=batch_size, num_workers=num_workers, desc=f"embed {name} train (PCA)")
    else:
        folders = _split_folders(embeddings)
        if protocol.query_boxes is not None:
            _check_query_boxes(folders["query"], name, protocol.query_boxes)
        read: dict[str, tuple] = {}

        def folder_of(split: str) -> tuple:  # (folder, embeddings, row index), each folder read once
            folder = folders[split]
            if folder not in read:
                x_folder, metadata = read_embedding_folder(folder)
                read[folder] = (folder, x_folder, _RowIndex(metadata, folder))
            return read[folder]

        scored = dict(zip(("query", "gallery"), _scored_rows(  # a class left out may hold a bad row
            protocol.query.labels, None if protocol.gallery is None else protocol.gallery.labels, classes,
            exclude_classes, protocol.query.class_names)))
        for split, images in splits.items():
            if images is None:
                vectors[split] = None
                continue
            embeddings, x, index = folder_of(split)
            if split == "query" and protocol.query_boxes is not None:
                # a cropped query is found by its key alone: the row found by its path is the whole image
                rows = index.rows(images.keys, [""] * len(images), split, remedy=(
                    "the queries are the query images cropped to their boxes: give the embeddings of the crops "
                    "rows with these keys (as unicom embed --dataset and evaluate --model write them), or evaluate with --model"))
            else:
                rows = index.rows(images.keys, images.paths, split)
            vectors[split] = x[rows]
            require_usable_rows(vectors[split], images.keys, embeddings, rows=rows, scored=scored[split])
        if train is not None and folders.get("train") is not None:
            embeddings, x, index = folder_of("train")
            drawn = _recorded_sample(embeddings)
            if drawn is not None and drawn < pca_samples:  # all the rows the cache holds, not a few of a larger draw
                train_rows = _sample(len(train), drawn)
            rows = index.rows([train.keys[i] for i in train_rows], [train.paths[i] for i in train_rows], "train",
                              required=False)
            found = rows >= 0
            keys, rows = [train.keys[i] for i, ok in zip(train_rows, found) if ok], rows[found]
            _warn_fewer_train(embeddings, len(rows), min(pca_samples, len(train)), pca_samples, drawn)
            vectors["train"] = x[rows] if len(rows) >= 2 else None
            if vectors["train"] is not None:
                require_usable_rows(vectors["train"], keys, embeddings, rows=rows)
        embeddings = folders["root"]
    # how the benchmark's embeddings were made, which the folders added must share
    made_by = (MadeBy(config[WEIGHTS_CHECKSUM], flip, scales or (1.0,)) if model is not None
               else MadeBy.of(folders["gallery"]))
    info = {"dataset": name, **_model_info(model, pretrained, embeddings, bool(made_by.flip), made_by.scales)}
    if pca and dims and vectors.get("train") is None:  # --no-pca asked for none
        info["note"] = "no train-split embeddings: the PCA baseline is left out"
    items = _benchmark_items(protocol) if examples is not None or per_query else None
    if distractors is not None:
        added, added_items = _distractor_vectors(distractors, protocol.gallery, vectors["gallery"].shape[1], made_by,
                                                 embeddings if model is None else None)
        vectors["gallery"] = np.concatenate([np.asarray(vectors["gallery"], dtype=np.float32), added])
        if items is not None:
            items = (items[0], items[1] + added_items)
        info["distractors"] = {"embeddings": storage.absolute(distractors), "count": len(added)}
    vectors = _whitened(vectors, whiten, made_by, info)
    return score_protocol(
        protocol,
        vectors,
        ks=tuple(ks) if ks else protocol.ks,
        dims=_parse_dims(dims),
        chunk_size=chunk_size,
        out=out,
        info=info,
        classes=classes,
        exclude_classes=exclude_classes,
        expansion=expansion,
        device=_scoring_device(device),
        examples=examples,
        items=items,
        per_query=per_query,
    )


def score_protocol(protocol, vectors: dict, **options) -> dict:
    """:func:`unicom.evaluate.report.evaluate_retrieval` of a benchmark's ``protocol`` (a
    :class:`unicom.data.benchmarks.RetrievalProtocol`: its labels, relevant lists, subsets,
    setups, ks and headline metric) on ``vectors`` (``"query"``, ``"gallery"`` (None when
    leave-one-out), optionally ``"train"``); ``options`` go to it as they are (``ks`` replaces
    the protocol's)."""
    from unicom.evaluate.report import evaluate_retrieval

    gallery = protocol.gallery
    options.setdefault("ks", protocol.ks)
    return evaluate_retrieval(
        vectors["query"], protocol.query.labels, vectors["gallery"], None if gallery is None else gallery.labels,
        relevant=protocol.relevant, subsets=protocol.subsets or None, setups=protocol.setups,
        train=vectors.get("train"), metric=protocol.metric, class_names=protocol.query.class_names, **options)


def _benchmark_items(protocol):
    """(query items, gallery items or None) of a benchmark's rows for the examples: each
    image's key and path (a Revisited query its crop)."""
    from unicom.data.sources import QueryCrop
    from unicom.evaluate.examples import Item

    query = protocol.query
    if protocol.query_boxes is not None:
        queries = [Item(key, QueryCrop(path, tuple(float(v) for v in box)))
                   for key, path, box in zip(query.keys, query.paths, protocol.query_boxes)]
    else:
        queries = [Item(key, path or None) for key, path in zip(query.keys, query.paths)]
    if protocol.gallery is None:
        return queries, None
    return queries, [Item(key, path or None) for key, path in zip(protocol.gallery.keys, protocol.gallery.paths)]


def _folder_items(metadata, folder, rows: int, shards=None) -> list:
    """The examples' :class:`~unicom.evaluate.examples.Item` of each of the ``rows`` rows of an
    embedding folder: its key (``#<row>`` without metadata), and its image where the metadata
    names one (``image_path``, ``path``), else, with ``shards`` (the folder of the shards it
    was embedded from), its sample in the shard its ``shard`` column names."""
    from unicom.evaluate.examples import Item, ShardSample

    if metadata is None:
        return [Item(f"#{row}") for row in range(rows)]
    keys = row_keys(metadata, folder)
    column = next((c for c in ("image_path", "path") if c in metadata.column_names), None)
    paths = metadata.column(column).to_pylist() if column else [None] * rows
    if column is None and shards is not None and {"shard", "key"} <= set(metadata.column_names):
        images = _shard_images(shards, folder)
        occurrences = (metadata.column(OCCURRENCE).to_pylist() if OCCURRENCE in metadata.column_names
                       else [None] * rows)
        return [Item(str(key), ShardSample(images, shard, str(key), occurrence) if shard else None)
                for key, shard, occurrence in zip(keys, metadata.column("shard").to_pylist(), occurrences)]
    return [Item(str(key), path or None) for key, path in zip(keys, paths)]


def _shard_images(shards, folder):
    """The :class:`~unicom.search.item_images.ShardImages` of the shards folder ``shards`` (a
    path or URL), read by the parquet columns that ``folder``'s ``embed_config.json`` records
    (the usual names when it records none)."""
    from unicom.data.parquet_shards import ShardColumns
    from unicom.search.item_images import ShardImages

    columns = ShardColumns.from_named((read_config(folder) or {}).get(SHARD_COLUMNS) or {},
                                      f"{storage.text(folder)}'s {CONFIG_FILE} (its {SHARD_COLUMNS})")
    return ShardImages(shards, columns=columns)


def _scoring_device(device: str | None):
    """Where the searches of the scores run: ``device`` (``--device``), by default this rank's
    GPU, else the CPU; checked."""
    from unicom.engine.device import resolve_device

    return resolve_device(device or "auto", key="--device")


@dataclass(frozen=True)
class MadeBy:
    """How a folder's embeddings were made, as far as recorded: the digest of the model's
    weights, whether each image's mirror was averaged in (``flip``) and the scales averaged
    (``scales``, ``(1.0,)`` for the model input alone); None: not recorded."""

    digest: str | None = None
    flip: bool | None = None
    scales: tuple[float, ...] | None = None

    @classmethod
    def of(cls, folder) -> "MadeBy":
        """As ``unicom embed`` (``embed_config.json``) or ``evaluate --model`` (its cache
        record) recorded it for ``folder``; nothing when neither did."""
        for record in (read_config(folder), read_record(storage.join(folder, CACHE_CONFIG), f"remove {folder} and "
                                                        "embed it again")):
            if record and record.get(WEIGHTS_CHECKSUM):
                return cls(record[WEIGHTS_CHECKSUM], recorded_flip(record), recorded_scales(record))
        return cls()


def _require_same_model(folder, option: str, found: int, dimension: int, made_by: MadeBy | None) -> None:
    """An :class:`InputError` when ``folder`` (given with ``option``) holds embeddings of
    ``found`` dimensions, not the benchmark's ``dimension``, or records other weights or
    another way of embedding (``--flip``, ``--scales``) than ``made_by`` (when both are recorded): they
    were made by another model, or otherwise."""
    if found != dimension:
        raise InputError(f"{storage.text(folder)} ({option}) holds {found}-dimensional embeddings, the benchmark's "
                         f"are {dimension}-dimensional: they were made by different models; embed {option}'s images "
                         "with the benchmark's model")
    made_by = made_by or MadeBy()
    recorded = MadeBy.of(folder)
    if made_by.digest is not None and recorded.digest is not None and recorded.digest != made_by.digest:
        raise InputError(f"{storage.text(folder)} ({option}) was embedded by other weights than the benchmark "
                         f"({WEIGHTS_CHECKSUM} {recorded.digest[:12]}… against {made_by.digest[:12]}…): {option}'s "
                         "images and the benchmark must be embedded by the same model")
    flip_differs = made_by.flip is not None and recorded.flip is not None and recorded.flip != made_by.flip
    scales_differ = made_by.scales is not None and recorded.scales is not None and recorded.scales != made_by.scales
    if flip_differs or scales_differ:
        raise InputError(f"{storage.text(folder)} ({option}) was embedded with "
                         f"{describe_views(recorded.flip, recorded.scales)}, the benchmark with "
                         f"{describe_views(made_by.flip, made_by.scales)}: embed {option}'s images the way the "
                         "benchmark's were")


def learned_whitening(whiten, dimension: int, made_by: MadeBy | None = None):
    """The whitening ``whiten`` asks for (a :class:`Whitening`, or a folder: PCA) learned on
    every row of its embedding folder (``--whiten``), checked to be made as the benchmark's
    embeddings were (``made_by``):
    (the fitted :class:`~unicom.evaluate.dims.PCA` or
    :class:`~unicom.evaluate.whitening.DiscriminativeWhitening`, its row count)."""
    from unicom.evaluate.dims import PCA

    spec = whiten if isinstance(whiten, Whitening) else Whitening(whiten)
    folder = spec.folder
    x, metadata = read_embedding_folder(folder)
    _require_same_model(folder, "--whiten", x.shape[1], dimension, made_by)
    keys = row_keys(metadata, folder) if metadata is not None else [f"#{row}" for row in range(len(x))]
    require_usable_rows(x, keys, folder)
    if spec.method == "discriminative":
        from unicom.evaluate.whitening import DiscriminativeWhitening

        if spec.labels is None and (metadata is None or "label" not in metadata.column_names):
            raise InputError(f"{storage.text(folder)} (--whiten): a discriminative whitening learns from classes, and "
                             "its metadata has no 'label' column; give --whiten-labels FILE (key,label columns)")
        labels = labels_of(metadata, folder, spec.labels)
        return DiscriminativeWhitening.fit(x, labels, name=f"{storage.text(folder)} (--whiten)"), len(x)
    pca = PCA.fit(x)
    if pca.rank < dimension:
        raise InputError(f"{storage.text(folder)} (--whiten): its {len(x)} embeddings vary along {pca.rank} of the "
                         f"{dimension} axes, and whitening divides by the variance along each; learn it on more "
                         f"images (at least {dimension + 1}, many more is better)")
    return pca, len(x)


def _whitened(vectors: dict, whiten, made_by: MadeBy | None, info: dict) -> dict:
    """``vectors`` (split -> (N, D) or None) whitened by :func:`learned_whitening` of
    ``whiten`` (a :class:`Whitening` or a folder), which ``info`` records; unchanged without
    ``whiten``."""
    if whiten is None:
        return vectors
    spec = whiten if isinstance(whiten, Whitening) else Whitening(whiten)
    dimension = next(v.shape[1] for v in vectors.values() if v is not None)
    whitening, rows = learned_whitening(spec, dimension, made_by)
    info["whitening"] = {"embeddings": storage.absolute(spec.folder), "rows": rows}
    if spec.method == "discriminative":
        info["whitening"].update(method="discriminative", classes=whitening.classes, pairs=whitening.pairs)
    return {split: None if v is None else whitening.whiten(v) for split, v in vectors.items()}


def _distractor_vectors(folder, gallery, dimension: int, made_by: MadeBy | None, benchmark_folder) -> tuple:
    """The rows of the embedding folder ``folder`` given with ``--distractors``, float32, and
    their examples' items (:func:`_folder_items`),
    checked against the benchmark's ``gallery`` (an ImageList) and its embeddings: the same
    dimension, weights and way of embedding (when both are recorded), none of the gallery's images, every row
    with a direction."""
    if benchmark_folder is not None and storage.absolute(folder) == storage.absolute(benchmark_folder):
        raise InputError(f"{storage.text(folder)} (--distractors) is the folder of the benchmark's own embeddings "
                         "(--embeddings): its images would be their own distractors; give the folder of the "
                         "distractor images (revisitop1m's, embedded with unicom embed)")
    x, metadata = read_embedding_folder(folder)
    _require_same_model(folder, "--distractors", x.shape[1], dimension, made_by)
    keys = row_keys(metadata, folder) if metadata is not None else [f"#{row}" for row in range(len(x))]
    shared = sorted(set(keys) & set(gallery.keys))
    if metadata is not None and not shared:  # the same files under other keys (a folder embedded with --input)
        paths = {os.path.realpath(p) for p in gallery.paths if p}
        names = {os.path.basename(p) for p in paths}  # a million paths are not resolved, only those of these names
        for column in ("path", "image_path"):
            if column in metadata.column_names:
                shared = [keys[i] for i, p in enumerate(metadata.column(column).to_pylist())
                          if p and os.path.basename(p) in names and os.path.realpath(p) in paths]
                if shared:
                    break
    if shared:
        images = f"{len(shared)} image{'s' if len(shared) > 1 else ''}"
        raise InputError(f"{storage.text(folder)} (--distractors) holds {images} of the benchmark's gallery (e.g. "
                         f"{', '.join(map(str, shared[:3]))}): a positive among the distractors would count against "
                         "itself; give a folder of other images")
    require_usable_rows(x, keys, folder)
    return x, _folder_items(metadata, folder, len(x))


def _split_folders(embeddings) -> dict:
    """Where each split's embeddings are: ``embeddings`` itself for every split (one folder
    holding them all, as ``unicom embed --dataset`` writes it), or, for the folder of the
    split folders that ``evaluate --model`` writes (``OUT/embeddings``: ``query/``,
    ``gallery/``, ``train/``, no ``img_emb/`` of its own), each split's folder (``None`` for
    a split not there; the gallery of a leave-one-out benchmark is not needed). ``"root"``:
    the folder given."""
    from unicom import storage

    if storage.is_dir(storage.join(embeddings, "img_emb")) or not storage.is_dir(storage.join(embeddings, "query", "img_emb")):
        return {"root": embeddings, "query": embeddings, "gallery": embeddings, "train": embeddings}
    folders = {"root": embeddings}
    for split in ("query", "gallery", "train"):
        folder = storage.join(embeddings, split)
        folders[split] = folder if storage.is_dir(storage.join(folder, "img_emb")) else None
    if folders["gallery"] is None:  # a gallery split without its folder: its images are reported missing
        folders["gallery"] = folders["query"]
    return folders


def _check_query_boxes(embeddings, dataset: str, boxes: np.ndarray) -> None:
    """Refuse a folder whose recorded query crops (``unicom embed --dataset``, or the query
    folder of ``evaluate --model``) are of another dataset, or of other boxes than the ground
    truth's: they would be scored as other queries."""
    from unicom import storage
    from unicom.data.benchmarks.revisited import query_boxes_sha256

    config = read_config(embeddings)
    if config is None:
        config = read_record(storage.join(embeddings, CACHE_CONFIG), (
            "it records the query boxes the crops were made from: embed the queries again with evaluate --model "
            "into another --out"))
    config = config or {}
    if config.get("dataset") not in (None, dataset):
        raise InputError(f"{embeddings}: holds the embeddings of {config['dataset']}, not of {dataset}; give "
                         f"--dataset {config['dataset']}, or the folder unicom embed --dataset {dataset} wrote")
    recorded = config.get("query_boxes_sha256")
    if recorded is None and config.get("query_boxes") is not None:  # an earlier evaluate --model kept the boxes
        try:
            recorded = query_boxes_sha256(np.asarray(config["query_boxes"], dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise InputError(f"{embeddings}: its recorded query_boxes are not numbers ({error}); embed the queries "
                             "again with evaluate --model into another --out") from error
    if recorded is not None and recorded != query_boxes_sha256(boxes):
        raise InputError(
            f"{embeddings}: its query crops were made from other boxes than the ground truth's (query_boxes_sha256: "
            f"{recorded!r} recorded, {query_boxes_sha256(boxes)!r} now); embed the queries again with unicom embed "
            "--dataset into another --out, or evaluate with the ground truth they were made from"
        )


def _recorded_sample(folder) -> int | None:
    """The ``--pca-samples`` that the ``evaluate --model`` run which cached ``folder`` (its
    train split) drew the train images with, or None for a folder it did not write."""
    record = read_record(storage.join(folder, CACHE_CONFIG), "give the train folder an evaluate --model run wrote, "
                         "or evaluate with --model into another --out")
    sample = (record or {}).get("sample")
    return sample if isinstance(sample, int) and not isinstance(sample, bool) else None


def _warn_fewer_train(folder, fitted: int, wanted: int, asked: int, drawn: int | None) -> None:
    """Warn when the PCA baseline is fitted on ``fitted`` train embeddings of ``folder``, fewer
    than the ``wanted`` that ``--pca-samples asked`` asks for; ``drawn``: the ``--pca-samples``
    that the cache in ``folder`` was made with (None: not a cache of ``evaluate --model``)."""
    if fitted >= wanted:
        return
    why = ("the folder holds no embedding of the others" if drawn is None or drawn >= asked
           else f"the folder holds the train images an evaluate --model run drew with --pca-samples {drawn}")
    warnings.warn(f"{storage.text(folder)}: the PCA axes are fitted on {fitted} train embeddings, fewer than the "
                  f"{wanted} that --pca-samples {asked} asks for ({why}); evaluate with --model --pca-samples {asked} "
                  "into another --out to fit them on more")


def _present_train_rows(train, rows: np.ndarray) -> np.ndarray:
    """The drawn train rows whose image file exists. The train split only feeds the PCA
    baseline, and is often downloaded in part (GLDv2's train.csv without its 4 million
    images): missing images are left out with a warning, before anything is embedded,
    instead of failing the run once the evaluation splits are done."""
    present = np.asarray([os.path.isfile(train.paths[i]) for i in rows], dtype=bool)
    if not present.all():
        missing = [train.keys[i] for i in rows[~present][:3]]
        kept = int(present.sum())
        warnings.warn(
            f"{int((~present).sum())} of {len(rows)} train images drawn for the PCA baseline are missing, e.g. "
            f"{missing}; " + (f"the PCA axes are fitted on the {kept} present" if kept >= 2
                              else "the PCA baseline is left out")
            + " (--no-pca skips it)"
        )
    return rows[present]


def _classification_benchmark(name, root, out, model, pretrained, embeddings, batch_size, num_workers, device,
                              download, probe, knn, knn_k, temperature, zero_shot=False, templates="openai",
                              class_names=None, flip=False, scales=None) -> dict:
    from unicom.data.benchmarks import load_classification_benchmark
    from unicom.evaluate.report import evaluate_classification

    if not (probe or knn or zero_shot):
        raise InputError("with neither the linear probe nor kNN (--no-probe, --no-knn) there is nothing to compute; "
                         "add --zero-shot (a CLIP's text tower classifies) or leave one of them out")
    if zero_shot and model is None:
        raise InputError("zero-shot classification embeds the class prompts with --model's text tower; give --model "
                         "(its image embeddings are cached under OUT/embeddings)")
    prompts = None
    if zero_shot:
        from unicom.evaluate.zero_shot import read_templates

        prompts = read_templates(templates, name)  # a bad file is named before anything is loaded
    train, test, metric = load_classification_benchmark(name, root, download=download)
    out = Path(out)
    parts = {"train": train, "test": test} if probe or knn else {"test": test}  # zero-shot alone needs no train split
    keys = {split: [_split_key(split, image, i, root) for i, image in enumerate(part.images)] for split, part in parts.items()}
    vectors = {}
    scores = None
    if model is not None:
        encoder = _encoder(model, pretrained, device, flip, scales)
        if zero_shot:
            from unicom.evaluate.zero_shot import class_names as prompt_names, class_prototypes

            if not encoder.has_text:
                raise InputError(f"zero-shot classification needs a text tower: {encoder.name} has none "
                                 f"({encoder.no_text_reason}); give a CLIP (an open_clip name with --pretrained)")
            names = prompt_names(name, test.class_names, _class_count(train, test), class_names)
        config = _embedding_identity(encoder, model, pretrained, name, flip, scales)
        for split, part in parts.items():
            vectors[split] = embed_cached(encoder, part.images, keys[split], out / "embeddings" / split,
                                          dict(config, split=split), labels=part.labels, batch_size=batch_size,
                                          num_workers=num_workers, desc=f"embed {name} {split}")
        if zero_shot:
            from unicom.evaluate.zero_shot import CLIP_BENCHMARK, TEMPLATE_SETS, zero_shot_scores

            scores = zero_shot_scores(vectors["test"], test.labels, class_prototypes(encoder, names, prompts))
            scores.update(templates=templates if templates in (*TEMPLATE_SETS, CLIP_BENCHMARK) else storage.recorded(templates),
                          prompts_per_class=len(prompts), class_names=names)
    else:
        x, metadata = read_embedding_folder(embeddings)
        index = _RowIndex(metadata, embeddings)
        for split, part in parts.items():
            paths = [image if isinstance(image, str) else "" for image in part.images]
            vectors[split] = x[index.rows(keys[split], paths, split)]
    made = MadeBy.of(embeddings) if model is None else None
    return evaluate_classification(
        vectors.get("train"), train.labels, vectors["test"], test.labels, metric=metric, probe=probe, knn=knn,
        knn_k=knn_k, temperature=temperature, out=out, zero_shot=scores,
        info={"dataset": name, **(_model_info(model, pretrained, None, flip, scales) if model is not None else
                                  _model_info(None, None, embeddings, bool(made.flip), made.scales))},
    )


def _class_count(train, test) -> int:
    """The classes of a dataset: as many as it names, else one past its highest label."""
    highest = max(int(train.labels.max(initial=-1)), int(test.labels.max(initial=-1)))
    return max(len(test.class_names), highest + 1)


def _split_key(split: str, image, i: int, root) -> str:
    """Paths relative to the dataset folder; in-memory images (CIFAR) as ``<split>/<index>``."""
    if isinstance(image, str):
        try:
            return Path(image).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            return image
    return f"{split}/{i}"


def evaluate_embedding_folders(
    embeddings: str | os.PathLike,
    *,
    out: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    gallery_embeddings: str | os.PathLike | None = None,
    train_embeddings: str | os.PathLike | None = None,
    task: str = "retrieval",
    ks: Sequence[int] = (1, 2, 4, 8),
    dims: Sequence[int] = (32, 64, 128, 256),
    pca: bool = True,
    pca_samples: int = 50_000,
    chunk_size: int | None = None,
    probe: bool = True,
    knn: bool = True,
    knn_k: int = 20,
    temperature: float = 0.07,
    classes: Sequence[str] | None = None,
    exclude_classes: Sequence[str] | None = None,
    expansion=None,
    whiten: str | os.PathLike | None = None,
    device: str | None = None,
    examples=None,
    per_query: bool = False,
    shards: str | os.PathLike | None = None,
) -> dict:
    """Evaluate precomputed embedding folders whose rows carry labels (metadata or ``labels``).

    Retrieval: ``embeddings`` are the queries, searched leave-one-out, or against
    ``gallery_embeddings``; ``train_embeddings`` fit the PCA baseline. Classification:
    ``train_embeddings`` train the linear probe and kNN, ``embeddings`` are the test set.
    ``classes``/``exclude_classes`` (retrieval): score only the queries and gallery items
    of these classes (labels as text), or of all but these. ``expansion`` (retrieval): an
    :class:`~unicom.evaluate.expansion.Expansion` re-ranking the searches; ``whiten``
    (retrieval): the folder a PCA whitening of every embedding is learned on, or a
    :class:`Whitening`. ``device``
    (retrieval): where the searches run (default this rank's GPU, else the CPU). ``examples``
    (retrieval): an :class:`~unicom.evaluate.examples.Examples`, drawn from the images the
    folders' metadata names (``image_path``, ``path``), or for folders embedded from shards,
    read from the shards in ``shards`` (a folder or URL). ``per_query`` (retrieval): each query's
    metrics as ``per_query.parquet`` under ``out``.
    """
    from unicom.evaluate.examples import ShardSample
    from unicom.evaluate.report import evaluate_classification, evaluate_retrieval

    for given, option, does in ((examples is not None, "--examples", "draws queries beside their first results in"),
                                (per_query, "--per-query", "writes the metrics of each query of")):
        if given and task == "classification":
            raise InputError(f"{option} {does} a retrieval search; --task classification searches nothing: leave "
                             f"{option} out")
    if shards is not None and examples is None:
        raise InputError("--shards is where the images of --examples are read from; give --examples too, or leave "
                         "--shards out")
    if whiten is not None and task == "classification":
        raise InputError("--whiten whitens the embeddings of a retrieval search; --task classification searches "
                         "nothing: leave --whiten out")
    if expansion and task == "classification":
        raise InputError("query expansion, database-side augmentation, k-reciprocal re-ranking and diffusion re-rank a "
                         "retrieval search; --task classification searches nothing: leave --qe, --dba, --k-reciprocal "
                         "and --diffusion out")
    if expansion and expansion.qe and gallery_embeddings is None:  # before anything is read
        raise InputError("--qe: without --gallery-embeddings the queries are searched leave-one-out, and an expanded "
                         "query would no longer be left out of its own search; give --gallery-embeddings, or leave "
                         "--qe out (--dba augments the searched set itself)")

    x, metadata = read_embedding_folder(embeddings)
    lookup = None if labels is None else read_labels(labels)
    y = labels_of(metadata, embeddings, labels, lookup=lookup)
    made_by = MadeBy.of(embeddings)
    info = _model_info(None, None, embeddings, bool(made_by.flip), made_by.scales)
    labelled = [(embeddings, metadata)]  # the folders whose keys the labels file labels
    if task == "classification":
        _retrieval_only(classes, exclude_classes)
        if train_embeddings is None:
            raise InputError("classification needs --train-embeddings (the train split) besides --embeddings (the test split)")
        train_x, train_metadata = read_embedding_folder(train_embeddings)
        train_y = labels_of(train_metadata, train_embeddings, labels, lookup=lookup)
        labelled.append((train_embeddings, train_metadata))
        _note_unlabelled_rows(info, lookup, labels, labelled)
        _require_shared_classes(train_y, y, train_embeddings, embeddings)
        train_y, y = _shared_ids(train_y, y)
        return evaluate_classification(train_x, train_y, x, y, probe=probe, knn=knn, knn_k=knn_k,
                                       temperature=temperature, out=out, info=info,
                                       names=(f"{train_embeddings} (--train-embeddings)", f"{embeddings} (--embeddings)"))
    if task != "retrieval":
        raise InputError(f"task must be 'retrieval' or 'classification', got {task!r}")
    gallery = gallery_y = None
    if gallery_embeddings is not None:
        gallery, gallery_metadata = read_embedding_folder(gallery_embeddings)
        _require_dimension(gallery, gallery_embeddings, "--gallery-embeddings", x, embeddings)
        _require_other_images(gallery_metadata, gallery_embeddings, metadata, embeddings)
        gallery_y = labels_of(gallery_metadata, gallery_embeddings, labels, lookup=lookup)
        labelled.append((gallery_embeddings, gallery_metadata))
    scored, gallery_scored = _scored_rows(y, gallery_y, classes, exclude_classes)  # a class left out may hold a bad row
    require_usable_rows(x, row_keys(metadata, embeddings), embeddings, scored=scored)
    if gallery is not None:
        require_usable_rows(gallery, row_keys(gallery_metadata, gallery_embeddings), gallery_embeddings,
                             scored=gallery_scored)
    train = None
    if train_embeddings is not None and ((pca and dims) or lookup is not None):
        # for the labels' note alone, the keys: not a train split's embeddings in memory
        train, train_metadata = read_embedding_folder(train_embeddings, embeddings=bool(pca and dims))
        labelled.append((train_embeddings, train_metadata))
        if pca and dims:
            _require_dimension(train, train_embeddings, "--train-embeddings", x, embeddings)
            sample = _sample(len(train), pca_samples)
            train = train[sample]
            drawn = _recorded_sample(train_embeddings)
            if drawn is not None and len(sample) >= drawn:  # the whole draw of an evaluate --model cache
                _warn_fewer_train(train_embeddings, len(sample), pca_samples, pca_samples, drawn)
            keys = (row_keys(train_metadata, train_embeddings) if train_metadata is not None  # a folder of
                    else None)  # vectors for the PCA alone may have no keys
            require_usable_rows(train, [f"#{row}" if keys is None else keys[row] for row in sample], train_embeddings,
                                 rows=sample)
    _note_unlabelled_rows(info, lookup, labels, labelled)
    if pca and dims and train is None:  # --no-pca asked for none
        _add_note(info, "no train embeddings: the PCA baseline is left out")
    if whiten is not None:
        whitened = _whitened({"query": x, "gallery": gallery, "train": train}, whiten, made_by, info)
        x, gallery, train = whitened["query"], whitened["gallery"], whitened["train"]
    items = None
    if examples is not None or per_query:
        items = (_folder_items(metadata, embeddings, len(x), shards),
                 None if gallery is None else _folder_items(gallery_metadata, gallery_embeddings, len(gallery), shards))
        if shards is not None and not any(isinstance(item.source, ShardSample) for part in items if part
                                          for item in part):
            folders = [storage.text(f) for f in (embeddings, gallery_embeddings) if f is not None]
            raise InputError(f"--shards {storage.text(shards)}: {' and '.join(folders)} "
                             f"{'was' if len(folders) == 1 else 'were'} not embedded from shards (no shard and key "
                             "columns in the metadata, or a file named for each image, which the examples show): "
                             "leave --shards out")
    return evaluate_retrieval(x, y, gallery, gallery_y, train=train, ks=ks, dims=_parse_dims(dims), examples=examples,
                              items=items, per_query=per_query,
                              chunk_size=chunk_size, out=out, info=info, classes=classes,
                              exclude_classes=exclude_classes, expansion=expansion, device=_scoring_device(device))


def _require_dimension(vectors, folder, option: str, queries, queries_folder) -> None:
    """An :class:`InputError` when ``folder`` (given with ``option``) holds embeddings of
    another dimension than the queries of ``queries_folder``: made by another model."""
    if vectors.shape[1] != queries.shape[1]:
        raise InputError(f"{storage.text(folder)} ({option}) holds {vectors.shape[1]}-dimensional embeddings, "
                         f"{storage.text(queries_folder)} (--embeddings) {queries.shape[1]}-dimensional ones: they were "
                         "made by different models; give folders embedded with the same model")


# the columns that identify one image in folders made by unicom embed, in the order they are compared: an image
# file (its path, and its key in the folder or list), or a shard's sample (the shard's file name, the sample's
# key and the url its JSON gives). A shard's name and a sample's key alone repeat across datasets (00000.tar,
# 000000000, ...): a shard's sample is the same only with the same url too, and one without a url is not compared
SAME_IMAGE_COLUMNS = (("image_path", "key"), ("shard", "key", "url"))


def _require_other_images(gallery_metadata, gallery_folder, metadata, folder) -> None:
    """An :class:`InputError` when the gallery holds query images: the same folder given
    twice, or rows with the same values in every column of one of :data:`SAME_IMAGE_COLUMNS`
    (an image file, or a shard's sample). Each would find itself first and lift every score.
    Folders without those columns (clip-retrieval's, whose ``image_path`` of a webdataset is
    the sample's key, the same in shards of other images) are compared as folders only."""
    same = storage.absolute(gallery_folder) == storage.absolute(folder)
    shared = []
    for columns in SAME_IMAGE_COLUMNS:
        if same or shared or not all(m is not None and set(columns) <= set(m.column_names)
                                     for m in (metadata, gallery_metadata)):
            continue

        def images(m):  # (identity, key) of each row that has every identity column
            values = zip(*(m.column(name).to_pylist() for name in columns))
            return [(row, str(row[columns.index("key")])) for row in values if None not in row]

        in_gallery = {row for row, _ in images(gallery_metadata)}
        shared = [key for row, key in images(metadata) if row in in_gallery]
    if same or shared:
        what = "is the folder of the queries" if same else (
            f"holds {len(shared)} of the query images of {storage.text(folder)} (e.g. {', '.join(shared[:3])})")
        raise InputError(f"{storage.text(gallery_folder)} (--gallery-embeddings) {what}: each query would find itself "
                         "first and lift every score; leave --gallery-embeddings out to search the queries "
                         "leave-one-out, or give a gallery without them")


def _add_note(info: dict, note: str) -> None:
    info["note"] = f"{info['note']}; {note}" if info.get("note") else note


def _note_unlabelled_rows(info: dict, lookup: dict | None, labels_file, folders) -> None:
    """Note the keys of ``labels_file`` that no folder of ``folders`` (root, metadata) holds:
    images labelled but never embedded (a failed or partial embedding run) are not scored."""
    if lookup is None:
        return
    embedded = set()
    for root, metadata in folders:
        if metadata is not None:  # a train folder for the PCA alone may have no keys
            embedded.update(row_keys(metadata, root))
    absent = [key for key in lookup if key not in embedded]
    if absent:
        _add_note(info, f"{len(absent)} of the {len(lookup)} keys of {labels_file} have no embedding in "
                        f"{', '.join(str(root) for root, _ in folders)} and are not scored, e.g. "
                        f"{', '.join(map(repr, absent[:3]))}")


def _require_shared_classes(train_y, test_y, train_root, test_root) -> None:
    """Refuse a test split none of whose classes the train split has: every prediction would be
    wrong and the scores 0 (a folder of class names against one of numbers, as an older unicom
    embed stored a list's names)."""
    train, test = {str(v) for v in np.asarray(train_y).tolist()}, {str(v) for v in np.asarray(test_y).tolist()}
    if train.isdisjoint(test):
        raise InputError(
            f"{test_root}: none of its {len(test)} test classes (e.g. {', '.join(sorted(test)[:3])}) is a class of the "
            f"train split {train_root} (e.g. {', '.join(sorted(train)[:3])}); give both splits the same labels (a "
            f"folder that an older unicom embed made from a list holds numbers for the list's class names: embed it "
            f"again, or give --labels)")


def _shared_ids(*label_arrays):
    """Label arrays -> int64 ids in one vocabulary (labels may be names)."""
    arrays = [np.asarray(a) for a in label_arrays]
    if not all(np.issubdtype(a.dtype, np.integer) for a in arrays):
        arrays = [a.astype(str) for a in arrays]
    _, inverse = np.unique(np.concatenate(arrays), return_inverse=True)
    return np.split(inverse.astype(np.int64), np.cumsum([len(a) for a in arrays])[:-1])
