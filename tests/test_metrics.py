"""Retrieval metrics: hand-computed examples, pytorch-metric-learning, a brute-force ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unicom.errors import InputError
from unicom.evaluate import knn_search, retrieval_metrics, retrieval_metrics_from_relevance
from unicom.evaluate.metrics import ranked_top_k


def at_angles(degrees) -> np.ndarray:
    """Unit vectors in the plane; their cosines are the cosines of the angle differences."""
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


# Six items. 0 and 1 are the same vector with different labels (a duplicate); 2 and 3 are
# equally similar to 0 and 1 (+-10 degrees): ties that only the gallery index can order.
ANGLES = [0, 0, 10, -10, 90, 60]
LABELS = ["A", "B", "B", "A", "C", "B"]
# Rankings, worked by hand (leave-one-out, ties by lower index):
#   q0 (A): 1B 2B 3A 5B 4C    R=1   q1 (B): 0A 2B 3A 5B 4C   R=2
#   q2 (B): 0A 1B 3A 5B 4C    R=2   q3 (A): 0A 1B 2B 5B 4C   R=1
#   q4 (C): alone in its class, excluded
#   q5 (B): 4C 2B 0A 1B 3A    R=2


def test_hand_computed_leave_one_out_with_ties_a_duplicate_and_a_lone_query():
    result = retrieval_metrics(at_angles(ANGLES), LABELS, ks=(1, 2, 4))
    assert result["n_queries"] == 5 and result["n_excluded"] == 1
    assert result["recall@1"] == pytest.approx(1 / 5)  # only q3's first neighbour shares its class
    assert result["recall@2"] == pytest.approx(4 / 5)
    assert result["recall@4"] == pytest.approx(1.0)
    # MAP@R per query: 0, 1/4, 1/4, 1, 1/4
    assert result["map@r"] == pytest.approx((0 + 0.25 + 0.25 + 1 + 0.25) / 5)
    # R-precision per query: 0, 1/2, 1/2, 1, 1/2
    assert result["r_precision"] == pytest.approx(2.5 / 5)
    # mAP@100 per query: 1/3, (1/2 + 2/4)/2, same, 1, same
    assert result["map@100"] == pytest.approx((1 / 3 + 0.5 + 0.5 + 1 + 0.5) / 5)
    # mMP@5 per query: only the first min(R, 5) ranks count: 0, 1/2, 1/2, 1, 1/2
    assert result["mmp@5"] == pytest.approx((0 + 0.5 + 0.5 + 1 + 0.5) / 5)


def published_mmp_at_5(ranked_relevance: list[list[int]], relevant_counts: list[int]) -> float:
    """The challenge's formula, written out: (1/Q) sum_q (1/min(n_q,5)) sum_{j=1}^{min(n_q,5)} rel_q(j)."""
    total = 0.0
    for rel, n in zip(ranked_relevance, relevant_counts):
        cut = min(n, 5)
        total += sum(rel[j] for j in range(cut)) / cut
    return total / len(ranked_relevance)


def test_mmp_at_5_counts_only_the_first_min_n_5_results():
    # gallery item i ranks (i+1)-th for a query at 0 degrees
    gallery = at_angles([10 * i for i in range(9)])
    queries = at_angles([0, 0, 0, 0])
    relevant = [
        [2, 3],              # n=2 found at ranks 3 and 4: outside the first 2, scores 0 (not 1)
        [0, 4],              # n=2 at ranks 1 and 5: only rank 1 counts, 1/2
        [0, 1, 2, 3, 5, 6, 7],  # n=7 > 5: the precision at 5 (4 of the first 5)
        [8],                 # n=1 at rank 9: 0
    ]
    result = retrieval_metrics_from_relevance(queries, gallery, relevant, ks=(1,), per_query=True)
    ranked = [[int(i in items) for i in range(9)] for items in relevant]
    expected = published_mmp_at_5(ranked, [len(items) for items in relevant])
    assert expected == pytest.approx((0 + 0.5 + 0.8 + 0) / 4)
    assert result["mmp@5"] == pytest.approx(expected)
    assert result["per_query"]["mmp@5"].tolist() == pytest.approx([0.0, 0.5, 0.8, 0.0])


