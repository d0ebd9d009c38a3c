"""Diffusion re-ranking: against a dense solve of the same linear system, through every metric
protocol, and through `unicom evaluate`."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from test_evaluate_cli import clustered
from test_expansion import re_ranked_folders, re_ranked_revisited
from test_kreciprocal import walk_metrics
from test_revisited import straightforward_metrics

from unicom.errors import InputError
from unicom.evaluate import Diffusion, retrieval_metrics
from unicom.evaluate.diffusion import DiffusionScores
from unicom.evaluate.dims import score
from unicom.evaluate.expansion import Expansion
from unicom.evaluate.kreciprocal import KReciprocal


def dense_graph(gallery: np.ndarray, k: int, gamma: float) -> np.ndarray:
    """S = D^-1/2 A D^-1/2 written out: a_ij = max(s_ij, 0)^γ when i and j are each among the
    other's k nearest (ties by lower index), else 0."""
    g = gallery.astype(np.float64)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    s = g @ g.T
    np.fill_diagonal(s, -np.inf)
    nearest = [set(np.argsort(-s[i], kind="stable")[:k].tolist()) for i in range(len(g))]
    a = np.zeros_like(s)
    for i in range(len(g)):
        for j in nearest[i]:
            if i in nearest[j]:
                a[i, j] = max(s[i, j], 0.0) ** gamma
    degree = a.sum(axis=1)
    scale = np.array([1 / np.sqrt(d) if d > 0 else 0.0 for d in degree])
    return scale[:, None] * a * scale[None, :]


def start_of(g: np.ndarray, x: np.ndarray, k: int, gamma: float, left_out: int | None = None) -> tuple:
    """A query's similarities to the unit rows ``g`` (its own row ``left_out`` at -inf) and its
    start y: max(s, 0)^γ over its k nearest rows, 0 elsewhere."""
    s = g @ x
    if left_out is not None:
        s[left_out] = -np.inf
    start = np.zeros(len(g))
    nearest = np.argsort(-s, kind="stable")[:k]
    start[nearest] = np.maximum(s[nearest], 0.0) ** gamma
    return s, start


def reference_scores(query, gallery, k, gamma, alpha, leave_one_out=False) -> np.ndarray:
    """f = (I - α S)^-1 y by a dense solve, each query's y its k nearest gallery items'
    max(s, 0)^γ; unreached items at similarity - 2 (with ``leave_one_out`` the queries are the
    gallery and a query's own row is neither a start nor scored: NaN)."""
    q = query.astype(np.float64) / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery.astype(np.float64) / np.linalg.norm(gallery, axis=1, keepdims=True)
    system = np.eye(len(g)) - alpha * dense_graph(gallery, k, gamma)
    out = np.empty((len(q), len(g)))
    for row, x in enumerate(q):
        s, start = start_of(g, x, k, gamma, row if leave_one_out else None)
        f = np.linalg.solve(system, start)
        out[row] = np.where(f > 0, f, s - 2)
        if leave_one_out:
            out[row, row] = np.nan
    return out


def re_scored(query, gallery, settings: Diffusion) -> np.ndarray:
    scores = DiffusionScores(query, gallery, settings)
    similarities = torch.from_numpy(query @ (query if gallery is None else gallery).T)
    return scores(torch.arange(len(query)), similarities).numpy()


# --------------------------------------------------------------------------- the scores

@pytest.mark.parametrize("k, gamma, alpha", [(10, 3.0, 0.99), (5, 1.0, 0.5), (20, 3.0, 0.9), (3, 2.0, 0.0)])
def test_scores_equal_a_dense_solve(k, gamma, alpha):
    query, _ = clustered(8, 8, 4, 0.8, seed=1)
    gallery, _ = clustered(60, 8, 4, 0.8, seed=2)
    expected = reference_scores(query, gallery, k, gamma, alpha)
    np.testing.assert_allclose(re_scored(query, gallery, Diffusion(k, gamma, alpha)), expected, rtol=1e-5, atol=1e-5)


def test_leave_one_out_spreads_over_the_query_set_from_each_query_s_others():
    x, _ = clustered(40, 8, 4, 0.9, seed=3)
    expected = reference_scores(x, x, 6, 3.0, 0.95, leave_one_out=True)
    got = re_scored(x, None, Diffusion(6, 3.0, 0.95))
    off_diagonal = ~np.eye(len(x), dtype=bool)
    np.testing.assert_allclose(got[off_diagonal], expected[off_diagonal], rtol=1e-5, atol=1e-5)


