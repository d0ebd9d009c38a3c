"""Diffusion re-ranking (Iscen et al., "Efficient Diffusion on Region Manifolds", CVPR 2017,
its global form): a query's similarity spread over a k-nearest-neighbour graph of the gallery.

* The graph: a_ij = max(x_i·x_j, 0)^γ between gallery items that are each among the other's
  k nearest (reciprocal neighbours; each item's k from the exact search of
  :func:`~unicom.evaluate.metrics.knn_search`, ties by lower index), 0 elsewhere and on the
  diagonal; S = D^-1/2 A D^-1/2 with D the row sums of A.
* A query q starts as y_j = max(q·x_j, 0)^γ over its k nearest gallery items (0 elsewhere)
  and spreads to f, the solution of (I - α S) f = y (the ranking of Zhou et al.'s manifold
  ranking), found by conjugate gradients, every query of a block at once, to a residual of
  :data:`TOLERANCE` x |y|.
* The gallery is ranked by f; items the query's spread does not reach (no path of the graph
  from a start with y > 0, or not a start when α = 0: f = 0) come after, in the order of the
  plain search.

Memory: the graph (k entries a row at most) and a block's f (queries x gallery), never
gallery x gallery. Cost: one search of the gallery against itself (as database-side
augmentation), then for each query some tens to a hundred products with the graph
(gallery x k multiply-adds each): made for landmark benchmarks, tens of queries against a
gallery of up to a million, not for tens of thousands of queries searched leave-one-out.

The spectral form (Iscen et al., "Fast Spectral Ranking for Similarity Search", CVPR 2018,
their FSR.RANK-r; ``rank`` r) is for those: f = Σ_i u_i uᵢᵀ y / (1 - α λ_i) over the
leading eigenpairs (λ_i, u_i) of S, the solution restricted to the leading directions of the
graph, two products per block of queries instead of a solve per query. The eigenvalue 1
comes once per connected part of the graph with an edge (the part's D^1/2 1, normalised),
a repeated eigenvalue a Lanczos iteration may return too few copies of: those vectors are
used exactly, as sums over each part (sparse, whatever their number), and the r largest
eigenpairs of S - 3 P (P the projection onto those vectors, moved below S's spectrum,
which lies in [-1, 1]; by ARPACK's implicitly restarted Lanczos iteration, once) join them.
Memory adds U (gallery x r float64: 60,000 x 1,000 takes 480 MB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from unicom.errors import InputError
from unicom.evaluate.metrics import as_embeddings, knn_search, ranked_top_k

DEFAULT_K = 50  # Iscen et al.'s k, γ and α
DEFAULT_GAMMA = 3.0
DEFAULT_ALPHA = 0.99
TOLERANCE = 1e-6  # conjugate gradients stop at a residual of TOLERANCE x |y| (each query's own)
MAX_ITERATIONS = 1000


@dataclass(frozen=True)
class Diffusion:
    """The settings of a diffusion re-ranking: ``k`` reciprocal neighbours in the graph (and
    the query's k nearest items it starts from), ``gamma`` the power of the similarities,
    ``alpha`` in [0, 1) how far the query spreads (0: the plain ranking of its k nearest);
    ``rank``: the spectral form on the graph's ``rank`` leading eigenvectors (None: the exact
    solve of each query)."""

    k: int = DEFAULT_K
    gamma: float = DEFAULT_GAMMA
    alpha: float = DEFAULT_ALPHA
    rank: int | None = None

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise InputError(f"diffusion's k is a number of neighbours, at least 1; got {self.k!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer))
                                      or self.rank < 1):
            raise InputError(f"diffusion's rank is a number of eigenvectors, at least 1 (or none: the exact solve); "
                             f"got {self.rank!r}")
        for name, low, high, what in (("gamma", 0.0, float("inf"), "the power of the similarities, a finite number "
                                                                    "> 0 (default 3)"),
                                      ("alpha", 0.0, 1.0, "how far a query spreads, from 0 up to but not 1 "
                                                          "(default 0.99)")):
            value = getattr(self, name)
            valid = not isinstance(value, bool) and isinstance(value, (int, float, np.number)) and \
                np.isfinite(value) and low <= value < high and not (name == "gamma" and value == 0)
            if not valid:
                raise InputError(f"diffusion's {name} is {what}; got {value!r}")


class PartsProjection:
    """The projection onto S's eigenvectors of eigenvalue 1, one per connected part of the
    graph with an edge: v_C = D^1/2 1_C / |D^1/2 1_C|, so P y = Σ_C v_C (v_Cᵀ y), computed as
    sums over each part. ``parts``: each item's part (N,); ``degree``: the row sums of A (N,)."""

    def __init__(self, parts: np.ndarray, degree: np.ndarray):
        n, count = len(parts), int(parts.max()) + 1
        root = np.sqrt(degree)
        mass = np.bincount(parts, weights=degree, minlength=count)  # |D^1/2 1_C|^2
        scale = np.where(mass > 0, 1.0 / np.sqrt(np.where(mass > 0, mass, 1.0)), 0.0)
        # row C of ``vectors`` is v_C (a part without an edge has none: zero)
        self.vectors = sparse.csr_matrix((root * scale[parts], (parts, np.arange(n))), shape=(count, n))

    def __call__(self, y: np.ndarray) -> np.ndarray:
        """P y for y (N,) or (N, C)."""
        return self.vectors.T @ (self.vectors @ y)


