"""k-reciprocal re-ranking: against the re-ranking code of Zhong et al. as torchreid ships it,
through every metric protocol, and through `unicom evaluate`."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate_cli import clustered
from test_expansion import re_ranked_folders, re_ranked_revisited, reference_expand
from test_revisited import straightforward_metrics

from unicom.errors import InputError
from unicom.evaluate import KReciprocal, knn_search, retrieval_metrics, retrieval_metrics_from_relevance
from unicom.evaluate.dims import score
from unicom.evaluate.expansion import Expansion
from unicom.evaluate.kreciprocal import KReciprocalScores


def zhong_re_ranking():
    """``re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)`` of torchreid (the
    person-re-ranking code of the paper's authors), read from its file: the package itself
    imports its training stack."""
    folder = Path(importlib.util.find_spec("torchreid").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("torchreid_rerank", folder / "reid" / "utils" / "rerank.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.re_ranking


def euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The Euclidean distances of unit rows (the reference squares them)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sqrt(np.maximum(2.0 - 2.0 * a @ b.T, 0.0))


def reference_distances(query, gallery, k1, k2, lam) -> np.ndarray:
    return zhong_re_ranking()(euclidean(query, gallery), euclidean(query, query), euclidean(gallery, gallery),
                              k1=k1, k2=k2, lambda_value=lam)


def reference_leave_one_out(x, k1, k2, lam) -> np.ndarray:
    """(N, N) re-ranked distances of each row to the others (diagonal NaN): row i is the
    reference's query x_i against the gallery of the other rows, whose items are all of x."""
    out = np.full((len(x), len(x)), np.nan)
    for i in range(len(x)):
        others = np.delete(np.arange(len(x)), i)
        out[i, others] = reference_distances(x[[i]], x[others], k1, k2, lam)[0]
    return out


def re_scored(query, gallery, settings: KReciprocal) -> np.ndarray:
    """-d* of every query against every gallery item (the gallery: the queries when None)."""
    scores = KReciprocalScores(query, gallery, settings)
    similarities = torch.from_numpy(query @ (query if gallery is None else gallery).T)
    return -scores(torch.arange(len(query)), similarities).numpy()


def walk_metrics(distances: np.ndarray, query_labels, gallery_labels, ks) -> dict:
    """Recall@K, MAP@R and R-Precision walking each row's ranking by distance (NaN: left out)."""
    recalls, map_r, r_precision = {k: [] for k in ks}, [], []
    for row, label in zip(distances, query_labels):
        order = [j for j in np.argsort(row, kind="stable") if not np.isnan(row[j])]
        relevant = [gallery_labels[j] == label for j in order]
        r = sum(relevant)
        for k in ks:
            recalls[k].append(any(relevant[:k]))
        hits = np.cumsum(relevant[:r])
        map_r.append(sum(hits[i] / (i + 1) for i in range(r) if relevant[i]) / r)
        r_precision.append(hits[-1] / r)
    return {**{f"recall@{k}": np.mean(recalls[k]) for k in ks}, "map@r": np.mean(map_r),
            "r_precision": np.mean(r_precision)}


# --------------------------------------------------------------------------- the distances

@pytest.mark.parametrize("k1, k2, lam", [(6, 3, 0.3), (20, 6, 0.3), (10, 1, 0.0), (5, 6, 0.5), (3, 2, 1.0)])
def test_re_ranked_distances_equal_the_reference(k1, k2, lam):
    query, _ = clustered(12, 8, 4, 0.8, seed=1)
    gallery, _ = clustered(40, 8, 4, 0.8, seed=2)
    expected = reference_distances(query, gallery, k1, k2, lam)
    np.testing.assert_allclose(re_scored(query, gallery, KReciprocal(k1, k2, lam)), expected, atol=1e-6)


def test_leave_one_out_equals_the_reference_of_each_query_against_the_others():
    x, _ = clustered(30, 8, 3, 0.9, seed=3)
    expected = reference_leave_one_out(x, 6, 3, 0.3)
    got = re_scored(x, None, KReciprocal(6, 3, 0.3))
    off_diagonal = ~np.eye(len(x), dtype=bool)
    np.testing.assert_allclose(got[off_diagonal], expected[off_diagonal], atol=1e-6)


def test_the_overlap_is_gathered_in_pieces_alike(monkeypatch):
    query, _ = clustered(12, 8, 4, 0.8, seed=1)
    gallery, _ = clustered(40, 8, 4, 0.8, seed=2)
    whole = KReciprocalScores(query, gallery, KReciprocal(6, 3, 0.3)).jaccard_overlap(np.arange(12))
    monkeypatch.setattr("unicom.evaluate.kreciprocal.PAIRS_AT_ONCE", 7)
    monkeypatch.setattr("unicom.evaluate.kreciprocal.ROWS_AT_ONCE", 5)
    monkeypatch.setattr("unicom.evaluate.kreciprocal.WEIGHT_VALUES_AT_ONCE", 50)
    pieces = KReciprocalScores(query, gallery, KReciprocal(6, 3, 0.3)).jaccard_overlap(np.arange(12))
    np.testing.assert_allclose(pieces, whole, atol=1e-12)
    assert (whole > 0).any() and (whole == 0).any()


def test_the_search_gives_each_rows_lowest_similarity():
    x, _ = clustered(25, 6, 3, 1.0, seed=5)
    similarities = x.astype(np.float64) @ x.T.astype(np.float64)
    _, _, lowest = knn_search(x, x[:7], 3, lowest=True, chunk_size=4)
    np.testing.assert_allclose(lowest, similarities[:, :7].min(1), atol=1e-6)
    np.fill_diagonal(similarities, np.inf)
    _, _, lowest = knn_search(x, None, 3, lowest=True, chunk_size=4)
    np.testing.assert_allclose(lowest, similarities.min(1), atol=1e-6)


# --------------------------------------------------------------------------- the metrics

def test_labelled_metrics_rank_by_the_re_ranked_distances():
    query, query_labels = clustered(24, 8, 4, 1.1, seed=6)
    gallery, gallery_labels = clustered(60, 8, 4, 1.1, seed=7)
    settings = KReciprocal(8, 4, 0.3)
    expected = walk_metrics(reference_distances(query, gallery, 8, 4, 0.3), query_labels, gallery_labels, (1, 2, 4))
    rescore = KReciprocalScores(query, gallery, settings)
    for chunk_size in (None, 5):
        got = retrieval_metrics(query, query_labels, gallery, gallery_labels, ks=(1, 2, 4), chunk_size=chunk_size,
                                rescore=rescore)
        assert {key: got[key] for key in expected} == pytest.approx(expected)
    plain = retrieval_metrics(query, query_labels, gallery, gallery_labels, ks=(1, 2, 4))
    assert got != plain  # the re-ranking changed the order


def test_leave_one_out_metrics_rank_by_the_re_ranked_distances():
    x, labels = clustered(40, 8, 5, 1.1, seed=8)
    expected = walk_metrics(reference_leave_one_out(x, 6, 3, 0.3), labels, labels, (1, 4))
    got = score(x, labels, ks=(1, 4), expansion=Expansion(k_reciprocal=KReciprocal(6, 3, 0.3)))
    assert {key: got[key] for key in expected} == pytest.approx(expected)


def test_relevance_lists_rank_by_the_re_ranked_distances():
    query, query_labels = clustered(10, 8, 3, 1.0, seed=9)
    gallery, gallery_labels = clustered(30, 8, 3, 1.0, seed=10)
    relevant = [np.flatnonzero(gallery_labels == label) for label in query_labels]
    expected = walk_metrics(reference_distances(query, gallery, 5, 2, 0.5), query_labels, gallery_labels, (1, 5))
    got = retrieval_metrics_from_relevance(query, gallery, relevant, ks=(1, 5),
                                           rescore=KReciprocalScores(query, gallery, KReciprocal(5, 2, 0.5)))
    assert {key: got[key] for key in expected} == pytest.approx(expected)


def test_database_side_augmentation_then_k_reciprocal_re_ranking():
    query, query_labels = clustered(12, 8, 3, 1.0, seed=11)
    gallery, gallery_labels = clustered(36, 8, 3, 1.0, seed=12)
    _, augmented = reference_expand(query, gallery, 0, 2, 3.0, 3.0)
    expected = walk_metrics(reference_distances(query, augmented, 5, 3, 0.3), query_labels, gallery_labels, (1, 2))
    got = score(query, query_labels, gallery, gallery_labels, ks=(1, 2),
                expansion=Expansion(dba=2, k_reciprocal=KReciprocal(5, 3, 0.3)))
    assert {key: got[key] for key in expected} == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- settings

@pytest.mark.parametrize("settings, message", [
    ((0,), "k1 is a number of neighbours, at least 1"), ((5, 0), "k2 is a number of neighbours"), ((5, 2.5), "k2 is a number"),
    ((5, 7), r"k2 \(7\) averages V over an item's k2 - 1 nearest neighbours, and only k1 = 5"),
    ((5, 2, 1.5), "lambda is the share of the original distance"), ((5, 2, float("nan")), "lambda"),
    ((True,), "k1 is a number"),
])
def test_settings_out_of_range_are_refused(settings, message):
    with pytest.raises(InputError, match=message):
        KReciprocal(*settings)


def test_more_neighbours_than_there_are_items_are_refused():
    x, _ = clustered(8, 4, 2, 1.0, seed=1)
    with pytest.raises(InputError, match=r"k1 = 8 neighbours, but there are 8 items .* give k1 of at most 7"):
        KReciprocalScores(x, None, KReciprocal(8))


# --------------------------------------------------------------------------- unicom evaluate

def test_embedding_folders_are_re_ranked_and_reported(tmp_path, capsys):
    report, query, query_labels, gallery, gallery_labels = re_ranked_folders(
        tmp_path, 30, "--k-reciprocal", "10", "--k-reciprocal-k2", "3")
    out = tmp_path / "report"
    assert report["protocol"]["expansion"] == {"k_reciprocal": {"k1": 10, "k2": 3, "lambda": 0.3}}
    expected = walk_metrics(reference_distances(query, gallery, 10, 3, 0.3), query_labels, gallery_labels, (1, 4))
    assert {key: report["metrics"][key] for key in expected} == pytest.approx(expected)
    assert report["without_expansion"] == pytest.approx(
        retrieval_metrics(query, query_labels, gallery, gallery_labels, ks=(1, 4)))
    markdown = (out / "metrics.md").read_text()
    assert ("Re-ranked: each gallery item ranked by λ = 0.3 of its distance to the query and 1 - λ of the Jaccard "
            "distance of their k-reciprocal neighbourhoods (k1 = 10, k2 = 3).") in markdown
    assert "| all, without re-ranking |" in markdown and markdown in capsys.readouterr().out


def test_a_revisited_benchmark_is_re_ranked(tmp_path):
    x, report = re_ranked_revisited(tmp_path, "--k-reciprocal", "4", "--k-reciprocal-k2", "2",
                                    "--k-reciprocal-lambda", "0.2", "--dims", "none")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    distances = reference_distances(x[:2], x[2:], 4, 2, 0.2)
    # ranking by -distance: the rows of -distances against the identity
    assert report["metrics"] == pytest.approx(straightforward_metrics(-distances, np.eye(distances.shape[1])))
    assert report["without_expansion"] == pytest.approx(straightforward_metrics(x[:2], x[2:]))
    assert "k-reciprocal neighbourhoods (k1 = 4, k2 = 2)" in (tmp_path / "report" / "metrics.md").read_text()


def test_k2_defaults_to_the_papers_6_or_all_the_neighbours_searched():
    assert (KReciprocal(20).k2, KReciprocal(5).k2, KReciprocal(4).k2, KReciprocal(1).k2) == (6, 6, 5, 2)
    assert KReciprocal(20).lambda_value == 0.3


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_the_cost_benchmark_runs_and_agrees_with_the_references(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "benchmarks" / "re_ranking_cost.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path / "out.txt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    k_reciprocal, diffusion = done.stdout.split("## ")[1:]
    rows = [line.split("|") for line in k_reciprocal.splitlines() if re.match(r"\| [0-9,]+ \| [0-9,l]", line)]
    assert len(rows) == 2 and rows[1][2].strip() == "leave-one-out"
    assert float(rows[0][8]) <= 1e-6  # the largest difference from the authors' distances
    rows = [line.split("|") for line in diffusion.splitlines() if re.match(r"\| [0-9,]+ \| [0-9,]", line)]
    assert len(rows) == 1 and float(rows[0][8]) <= 1e-5  # from the dense solve's scores
    assert not (tmp_path / "out.txt").exists()  # a smoke run writes no result


def test_the_re_ranked_search_shows_its_progress(capsys, monkeypatch):
    monkeypatch.setenv("UNICOM_PROGRESS", "1")
    query, query_labels = clustered(20, 8, 4, 1.1, seed=6)
    gallery, gallery_labels = clustered(50, 8, 4, 1.1, seed=7)
    retrieval_metrics(query, query_labels, gallery, gallery_labels, ks=(1,), chunk_size=6,
                      rescore=KReciprocalScores(query, gallery, KReciprocal(5)))
    err = capsys.readouterr().err
    assert re.search(r"k-reciprocal: 5 neighbours of each item.*70/70 ", err)
    assert re.search(r"k-reciprocal: re-ranked search.*20/20 ", err)
