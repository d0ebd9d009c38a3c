"""Classification on frozen features: CLIP's linear probe and weighted kNN.

* :func:`linear_probe`: L2-regularised multinomial logistic regression (scikit-learn,
  L-BFGS, at most 1,000 iterations) on the L2-normalised features. C = 1/lambda is chosen on a validation split carved
  from train (20%, stratified when every class allows it; a class's only image is never in it): first C in
  {1e-6, 1e-4, ..., 1e6}, then around the best value the step in log10(C) is halved,
  2 -> 1 -> 1/2 -> 1/4 -> 1/8 decade (CLIP's parametric search, 8 steps per decade). The
  model is refitted on train + val with the chosen C and scored on test.
* :func:`knn_classify`: each test feature takes the labels of its k = 20 nearest training
  features (cosine, :func:`~unicom.evaluate.metrics.knn_search`), each vote weighted by
  exp(similarity / 0.07); the class with the largest total wins, ties to the lower label.

``accuracy`` is the fraction of correct predictions; ``mean_per_class`` the mean over
classes present in the test labels of the per-class accuracy (CLIP reports it for
FGVC-Aircraft, Oxford Pets, Caltech-101 and Flowers-102).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from unicom.errors import InputError
from unicom.evaluate.metrics import as_embeddings, knn_search

LOG10_C_START = (-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0)
FINEST_STEP = 1 / 8  # decades


def classification_scores(predictions, labels) -> dict:
    """``{"accuracy", "mean_per_class"}`` of integer predictions against labels (N,)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    correct = predictions == labels
    classes = np.unique(labels)
    per_class = [correct[labels == c].mean() for c in classes]
    return {"accuracy": float(correct.mean()), "mean_per_class": float(np.mean(per_class))}


def check_splits(train_features, train_labels, test_features, test_labels=None, names=("train", "test")):
    """``(x, y, x_test, y_test)`` as float32 (N, D) and int64 (N,) arrays (``y_test`` None
    when not given; ``x``, ``y`` None when ``train_features`` is None: the test split alone),
    or :class:`InputError` naming the split (``names``) and the row: a shape that is not
    (N, D) with N labels, NaN or infinite values, or train and test features of different
    dimensions."""
    checked = []
    for features, labels, name in ((train_features, train_labels, names[0]), (test_features, test_labels, names[1])):
        if features is None and name == names[0]:
            checked += [None, None]
            continue
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or (labels is not None and len(features) != len(labels)):
            shape = "" if labels is None else f" and {np.shape(labels)[0]} labels"
            raise InputError(f"{name}: expected (N, D) features and N labels, got features of shape {features.shape}{shape}")
        bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
        if len(bad):
            raise InputError(f"{name}: row {bad[0]} holds NaN or infinite values ({len(bad)} of its {len(features)} rows do)")
        checked += [features, None if labels is None else np.asarray(labels).astype(np.int64)]
    if checked[0] is not None and checked[0].shape[1] != checked[2].shape[1]:
        raise InputError(f"{names[0]} features have {checked[0].shape[1]} dimensions but {names[1]} features "
                         f"{checked[2].shape[1]}: embed both splits with the same model")
    return tuple(checked)


def _validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, val)`` rows: ``val`` is ``fraction`` of the rows, drawn from the classes of two
    or more images (a class's only image stays in ``fit``: the fit part then has every class)."""
    from sklearn.model_selection import train_test_split

    _, class_of, counts = np.unique(labels, return_inverse=True, return_counts=True)  # any label values (ids, hashes)
    pool = np.flatnonzero(counts[class_of] >= 2)
    if len(pool) == 0:
        raise InputError("every class of the train split has a single image: the linear probe needs a class with "
                         "two or more to carve a validation split from (leave the probe out: --no-probe)")
    classes = len(np.unique(labels[pool]))
    n_val = min(max(1, round(fraction * len(labels))), len(pool) - 1)
    stratify = labels[pool] if classes <= n_val <= len(pool) - classes else None
    _, val = train_test_split(pool, test_size=n_val, random_state=seed, shuffle=True, stratify=stratify)
    return np.setdiff1d(np.arange(len(labels)), val), np.sort(val)


def _fit(features, labels, c: float, max_iter: int):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter)
    with warnings.catch_warnings():
        # hitting the iteration cap is part of the protocol (1,000 iterations at most)
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(features, labels)
    return model


