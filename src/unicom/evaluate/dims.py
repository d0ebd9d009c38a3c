"""Dimension-constrained retrieval: the first d dimensions, and a PCA-to-d baseline.

Unicom's random feature selection trains the leading dimensions to carry the embedding, so
the first d dimensions, re-normalised, are a compact embedding by themselves (the paper's
Fig. 1a). The baseline projects onto the d leading principal components of the train
split's embeddings, centred, then re-normalised. Both are scored with the same metrics
as the full embedding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from unicom.errors import InputError
from unicom.evaluate.metrics import (
    as_embeddings,
    default_chunk_size,
    retrieval_metrics,
    retrieval_metrics_from_relevance,
    revisited_metrics,
)

logger = logging.getLogger(__name__)
SHOWN_ROWS = 5  # rows named in a message
RANK_TOLERANCE = 1e-10  # a principal axis whose variance is below this fraction of the first's is none


def first_dimensions(x, d: int) -> np.ndarray:
    """The first ``d`` coordinates of each row, float32 (N, d) (re-normalised when scored)."""
    x = np.asarray(x)
    if not 1 <= d <= x.shape[1]:
        raise InputError(f"cannot keep {d} of {x.shape[1]} dimensions")
    return np.ascontiguousarray(x[:, :d], dtype=np.float32)


@dataclass
class PCA:
    """Principal axes of a set of embeddings.

    ``mean``: (D,) float64; ``components``: (D, D) float64, one axis per row, by decreasing
    explained variance, each signed so that its largest coordinate is positive;
    ``explained_variance``: (D,).
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray

    @classmethod
    def fit(cls, x, block_rows: int = 65_536) -> "PCA":
        """Fit on (N, D) embeddings (L2-normalised first, as they are scored), N >= 2.

        The covariance is accumulated in float64 over blocks of rows, so memory stays
        O(D^2 + block_rows x D) for any N.
        """
        import torch

        n = len(x)
        if n < 2:
            raise InputError(f"PCA needs at least 2 training embeddings, got {n}")
        total = None
        outer = None
        for start in range(0, n, block_rows):
            block = as_embeddings(np.asarray(x[start:start + block_rows]), "train embeddings").double()
            total = block.sum(0) if total is None else total + block.sum(0)
            outer = block.T @ block if outer is None else outer + block.T @ block
        mean = total / n
        covariance = outer / n - torch.outer(mean, mean)
        variance, axes = torch.linalg.eigh(covariance)
        order = torch.argsort(variance, descending=True)
        components = axes[:, order].T.contiguous()
        largest = components.abs().argmax(1)
        signs = torch.sign(components[torch.arange(len(components)), largest])
        components = components * signs[:, None]
        return cls(mean.numpy(), components.numpy(), variance[order].clamp(min=0).numpy())

    @property
    def rank(self) -> int:
        """The axes along which the fitted embeddings vary: at most N - 1 for N of them.
        The axes beyond are an arbitrary basis of the directions they never take."""
        variance = self.explained_variance
        return int((variance > RANK_TOLERANCE * variance[0]).sum()) if len(variance) and variance[0] > 0 else 0

    def transform(self, x, d: int, block_rows: int = 65_536) -> np.ndarray:
        """(N, D) embeddings -> (N, d) float32 coordinates on the d leading axes, centred."""
        if not 1 <= d <= len(self.components):
            raise InputError(f"cannot project onto {d} of {len(self.components)} principal axes")
        if np.shape(x)[1] != len(self.mean):
            raise InputError(f"embeddings of {np.shape(x)[1]} dimensions cannot be projected by a PCA fitted on "
                             f"{len(self.mean)}-dimensional train embeddings: embed both with the same model")
        axes = self.components[:d].T
        out = np.empty((len(x), d), dtype=np.float32)
        for start in range(0, len(x), block_rows):
            block = as_embeddings(np.asarray(x[start:start + block_rows]), "embeddings").double().numpy()
            out[start:start + len(block)] = (block - self.mean) @ axes
        return out

    def whiten(self, x, block_rows: int = 65_536) -> np.ndarray:
        """(N, D) embeddings -> (N, D) float32 coordinates on every principal axis, centred and
        divided by the axis' standard deviation (PCA whitening, Jégou and Chum 2012): the
        directions the fitted embeddings share stop dominating the cosine. Every axis must
        carry variance (:attr:`rank` = D)."""
        if self.rank < len(self.components):
            raise InputError(f"whitening divides by the variance along each of the {len(self.components)} axes, but "
                             f"the embeddings it is learned on vary along {self.rank} only: learn it on more "
                             f"embeddings (at least {len(self.components) + 1}, many more is better)")
        return self.transform(x, len(self.components), block_rows) / np.sqrt(self.explained_variance).astype(np.float32)