def leading_eigenpairs(graph, rank: int, deflated: PartsProjection | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``rank`` largest eigenvalues (float64 (r,), decreasing) of the symmetric sparse
    ``graph`` (a normalised one: its eigenvalues lie in [-1, 1]) and their unit eigenvectors
    (float64 (N, r)), the eigenvectors of the projection ``deflated`` left out (they are
    moved to -2 by iterating on graph - 3 P; fewer than ``rank`` pairs come back when the
    others are all there is), by ARPACK's implicitly restarted Lanczos iteration from a fixed
    start (the same pairs at every run)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    n = graph.shape[0]
    operator = graph if deflated is None else LinearOperator(
        (n, n), matvec=lambda x: graph @ x - 3.0 * deflated(x), dtype=np.float64)
    start = np.random.default_rng(0).standard_normal(n)
    values, vectors = eigsh(operator, k=rank, which="LA", v0=start)
    kept = np.argsort(-values, kind="stable")
    kept = kept[values[kept] > -1.5]  # a deflated direction (at -2), reached when rank exceeds the rest
    return values[kept], np.ascontiguousarray(vectors[:, kept])


class DiffusionScores:
    """The neighbour graph of the gallery, re-scoring a search by diffusion.

    query: (Nq, D), gallery: (Ng, D) (any float dtype; L2-normalised here) or ``None`` (the
    query set searched leave-one-out: the graph is over the queries, a query starting from
    its k nearest others). :meth:`__call__` turns a block of query rows' cosine similarities
    to the gallery into the scores the diffusion ranks by, in place.
    """

    desc = "diffusion: spread of each query"  # the progress bar of the search it re-scores

    def __init__(self, query, gallery, settings: Diffusion, *, chunk_size: int | None = None):
        q = as_embeddings(query, "query")
        g = q if gallery is None else as_embeddings(gallery, "gallery", q.device)
        if q.shape[1] != g.shape[1]:
            raise InputError(f"query rows have {q.shape[1]} dimensions but gallery rows {g.shape[1]}")
        n = g.shape[0]
        if settings.k > n - 1:
            raise InputError(f"diffusion over k = {settings.k} neighbours, but the gallery has {n} items and so "
                             f"{n - 1} neighbours of each; give k of at most {n - 1}")
        self.settings = settings
        self.leave_one_out = gallery is None
        similarities, nearest = knn_search(g, None, settings.k, chunk_size=chunk_size,
                                           desc=f"diffusion: {settings.k} neighbours of each item")
        rows = np.repeat(np.arange(n), settings.k)
        columns = nearest.reshape(-1)
        weights = np.maximum(similarities.reshape(-1).astype(np.float64), 0.0) ** settings.gamma
        directed = sparse.csr_matrix((weights, (rows, columns)), shape=(n, n))
        mutual = directed.minimum(directed.T)  # a pair only when each is among the other's k nearest
        mutual.eliminate_zeros()
        degree = np.asarray(mutual.sum(axis=1)).ravel()
        scale = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
        self.graph = (sparse.diags(scale) @ mutual @ sparse.diags(scale)).tocsr()
        # which items a start reaches: those of its connected part of the graph
        self.parts = connected_components(mutual, directed=False)[1]
        self.eigenvalues = self.eigenvectors = self.parts_projection = None
        if settings.rank is not None:
            if settings.rank > n - 2:
                raise InputError(f"diffusion on {settings.rank} eigenvectors of the graph of {n} items: the iteration "
                                 f"finds at most {n - 2}; give a rank of at most {n - 2}, or leave it out (the exact "
                                 "solve)")
            self.parts_projection = PartsProjection(self.parts, degree)
            self.eigenvalues, self.eigenvectors = leading_eigenpairs(self.graph, settings.rank, self.parts_projection)

    def spread(self, start: np.ndarray) -> np.ndarray:
        """f = (I - α S)^-1 y for each column of ``start`` (y, float64 (Ng, C)), by conjugate
        gradients, or on the leading eigenvectors with a ``rank``: float64 (Ng, C)."""
        alpha = float(self.settings.alpha)
        if self.eigenvectors is not None:
            u = self.eigenvectors
            leading = u @ ((u.T @ start) / (1.0 - alpha * self.eigenvalues)[:, None])
            return self.parts_projection(start) / (1.0 - alpha) + leading
        f = np.zeros_like(start)
        residual = start.copy()
        direction = residual.copy()
        rho = (residual * residual).sum(axis=0)
        goal = TOLERANCE ** 2 * rho
        for _ in range(MAX_ITERATIONS):
            active = rho > goal
            if not active.any():
                break
            product = direction - alpha * (self.graph @ direction)
            curvature = (direction * product).sum(axis=0)
            step = np.where(active, rho / np.where(active, curvature, 1.0), 0.0)
            f += step * direction
            residual -= step * product
            rho_next = (residual * residual).sum(axis=0)
            direction = residual + np.where(active, rho_next / np.where(active, rho, 1.0), 0.0) * direction
            rho = np.where(active, rho_next, rho)
        return f

    def __call__(self, query_rows: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` (C, Ng) cosine similarities of ``query_rows`` (C,) to the gallery,
        replaced in place by f where the diffusion reaches and similarity - 2 (below any f)
        elsewhere; returns ``scores``."""
        k, gamma = self.settings.k, float(self.settings.gamma)
        searched = scores
        if self.leave_one_out:  # a query starts from its k nearest others
            searched = scores.clone()
            searched[torch.arange(len(query_rows), device=scores.device), query_rows] = float("-inf")
        values, items = ranked_top_k(searched, k)  # ties by lower index, as every search here
        start = np.zeros((scores.shape[1], len(query_rows)), dtype=np.float64)
        columns = np.repeat(np.arange(len(query_rows)), k)
        start[items.cpu().numpy().reshape(-1), columns] = \
            np.maximum(values.cpu().double().numpy().reshape(-1), 0.0) ** gamma
        started = start.T > 0  # (C, Ng)
        if self.settings.alpha > 0:
            queries, items = started.nonzero()
            hit = np.zeros((len(query_rows), self.parts.max() + 1), dtype=bool)
            hit[queries, self.parts[items]] = True
            started = hit[:, self.parts]
        reached = torch.from_numpy(started).to(scores.device)
        f = torch.from_numpy(self.spread(start).T.copy()).to(scores.device)
        scores.sub_(2.0)
        scores[reached] = f[reached].to(scores.dtype)
        return scores
