"""Evaluation: retrieval metrics, benchmark protocols, compact dimensions, linear probe, kNN.

* :func:`retrieval_metrics` / :func:`retrieval_metrics_from_relevance` (``metrics``): the
  one implementation of Recall@K, MAP@R, R-Precision, mAP@100 and mMP@5, on an exact,
  chunked k-NN search (:func:`knn_search`); :func:`revisited_metrics`: mAP and mP@k of the
  Revisited Oxford/Paris easy, medium and hard setups.
* :func:`dimension_curve` (``dims``): metrics of the first d dimensions and of a PCA-to-d
  baseline; :class:`PCA` also whitens (``PCA.fit(x).whiten(y)``).
* :class:`Expansion`, :func:`expand` (``expansion``): re-ranking by α-query expansion and
  database-side augmentation; :class:`KReciprocal` (``kreciprocal``): k-reciprocal re-ranking;
  :class:`Diffusion` (``diffusion``): diffusion over the gallery's neighbour graph.
* :func:`linear_probe`, :func:`knn_classify` (``probe``): frozen-feature classification.
* :func:`evaluate_retrieval`, :func:`evaluate_classification` (``report``): a whole
  benchmark run, with ``metrics.json``, a markdown table and the Recall@1-vs-dimension PNG.

Names are resolved on first use, so ``import unicom.evaluate`` imports neither
scikit-learn nor matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "retrieval_metrics": "unicom.evaluate.metrics",
    "retrieval_metrics_from_relevance": "unicom.evaluate.metrics",
    "knn_search": "unicom.evaluate.metrics",
    "pairs_above": "unicom.evaluate.metrics",
    "revisited_metrics": "unicom.evaluate.metrics",
    "dimension_curve": "unicom.evaluate.dims",
    "first_dimensions": "unicom.evaluate.dims",
    "PCA": "unicom.evaluate.dims",
    "Expansion": "unicom.evaluate.expansion",
    "expand": "unicom.evaluate.expansion",
    "KReciprocal": "unicom.evaluate.kreciprocal",
    "Diffusion": "unicom.evaluate.diffusion",
    "linear_probe": "unicom.evaluate.probe",
    "knn_classify": "unicom.evaluate.probe",
    "evaluate_retrieval": "unicom.evaluate.report",
    "evaluate_classification": "unicom.evaluate.report",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'unicom.evaluate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
