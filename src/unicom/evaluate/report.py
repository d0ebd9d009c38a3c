"""A whole evaluation run on embeddings: numbers, compact-dimension curves, files.

:func:`evaluate_retrieval` and :func:`evaluate_classification` compute everything first,
then (with ``out``) write ``metrics.json``, ``metrics.md`` and, for retrieval with
dimensions, ``recall_vs_dimension.png``, each under a temporary name and renamed. A failed
run leaves no partial report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from unicom.evaluate.dims import dimension_curve, score
from unicom.evaluate.metrics import METRIC_KEYS, summarize
from unicom.files import sweep_temporaries, write_json_atomic, write_text_atomic

JSON_NAME = "metrics.json"
MARKDOWN_NAME = "metrics.md"
PLOT_NAME = "recall_vs_dimension.png"


def evaluate_retrieval(
    query,
    query_labels=None,
    gallery=None,
    gallery_labels=None,
    *,
    relevant=None,
    subsets: dict[str, np.ndarray] | None = None,
    train=None,
    ks: Sequence[int] = (1, 2, 4, 8),
    metric: str = "recall@1",
    dims: Sequence[int] = (),
    chunk_size: int | None = None,
    out: str | os.PathLike | None = None,
    info: dict[str, Any] | None = None,
) -> dict:
    """Score a retrieval protocol on embeddings; optionally write the report under ``out``.

    Args:
        query, gallery: (N, D) embeddings (``gallery=None``: leave-one-out over ``query``).
        query_labels, gallery_labels: class per row; or ``relevant`` lists (GLDv2).
        subsets: named query-row arrays scored separately as well (GLDv2 public/private).
        train: train-split embeddings; with ``dims``, the PCA baseline is fitted on them.
        metric: the headline metric, drawn against the dimension.
        dims: dimensions d of the compact-dimension curve (empty: no curve).
        info: extra fields for the report (dataset, model, ...).

    Returns the report: ``{**info, "protocol": {...}, "metrics": {...}, "subsets":
    {name: metrics}, "dimensions": [rows of dimension_curve]}``.
    """
    full = score(query, query_labels, gallery, gallery_labels, relevant=relevant, ks=ks, chunk_size=chunk_size,
                 per_query=bool(subsets))
    per_query = full.pop("per_query", None)
    if metric not in full:
        raise ValueError(f"metric {metric!r} is not computed; choose one of {sorted(full)}")
    report: dict[str, Any] = dict(info or {})
    report["protocol"] = {
        "queries": int(np.asarray(query).shape[0]),
        "gallery": None if gallery is None else int(np.asarray(gallery).shape[0]),
        "leave_one_out": gallery is None,
        "embedding_dim": int(np.asarray(query).shape[1]),
        "ks": [int(k) for k in ks],
        "metric": metric,
    }
    report["metrics"] = full
    if subsets:
        report["subsets"] = {name: summarize(per_query, ks, rows) for name, rows in subsets.items()}
    if dims:
        report["dimensions"] = dimension_curve(
            query, query_labels, gallery, gallery_labels, dims=dims, train=train, relevant=relevant, ks=ks,
            chunk_size=chunk_size,
        )
    if out is not None:
        write_retrieval_report(report, out)
    return report


def write_retrieval_report(report: dict, out: str | os.PathLike) -> None:
    from unicom.evaluate.plots import plot_dimension_curve

    out = Path(out)
    sweep_temporaries(out, [PLOT_NAME, MARKDOWN_NAME, JSON_NAME])  # what a killed run left
    metric = report["protocol"]["metric"]
    if report.get("dimensions"):
        title = " / ".join(str(report[k]) for k in ("dataset", "model") if report.get(k))
        plot_dimension_curve(report["dimensions"], out / PLOT_NAME, metric=metric, title=title)
    write_text_atomic(out / MARKDOWN_NAME, retrieval_markdown(report))
    write_json_atomic(out / JSON_NAME, report)


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def retrieval_markdown(report: dict) -> str:
    """The report as markdown tables: metrics (in %), subsets, and the dimension curve."""
    protocol = report["protocol"]
    heading = " · ".join(str(report[k]) for k in ("dataset", "model", "embeddings") if report.get(k)) or "retrieval"
    search = "leave-one-out" if protocol["leave_one_out"] else f"against a gallery of {protocol['gallery']}"
    metrics = report["metrics"]
    lines = [
        f"# {heading}",
        "",
        f"{protocol['queries']} queries {search}, dimension {protocol['embedding_dim']}; "
        f"{metrics['n_queries']} scored, {metrics['n_excluded']} without a relevant item excluded.",
        "",
    ]
    columns = [f"recall@{k}" for k in protocol["ks"]] + list(METRIC_KEYS)
    rows = [("all", metrics)] + list(report.get("subsets", {}).items())
    lines += ["| queries | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in rows:
        lines.append(f"| {name} | " + " | ".join(_percent(values[c]) for c in columns) + " |")
    if report.get("dimensions"):
        metric = protocol["metric"]
        by = {(row["method"], row["dimension"]): row[metric] for row in report["dimensions"]}
        dims = sorted({row["dimension"] for row in report["dimensions"]})
        has_pca = any(method == "pca" for method, _ in by)
        lines += ["", f"## {metric} (%) by embedding dimension", ""]
        lines += ["| dimension | first d dimensions |" + (" PCA to d |" if has_pca else ""),
                  "|---|---|" + ("---|" if has_pca else "")]
        for d in dims:
            cells = [_percent(by[("first", d)])] + ([_percent(by[("pca", d)])] if has_pca else [])
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_classification(
    train,
    train_labels,
    test,
    test_labels,
    *,
    metric: str = "accuracy",
    probe: bool = True,
    knn: bool = True,
    knn_k: int = 20,
    temperature: float = 0.07,
    out: str | os.PathLike | None = None,
    info: dict[str, Any] | None = None,
) -> dict:
    """Linear probe and kNN accuracy of frozen features; optionally write the report."""
    from unicom.evaluate.probe import knn_accuracy, linear_probe

    report: dict[str, Any] = dict(info or {})
    report["protocol"] = {
        "train": int(len(train)),
        "test": int(len(test)),
        "classes": int(len(np.unique(np.asarray(train_labels)))),
        "embedding_dim": int(np.asarray(train).shape[1]),
        "metric": metric,
    }
    if probe:
        report["linear_probe"] = linear_probe(train, train_labels, test, test_labels, metric=metric)
    if knn:
        report["knn"] = knn_accuracy(train, train_labels, test, test_labels, k=knn_k, temperature=temperature)
    if out is not None:
        out = Path(out)
        sweep_temporaries(out, [MARKDOWN_NAME, JSON_NAME])  # what a killed run left
        write_text_atomic(out / MARKDOWN_NAME, classification_markdown(report))
        write_json_atomic(out / JSON_NAME, report)
    return report


def classification_markdown(report: dict) -> str:
    protocol = report["protocol"]
    heading = " · ".join(str(report[k]) for k in ("dataset", "model", "embeddings") if report.get(k)) or "classification"
    lines = [
        f"# {heading}",
        "",
        f"{protocol['train']} train and {protocol['test']} test images, {protocol['classes']} classes, "
        f"dimension {protocol['embedding_dim']}; the dataset's metric is {protocol['metric']}.",
        "",
        "| method | accuracy (%) | mean per class (%) | setting |",
        "|---|---|---|---|",
    ]
    if "linear_probe" in report:
        p = report["linear_probe"]
        lines.append(f"| linear probe | {_percent(p['accuracy'])} | {_percent(p['mean_per_class'])} | C = {p['C']:.4g} |")
    if "knn" in report:
        k = report["knn"]
        lines.append(f"| kNN | {_percent(k['accuracy'])} | {_percent(k['mean_per_class'])} | "
                     f"k = {k['k']}, T = {k['temperature']} |")
    return "\n".join(lines) + "\n"