def test_an_item_no_path_reaches_follows_in_the_plain_order():
    """Two clusters far apart: a query in the first never reaches the second, whose items
    come after every reached one, by similarity."""
    rng = np.random.default_rng(4)
    first = np.array([1.0, 0.0, 0.0]) + 0.05 * rng.standard_normal((6, 3))
    second = np.array([-1.0, 0.0, 0.0]) + 0.05 * rng.standard_normal((6, 3))
    gallery = np.concatenate([first, second]).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    query = np.array([[1.0, 0.01, 0.0]], dtype=np.float32)
    got = re_scored(query, gallery, Diffusion(3))[0]
    assert (got[:6] > 0).all() and (got[6:] < -1).all()
    np.testing.assert_allclose(got[6:], gallery[6:] @ query[0] - 2, atol=1e-6)


# --------------------------------------------------------------------------- the metrics

def test_labelled_metrics_rank_by_the_diffusion():
    query, query_labels = clustered(20, 8, 4, 1.1, seed=6)
    gallery, gallery_labels = clustered(70, 8, 4, 1.1, seed=7)
    expected = walk_metrics(-reference_scores(query, gallery, 8, 3.0, 0.99), query_labels, gallery_labels, (1, 2, 4))
    rescore = DiffusionScores(query, gallery, Diffusion(8))
    for chunk_size in (None, 6):
        got = retrieval_metrics(query, query_labels, gallery, gallery_labels, ks=(1, 2, 4), chunk_size=chunk_size,
                                rescore=rescore)
        assert {key: got[key] for key in expected} == pytest.approx(expected)


def test_leave_one_out_metrics_rank_by_the_diffusion():
    x, labels = clustered(40, 8, 5, 1.1, seed=8)
    expected = walk_metrics(-reference_scores(x, x, 6, 3.0, 0.99, leave_one_out=True), labels, labels, (1, 4))
    got = score(x, labels, ks=(1, 4), expansion=Expansion(diffusion=Diffusion(6)))
    assert {key: got[key] for key in expected} == pytest.approx(expected)


# --------------------------------------------------------------------------- settings

@pytest.mark.parametrize("settings, message", [
    ((0,), "diffusion's k is a number of neighbours"), ((5, 0.0), "gamma is the power"),
    ((5, float("inf")), "gamma"), ((5, 3.0, 1.0), "alpha is how far a query spreads"), ((5, 3.0, -0.1), "alpha"),
])
def test_settings_out_of_range_are_refused(settings, message):
    with pytest.raises(InputError, match=message):
        Diffusion(*settings)


def test_one_re_scoring_at_a_time():
    with pytest.raises(InputError, match="choose one of them"):
        Expansion(k_reciprocal=KReciprocal(5), diffusion=Diffusion(5))


def test_more_neighbours_than_the_gallery_has_are_refused():
    x, _ = clustered(8, 4, 2, 1.0, seed=1)
    with pytest.raises(InputError, match=r"k = 8 neighbours, but the gallery has 8 items .* give k of at most 7"):
        DiffusionScores(x, None, Diffusion(8))


# --------------------------------------------------------------------------- unicom evaluate

def test_embedding_folders_are_re_ranked_and_reported(tmp_path):
    report, query, query_labels, gallery, gallery_labels = re_ranked_folders(
        tmp_path, 16, "--diffusion", "10", "--diffusion-alpha", "0.9")
    out = tmp_path / "report"
    assert report["protocol"]["expansion"] == {"diffusion": {"k": 10, "gamma": 3.0, "alpha": 0.9}}
    expected = walk_metrics(-reference_scores(query, gallery, 10, 3.0, 0.9), query_labels, gallery_labels, (1, 4))
    assert {key: report["metrics"][key] for key in expected} == pytest.approx(expected)
    assert report["without_expansion"] == pytest.approx(
        retrieval_metrics(query, query_labels, gallery, gallery_labels, ks=(1, 4)))
    assert ("Re-ranked: each query's similarities spread over the graph of the gallery items' reciprocal 10 nearest "
            "neighbours (diffusion, γ = 3, α = 0.9) and the gallery items ranked by it.") in \
        (out / "metrics.md").read_text()


def test_the_spectral_form_is_reported_with_its_rank(tmp_path):
    report, query, query_labels, gallery, gallery_labels = re_ranked_folders(
        tmp_path, 16, "--diffusion", "10", "--diffusion-rank", "12")
    assert report["protocol"]["expansion"] == {"diffusion": {"k": 10, "gamma": 3.0, "alpha": 0.99, "rank": 12}}
    assert "(diffusion, γ = 3, α = 0.99, on the graph's 12 leading eigenvectors)" in \
        (tmp_path / "report" / "metrics.md").read_text()
    direct = score(query, query_labels, gallery, gallery_labels, ks=(1, 4),
                   expansion=Expansion(diffusion=Diffusion(10, rank=12)))
    assert {key: report["metrics"][key] for key in direct} == pytest.approx(direct)