def linear_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    metric: str = "accuracy",
    val_fraction: float = 0.2,
    max_iter: int = 1000,
    seed: int = 0,
    log10_c: Sequence[float] | None = None,
) -> dict:
    """CLIP's linear-probe protocol on frozen features (module docstring).

    Args:
        train_features, test_features: (N, D) float features, L2-normalised here (as the
            retrieval metrics and kNN compare them: by direction); labels: (N,) integers.
        metric: ``"accuracy"`` or ``"mean_per_class"``, used to choose C on validation.
        log10_c: a fixed grid of log10(C) to search instead of the halving search.

    Returns:
        ``{"accuracy", "mean_per_class", "C", "validation": {metric: best value},
        "search": [[C, validation value], ...] in the order tried}``.
    """
    if metric not in ("accuracy", "mean_per_class"):
        raise InputError(f"metric must be 'accuracy' or 'mean_per_class', got {metric!r}")
    x, y, x_test, y_test = check_splits(train_features, train_labels, test_features, test_labels)
    x, x_test = as_embeddings(x, "train").numpy(), as_embeddings(x_test, "test").numpy()
    if len(np.unique(y)) < 2:
        raise InputError("train labels hold a single class; a classifier needs at least two")
    fit, val = _validation_split(y, val_fraction, seed)
    tried: dict[float, float] = {}

    def validate(log_c: float) -> float:
        if log_c not in tried:
            model = _fit(x[fit], y[fit], 10.0 ** log_c, max_iter)
            tried[log_c] = classification_scores(model.predict(x[val]), y[val])[metric]
        return tried[log_c]

    def best() -> float:  # highest score, then the smallest C (the strongest regularisation)
        return max(tried, key=lambda c: (tried[c], -c))

    if log10_c is not None:
        for log_c in log10_c:
            validate(float(log_c))
    else:
        for log_c in LOG10_C_START:
            validate(log_c)
        step = LOG10_C_START[1] - LOG10_C_START[0]
        while step > FINEST_STEP:
            step /= 2
            centre = best()
            for log_c in (centre - step, centre + step):
                if LOG10_C_START[0] <= log_c <= LOG10_C_START[-1]:
                    validate(log_c)
    chosen = best()
    model = _fit(x, y, 10.0 ** chosen, max_iter)
    result = classification_scores(model.predict(x_test), y_test)
    result.update(
        C=10.0 ** chosen,
        validation={metric: tried[chosen]},
        search=[[10.0 ** c, v] for c, v in tried.items()],
    )
    return result


def knn_classify(
    train_features,
    train_labels,
    test_features,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Predicted labels (N_test,) int64 by similarity-weighted voting of the k nearest.

    Votes: sum over the k nearest training features (cosine) of exp(similarity /
    temperature) per label; argmax, ties to the lower label.
    """
    x, y, x_test, _ = check_splits(train_features, train_labels, test_features)
    if k > len(x):
        raise InputError(f"k={k} neighbours asked for but the train split has {len(x)} features: use a k of at "
                         f"most {len(x)} (unicom evaluate --knn-k), or leave kNN out (--no-knn)")
    if temperature <= 0 or not math.isfinite(temperature):
        raise InputError(f"temperature must be a positive number, got {temperature}")
    similarities, neighbours = knn_search(x_test, x, k, chunk_size=chunk_size)
    classes, y_index = np.unique(y, return_inverse=True)
    votes_for = y_index[neighbours]  # (N, k) class positions
    # exp(s/T) - shifted by the row maximum, which leaves the argmax unchanged
    weights = np.exp((similarities.astype(np.float64) - similarities[:, :1]) / temperature)
    predictions = np.empty(len(x_test), dtype=np.int64)
    block = max(1, 2**24 // max(1, len(classes)))
    for start in range(0, len(x_test), block):
        stop = min(start + block, len(x_test))
        tally = np.zeros((stop - start, len(classes)))
        np.add.at(tally, (np.arange(stop - start)[:, None], votes_for[start:stop]), weights[start:stop])
        predictions[start:stop] = classes[tally.argmax(1)]
    return predictions


def knn_accuracy(train_features, train_labels, test_features, test_labels, **options) -> dict:
    """:func:`classification_scores` of :func:`knn_classify` (``k``, ``temperature`` in options)."""
    predictions = knn_classify(train_features, train_labels, test_features, **options)
    result = classification_scores(predictions, test_labels)
    result.update(k=options.get("k", 20), temperature=options.get("temperature", 0.07))
    return result