def test_mmp_at_5_with_labels_matches_the_published_formula_on_a_full_ranking():
    x, labels = clustered(400, 16, 60, 2.0, seed=8)
    query, gallery = x[:100], x[100:]
    scores = query.astype(np.float64) @ gallery.T.astype(np.float64)
    order = np.argsort(-scores, axis=1, kind="stable")
    rel = labels[100:][order] == labels[:100, None]
    counts = rel.sum(1)
    keep = counts > 0
    expected = published_mmp_at_5(rel[keep].astype(int).tolist(), counts[keep].tolist())
    ours = retrieval_metrics(query, labels[:100], gallery, labels[100:], ks=(1,))
    assert 0.05 < expected < 0.95
    assert ours["mmp@5"] == pytest.approx(expected, abs=1e-12)


def test_own_row_is_removed_by_index_not_by_rank():
    # q1 and its duplicate q0 tie at similarity 1; dropping "the first result" would drop q0
    # (lower index) and leave q1 itself at rank 1, a false hit for class B.
    result = retrieval_metrics(at_angles(ANGLES), LABELS, ks=(1,), per_query=True)
    assert result["per_query"]["first_relevant_rank"][1] == 2


def test_equal_similarities_rank_the_lower_gallery_index_first():
    result = retrieval_metrics(at_angles(ANGLES), LABELS, ks=(1,), per_query=True)
    ranks = result["per_query"]["first_relevant_rank"]
    assert ranks[0] == 3  # 2 (class B) outranks 3 (class A) at equal similarity
    assert ranks[2] == 2  # 0 (class A) outranks 1 (class B) at equal similarity
    _, neighbours = knn_search(at_angles(ANGLES), k=5)
    assert neighbours[0].tolist() == [1, 2, 3, 5, 4]
    assert neighbours[2].tolist() == [0, 1, 3, 5, 4]


def test_lone_query_is_excluded_and_reported():
    result = retrieval_metrics(at_angles(ANGLES), LABELS, ks=(1,), per_query=True)
    assert result["per_query"]["relevant"].tolist() == [1, 2, 2, 1, 0, 2]
    assert math.isnan(result["per_query"]["map@r"][4])
    assert result["per_query"]["first_relevant_rank"][4] == 0


def test_query_against_gallery_keeps_a_duplicate_of_the_query():
    # With a separate gallery nothing is removed: the query's own copy is a normal item.
    gallery = at_angles([0, 20, 40])
    result = retrieval_metrics(at_angles([0]), [7], gallery, [7, 7, 3], ks=(1, 2))
    assert result["recall@1"] == 1.0
    assert result["map@r"] == 1.0  # R = 2: ranks 1 and 2 are both relevant
    assert result["n_excluded"] == 0


def test_relevance_lists_hand_computed():
    gallery = at_angles([10 * i for i in range(8)])  # item i ranks (i+1)-th for a query at 0 degrees
    queries = at_angles([0, 0, 75])
    relevant = [[1, 2, 4, 6, 7], [], [0]]
    result = retrieval_metrics_from_relevance(queries, gallery, relevant, ks=(1, 2, 8))
    assert result["n_queries"] == 2 and result["n_excluded"] == 1
    # query 0: relevant at ranks 2, 3, 5, 7, 8 (R=5); query 2: item 0 is the farthest, rank 8
    ap100_q0 = (1 / 2 + 2 / 3 + 3 / 5 + 4 / 7 + 5 / 8) / 5
    assert result["map@100"] == pytest.approx((ap100_q0 + 1 / 8) / 2)
    assert result["mmp@5"] == pytest.approx((3 / 5 + 0) / 2)
    assert result["map@r"] == pytest.approx(((1 / 2 + 2 / 3 + 3 / 5) / 5 + 0) / 2)
    assert result["r_precision"] == pytest.approx((3 / 5 + 0) / 2)
    assert (result["recall@1"], result["recall@2"], result["recall@8"]) == (0.0, 0.5, 1.0)