def test_a_revisited_benchmark_is_re_ranked(tmp_path):
    x, report = re_ranked_revisited(tmp_path, "--diffusion", "3", "--diffusion-gamma", "1", "--dims", "none")
    assert report["protocol"]["expansion"] == {"diffusion": {"k": 3, "gamma": 1.0, "alpha": 0.99}}
    expected = reference_scores(x[:2], x[2:], 3, 1.0, 0.99)
    # ranking by the scores: the rows of the scores against the identity
    assert report["metrics"] == pytest.approx(straightforward_metrics(expected, np.eye(expected.shape[1])))
    assert report["without_expansion"] == pytest.approx(straightforward_metrics(x[:2], x[2:]))


# --------------------------------------------------------------------------- the spectral form

def spectral_reference(query, gallery, k, gamma, alpha, rank, leave_one_out=False) -> np.ndarray:
    """f = U diag(1 / (1 - α λ)) Uᵀ y on the largest eigenpairs of the dense S (numpy's eigh):
    every eigenvalue 1 (one per connected part with an edge) and ``rank`` more, where the exact
    solve reaches (f > 0 there); elsewhere similarity - 2, as :func:`reference_scores` (NaN on
    a left-out query's own row)."""
    exact = reference_scores(query, gallery, k, gamma, alpha, leave_one_out)
    values, vectors = np.linalg.eigh(dense_graph(gallery, k, gamma))
    top = np.argsort(-values, kind="stable")[:rank + int(np.sum(values > 1 - 1e-9))]
    u, lam = vectors[:, top], values[top]
    q = query.astype(np.float64) / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery.astype(np.float64) / np.linalg.norm(gallery, axis=1, keepdims=True)
    out = exact.copy()
    for row, x in enumerate(q):
        _, start = start_of(g, x, k, gamma, row if leave_one_out else None)
        f = u @ ((u.T @ start) / (1 - alpha * lam))
        reached = exact[row] > 0
        out[row, reached] = f[reached]
    return out


def cut_between_eigenvalues(gallery, k, gamma, near: int) -> int:
    """A rank near ``near`` that does not split a repeated eigenvalue of the graph below 1 (the
    eigenvalues 1 come first, whatever the rank)."""
    values = np.sort(np.linalg.eigvalsh(dense_graph(gallery, k, gamma)))[::-1]
    ones = int(np.sum(values > 1 - 1e-9))
    assert ones >= 1
    return next(r for r in range(near, len(values) - 2 - ones) if values[ones + r - 1] - values[ones + r] > 1e-6)


@pytest.mark.parametrize("k, gamma, alpha, near", [(10, 3.0, 0.99, 20), (5, 1.0, 0.9, 8), (8, 3.0, 0.99, 40)])
def test_spectral_scores_equal_the_dense_expansion_on_the_leading_eigenvectors(k, gamma, alpha, near):
    query, _ = clustered(8, 8, 4, 0.8, seed=1)
    gallery, _ = clustered(60, 8, 4, 0.8, seed=2)
    rank = cut_between_eigenvalues(gallery, k, gamma, near)
    expected = spectral_reference(query, gallery, k, gamma, alpha, rank)
    np.testing.assert_allclose(re_scored(query, gallery, Diffusion(k, gamma, alpha, rank)), expected, rtol=1e-5,
                               atol=1e-5)


def test_spectral_leave_one_out_and_its_approach_to_the_exact_solve():
    x, labels = clustered(50, 8, 5, 0.9, seed=3)
    rank = cut_between_eigenvalues(x, 6, 3.0, 15)
    expected = spectral_reference(x, x, 6, 3.0, 0.95, rank, leave_one_out=True)
    got = re_scored(x, None, Diffusion(6, 3.0, 0.95, rank))
    off_diagonal = ~np.eye(len(x), dtype=bool)
    np.testing.assert_allclose(got[off_diagonal], expected[off_diagonal], rtol=1e-5, atol=1e-5)
    # more eigenvectors, nearer the exact solve
    exact = re_scored(x, None, Diffusion(6, 3.0, 0.95))[off_diagonal]
    errors = [np.linalg.norm(re_scored(x, None, Diffusion(6, 3.0, 0.95, r))[off_diagonal] - exact)
              for r in (cut_between_eigenvalues(x, 6, 3.0, 5), rank, 40)]
    assert errors[0] > errors[1] > errors[2]
    metrics = score(x, labels, ks=(1,), expansion=Expansion(diffusion=Diffusion(6, 3.0, 0.95, rank)))
    walked = walk_metrics(-expected, labels, labels, (1,))
    assert {key: metrics[key] for key in walked} == pytest.approx(walked)


def test_a_rank_the_iteration_cannot_reach_is_refused():
    x, _ = clustered(12, 4, 2, 1.0, seed=1)
    with pytest.raises(InputError, match="finds at most 10; give a rank of at most 10"):
        DiffusionScores(x, None, Diffusion(3, rank=11))
    with pytest.raises(InputError, match="rank is a number of eigenvectors"):
        Diffusion(3, rank=0)
    assert Expansion(diffusion=Diffusion(3, rank=7)).describe()["diffusion"] == {"k": 3, "gamma": 3.0, "alpha": 0.99,
                                                                                 "rank": 7}
