"""Query expansion and database-side augmentation: re-ranking by a second search.

Both replace a vector by a weighted sum of itself and its nearest neighbours, re-normalised,
as the landmark-retrieval literature reports them beside the plain search (α-query expansion
of Radenović et al., TPAMI 2019; database-side augmentation of Arandjelović and Zisserman,
CVPR 2012, with the same α-weights):

* **database-side augmentation** (DBA, ``dba`` = k): each gallery vector x becomes
  x + Σ_j w_j x_j over its k nearest *other* gallery items x_j;
* **α-query expansion** (αQE, ``qe`` = k): each query q becomes q + Σ_j w_j g_j over its k
  nearest gallery items g_j (the augmented ones when DBA is on), and the expanded query
  is searched again.

The weight of a neighbour at cosine similarity s is w = max(s, 0)^α, its own vector counting
once (s = 1); α = 0 weighs every neighbour as much as the vector itself (average query
expansion, Chum et al. 2007), a large α keeps only the closest. Neighbours are found by the
exact search of :func:`~unicom.evaluate.metrics.knn_search` (ties by lower gallery index), so
the result does not depend on a chunk size; CUDA tensors are searched and summed on their GPU.
The results are float32 numpy arrays. A leave-one-out protocol (no gallery apart from
the queries) takes DBA, over the query set, but not αQE: an expanded query would have to be
searched without its own row, which it no longer is.

An :class:`Expansion` may also hold a :class:`~unicom.evaluate.kreciprocal.KReciprocal` or
a :class:`~unicom.evaluate.diffusion.Diffusion` re-ranking (one of them), which do not change
the vectors but the scores their search ranks by (:mod:`unicom.evaluate.kreciprocal`,
:mod:`unicom.evaluate.diffusion`); they follow DBA and αQE, on the vectors they give.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from unicom.errors import InputError
from unicom.evaluate.diffusion import Diffusion
from unicom.evaluate.kreciprocal import KReciprocal
from unicom.evaluate.metrics import as_embeddings, knn_search

DEFAULT_ALPHA = 3.0  # the α of Radenović et al.'s αQE and DBA
BLOCK_ROWS = 16_384  # rows whose neighbours are gathered at once: k x D floats each


@dataclass(frozen=True)
class Expansion:
    """What re-ranks a search: ``qe`` and ``dba`` neighbours (0: none) and their α, and a
    ``k_reciprocal`` or ``diffusion`` re-ranking of the scores (None: none)."""

    qe: int = 0
    dba: int = 0
    qe_alpha: float = DEFAULT_ALPHA
    dba_alpha: float = DEFAULT_ALPHA
    k_reciprocal: KReciprocal | None = None
    diffusion: Diffusion | None = None

    def __post_init__(self):
        for name in ("qe", "dba"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise InputError(f"{name} is a number of neighbours, 0 or more (0: no {_TITLES[name]}); got {value!r}")
            alpha = getattr(self, f"{name}_alpha")
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) \
                    or not np.isfinite(alpha) or alpha < 0:
                raise InputError(f"{name}_alpha is the power of the similarities that weigh the neighbours, a finite "
                                 f"number >= 0 (0 weighs them all as the vector itself; default {DEFAULT_ALPHA:g}); "
                                 f"got {alpha!r}")
        if self.k_reciprocal is not None and not isinstance(self.k_reciprocal, KReciprocal):
            raise InputError(f"k_reciprocal is a KReciprocal (k1, k2, lambda_value) or None; got {self.k_reciprocal!r}")
        if self.diffusion is not None and not isinstance(self.diffusion, Diffusion):
            raise InputError(f"diffusion is a Diffusion (k, gamma, alpha) or None; got {self.diffusion!r}")
        if self.k_reciprocal is not None and self.diffusion is not None:
            raise InputError("k-reciprocal re-ranking and diffusion each replace the scores a search ranks by; "
                             "choose one of them")

    def __bool__(self) -> bool:
        return bool(self.qe or self.dba or self.k_reciprocal or self.diffusion)

    def describe(self) -> dict:
        """The settings a report records: ``{"qe": {"k", "alpha"}, "dba": {...}, "k_reciprocal":
        {"k1", "k2", "lambda"}, "diffusion": {"k", "gamma", "alpha"}}``, those in use."""
        described: dict = {name: {"k": int(getattr(self, name)), "alpha": float(getattr(self, f"{name}_alpha"))}
                           for name in ("dba", "qe") if getattr(self, name)}
        if self.k_reciprocal is not None:
            kr = self.k_reciprocal
            described["k_reciprocal"] = {"k1": int(kr.k1), "k2": int(kr.k2), "lambda": float(kr.lambda_value)}
        if self.diffusion is not None:
            d = self.diffusion
            described["diffusion"] = {"k": int(d.k), "gamma": float(d.gamma), "alpha": float(d.alpha)}
            if d.rank is not None:
                described["diffusion"]["rank"] = int(d.rank)
        return described

    def text(self) -> str:
        """``"DBA k=10 α=3, αQE k=2 α=3, k-reciprocal k1=20 k2=6 λ=0.3"`` (or ``"diffusion k=50
        γ=3 α=0.99"``): the settings in a table's caption."""
        said = [f"{_SHORT[name]} k={setting['k']} α={setting['alpha']:g}"
                for name, setting in self.describe().items() if name in _SHORT]
        if self.k_reciprocal is not None:
            kr = self.k_reciprocal
            said.append(f"k-reciprocal k1={kr.k1} k2={kr.k2} λ={kr.lambda_value:g}")
        if self.diffusion is not None:
            d = self.diffusion
            said.append(f"diffusion k={d.k} γ={d.gamma:g} α={d.alpha:g}" + (f" rank={d.rank}" if d.rank else ""))
        return ", ".join(said)


_TITLES = {"qe": "query expansion", "dba": "database-side augmentation"}
_SHORT = {"qe": "αQE", "dba": "DBA"}


def _weighted_sums(x: torch.Tensor, neighbours: torch.Tensor, similarities: np.ndarray, indices: np.ndarray,
                   alpha: float) -> np.ndarray:
    """Each row of ``x`` plus its neighbours' rows of ``neighbours`` (``indices``) weighted by
    max(similarity, 0)^alpha, re-normalised: float32 (N, D)."""
    out = np.empty(tuple(x.shape), dtype=np.float32)
    for start in range(0, len(x), BLOCK_ROWS):
        stop = start + BLOCK_ROWS
        weights = torch.from_numpy(similarities[start:stop]).clamp(min=0).double().pow(alpha).float().to(x.device)
        rows = neighbours[torch.from_numpy(indices[start:stop]).to(x.device).reshape(-1)].reshape(*weights.shape, -1)
        summed = x[start:stop] + torch.einsum("nk,nkd->nd", weights, rows)
        out[start:stop] = torch.nn.functional.normalize(summed, dim=1).cpu().numpy()
    return out


def database_side_augmentation(gallery, k: int, alpha: float = DEFAULT_ALPHA, *, chunk_size: int | None = None) -> np.ndarray:
    """Each gallery row plus its ``k`` nearest other rows weighted by max(s, 0)^``alpha``,
    re-normalised (DBA): float32 (N, D)."""
    g = as_embeddings(gallery, "gallery")
    _require_neighbours(k, len(g) - 1, "dba", "other gallery items")
    similarities, indices = knn_search(g, None, k, chunk_size=chunk_size, desc=f"DBA: {k} neighbours of each item")
    return _weighted_sums(g, g, similarities, indices, alpha)


def query_expansion(query, gallery, k: int, alpha: float = DEFAULT_ALPHA, *, chunk_size: int | None = None) -> np.ndarray:
    """Each query row plus its ``k`` nearest gallery rows weighted by max(s, 0)^``alpha``,
    re-normalised (αQE): float32 (Nq, D), to be searched in ``gallery`` again."""
    q = as_embeddings(query, "query")
    g = as_embeddings(gallery, "gallery", q.device)
    if q.shape[1] != g.shape[1]:
        raise InputError(f"query rows have {q.shape[1]} dimensions but gallery rows {g.shape[1]}")
    _require_neighbours(k, len(g), "qe", "gallery items")
    similarities, indices = knn_search(q, g, k, chunk_size=chunk_size, desc=f"αQE: {k} neighbours of each query")
    return _weighted_sums(q, g, similarities, indices, alpha)


def _require_neighbours(k: int, available: int, name: str, what: str) -> None:
    if k > available:
        raise InputError(f"{_TITLES[name]} with {k} neighbours ({name}={k}), but there are {available} {what}; "
                         f"give {name} of at most {available}")


def expand(query, gallery, expansion: Expansion, *, chunk_size: int | None = None):
    """(query, gallery) re-ranked by ``expansion``: DBA on the gallery first, then αQE of
    the queries against the augmented gallery. ``gallery=None`` (leave-one-out over the
    queries): DBA over the query set, which stays the gallery (returned as None); αQE is
    refused there. Unchanged inputs when ``expansion`` asks for neither (its k-reciprocal
    or diffusion re-ranking changes the scores, not the vectors)."""
    if not (expansion.qe or expansion.dba):
        return query, gallery
    if gallery is None:
        if expansion.qe:
            raise InputError(
                "query expansion needs a gallery apart from the queries: this protocol searches the queries "
                "leave-one-out, and an expanded query would no longer be left out of its own search; set qe to 0 "
                "(dba augments the query set itself), or give a gallery")
        return database_side_augmentation(query, expansion.dba, expansion.dba_alpha, chunk_size=chunk_size), None
    if expansion.dba:
        gallery = database_side_augmentation(gallery, expansion.dba, expansion.dba_alpha, chunk_size=chunk_size)
    if expansion.qe:
        query = query_expansion(query, gallery, expansion.qe, expansion.qe_alpha, chunk_size=chunk_size)
    return query, gallery
