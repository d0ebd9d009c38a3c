"""Discriminative whitening learned from labelled embeddings (the "learned whitening" Lw of
Radenović, Tolias and Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI
2019), beside the PCA whitening of :meth:`unicom.evaluate.dims.PCA.whiten`.

From embeddings x (L2-normalised) with class labels:

* C_S, the covariance of the differences x_i - x_j over every ordered pair of distinct
  embeddings of one class (the matching pairs), computed from per-class sums without
  listing the pairs: Σ_c 2 n_c Σ_{i in c} (x_i - μ_c)(x_i - μ_c)^T / Σ_c n_c (n_c - 1);
* W = C_S^-1/2 whitens the matching pairs' differences;
* m, the mean of the embeddings, and the eigenvectors E of W C_T W (C_T the covariance of
  the embeddings), by decreasing eigenvalue;
* an embedding becomes P (x - m) with P = E^T W, then is L2-normalised when scored.

The cosine of two whitened embeddings depends on C_S and m alone ((x - m)^T C_S^-1 (y - m),
normalised); E orders the axes, so that the first d coordinates keep the directions that
separate the classes most (the dimension curve's first d). With classes of one size, the
axes are those of linear discriminant analysis (C_S is then proportional to its within-class
covariance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from unicom.errors import InputError
from unicom.evaluate.dims import RANK_TOLERANCE  # an eigenvalue of C_S below this fraction of its largest is none
from unicom.evaluate.metrics import as_embeddings


@dataclass
class DiscriminativeWhitening:
    """``mean``: (D,) float64; ``projection``: (D, D) float64, one axis per row, by decreasing
    variance of the whitened embeddings, each signed so that its largest coordinate is
    positive; ``classes`` and ``pairs``: the classes with a matching pair and their unordered
    matching pairs."""

    mean: np.ndarray
    projection: np.ndarray
    classes: int
    pairs: int

    @classmethod
    def fit(cls, x, labels, block_rows: int = 65_536, name: str = "the embeddings") -> "DiscriminativeWhitening":
        """Learn on (N, D) embeddings ``x`` with ``labels`` (N,), accumulated in float64 over
        blocks of rows (memory O(classes x D + D^2 + block_rows x D)). ``name`` says in an
        error where the embeddings come from."""
        labels = np.asarray(labels)
        n = len(x)
        if len(labels) != n:
            raise InputError(f"{name}: {n} embeddings but {len(labels)} labels; give one label per embedding")
        classes, of_row = np.unique(labels, return_inverse=True)
        sizes = np.bincount(of_row, minlength=len(classes)).astype(np.float64)
        dimension = np.shape(x)[1]
        class_sums = np.zeros((len(classes), dimension))
        total = np.zeros(dimension)
        outer = np.zeros((dimension, dimension))
        weighted_outer = np.zeros((dimension, dimension))  # Σ_i n_c(i) x_i x_i^T
        for start in range(0, n, block_rows):
            block = as_embeddings(np.asarray(x[start:start + block_rows]), name).double().numpy()
            rows = of_row[start:start + len(block)]
            members = sparse.csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))),
                                        shape=(len(class_sums), len(rows)))  # one-hot: class x row
            class_sums += members @ block
            total += block.sum(0)
            outer += block.T @ block
            weighted_outer += (block * sizes[rows, None]).T @ block
        ordered_pairs = float((sizes * (sizes - 1)).sum())
        independent = int((sizes - 1).sum())  # the differences within classes span at most N - C directions
        if independent < dimension:
            raise InputError(f"{name}: a discriminative whitening needs the differences of matching embeddings (of one "
                             f"class) to span all {dimension} dimensions, and {n} embeddings in {len(classes)} classes "
                             f"give {independent} independent ones (N - classes); learn it on more embeddings of each "
                             f"class (at least {dimension - independent} more)")
        # Σ_c 2 n_c Σ_{i in c} (x_i - μ_c)(x_i - μ_c)^T = 2 (Σ_i n_c(i) x_i x_i^T - Σ_c s_c s_c^T)
        within = 2.0 * (weighted_outer - class_sums.T @ class_sums) / ordered_pairs
        within = (within + within.T) / 2
        variance, axes = np.linalg.eigh(within)
        if variance[0] <= RANK_TOLERANCE * variance[-1]:
            raise InputError(f"{name}: the differences of matching embeddings vary along "
                             f"{int((variance > RANK_TOLERANCE * variance[-1]).sum())} of the {dimension} dimensions "
                             "only, and the whitening divides by the variance along each; learn it on more, or more "
                             "varied, embeddings of each class")
        whiten = (axes / np.sqrt(variance)) @ axes.T  # C_S^-1/2
        mean = total / n
        covariance = outer / n - np.outer(mean, mean)
        spread, rotation = np.linalg.eigh(whiten @ covariance @ whiten)
        projection = rotation[:, np.argsort(spread)[::-1]].T @ whiten
        largest = np.abs(projection).argmax(1)
        projection *= np.sign(projection[np.arange(dimension), largest])[:, None]
        return cls(mean, projection, int((sizes > 1).sum()), int(ordered_pairs // 2))

    def whiten(self, x, block_rows: int = 65_536) -> np.ndarray:
        """(N, D) embeddings -> (N, D) float32 P (x - m), x L2-normalised first."""
        if np.shape(x)[1] != len(self.mean):
            raise InputError(f"embeddings of {np.shape(x)[1]} dimensions cannot be whitened by a whitening learned on "
                             f"{len(self.mean)}-dimensional ones: embed both with the same model")
        out = np.empty((len(x), len(self.mean)), dtype=np.float32)
        axes = self.projection.T
        for start in range(0, len(x), block_rows):
            block = as_embeddings(np.asarray(x[start:start + block_rows]), "embeddings").double().numpy()
            out[start:start + len(block)] = (block - self.mean) @ axes
        return out