def clustered(n, dim, classes, noise, seed, duplicates=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.standard_normal((classes, dim))[labels] + noise * rng.standard_normal((n, dim))
    if duplicates:  # exact copies of earlier rows, sometimes under another label
        source = rng.integers(0, n - duplicates, duplicates)
        x[n - duplicates:] = x[source]
        labels[n - duplicates:] = np.where(rng.random(duplicates) < 0.5, labels[source], rng.integers(0, classes, duplicates))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def test_equals_pytorch_metric_learning_leave_one_out():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, labels = clustered(1500, 24, 120, 1.2, seed=1)
    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"), k=None, device=torch.device("cpu")
    )
    reference = calculator.get_accuracy(x, labels)
    ours = retrieval_metrics(x, labels, ks=(1,))
    assert 0.1 < ours["recall@1"] < 0.9  # neither trivial nor hopeless
    assert ours["recall@1"] == pytest.approx(reference["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(reference["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(reference["r_precision"], abs=1e-6)


def test_equals_pytorch_metric_learning_query_against_gallery():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, labels = clustered(1600, 24, 150, 1.2, seed=2)
    query, gallery = x[:400], x[400:]
    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"), k=None, device=torch.device("cpu")
    )
    reference = calculator.get_accuracy(query, labels[:400], gallery, labels[400:])
    ours = retrieval_metrics(query, labels[:400], gallery, labels[400:], ks=(1,))
    assert ours["recall@1"] == pytest.approx(reference["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(reference["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(reference["r_precision"], abs=1e-6)


def brute_force(x, labels, ks):
    """Every metric from a full ranking of each query (scores with torch, as the search)."""
    scores = (torch.from_numpy(x) @ torch.from_numpy(x).T).numpy()
    n = len(x)
    per = {key: [] for key in ("map@r", "r_precision", "map@100", "mmp@5", "first")}
    for q in range(n):
        s = scores[q].astype(np.float64)
        s[q] = -np.inf
        order = np.lexsort((np.arange(n), -s))[: n - 1]  # by score, then by index
        rel = (labels[order] == labels[q]).astype(np.float64)
        r = int(rel.sum())
        if r == 0:
            continue
        precision = np.cumsum(rel) / np.arange(1, n)
        per["map@r"].append((precision * rel)[:r].sum() / r)
        per["r_precision"].append(rel[:r].sum() / r)
        per["map@100"].append((precision * rel)[:100].sum() / min(r, 100))
        per["mmp@5"].append(rel[: min(r, 5)].sum() / min(r, 5))
        per["first"].append(int(np.argmax(rel)) + 1)
    result = {f"recall@{k}": float(np.mean(np.asarray(per["first"]) <= k)) for k in ks}
    result.update({key: float(np.mean(values)) for key, values in per.items() if key != "first"})
    return result, np.asarray(per["first"])


def test_deep_relevant_items_and_exact_duplicates_match_a_full_ranking():
    # Weak clusters: many first relevant items rank below 100, beyond the top-k the search
    # keeps, and 40 exact duplicates create ties at every depth.
    x, labels = clustered(700, 16, 200, 3.0, seed=3, duplicates=40)
    ks = (1, 10, 100, 300, 600)
    expected, first_ranks = brute_force(x, labels, ks)
    ours = retrieval_metrics(x, labels, ks=ks, chunk_size=64, per_query=True)
    # both deep paths run: ranks beyond the top 100, and beyond the largest K (600)
    assert expected["recall@100"] < 0.9 and expected["recall@600"] < 1
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    scored = ours["per_query"]["relevant"] > 0
    np.testing.assert_array_equal(ours["per_query"]["first_relevant_rank"][scored], first_ranks)


def test_chunked_search_equals_unchunked():
    x, labels = clustered(500, 16, 60, 1.5, seed=4, duplicates=20)
    whole = retrieval_metrics(x, labels, ks=(1, 5, 50), chunk_size=500, per_query=True)
    for chunk_size in (1, 7, 128):
        chunked = retrieval_metrics(x, labels, ks=(1, 5, 50), chunk_size=chunk_size, per_query=True)
        for key, value in whole.items():
            if key == "per_query":
                for name, array in value.items():
                    np.testing.assert_array_equal(chunked["per_query"][name], array, err_msg=name)
            else:
                assert chunked[key] == value, (chunk_size, key)
    _, unchunked = knn_search(x, k=30, chunk_size=500)
    _, chunked = knn_search(x, k=30, chunk_size=3)
    np.testing.assert_array_equal(chunked, unchunked)


def test_ranked_top_k_matches_a_stable_sort_on_many_ties():
    scores = torch.randint(0, 4, (50, 40)).float()  # values 0..3: ties everywhere
    values, indices = ranked_top_k(scores, 9)
    exact = torch.sort(scores, dim=1, descending=True, stable=True)
    assert torch.equal(indices, exact.indices[:, :9])
    assert torch.equal(values, exact.values[:, :9])


def test_embeddings_are_normalised_and_labels_may_be_names():
    x = at_angles(ANGLES) * np.array([[3.0], [0.5], [2.0], [1.0], [7.0], [0.1]], dtype=np.float32)
    assert retrieval_metrics(x, LABELS, ks=(1, 2)) == retrieval_metrics(at_angles(ANGLES), LABELS, ks=(1, 2))


def test_bad_inputs_are_named():
    x = at_angles(ANGLES)
    with pytest.raises(InputError, match="query_labels: expected 6 labels"):
        retrieval_metrics(x, LABELS[:5])
    with pytest.raises(InputError, match="row 2 is all zeros"):
        retrieval_metrics(np.where(np.arange(6)[:, None] == 2, 0, x), LABELS)
    with pytest.raises(InputError, match="gallery and gallery_labels together"):
        retrieval_metrics(x, LABELS, gallery=x)
    with pytest.raises(InputError, match="none of the 6 queries"):
        retrieval_metrics(x, list(range(6)))
    with pytest.raises(InputError, match=r"relevant\[0\] names gallery index 9"):
        retrieval_metrics_from_relevance(x[:1], x, [[9]])


def test_importing_the_evaluation_package_stays_light():
    import subprocess
    import sys

    code = ("import sys, unicom.evaluate, unicom.evaluate.metrics, unicom.data.benchmarks; "
            "print(sorted(m for m in ('sklearn', 'matplotlib', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_searched_on_their_device_with_the_same_results():
    x, labels = clustered(800, 32, 80, 1.5, seed=5, duplicates=30)
    on_cpu = retrieval_metrics(x, labels, ks=(1, 10, 500), chunk_size=100, per_query=True)
    on_gpu = retrieval_metrics(torch.from_numpy(x).cuda(), torch.from_numpy(labels).cuda(), ks=(1, 10, 500),
                               chunk_size=100, per_query=True)
    for key in ("recall@1", "recall@10", "recall@500", "map@r", "r_precision", "map@100", "mmp@5"):
        assert on_gpu[key] == pytest.approx(on_cpu[key], abs=2e-3), key


def test_metric_names_are_the_scores_each_metric_function_reports():
    from unicom.evaluate.metrics import metric_names, revisited_metrics

    def scores(result: dict) -> list[str]:
        return [name for name in result if not name.startswith("n_") and name != "per_query"]

    vectors = at_angles(ANGLES)
    assert scores(retrieval_metrics(vectors, LABELS, ks=(4, 1, 2))) == metric_names((1, 2, 4))
    relevant = [[1], [0, 2], [3], [0]]
    assert (scores(retrieval_metrics_from_relevance(vectors[:4], vectors, relevant, ks=(1, 3)))
            == metric_names((1, 3)) == ["recall@1", "recall@3", "map@r", "r_precision", "map@100", "mmp@5"])
    setups = {"easy": ([[1], [2], [3]], [[], [], [4]]), "hard": ([[2], [1], [0]], [[5], [], []])}
    assert (scores(revisited_metrics(vectors[:3], vectors, setups, kappas=(1, 5)))
            == metric_names((5, 1), ["easy", "hard"])
            == ["map_easy", "mp@1_easy", "mp@5_easy", "map_hard", "mp@1_hard", "mp@5_hard"])
