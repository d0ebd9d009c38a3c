"""Learned whitening (`unicom evaluate --whiten FOLDER`): PCA whitening against scikit-learn's
PCA(whiten=True); the discriminative one against the matching pairs listed plainly and
scikit-learn's linear discriminant analysis."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from sklearn.decomposition import PCA as SklearnPCA
from test_evaluate_cli import clustered, embedding_folder
from test_revisited import revisited_dataset, straightforward_metrics

from unicom.cli import main
from unicom.data.benchmarks import load_retrieval_benchmark
from unicom.errors import InputError
from unicom.evaluate import retrieval_metrics
from unicom.evaluate.dims import PCA


def normalised(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sklearn_whitened(learned_on, *xs):
    """Each of ``xs`` whitened by scikit-learn's PCA(whiten=True) fitted on ``learned_on``
    (rows L2-normalised first, as they are compared), then L2-normalised."""
    pca = SklearnPCA(whiten=True).fit(normalised(learned_on))
    return [normalised(pca.transform(normalised(x))) for x in xs]


def test_whitening_gives_scikit_learns_similarities():
    rng = np.random.default_rng(0)
    # anisotropic: a few directions shared by every embedding dominate the raw cosine
    learned_on = rng.standard_normal((500, 12)) * np.geomspace(10, 0.3, 12) + 4
    x = rng.standard_normal((40, 12)) * np.geomspace(10, 0.3, 12) + 4
    ours = normalised(PCA.fit(learned_on).whiten(x))
    (reference,) = sklearn_whitened(learned_on, x)
    # the axes' signs are conventions; the similarities, which the search ranks by, are not
    np.testing.assert_allclose(ours @ ours.T, reference @ reference.T, atol=2e-5)
    assert not np.allclose(normalised(x) @ normalised(x).T, reference @ reference.T, atol=0.05)


def test_whitening_refuses_embeddings_that_span_too_few_axes():
    x = np.random.default_rng(1).standard_normal((8, 12))
    with pytest.raises(InputError, match=r"vary along 7 only: learn it on more embeddings \(at least 13"):
        PCA.fit(x).whiten(x)


def test_revisited_benchmark_and_its_distractors_are_whitened(tmp_path, capsys):
    root = revisited_dataset(tmp_path / "data", "roxford5k")
    protocol = load_retrieval_benchmark("roxford5k", root)
    rng = np.random.default_rng(4)
    scale = np.geomspace(6, 0.5, 8)
    x = (rng.standard_normal((2 + len(protocol.gallery), 8)) * scale + 2).astype(np.float32)
    d = (rng.standard_normal((20, 8)) * scale + 2).astype(np.float32)
    w = (rng.standard_normal((300, 8)) * scale + 2).astype(np.float32)
    embedding_folder(tmp_path / "emb", x, protocol.query.keys + protocol.gallery.keys, parts=1)
    embedding_folder(tmp_path / "r1m", d, [f"r1m/{i}" for i in range(20)], parts=1)
    embedding_folder(tmp_path / "learn", w, [f"w{i}" for i in range(300)], parts=3)
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "roxford5k", "--root", str(root),
                 "--distractors", str(tmp_path / "r1m"), "--whiten", str(tmp_path / "learn"), "--qe", "1",
                 "--dims", "none", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    x, d, w = (a.astype(np.float16).astype(np.float64) for a in (x, d, w))
    query, gallery = sklearn_whitened(w, x[:2], np.concatenate([x[2:], d]))
    assert report["without_expansion"] == pytest.approx(straightforward_metrics(query, gallery), abs=1e-9)
    assert report["whitening"] == {"embeddings": str(tmp_path / "learn"), "rows": 300}
    markdown = (out / "metrics.md").read_text()
    whitened_at = markdown.index(f"Whitened: every embedding centred and scaled along the principal axes of 300 "
                                 f"embeddings of {tmp_path / 'learn'} (PCA whitening).")
    assert whitened_at < markdown.index("Re-ranked: each query expanded")
    assert markdown in capsys.readouterr().out


def test_embedding_folders_are_whitened_before_the_dimension_curve(tmp_path):
    x, labels = clustered(60, 10, 6, 1.0, seed=3)
    gallery, gallery_labels = clustered(90, 10, 6, 1.0, seed=3)
    learn, _ = clustered(400, 10, 20, 1.0, seed=5)
    embedding_folder(tmp_path / "q", x, [f"q{i}" for i in range(60)], labels.tolist())
    embedding_folder(tmp_path / "g", gallery, [f"g{i}" for i in range(90)], gallery_labels.tolist())
    embedding_folder(tmp_path / "learn", learn, [f"w{i}" for i in range(400)])
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--gallery-embeddings", str(tmp_path / "g"),
                 "--whiten", str(tmp_path / "learn"), "--dims", "4", "--ks", "1,4", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    x, gallery, learn = (a.astype(np.float16).astype(np.float64) for a in (x, gallery, learn))
    query, whitened_gallery = sklearn_whitened(learn, x, gallery)
    expected = retrieval_metrics(query, labels, whitened_gallery, gallery_labels, ks=(1, 4))
    assert report["metrics"] == pytest.approx(expected)
    assert report["metrics"] != pytest.approx(retrieval_metrics(x, labels, gallery, gallery_labels, ks=(1, 4)))
    # the first 4 whitened coordinates: the 4 leading principal axes, each scaled to unit variance
    pca = SklearnPCA(whiten=True, n_components=4).fit(normalised(learn))
    four = retrieval_metrics(pca.transform(normalised(x)), labels, pca.transform(normalised(gallery)),
                             gallery_labels, ks=(1, 4))
    row = next(r for r in report["dimensions"] if r["dimension"] == 4 and r["method"] == "first")
    assert {k: v for k, v in row.items() if k not in ("dimension", "method")} == pytest.approx(four)


@pytest.mark.parametrize("case, message", [
    ("few rows", r"learn \(--whiten\): its 6 embeddings vary along 5 of the 8 axes"),
    ("other width", r"learn \(--whiten\) holds 5-dimensional embeddings, the benchmark's are 8-dimensional"),
    ("classification", "--task classification searches nothing: leave --whiten out"),
])
def test_a_whitening_that_cannot_be_learned_or_applied_is_refused(case, message, tmp_path, capsys):
    x, labels = clustered(30, 8, 3, 1.0, seed=0)
    embedding_folder(tmp_path / "q", x, [f"q{i}" for i in range(30)], labels.tolist())
    rows, width = {"few rows": (6, 8), "other width": (50, 5)}.get(case, (50, 8))
    embedding_folder(tmp_path / "learn", np.random.default_rng(2).standard_normal((rows, width)).astype(np.float32),
                     [f"w{i}" for i in range(rows)])
    extra = ["--task", "classification", "--train-embeddings", str(tmp_path / "q")] if case == "classification" else []
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--whiten", str(tmp_path / "learn"), *extra,
                 "--dims", "none", "--out", str(tmp_path / "report")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "report").exists()


# --------------------------------------------------------------------------- discriminative whitening

def matching_pair_covariance(x: np.ndarray, labels) -> np.ndarray:
    """C_S listed the plain way: the mean of (x_i - x_j)(x_i - x_j)^T over every ordered pair
    of distinct rows of one label, rows L2-normalised."""
    x = normalised(x)
    differences = [x[i] - x[j] for i in range(len(x)) for j in range(len(x)) if i != j and labels[i] == labels[j]]
    return np.mean([np.outer(d, d) for d in differences], axis=0)


def classes_of(sizes, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of classes of the given sizes: class centres plus anisotropic noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = rng.standard_normal((len(sizes), dim))[labels] + 0.7 * rng.standard_normal((len(labels), dim)) * \
        np.geomspace(3, 0.5, dim)
    return x, labels


def test_discriminative_similarities_are_those_of_the_inverse_matching_pair_covariance():
    from unicom.evaluate.whitening import DiscriminativeWhitening

    x, labels = classes_of([3, 9, 5, 7, 4], 6, seed=0)  # classes of several sizes
    whitening = DiscriminativeWhitening.fit(x, labels, block_rows=7)
    assert (whitening.classes, whitening.pairs) == (5, 3 + 36 + 10 + 21 + 6)
    inverse = np.linalg.inv(matching_pair_covariance(x, labels))
    np.testing.assert_allclose(whitening.projection.T @ whitening.projection, inverse, rtol=1e-6, atol=1e-6)
    y = whitening.whiten(x).astype(np.float64)
    pairs = [y[i] - y[j] for i in range(len(y)) for j in range(len(y)) if i != j and labels[i] == labels[j]]
    np.testing.assert_allclose(np.mean([np.outer(d, d) for d in pairs], axis=0), np.eye(6), atol=1e-5)  # white
    centred = normalised(x) - normalised(x).mean(0)
    expected = centred @ inverse @ centred.T  # (x - m)^T C_S^-1 (y - m)
    np.testing.assert_allclose(y @ y.T, expected, rtol=1e-5, atol=1e-5)
    spread = np.cov(y.T, bias=True)  # the axes are the whitened embeddings' principal axes, by decreasing variance
    np.testing.assert_allclose(spread - np.diag(np.diag(spread)), 0, atol=1e-6)
    assert (np.diff(np.diag(spread)) <= 1e-9).all()


def test_with_classes_of_one_size_the_leading_axes_are_linear_discriminant_analysis():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from unicom.evaluate.whitening import DiscriminativeWhitening

    x, labels = classes_of([8] * 5, 6, seed=1)
    whitening = DiscriminativeWhitening.fit(x, labels)
    axes = LinearDiscriminantAnalysis(solver="eigen").fit(normalised(x), labels).scalings_.T
    for ours, theirs in zip(whitening.projection[:4], axes[:4]):  # 5 classes: 4 discriminant directions
        ours, theirs = ours / np.linalg.norm(ours), theirs / np.linalg.norm(theirs)
        assert min(np.abs(ours - theirs).max(), np.abs(ours + theirs).max()) < 1e-6


def test_too_few_matching_pairs_are_refused():
    from unicom.evaluate.whitening import DiscriminativeWhitening

    x, labels = classes_of([2, 2, 3, 1], 6, seed=2)  # 8 rows in 4 classes: 4 independent differences
    with pytest.raises(InputError, match=r"8 embeddings in 4 classes give 4 independent ones \(N - classes\); learn it "
                                         r"on more embeddings of each class \(at least 2 more\)"):
        DiscriminativeWhitening.fit(x, labels, name="learn")


def test_embedding_folders_are_whitened_by_their_classes(tmp_path, capsys):
    x, labels = clustered(40, 8, 5, 1.2, seed=3)
    gallery, gallery_labels = clustered(80, 8, 5, 1.2, seed=4)
    learn, learn_labels = classes_of([12] * 10, 8, seed=5)
    embedding_folder(tmp_path / "q", x, [f"q{i}" for i in range(40)], labels.tolist())
    embedding_folder(tmp_path / "g", gallery, [f"g{i}" for i in range(80)], gallery_labels.tolist())
    embedding_folder(tmp_path / "learn", learn.astype(np.float32), [f"w{i}" for i in range(120)])
    (tmp_path / "learn.csv").write_text("key,label\n" + "".join(f"w{i},c{label}\n" for i, label in
                                                               enumerate(learn_labels)))
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--gallery-embeddings", str(tmp_path / "g"),
                 "--whiten", str(tmp_path / "learn"), "--whiten-method", "discriminative", "--whiten-labels",
                 str(tmp_path / "learn.csv"), "--dims", "3", "--no-pca", "--ks", "1,4", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["whitening"] == {"embeddings": str(tmp_path / "learn"), "rows": 120, "method": "discriminative",
                                   "classes": 10, "pairs": 10 * 66}
    x, gallery, learn = (a.astype(np.float16).astype(np.float64) for a in (x, gallery, learn))
    inverse = np.linalg.inv(matching_pair_covariance(learn, learn_labels))
    mean = normalised(learn).mean(0)
    root = np.linalg.cholesky(inverse)  # any P with P^T P = C_S^-1 gives the same similarities
    query, whitened_gallery = ((normalised(a) - mean) @ root for a in (x, gallery))
    expected = retrieval_metrics(query, labels, whitened_gallery, gallery_labels, ks=(1, 4))
    assert report["metrics"] == pytest.approx(expected)
    markdown = (out / "metrics.md").read_text()
    assert (f"Whitened: every embedding centred and projected so that the differences of the 660 matching pairs of "
            f"120 embeddings of {tmp_path / 'learn'} (10 classes) are white") in markdown


@pytest.mark.parametrize("arguments, message", [
    (["--whiten-method", "discriminative"], "--whiten-method sets the whitening of --whiten FOLDER; give --whiten"),
    (["--whiten", "LEARN", "--whiten-labels", "x.csv"], "--whiten-labels names the classes a discriminative"),
    (["--whiten", "LEARN", "--whiten-method", "discriminative"],
     r"learn \(--whiten\): a discriminative whitening learns from classes, and its metadata has no 'label' column; "
     "give --whiten-labels FILE"),
])
def test_a_discriminative_whitening_without_classes_is_refused(arguments, message, tmp_path, capsys):
    x, labels = clustered(30, 8, 3, 1.0, seed=0)
    embedding_folder(tmp_path / "q", x, [f"q{i}" for i in range(30)], labels.tolist())
    embedding_folder(tmp_path / "learn", x, [f"w{i}" for i in range(30)])
    arguments = [str(tmp_path / "learn") if a == "LEARN" else a for a in arguments]
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), *arguments, "--dims", "none",
                 "--out", str(tmp_path / "report")]) == 2
    assert re.search(message, capsys.readouterr().err)
