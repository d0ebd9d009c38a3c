"""Retrieval metrics from one exact, chunked k-nearest-neighbour search.

Every retrieval number of the project comes from :func:`retrieval_metrics` (class labels),
:func:`retrieval_metrics_from_relevance` (explicit lists of relevant gallery items per
query, as in GLDv2's solution file) or :func:`revisited_metrics` (Revisited Oxford/Paris:
positive and ignored lists per setup, scored on whole rankings). All rank the gallery by
cosine similarity (embeddings are L2-normalised here, in float32) and share one search:

* queries are processed in blocks of ``chunk_size`` rows; a block's similarities to the
  whole gallery are one matrix product into a reused buffer, so memory is
  ``chunk_size x len(gallery)`` floats, never N x N;
* ties are broken deterministically: equal similarities rank the lower gallery index
  first (see :func:`ranked_top_k`);
* when the gallery is the query set (``gallery=None``) each query's own row is removed by
  its index (its similarity is set to -inf), never by assuming it ranks first.

Definitions (``docs/evaluation.md`` has them with worked examples). For a query q with
R_q relevant gallery items (same class, minus q itself when q is in the gallery), rel_q(i)
= 1 if the item at rank i is relevant, P_q(i) = (1/i) sum_{j<=i} rel_q(j):

* ``recall@K``: 1 if some relevant item is among the K nearest (hit@K);
* ``map@r``: (1/R_q) sum_{i<=R_q} P_q(i) rel_q(i)  (Musgrave et al. 2020);
* ``r_precision``: (1/R_q) sum_{i<=R_q} rel_q(i);
* ``map@100``: (1/min(R_q,100)) sum_{i<=100} P_q(i) rel_q(i)  (Google Landmark Retrieval);
* ``mmp@5``: (1/min(R_q,5)) sum_{i<=min(R_q,5)} rel_q(i)  (GUIEC): only the first
  min(R_q,5) results count, so with R_q <= 5 it is the R-precision and with more it is
  the precision at 5;

each averaged over the queries with R_q > 0; the others are counted in ``n_excluded``.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from unicom.engine.device import exact_float32
from unicom.errors import InputError
from unicom.progress import progress

# Bytes of float32 similarities computed at once when ``chunk_size`` is not given.
SCORE_BLOCK_BYTES = 256 * 2**20
# The deepest rank any metric reads besides MAP@R / R-precision (mAP@100).
DEEPEST_FIXED_RANK = 100


# --------------------------------------------------------------------------- inputs


def as_embeddings(x, name: str, device: torch.device | None = None) -> torch.Tensor:
    """(N, D) array or tensor -> float32 tensor, rows L2-normalised.

    Raises :class:`InputError` for a wrong shape, non-finite values or all-zero rows.
    """
    tensor = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if device is not None:
        tensor = tensor.to(device)
    if tensor.ndim != 2 or tensor.shape[1] == 0:
        raise InputError(f"{name}: expected a 2-D array (rows, dimension), got shape {tuple(tensor.shape)}")
    tensor = tensor.detach().float()
    if not bool(torch.isfinite(tensor).all()):
        row = int((~torch.isfinite(tensor)).any(1).nonzero()[0])
        raise InputError(f"{name}: row {row} holds NaN or infinite values")
    norms = tensor.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        row = int((norms[:, 0] == 0).nonzero()[0])
        raise InputError(f"{name}: row {row} is all zeros and has no direction; remove it")
    return (tensor / norms).contiguous()


def _label_ids(query_labels, gallery_labels, num_query: int, num_gallery: int | None):
    """Labels -> int64 numpy arrays; non-integer labels (names) share one vocabulary."""
    arrays = []
    for labels, n, name in ((query_labels, num_query, "query_labels"), (gallery_labels, num_gallery, "gallery_labels")):
        if labels is None:
            continue
        array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if array.ndim != 1 or len(array) != n:
            raise InputError(f"{name}: expected {n} labels (one per embedding row), got shape {array.shape}")
        arrays.append(array)
    if all(np.issubdtype(a.dtype, np.integer) for a in arrays):
        return [a.astype(np.int64) for a in arrays]
    _, inverse = np.unique(np.concatenate([a.astype(str) for a in arrays]), return_inverse=True)
    return np.split(inverse.astype(np.int64), [len(arrays[0])])[: len(arrays)]


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise InputError(f"ks must be positive integers, got {ks}")
    return ks


def default_chunk_size(num_gallery: int) -> int:
    """Query rows per block so that one block of similarities takes about 256 MiB."""
    return max(1, min(8192, SCORE_BLOCK_BYTES // (4 * max(1, num_gallery))))


# --------------------------------------------------------------------------- the search


def ranked_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest entries of each row, ordered by score, equal scores by lower column.

    scores: float (C, N); returns (values (C, k) float, indices (C, k) int64). The order is
    the one a stable descending sort of the whole row gives, computed with ``topk``: rows
    where equal scores straddle the k-th place are re-ranked with a stable full sort, and
    runs of equal scores inside the top k are put in index order.
    """
    n = scores.shape[1]
    k = min(k, n)
    take = min(k + 1, n)
    values, indices = torch.topk(scores, take, dim=1, largest=True, sorted=True)
    if take > k:
        straddling = (values[:, k - 1] == values[:, k]).nonzero().flatten()
        values, indices = values[:, :k].clone(), indices[:, :k].clone()
        if len(straddling):
            exact = torch.sort(scores[straddling], dim=1, descending=True, stable=True)
            values[straddling] = exact.values[:, :k]
            indices[straddling] = exact.indices[:, :k]
    tied = (values[:, 1:] == values[:, :-1]).any(1).nonzero().flatten()
    if len(tied):
        v, i = values[tied], indices[tied]
        by_index = torch.argsort(i, dim=1)
        v, i = v.gather(1, by_index), i.gather(1, by_index)
        by_score = torch.sort(v, dim=1, descending=True, stable=True).indices
        values[tied], indices[tied] = v.gather(1, by_score), i.gather(1, by_score)
    return values, indices


