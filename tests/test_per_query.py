"""`unicom evaluate --per-query`: each query's metrics of the evaluated search as a parquet
table, against a plain walk of each ranking, for labels, relevance lists and the Revisited setups."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_evaluate_cli import clustered, embedding_folder, tiny_model_file
from test_revisited import GND, NAMES, QUERIES, revisited_dataset

from unicom.cli import main
from unicom.evaluate.report import evaluate_retrieval
from unicom.formats.embeddings import read_embedding_folder


def walked(similarities: np.ndarray, relevant: set, leave_out: int | None = None) -> dict:
    """One query's metrics by walking its ranking (equal similarities by lower row)."""
    row = similarities.astype(np.float64).copy()
    if leave_out is not None:
        row[leave_out] = -np.inf
    order = [i for i in np.argsort(-row, kind="stable") if i != leave_out]
    hits = np.array([i in relevant for i in order], dtype=float)
    r = len(relevant)
    if r == 0:
        return {"relevant": 0, "first_relevant_rank": 0}
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return {
        "relevant": r,
        "first_relevant_rank": int(np.argmax(hits) + 1),
        "map@r": float(np.sum(precision[:r] * hits[:r]) / r),
        "r_precision": float(hits[:r].sum() / r),
        "map@100": float(np.sum(precision[:100] * hits[:100]) / min(r, 100)),
        "mmp@5": float(hits[:min(5, r)].sum() / min(5, r)),
    }


def test_each_querys_metrics_of_a_leave_one_out_search_equal_a_walk_of_its_ranking(tmp_path):
    x, labels = clustered(120, 16, 12, 1.0, seed=5)
    keys = [f"img{i:03d}" for i in range(120)]
    embedding_folder(tmp_path / "emb", x, keys, labels.tolist())
    out = tmp_path / "eval"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--out", str(out), "--dims", "none",
                 "--per-query"]) == 0
    table = pq.read_table(out / "per_query.parquet")
    assert table.column_names == ["query", "label", "relevant", "first_relevant_rank", "map@r", "r_precision",
                                  "map@100", "mmp@5"]
    assert table.column("query").to_pylist() == keys and table.column("label").to_pylist() == labels.tolist()
    x = read_embedding_folder(tmp_path / "emb")[0]  # as stored (float16)
    similarities = x.astype(np.float64) @ x.T.astype(np.float64)
    for row in range(120):
        expected = walked(similarities[row], {i for i in range(120) if labels[i] == labels[row] and i != row}, row)
        for name, value in expected.items():
            assert table.column(name)[row].as_py() == pytest.approx(value, abs=1e-9), (row, name)
    report = json.loads((out / "metrics.json").read_text())
    for name in ("map@r", "r_precision", "map@100", "mmp@5"):
        assert np.mean(table.column(name).to_numpy()) == pytest.approx(report["metrics"][name], abs=1e-12)
    ranks = table.column("first_relevant_rank").to_numpy()
    assert np.mean(ranks <= 1) == pytest.approx(report["metrics"]["recall@1"])
    assert report["per_query"]["file"] == "per_query.parquet"
    assert "Per query (per_query.parquet)" in (out / "metrics.md").read_text()


def test_re_ranked_per_query_metrics_are_those_of_the_re_ranked_search(tmp_path):
    x, labels = clustered(90, 16, 9, 1.0, seed=6)
    embedding_folder(tmp_path / "emb", x, [f"k{i}" for i in range(90)], labels.tolist())
    out = tmp_path / "eval"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--out", str(out), "--dims", "none",
                 "--k-reciprocal", "10", "--per-query"]) == 0
    table = pq.read_table(out / "per_query.parquet")
    report = json.loads((out / "metrics.json").read_text())
    assert np.mean(table.column("map@r").to_numpy()) == pytest.approx(report["metrics"]["map@r"], abs=1e-12)
    assert report["metrics"]["map@r"] != pytest.approx(report["without_expansion"]["map@r"], abs=1e-6)


def test_relevance_lists_leave_queries_without_one_unscored_and_mark_each_subset(tmp_path):
    rng = np.random.default_rng(2)
    gallery = rng.normal(size=(30, 8)).astype(np.float32)
    query = rng.normal(size=(5, 8)).astype(np.float32)
    relevant = [np.array([3, 7]), np.array([], dtype=np.int64), np.array([0]), np.array([29, 1, 2]), np.array([5])]
    report = evaluate_retrieval(query, None, gallery, None, relevant=relevant, ks=(1, 10), out=tmp_path,
                                subsets={"public": np.array([0, 1]), "private": np.array([2, 3, 4])}, per_query=True)
    table = pq.read_table(tmp_path / "per_query.parquet")
    assert table.column("query").to_pylist() == [f"#{row}" for row in range(5)]
    assert "label" not in table.column_names
    assert table.column("subset_public").to_pylist() == [True, True, False, False, False]
    assert table.column("subset_private").to_pylist() == [False, False, True, True, True]
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    similarities = q.astype(np.float64) @ g.T.astype(np.float64)
    for row in range(5):
        expected = walked(similarities[row], set(relevant[row].tolist()))
        for name, value in expected.items():
            assert table.column(name)[row].as_py() == pytest.approx(value, abs=1e-9)
    assert np.isnan(table.column("map@r")[1].as_py()) and report["metrics"]["n_excluded"] == 1


def revisited_walk(similarities: np.ndarray, positives: set, ignored: set) -> float:
    """A query's Revisited AP: its ranking without the ignored images, walked."""
    ranking = [i for i in np.argsort(-similarities, kind="stable") if i not in ignored - positives]
    ap, found = 0.0, 0
    for rank, item in enumerate(ranking):
        if item in positives:
            before = 1.0 if rank == 0 else found / rank
            found += 1
            ap += (before + found / (rank + 1)) / 2 / len(positives)
    return ap


def test_revisited_per_query_ap_of_each_setup(tmp_path):
    checkpoint = tiny_model_file(tmp_path / "model.pt")
    root = revisited_dataset(tmp_path / "data", "roxford5k")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "roxford5k", "--root", str(root), "--out",
                 str(out), "--dims", "none", "--workers", "0", "--per-query"]) == 0
    table = pq.read_table(out / "per_query.parquet")
    assert table.column("query").to_pylist() == [f"jpg/{name}.jpg#crop" for name in QUERIES]
    assert {"ap_easy", "ap_medium", "ap_hard", "p@1_medium", "p@5_hard", "p@10_easy"} <= set(table.column_names)
    query = read_embedding_folder(out / "embeddings" / "query")[0]
    gallery = read_embedding_folder(out / "embeddings" / "gallery")[0]
    similarities = query.astype(np.float64) @ gallery.T.astype(np.float64)
    setups = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
              "hard": (("hard",), ("junk", "easy"))}
    for name, (positive_lists, ignored_lists) in setups.items():
        for q, gnd in enumerate(GND):
            positives = {int(i) for f in positive_lists for i in gnd[f]}
            ignored = {int(i) for f in ignored_lists for i in gnd[f]}
            value = table.column(f"ap_{name}")[q].as_py()
            if not positives:
                assert np.isnan(value)
            else:
                assert value == pytest.approx(revisited_walk(similarities[q], positives, ignored), abs=1e-9)
    assert len(NAMES) == gallery.shape[0]


def test_per_query_is_refused_for_classification(tmp_path, capsys):
    assert main(["evaluate", "--embeddings", str(tmp_path), "--train-embeddings", str(tmp_path), "--task",
                 "classification", "--out", str(tmp_path / "o"), "--per-query"]) == 2
    assert "leave --per-query out" in capsys.readouterr().err