@dataclass
class PreparedSearch:
    """A search as the metrics run it: the query and gallery (expanded, on the device), the
    re-scoring of a re-ranking (or None) and the query rows searched at once (None: the default)."""

    query: Any
    gallery: Any
    rescore: Any = None
    chunk_size: int | None = None


def prepare_search(query, gallery=None, *, expansion=None, chunk_size: int | None = None, device=None) -> PreparedSearch:
    """The search of :func:`score`: ``query`` and ``gallery`` on ``device``, expanded by
    ``expansion`` (database-side augmentation, query expansion) and with its k-reciprocal or
    diffusion re-scoring built (the costly part of those: made once here)."""
    query, gallery = _on(query, device), _on(gallery, device)
    rescore = None
    if expansion:
        from unicom.evaluate.expansion import expand

        query, gallery = expand(query, gallery, expansion, chunk_size=chunk_size)
        query, gallery = _on(query, device), _on(gallery, device)
        if expansion.k_reciprocal is not None:
            from unicom.evaluate.kreciprocal import KReciprocalScores

            rescore = KReciprocalScores(query, gallery, expansion.k_reciprocal, chunk_size=chunk_size)
        elif expansion.diffusion is not None:
            from unicom.evaluate.diffusion import DiffusionScores

            rescore = DiffusionScores(query, gallery, expansion.diffusion, chunk_size=chunk_size)
        if rescore is not None and chunk_size is None:  # a block's re-scoring holds float64 copies of its scores
            chunk_size = max(1, default_chunk_size(len(query if gallery is None else gallery)) // 8)
    return PreparedSearch(query, gallery, rescore, chunk_size)


def score(
    query,
    query_labels=None,
    gallery=None,
    gallery_labels=None,
    *,
    relevant=None,
    setups=None,
    ks: Sequence[int] = (1,),
    chunk_size: int | None = None,
    per_query: bool = False,
    expansion=None,
    device=None,
    prepared: "PreparedSearch | None" = None,
) -> dict:
    """:func:`retrieval_metrics`, or its relevance-list variant when ``relevant`` is given, or
    :func:`revisited_metrics` (``ks`` the k of mP@k) when ``setups`` are; with an
    ``expansion`` (:class:`~unicom.evaluate.expansion.Expansion`), of the query and gallery
    it re-ranks (database-side augmentation, query expansion, then k-reciprocal or diffusion
    re-ranking of the scores). ``device``: where the searches run (a torch device; default where the
    embeddings are: the CPU for arrays), in full float32. ``prepared``: the search as
    :func:`prepare_search` made it of these arguments, made once for several uses."""
    search = prepared or prepare_search(query, gallery, expansion=expansion, chunk_size=chunk_size, device=device)
    query, gallery, rescore, chunk_size = search.query, search.gallery, search.rescore, search.chunk_size
    if setups is not None:
        return revisited_metrics(query, gallery, setups, ks, chunk_size, rescore=rescore, per_query=per_query)
    if relevant is not None:
        return retrieval_metrics_from_relevance(query, gallery, relevant, ks, chunk_size, per_query=per_query,
                                                rescore=rescore)
    return retrieval_metrics(query, query_labels, gallery, gallery_labels, ks, chunk_size, per_query=per_query,
                             rescore=rescore)


def _on(x, device):
    """Embeddings ``x`` (an array or tensor; None stays None) as a float32 tensor on ``device``;
    unchanged without one."""
    if x is None or device is None:
        return x
    import torch

    tensor = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return tensor.to(device=device, dtype=torch.float32)


def dimension_curve(
    query,
    query_labels=None,
    gallery=None,
    gallery_labels=None,
    *,
    dims: Sequence[int] = (32, 64, 128, 256),
    train=None,
    relevant=None,
    setups=None,
    ks: Sequence[int] = (1,),
    chunk_size: int | None = None,
    expansion=None,
    device=None,
) -> list[dict]:
    """Metrics of the first d dimensions and of PCA-to-d, for each d in ``dims`` and full D
    (with an ``expansion``, re-ranked in the d dimensions: :func:`score`; ``device``: where
    the searches run, as there).

    Returns rows ``{"dimension": d, "method": "first" | "pca", **metrics}``, ``first``
    rows first, each by increasing d. The ``pca`` rows need ``train`` (embeddings of the
    train split; the axes are fitted on them) and are absent without it. Dimensions above
    D are left out with a warning that names them. A d beyond the PCA's rank (``train``
    varies along fewer axes, as N train rows span at most N - 1) is not scored by PCA, nor
    is a d at which some rows are all zeros (no direction to rank by): its row is ``{"dimension": d, "method": ..., "skipped": why}``, naming the
    rows, and a warning says so; the other dimensions are scored.
    """
    full = np.asarray(query).shape[1]
    wanted = sorted({int(d) for d in dims if 1 <= int(d) < full} | {full})
    above = sorted({int(d) for d in dims if int(d) > full})
    if above:
        logger.warning("dimension%s %s left out: the embeddings have %d dimensions (scored in full)",
                       "s" if len(above) > 1 else "", ", ".join(map(str, above)), full)
    rows = []
    methods = {"first": first_dimensions}
    pca = None
    if train is not None:
        pca = PCA.fit(train)
        methods["pca"] = pca.transform
    for method, reduce in methods.items():
        for d in wanted:
            why = ""
            if method == "pca" and d > pca.rank:
                why = (f"dimension {d} (pca) skipped: the {len(train)} train embeddings vary along {pca.rank} principal "
                       "axes only, and the axes beyond are arbitrary; fit the PCA on more train images (a larger "
                       "--pca-samples or train split); the other dimensions are scored")
            else:
                q = reduce(query, d)
                g = None if gallery is None else reduce(gallery, d)
                why = _without_direction(q, g, d, method)
            if why:
                logger.warning("%s", why)
                rows.append({"dimension": d, "method": method, "skipped": why})
                continue
            metrics = score(q, query_labels, g, gallery_labels, relevant=relevant, setups=setups, ks=ks,
                            chunk_size=chunk_size, expansion=expansion, device=device)
            rows.append({"dimension": d, "method": method, **metrics})
    return rows


def _without_direction(query: np.ndarray, gallery: np.ndarray | None, d: int, method: str) -> str:
    """Why ``d`` cannot be scored: the rows of ``query``/``gallery`` (reduced to d) that are
    all zeros; empty when there are none."""
    problems, count = [], 0
    for name, x in (("query", query), ("gallery", gallery)):
        if x is None:
            continue
        zero = np.flatnonzero(~np.any(x != 0, axis=1))
        count += len(zero)
        if len(zero):
            listed = ", ".join(str(int(r)) for r in zero[:SHOWN_ROWS])
            more = f" and {len(zero) - SHOWN_ROWS} more" if len(zero) > SHOWN_ROWS else ""
            problems.append(f"{name} row{'s' if len(zero) > 1 else ''} {listed}{more}")
    if not problems:
        return ""
    what = f"first {d} coordinates" if method == "first" else f"projection onto the first {d} principal axes"
    verb = "is" if count == 1 else "are"
    return (f"dimension {d} ({method}) skipped: {' and '.join(problems)} {verb} all zeros in their {what}, "
            "with no direction to rank by; the other dimensions are scored")
