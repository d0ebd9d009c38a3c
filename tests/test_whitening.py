"""Learned PCA whitening (`unicom evaluate --whiten FOLDER`), against scikit-learn's PCA(whiten=True)."""

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