def _blocks(
    query: torch.Tensor,
    gallery: torch.Tensor,
    rows: torch.Tensor,
    chunk_size: int,
    exclude_self: bool,
    rescore: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(query row ids (C,), similarities (C, N_gallery)) for consecutive blocks of ``rows``.

    The similarity block is a view of one reused buffer: consume it before the next step.
    ``rescore(rows, block)``, when given, replaces the cosine similarities in place by the
    scores a re-ranking ranks by (higher first; :class:`~unicom.evaluate.kreciprocal.KReciprocalScores`),
    with a progress bar (rate, ETA) over the queries named by its ``desc``. With
    ``exclude_self`` query row r's own gallery column r is then set to -inf.
    """
    rows_at_once = min(chunk_size, max(1, len(rows)))
    buffer = torch.empty((rows_at_once, gallery.shape[0]), dtype=torch.float32, device=gallery.device)
    gallery_t = gallery.T
    bar = None if rescore is None else progress(total=len(rows), desc=getattr(rescore, "desc", "re-ranked search"),
                                                unit="query")
    try:
        for start in range(0, len(rows), chunk_size):
            block_rows = rows[start:start + chunk_size]
            scores = buffer[: len(block_rows)]
            with exact_float32():  # not TF32, whatever a training run in this process allowed
                torch.mm(query[block_rows], gallery_t, out=scores)
            if rescore is not None:
                rescore(block_rows, scores)
                bar.update(len(block_rows))
            if exclude_self:
                scores[torch.arange(len(block_rows), device=scores.device), block_rows] = float("-inf")
            yield block_rows, scores
    finally:
        if bar is not None:
            bar.close()


def knn_search(query, gallery=None, k: int = 10, *, chunk_size: int | None = None,
               desc: str | None = None, lowest: bool = False) -> tuple[np.ndarray, ...]:
    """Exact cosine k-nearest neighbours of every query row in ``gallery``.

    query: (Nq, D), gallery: (Ng, D) (any float dtype; L2-normalised here); with
    ``gallery=None`` the query set is searched without each query's own row. Returns
    (similarities float32 (Nq, k), gallery indices int64 (Nq, k)), best first, equal
    similarities by lower gallery index. ``desc``: a progress bar (rate, ETA) of that name
    over the query rows. ``lowest``: also return each query's lowest similarity to the gallery
    (float32 (Nq,); its own row left out as from the neighbours), from the same search.
    """
    exclude_self = gallery is None
    q = as_embeddings(query, "query")
    g = q if exclude_self else as_embeddings(gallery, "gallery", q.device)
    if q.shape[1] != g.shape[1]:
        raise InputError(f"query rows have {q.shape[1]} dimensions but gallery rows {g.shape[1]}")
    available = g.shape[0] - int(exclude_self)
    if not 1 <= k <= available:
        raise InputError(f"k={k} nearest neighbours asked for, but the gallery offers {available} items")
    chunk_size = chunk_size or default_chunk_size(g.shape[0])
    values = torch.empty((q.shape[0], k), dtype=torch.float32)
    indices = torch.empty((q.shape[0], k), dtype=torch.int64)
    least = torch.empty(q.shape[0], dtype=torch.float32)
    rows = torch.arange(q.shape[0], device=q.device)
    bar = None if desc is None else progress(total=q.shape[0], desc=desc, unit="row")
    try:
        for block_rows, scores in _blocks(q, g, rows, chunk_size, exclude_self):
            v, i = ranked_top_k(scores, k)
            values[block_rows.cpu()], indices[block_rows.cpu()] = v.cpu(), i.cpu()
            if lowest:
                if exclude_self:  # its -inf is no similarity
                    scores[torch.arange(len(block_rows), device=scores.device), block_rows] = float("inf")
                least[block_rows.cpu()] = scores.amin(1).cpu()
            if bar is not None:
                bar.update(len(block_rows))
    finally:
        if bar is not None:
            bar.close()
    if lowest:
        return values.numpy(), indices.numpy(), least.numpy()
    return values.numpy(), indices.numpy()


def pairs_above(query, gallery=None, threshold: float = 0.95, *, chunk_size: int | None = None,
                max_pairs: int | None = None, desc: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows whose cosine similarity is at least ``threshold``, found exactly.

    query: (Nq, D), gallery: (Ng, D) (any float dtype; L2-normalised here); with
    ``gallery=None`` the pairs within ``query``, each once (query row < gallery row), never
    a row with itself. Returns (query rows int64 (P,), gallery rows int64 (P,), similarities
    float32 (P,)), by query row, then gallery row. ``max_pairs``: an :class:`InputError` as
    soon as more are found, before they fill the memory (12 bytes each are kept here).
    ``desc``: a progress bar (rate, ETA) of that name over the query rows.
    """
    within = gallery is None
    q = as_embeddings(query, "query")
    g = q if within else as_embeddings(gallery, "gallery", q.device)
    if q.shape[1] != g.shape[1]:
        raise InputError(f"query rows have {q.shape[1]} dimensions but gallery rows {g.shape[1]}")
    chunk_size = chunk_size or default_chunk_size(g.shape[0])
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    total = 0
    bar = None if desc is None else progress(total=q.shape[0], desc=desc, unit="row")
    try:
        for start in range(0, q.shape[0], chunk_size):
            rows = torch.arange(start, min(start + chunk_size, q.shape[0]), device=q.device)
            # within one set, a block of rows is compared with the rows from its first on: half the products
            first = start if within else 0
            for block_rows, scores in _blocks(q, g[first:], rows, chunk_size, False):
                if within:  # each pair once, from its lower row: the block's own square, from its diagonal down
                    square = torch.ones(len(block_rows), len(block_rows), dtype=torch.bool, device=q.device).tril()
                    scores[:, :len(block_rows)].masked_fill_(square, float("-inf"))
                at, column = torch.nonzero(scores >= threshold, as_tuple=True)
                total += len(at)
                if max_pairs is not None and total > max_pairs:
                    raise InputError(f"more than {max_pairs:,} pairs have a cosine similarity of {threshold:g} or more "
                                     f"(after {int(block_rows[-1]) + 1:,} of {q.shape[0]:,} rows): raise the threshold, "
                                     "or the most pairs allowed if the memory holds them")
                found.append((block_rows[at].cpu().numpy(), (column + first).cpu().numpy(),
                              scores[at, column].cpu().numpy().astype(np.float32)))
            if bar is not None:
                bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate([part[i] for part in found]) for i in range(3))


