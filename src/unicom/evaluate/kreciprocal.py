"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017): a query's distance to a gallery item blended with the Jaccard distance
of their k-reciprocal neighbourhoods.

Every item (the queries and the gallery together; the query set alone when it is searched
leave-one-out) is described by a sparse vector V over the items:

* its ranking N(i, k) is itself first, then its k nearest other items (the exact search of
  :func:`~unicom.evaluate.metrics.knn_search`, ties by lower index); R(i, k) keeps the j of
  N(i, k) with i in N(j, k);
* R*(i) is R(i, k1) joined by R(c, round(k1 / 2)) of each c in R(i, k1) that shares more
  than 2/3 of its items with R(i, k1) (``numpy.around``: 10 for k1 = 20);
* V_ij = exp(-d_ij) over j in R*(i), summing to 1, with d_ij = ||x_i - x_j||² / max_j ||x_i -
  x_j||² (the squared distance of the unit rows, 2 - 2 cos, divided by the item's largest);
* with k2 > 1, V_i becomes the mean of V over N(i, k2 - 1) (local query expansion).

A query q and a gallery item g are then d*(q, g) = λ d_qg + (1 - λ) J(q, g), with the
Jaccard distance J = 1 - Σ min(V_q, V_g) / Σ max(V_q, V_g) (the sums of V being 1, the
denominator is 2 - Σ min); items sharing nothing are J = 1 apart. The search ranks by
-d*, so every metric of :mod:`unicom.evaluate.metrics` reads the re-ranked order.

Memory: the neighbour lists (N x (k1 + 1)) and V (a few tens of entries a row, k2 times as
many after the expansion), never N x N; the Σ min of a block of queries is gathered through
V's columns (:data:`PAIRS_AT_ONCE` terms at a time). Cost: one search of every item
against every item (N² similarities, chunked like every search here), as database-side
augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse

from unicom.errors import InputError
from unicom.evaluate.metrics import as_embeddings, knn_search

DEFAULT_K2 = 6  # the paper's k1 = 20, k2 = 6, λ = 0.3 (its Market-1501 setting)
DEFAULT_LAMBDA = 0.3
ROWS_AT_ONCE = 4096  # items whose k-reciprocal sets are built at once: rows x (k1 + 1)² comparisons
PAIRS_AT_ONCE = 1 << 22  # (query, item, column) terms of Σ min(V_q, V_g) gathered at once
WEIGHT_VALUES_AT_ONCE = 1 << 22  # coordinates of the (item, item) pairs whose similarities weigh V, gathered at once


@dataclass(frozen=True)
class KReciprocal:
    """The settings of a k-reciprocal re-ranking: ``k1`` neighbours (R(i, k1)), ``k2`` (the
    local query expansion of V over N(i, k2 - 1); 1: none; default 6, or k1 + 1 when smaller)
    and ``lambda_value`` (the share of the original distance; 0: the Jaccard distance alone)."""

    k1: int
    k2: int | None = None
    lambda_value: float = DEFAULT_LAMBDA

    def __post_init__(self):
        if self.k2 is None and isinstance(self.k1, (int, np.integer)) and not isinstance(self.k1, bool):
            object.__setattr__(self, "k2", min(DEFAULT_K2, int(self.k1) + 1))
        for name, least in (("k1", 1), ("k2", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise InputError(f"k-reciprocal re-ranking's {name} is a number of neighbours, at least {least}; "
                                 f"got {value!r}")
        if self.k2 > self.k1 + 1:
            raise InputError(f"k-reciprocal re-ranking's k2 ({self.k2}) averages V over an item's k2 - 1 nearest "
                             f"neighbours, and only k1 = {self.k1} are searched; give k2 of at most {self.k1 + 1}")
        value = self.lambda_value
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 <= value <= 1:
            raise InputError("k-reciprocal re-ranking's lambda is the share of the original distance in the blend, "
                             f"from 0 (the Jaccard distance alone) to 1 (no re-ranking); got {value!r}")


class KReciprocalScores:
    """The k-reciprocal encodings of the queries and the gallery, re-scoring a search.

    query: (Nq, D), gallery: (Ng, D) (any float dtype; L2-normalised here) or ``None`` (the
    query set searched leave-one-out: the items are the queries). :meth:`__call__` turns a
    block of query rows' cosine similarities to the gallery into -d*, in place.
    """

    desc = "k-reciprocal: re-ranked search"  # the progress bar of the search it re-scores

    def __init__(self, query, gallery, settings: KReciprocal, *, chunk_size: int | None = None):
        q = as_embeddings(query, "query")
        items = q if gallery is None else torch.cat([q, as_embeddings(gallery, "gallery", q.device)])
        if gallery is not None and q.shape[1] != items.shape[1]:
            raise InputError(f"query rows have {q.shape[1]} dimensions but gallery rows {items.shape[1]}")
        n = items.shape[0]
        k1, k2 = settings.k1, settings.k2
        if k1 > n - 1:
            raise InputError(f"k-reciprocal re-ranking with k1 = {k1} neighbours, but there are {n} items (queries "
                             f"and gallery together) and so {n - 1} neighbours of each; give k1 of at most {n - 1}")
        self.settings = settings
        self.gallery_offset = 0 if gallery is None else q.shape[0]
        _, nearest, lowest = knn_search(items, None, k1, chunk_size=chunk_size, lowest=True,
                                        desc=f"k-reciprocal: {k1} neighbours of each item")
        ranks = np.concatenate([np.arange(n, dtype=np.int64)[:, None], nearest], axis=1)  # N(i, k1), itself first
        # the largest squared distance of each item, which its distances are divided by
        farthest = 2.0 - 2.0 * lowest.astype(np.float64)
        self.farthest = np.where(farthest > 0, farthest, 1.0)
        encoding = _encoding(items, ranks, k1, self.farthest)
        if k2 > 1:
            rows = np.repeat(np.arange(n), k2)
            average = sparse.csr_matrix((np.full(n * k2, 1.0 / k2), (rows, ranks[:, :k2].reshape(-1))), shape=(n, n))
            encoding = (average @ encoding).tocsr()
        encoding.sort_indices()
        self.rows = encoding
        self.columns = encoding.tocsc()

    def jaccard_overlap(self, query_rows: np.ndarray) -> np.ndarray:
        """Σ_k min(V_qk, V_gk) of each query row against each gallery item: float64 (C, Ng)."""
        n_gallery = self.rows.shape[0] - self.gallery_offset
        out = np.zeros((len(query_rows), n_gallery), dtype=np.float64)
        block = self.rows[query_rows]  # the queries' rows of V, whose every column k is read down
        column_starts = self.columns.indptr
        sizes = column_starts[block.indices + 1] - column_starts[block.indices]  # items sharing column k
        row_of_entry = np.repeat(np.arange(len(query_rows)), np.diff(block.indptr))
        ends = np.cumsum(np.bincount(row_of_entry, weights=sizes, minlength=len(query_rows)).astype(np.int64))
        start = 0
        while start < len(query_rows):  # query rows whose terms fit PAIRS_AT_ONCE, at least one
            done = int(ends[start - 1]) if start else 0
            stop = min(len(query_rows), max(start + 1, int(np.searchsorted(ends, done + PAIRS_AT_ONCE, "right"))))
            lo, hi = block.indptr[start], block.indptr[stop]
            counts = sizes[lo:hi]
            at = np.repeat(column_starts[block.indices[lo:hi]] - np.cumsum(counts) + counts, counts) + \
                np.arange(int(counts.sum()))
            cells = np.repeat((row_of_entry[lo:hi] - start) * n_gallery - self.gallery_offset, counts)
            cells += self.columns.indices[at]  # (query, gallery item) as one index into the block's rows
            overlap = np.minimum(np.repeat(block.data[lo:hi], counts), self.columns.data[at])
            if self.gallery_offset:  # the queries' own columns are not in the gallery
                kept = self.columns.indices[at] >= self.gallery_offset
                cells, overlap = cells[kept], overlap[kept]
            out[start:stop] = np.bincount(cells, weights=overlap,
                                          minlength=(stop - start) * n_gallery).reshape(stop - start, n_gallery)
            start = stop
        return out

    def __call__(self, query_rows: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` (C, Ng) cosine similarities of ``query_rows`` (C,) to the gallery,
        replaced in place by -d* (higher is nearer); returns ``scores``."""
        rows = query_rows.cpu().numpy()
        lam = float(self.settings.lambda_value)
        scale = torch.from_numpy(2.0 * lam / self.farthest[rows]).to(scores.device, torch.float32)[:, None]
        # an item sharing nothing (J = 1): -(λ (2 - 2s) / f + 1 - λ) = (s - 1) 2λ / f - (1 - λ)
        scores.sub_(1.0).mul_(scale).sub_(1.0 - lam)
        # the others are nearer by (1 - λ)(1 - J) = (1 - λ) m / (2 - m), m = Σ min(V_q, V_g)
        overlap = self.jaccard_overlap(rows)
        np.divide(overlap, 2.0 - overlap, out=overlap)
        overlap *= 1.0 - lam
        scores.add_(torch.from_numpy(overlap).to(scores.device, torch.float32))
        return scores


def _reciprocal(ranks: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Which of N(i, k) of each of ``rows`` hold i in their own N(·, k): bool (len(rows), k + 1)."""
    forward = ranks[rows, :k + 1]
    return (ranks[forward, :k + 1] == rows[:, None, None]).any(axis=2)


def _encoding(items: torch.Tensor, ranks: np.ndarray, k1: int, farthest: np.ndarray) -> sparse.csr_matrix:
    """V before the local query expansion: float32 CSR (N, N), each row exp(-d) over R*(i), summing to 1."""
    n = ranks.shape[0]
    half = int(np.around(k1 / 2.0))
    everyone = np.arange(n)
    half_sets = np.where(_reciprocal(ranks, everyone, half), ranks[:, :half + 1], -1)  # R(c, half), -1: not in it
    half_sizes = (half_sets >= 0).sum(axis=1)
    pair_rows, pair_columns = [], []
    for start in range(0, n, ROWS_AT_ONCE):
        rows = everyone[start:start + ROWS_AT_ONCE]
        own = np.where(_reciprocal(ranks, rows, k1), ranks[rows, :k1 + 1], -1)  # R(i, k1); -1: not in it
        candidates = np.maximum(own, 0)
        theirs = half_sets[candidates]  # (B, k1 + 1, half + 1)
        shared = ((theirs[..., None] == own[:, None, None, :]) & (theirs[..., None] >= 0)).any(axis=3).sum(axis=2)
        joins = (own >= 0) & (shared > 2.0 / 3 * half_sizes[candidates])
        joined = np.where(joins[..., None], theirs, -1).reshape(len(rows), -1)
        members = np.concatenate([own, joined], axis=1)
        row_of = np.broadcast_to(rows[:, None], members.shape)
        present = members >= 0
        keys = np.unique(row_of[present] * n + members[present])
        pair_rows.append(keys // n)
        pair_columns.append(keys % n)
    pair_rows, pair_columns = np.concatenate(pair_rows), np.concatenate(pair_columns)
    similarity = np.empty(len(pair_rows), dtype=np.float64)
    at_once = max(1, WEIGHT_VALUES_AT_ONCE // items.shape[1])
    for start in range(0, len(pair_rows), at_once):
        a = torch.from_numpy(pair_rows[start:start + at_once]).to(items.device)
        b = torch.from_numpy(pair_columns[start:start + at_once]).to(items.device)
        similarity[start:start + len(a)] = (items[a] * items[b]).sum(1, dtype=torch.float64).cpu().numpy()
    weight = np.exp(-(2.0 - 2.0 * similarity) / farthest[pair_rows])
    weight /= np.bincount(pair_rows, weights=weight, minlength=n)[pair_rows]
    return sparse.csr_matrix((weight.astype(np.float32), (pair_rows, pair_columns)), shape=(n, n))
