"""The compact-dimension curve: PCA to d only where the train split spans d axes."""

from __future__ import annotations

import numpy as np
import pytest

from unicom.evaluate import retrieval_metrics
from unicom.evaluate.dims import PCA, dimension_curve


def unit_rows(n, dim, seed):
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_pca_rank_counts_the_axes_the_train_rows_vary_along():
    assert PCA.fit(unit_rows(6, 16, seed=0)).rank == 5  # 6 centred rows span 5 axes
    assert PCA.fit(unit_rows(100, 16, seed=0)).rank == 16
    assert PCA.fit(np.repeat(unit_rows(1, 16, seed=0), 4, axis=0)).rank == 0  # one point, no axis


def test_pca_beyond_the_axes_of_a_small_train_split_is_skipped_not_scored(caplog):
    query, labels = unit_rows(40, 16, seed=1), np.arange(40) % 4
    train = unit_rows(6, 16, seed=2)  # 5 axes of variance; the other 11 are an arbitrary basis
    rows = {(r["method"], r["dimension"]): r for r in dimension_curve(query, labels, dims=(4, 8), train=train)}

    assert set(rows) == {(m, d) for m in ("first", "pca") for d in (4, 8, 16)}
    expected = retrieval_metrics(PCA.fit(train).transform(query, 4), labels, ks=(1,))
    assert rows[("pca", 4)]["recall@1"] == pytest.approx(expected["recall@1"])
    for d in (8, 16):
        assert rows[("pca", d)] == {"dimension": d, "method": "pca", "skipped": (
            f"dimension {d} (pca) skipped: the 6 train embeddings vary along 5 principal axes only, and the axes beyond "
            "are arbitrary; fit the PCA on more train images (a larger --pca-samples or train split); the other "
            "dimensions are scored")}
        assert "recall@1" in rows[("first", d)]
    assert "dimension 8 (pca) skipped" in caplog.text


def test_embeddings_of_another_dimension_than_the_pca_are_refused():
    from unicom.errors import InputError

    with pytest.raises(InputError, match="embeddings of 16 dimensions cannot be projected by a PCA fitted on "
                                         "8-dimensional train embeddings: embed both with the same model"):
        dimension_curve(unit_rows(40, 16, seed=1), np.arange(40) % 4, dims=(4,), train=unit_rows(30, 8, seed=2))