# --------------------------------------------------------------------------- relevance


class _LabelRelevance:
    """Relevant = same label. Gallery members of each class are kept sorted by label."""

    def __init__(self, query_labels: torch.Tensor, gallery_labels: torch.Tensor, exclude_self: bool):
        self.query_labels = query_labels
        self.gallery_labels = gallery_labels
        self.by_label = torch.argsort(gallery_labels, stable=True)
        sorted_labels = gallery_labels[self.by_label]
        self.classes, class_sizes = torch.unique_consecutive(sorted_labels, return_counts=True)
        self.starts = torch.cumsum(class_sizes, 0) - class_sizes
        position = torch.searchsorted(self.classes, query_labels).clamp(max=len(self.classes) - 1)
        present = self.classes[position] == query_labels
        self.class_of_query = torch.where(present, position, -1)
        self.sizes = torch.where(present, class_sizes[position], 0)
        self.counts = (self.sizes - int(exclude_self)).clamp(min=0)

    def relevant_at(self, rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.gallery_labels[indices] == self.query_labels[rows, None]

    def members(self, rows: torch.Tensor) -> torch.Tensor:
        """(C, max size) gallery indices of each row's class, padded by repeating the first."""
        sizes = self.sizes[rows]
        offsets = torch.arange(int(sizes.max()), device=rows.device)
        offsets = torch.minimum(offsets[None, :], (sizes - 1)[:, None])
        return self.by_label[self.starts[self.class_of_query[rows]][:, None] + offsets]


def _gallery_rows(items, num_gallery: int, name: str) -> np.ndarray:
    """``items`` as sorted distinct int64 gallery rows, each in 0..num_gallery-1."""
    rows = np.unique(np.asarray(items, dtype=np.int64).reshape(-1))
    if len(rows) and (rows[0] < 0 or rows[-1] >= num_gallery):
        raise InputError(f"{name} names gallery index {int(rows[0] if rows[0] < 0 else rows[-1])}, "
                         f"outside 0..{num_gallery - 1}")
    return rows


class _ListRelevance:
    """Relevant = listed for the query; lists are stored as CSR (indptr, sorted indices)."""

    def __init__(self, relevant: Sequence[Sequence[int]], num_gallery: int, device: torch.device):
        lists = []
        for q, items in enumerate(relevant):
            lists.append(_gallery_rows(items, num_gallery, f"relevant[{q}]"))
        sizes = np.array([len(items) for items in lists], dtype=np.int64)
        self.indptr = torch.as_tensor(np.concatenate([[0], np.cumsum(sizes)]), device=device)
        self.items = torch.as_tensor(np.concatenate(lists) if lists else np.zeros(0, np.int64), device=device)
        self.counts = torch.as_tensor(sizes, device=device)
        self.num_gallery = num_gallery

    def _lists(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block row of each listed item, gallery index of each listed item) for ``rows``."""
        sizes = self.counts[rows]
        owner = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), sizes)
        first = torch.repeat_interleave(self.indptr[rows], sizes)
        list_starts = torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
        within = torch.arange(len(owner), device=rows.device) - list_starts
        return owner, self.items[first + within]

    def relevant_at(self, rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros((len(rows), self.num_gallery), dtype=torch.bool, device=rows.device)
        mask[self._lists(rows)] = True
        return mask.gather(1, indices)

    def members(self, rows: torch.Tensor) -> torch.Tensor:
        sizes = self.counts[rows]
        offsets = torch.arange(int(sizes.max()), device=rows.device)
        offsets = torch.minimum(offsets[None, :], (sizes - 1)[:, None])
        return self.items[self.indptr[rows][:, None] + offsets]


def _first_relevant_rank(scores: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """1-based rank of the best relevant item of each row over the whole gallery.

    scores: (C, N) similarities; members: (C, M) relevant gallery indices (repeats allowed,
    the query's own -inf column harmless). Items ranked before the best relevant one are
    those with a higher score, or an equal score and a lower index.
    """
    member_scores = scores.gather(1, members)
    best = member_scores.max(1).values
    sentinel = torch.full_like(members, scores.shape[1])
    best_index = torch.where(member_scores == best[:, None], members, sentinel).min(1).values
    higher = (scores > best[:, None]).sum(1)
    columns = torch.arange(scores.shape[1], device=scores.device)
    tied_before = ((scores == best[:, None]) & (columns[None, :] < best_index[:, None])).sum(1)
    return higher + tied_before + 1


# --------------------------------------------------------------------------- metrics


METRIC_KEYS = ("map@r", "r_precision", "map@100", "mmp@5")


def metric_names(ks: Sequence[int], setups: Sequence[str] | None = None) -> list[str]:
    """The scores (each higher for a better search) that :func:`retrieval_metrics` and
    :func:`retrieval_metrics_from_relevance` report with ``ks``, or, with the names of its
    ``setups``, :func:`revisited_metrics` with ``ks`` as its kappas; counts (``n_queries``...)
    left out."""
    ks = _check_ks(ks)
    if setups:
        return [name for setup in setups for name in (f"map_{setup}", *(f"mp@{k}_{setup}" for k in ks))]
    return [*(f"recall@{k}" for k in ks), *METRIC_KEYS]


def _evaluate(
    q: torch.Tensor,
    g: torch.Tensor,
    relevance,
    ks: tuple[int, ...],
    exclude_self: bool,
    chunk_size: int | None,
    per_query: bool,
    rescore=None,
) -> dict:
    counts = relevance.counts
    num_queries = q.shape[0]
    included = (counts > 0).nonzero().flatten()
    if len(included) == 0:
        raise InputError(
            f"none of the {num_queries} queries has a relevant item in the gallery; check that query and "
            "gallery labels (or relevance lists) refer to the same classes"
        )
    available = g.shape[0] - int(exclude_self)
    chunk_size = chunk_size or default_chunk_size(g.shape[0])
    if chunk_size < 1:
        raise InputError(f"chunk_size must be positive, got {chunk_size}")
    device = q.device
    first_rank = torch.zeros(num_queries, dtype=torch.int64, device=device)
    values = {key: torch.zeros(num_queries, dtype=torch.float64, device=device) for key in METRIC_KEYS}

    def record(block_rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Metrics of rows whose top ``indices.shape[1]`` covers R_q; returns the rows
        (positions in ``block_rows``) without any relevant item in that top."""
        r = counts[block_rows]
        relevant = relevance.relevant_at(block_rows, indices)
        rank = torch.arange(1, indices.shape[1] + 1, device=device)
        gained = torch.cumsum(relevant, 1).double() / rank * relevant
        r_cut = rank[None, :] <= r[:, None]
        values["map@r"][block_rows] = (gained * r_cut).sum(1) / r
        values["r_precision"][block_rows] = (relevant & r_cut).sum(1).double() / r
        values["map@100"][block_rows] = gained[:, :DEEPEST_FIXED_RANK].sum(1) / r.clamp(max=100)
        r5 = r.clamp(max=5)
        values["mmp@5"][block_rows] = (relevant[:, :5] & (rank[None, :5] <= r5[:, None])).sum(1).double() / r5
        found = relevant.any(1)
        first_rank[block_rows[found]] = relevant[found].int().argmax(1) + 1
        return (~found).nonzero().flatten()

    def search_deeper(block_rows: torch.Tensor, scores: torch.Tensor, depth: int) -> None:
        """First relevant rank of rows with none in their top ``depth``: look as deep as
        the largest K, then count what beats the best relevant item for the rest."""
        deepest = min(available, max(ks))
        if deepest > depth:
            _, indices = ranked_top_k(scores, deepest)
            relevant = relevance.relevant_at(block_rows, indices)
            hit = relevant.any(1)
            first_rank[block_rows[hit]] = relevant[hit].int().argmax(1) + 1
            block_rows, scores = block_rows[~hit], scores[~hit]
        if len(block_rows) and deepest < available:
            first_rank[block_rows] = _first_relevant_rank(scores, relevance.members(block_rows))

    # queries sorted by R so that each block needs about the same search depth
    rows = included[torch.argsort(counts[included], stable=True)]
    for block_rows, scores in _blocks(q, g, rows, chunk_size, exclude_self, rescore):
        depth = min(available, max(DEEPEST_FIXED_RANK, int(counts[block_rows].max())))
        _, indices = ranked_top_k(scores, depth)
        deeper = record(block_rows, indices)
        if len(deeper) and depth < available:
            search_deeper(block_rows[deeper], scores[deeper], depth)

    mask = counts > 0
    per = {
        "relevant": counts.cpu().numpy(),
        "first_relevant_rank": first_rank.cpu().numpy(),
        **{key: torch.where(mask, values[key], float("nan")).cpu().numpy() for key in METRIC_KEYS},
    }
    result = summarize(per, ks)
    if per_query:
        result["per_query"] = per
    return result


def summarize(per_query: dict, ks: Sequence[int], rows=None) -> dict:
    """The metrics of the queries ``rows`` (default: all) from ``per_query`` arrays.

    ``per_query`` is what ``retrieval_metrics(..., per_query=True)`` returns under
    ``"per_query"``; this scores subsets of the queries (GLDv2 Public/Private, domains)
    without searching again. Excluded queries (R_q = 0) are left out and counted.
    """
    relevant = np.asarray(per_query["relevant"])
    rows = np.arange(len(relevant)) if rows is None else np.asarray(rows)
    scored = rows[relevant[rows] > 0]
    if len(scored) == 0:
        raise InputError(f"none of the {len(rows)} queries has a relevant item in the gallery")
    first = np.asarray(per_query["first_relevant_rank"])[scored]
    result: dict = {f"recall@{k}": float(np.mean(first <= k)) for k in _check_ks(ks)}
    for key in METRIC_KEYS:
        result[key] = float(np.mean(np.asarray(per_query[key])[scored]))
    result["n_queries"] = int(len(scored))
    result["n_excluded"] = int(len(rows) - len(scored))
    return result


def retrieval_metrics(
    query,
    query_labels,
    gallery=None,
    gallery_labels=None,
    ks: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int | None = None,
    *,
    per_query: bool = False,
    rescore=None,
) -> dict:
    """Recall@K, MAP@R, R-Precision, mAP@100 and mMP@5 of a labelled retrieval protocol.

    Args:
        query: (Nq, D) embeddings (numpy or torch, any float dtype; L2-normalised here, so
            similarities are cosines). Torch tensors are searched on their device.
        query_labels: (Nq,) class of each query (integers, or any values np.unique sorts).
        gallery, gallery_labels: (Ng, D) and (Ng,); ``None`` for leave-one-out, where the
            gallery is the query set and each query's own row is removed by index.
        ks: the K of ``recall@K``.
        chunk_size: query rows searched at once (memory: chunk_size x Ng float32);
            default: about 256 MiB of similarities.
        per_query: also return ``"per_query"``: numpy arrays ``relevant`` (R_q),
            ``first_relevant_rank`` (0 for excluded queries) and each metric (NaN when
            excluded), in query order.
        rescore: a re-ranking of the search (``rescore(query rows, similarities)``, as
            :class:`~unicom.evaluate.kreciprocal.KReciprocalScores`), whose scores rank instead.

    Returns:
        ``{"recall@K": float, ..., "map@r", "r_precision", "map@100", "mmp@5",
        "n_queries": int (queries scored), "n_excluded": int (queries without any
        relevant gallery item)}``.
    """
    exclude_self = gallery is None
    if exclude_self != (gallery_labels is None):
        raise InputError("give gallery and gallery_labels together, or neither (leave-one-out)")
    ks = _check_ks(ks)
    q = as_embeddings(query, "query")
    g = q if exclude_self else as_embeddings(gallery, "gallery", q.device)
    if q.shape[1] != g.shape[1]:
        raise InputError(f"query rows have {q.shape[1]} dimensions but gallery rows {g.shape[1]}")
    labels = _label_ids(query_labels, gallery_labels, q.shape[0], None if exclude_self else g.shape[0])
    ql = torch.as_tensor(labels[0], device=q.device)
    gl = ql if exclude_self else torch.as_tensor(labels[1], device=q.device)
    relevance = _LabelRelevance(ql, gl, exclude_self)
    return _evaluate(q, g, relevance, ks, exclude_self, chunk_size, per_query, rescore)


def retrieval_metrics_from_relevance(
    query,
    gallery,
    relevant: Sequence[Sequence[int]],
    ks: Sequence[int] = (1, 5, 10, 100),
    chunk_size: int | None = None,
    *,
    per_query: bool = False,
    rescore=None,
) -> dict:
    """The metrics of :func:`retrieval_metrics` with explicit relevance lists.

    ``relevant[q]`` lists the gallery row indices relevant to query q (GLDv2's solution
    file, duplicate-aware benchmarks); R_q is its number of distinct entries. Queries with
    an empty list are excluded and counted in ``n_excluded``; ``rescore`` as there.
    """
    ks = _check_ks(ks)
    q = as_embeddings(query, "query")
    g = as_embeddings(gallery, "gallery", q.device)
    if q.shape[1] != g.shape[1]:
        raise InputError(f"query rows have {q.shape[1]} dimensions but gallery rows {g.shape[1]}")
    if len(relevant) != q.shape[0]:
        raise InputError(
            f"relevant has {len(relevant)} lists but there are {q.shape[0]} queries; give one list per query"
        )
    relevance = _ListRelevance(relevant, g.shape[0], q.device)
    return _evaluate(q, g, relevance, ks, False, chunk_size, per_query, rescore)


# --------------------------------------------------------------------------- Revisited Oxford/Paris


def _revisited_average_precision(ranks: np.ndarray, positives: int) -> float:
    """AP of sorted 0-based ``ranks`` of the positives (ignored items already removed): each
    positive adds the mean of the precision just before it and at it, times the recall step
    1/``positives`` (the trapezoidal rule of the Revisited benchmark; the precision before
    rank 0 is 1)."""
    found = np.arange(len(ranks))
    before = np.where(ranks == 0, 1.0, found / np.maximum(ranks, 1))
    at = (found + 1) / (ranks + 1)
    return float(((before + at) / 2).sum() / positives)


def _revisited_precisions(ranks: np.ndarray, kappas: tuple[int, ...]) -> np.ndarray:
    """mP@k terms of one query: precision at min(k, rank of its last positive), with 1-based
    ranks after the ignored items are removed."""
    cuts = np.minimum(np.asarray(kappas), ranks[-1] + 1)
    return np.asarray([(ranks < cut).sum() / cut for cut in cuts], dtype=np.float64)


def revisited_metrics(
    query,
    gallery,
    setups: dict[str, tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]]],
    kappas: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
    rescore=None,
    per_query: bool = False,
) -> dict:
    """mAP and mP@k of the Revisited Oxford/Paris protocol (Radenović et al. 2018), per setup.

    Args:
        query, gallery: (Nq, D) and (Ng, D) embeddings, ranked by cosine similarity (ties by
            lower gallery index, as everywhere here).
        setups: name -> (positives, ignored): per query, the gallery rows that are positive,
            and the rows removed from its ranking before it is scored (a row in both counts
            as positive).
        kappas: the k of mP@k.
        rescore: a re-ranking of the search, as in :func:`retrieval_metrics`.

    Per query, with the ignored rows removed from the ranking and r_1 < r_2 < ... the
    0-based ranks of its P positives: AP = (1/P) sum_j ((j-1)/r_j + j/(r_j + 1)) / 2 (the
    first term 1 when r_j = 0), and P@k = |{j: r_j < k_q}| / k_q with k_q = min(k, r_P + 1).
    A query without positives in a setup is left out of that setup's means.

    Returns ``{"map_<setup>": float, "mp@<k>_<setup>": float, "n_queries_<setup>": int (queries
    scored), "n_excluded_<setup>": int}`` for each setup; with ``per_query``, also
    ``"per_query"``: float64 arrays (Nq,) ``ap_<setup>`` and ``p@<k>_<setup>``, NaN for a query
    without positives in the setup.
    """
    kappas = _check_ks(kappas)
    q = as_embeddings(query, "query")
    g = as_embeddings(gallery, "gallery", q.device)
    if q.shape[1] != g.shape[1]:
        raise InputError(f"query rows have {q.shape[1]} dimensions but gallery rows {g.shape[1]}")
    lists = {}
    for name, (positives, ignored) in setups.items():
        if len(positives) != q.shape[0] or len(ignored) != q.shape[0]:
            raise InputError(f"setup {name!r}: {len(positives)} positive and {len(ignored)} ignored lists for "
                             f"{q.shape[0]} queries; give one of each per query")
        lists[name] = tuple([_gallery_rows(items, g.shape[0], f"setup {name!r}: {what}[{row}]")
                             for row, items in enumerate(given)]
                            for what, given in (("positives", positives), ("ignored", ignored)))
    ap = {name: np.full(q.shape[0], np.nan) for name in setups}
    precision = {name: np.full((q.shape[0], len(kappas)), np.nan) for name in setups}
    # a block holds the similarities, the ranking and its inverse: 4 + 8 + 8 bytes per item
    chunk_size = chunk_size or max(1, default_chunk_size(g.shape[0]) // 5)
    rows = torch.arange(q.shape[0], device=q.device)
    for block_rows, scores in _blocks(q, g, rows, chunk_size, False, rescore):
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        position = torch.empty_like(order)
        position.scatter_(1, order, torch.arange(g.shape[0], device=order.device).expand_as(order))
        position = position.cpu().numpy()
        for at, row in enumerate(block_rows.tolist()):
            for name, (positives, ignored) in lists.items():
                if len(positives[row]) == 0:
                    continue
                ranks = np.sort(position[at, positives[row]])
                skipped = np.sort(position[at, np.setdiff1d(ignored[row], positives[row])])
                ranks = ranks - np.searchsorted(skipped, ranks)
                ap[name][row] = _revisited_average_precision(ranks, len(ranks))
                precision[name][row] = _revisited_precisions(ranks, kappas)
    result: dict = {}
    for name in setups:
        scored = ~np.isnan(ap[name])
        if not scored.any():
            raise InputError(f"setup {name!r}: none of the {q.shape[0]} queries has a positive")
        result[f"map_{name}"] = float(ap[name][scored].mean())
        for column, k in enumerate(kappas):
            result[f"mp@{k}_{name}"] = float(precision[name][scored, column].mean())
        result[f"n_queries_{name}"] = int(scored.sum())
        result[f"n_excluded_{name}"] = int((~scored).sum())
    if per_query:
        result["per_query"] = {}
        for name in setups:
            result["per_query"][f"ap_{name}"] = ap[name]
            result["per_query"].update({f"p@{k}_{name}": precision[name][:, column] for column, k in enumerate(kappas)})
    return result
