"""The memory planner: which faiss index to build for N vectors of d dimensions.

Index types (their structure in faiss' factory notation; the metric is the inner product):

* ``flat``  exact search, ``Flat``: 4·d bytes per vector.
* ``hnsw``  a graph, ``HNSW{M}``: the vectors plus about 4·(2M+1) bytes of links and an
  8-byte id per vector; the fastest at high recall, but larger than ``flat``.
* ``ivfpq`` inverted lists of product-quantised residuals, ``PR{d'},IVF{nlist},PQ{m}x{nbits}``:
  m·nbits/8 bytes of code plus an 8-byte id per vector. ``PR{d'}`` (a principal rotation,
  :func:`unicom.search.index.principal_rotation`) projects the vectors on their d' = s·m
  principal axes (s ≥ 2 dimensions per sub-quantizer) and rotates them randomly, spreading
  the variance over the sub-quantizers.

:func:`plan` lists the candidates for a memory budget: with ``auto``, the exact index for
small collections, else those that fit the budget in the order hnsw, ivfpq (the largest
code that fits), flat. Each is then built and :func:`tune` raises its search parameter
until recall@k on a held-out sample reaches the target; the first that reaches it is kept.

recall@k is measured against exact search on a held-out sample: rows of the collection that
train no quantizer and join the index only after the measurement, so that they are searched
as new queries are. For each held-out row q it is the fraction of q's k exact nearest
neighbours among the other (not held-out) rows that the index returns among its k.

Nothing here imports faiss: the memory formulas, candidates and the tuning loop are plain
arithmetic over a search function the index passes in.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from unicom.errors import InputError

logger = logging.getLogger(__name__)

TYPES = ("auto", "flat", "hnsw", "ivfpq")
ID_BYTES = 8  # faiss keeps one int64 id per vector in inverted lists
MIN_IVFPQ_ROWS = 39 * 16  # 39 training rows for each of 16 centroids: the smallest IVF-PQ worth training
NPROBE_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
EF_SEARCH_STEPS = (16, 32, 64, 128, 256, 512, 1024, 2048)


# --------------------------------------------------------------------------- sizes and recall


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """Bytes from ``"512MB"``, ``"2GiB"``, ``"1.5G"`` or a number (decimal units: 1 MB = 10^6 bytes; MiB = 2^20)."""
    if isinstance(text, (int, float)):
        return int(text)
    match = _SIZE.match(text)
    if match is None:
        raise InputError(f"memory size {text!r} not understood: write e.g. 512MB, 2GiB or 1500000000")
    value, prefix, suffix = match.groups()
    power = "kmgt".index(prefix.lower()) + 1 if prefix else 0
    base = 1024 if suffix.lower().startswith("i") else 1000
    return int(float(value) * base**power)


def format_size(num_bytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units up to GiB."""
    if abs(num_bytes) < 1024:
        return f"{num_bytes:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        num_bytes /= 1024
        if abs(num_bytes) < 1024 or unit == "GiB":
            break
    return f"{num_bytes:.1f} {unit}"


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of |found ∩ truth| / |truth|; ``found``, ``truth``: int (Q, k), -1 = none."""
    if len(truth) == 0:
        return float("nan")
    total = 0.0
    for got, want in zip(found, truth):
        want = want[want >= 0]
        if len(want):
            total += len(np.intersect1d(got[got >= 0], want)) / len(want)
        else:
            total += 1.0
    return total / len(truth)


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """An index type with its build parameters and its estimated memory in bytes."""

    type: str
    params: dict
    memory: int

    def structure(self) -> str:
        """The index in faiss' factory notation (``PR`` is :func:`principal_rotation`)."""
        p = self.params
        if self.type == "flat":
            return "Flat"
        if self.type == "hnsw":
            return f"HNSW{p['M']}"
        return f"PR{p['rotated_dims']},IVF{p['nlist']},PQ{p['m']}x{p['nbits']}"

    def describe(self) -> str:
        shown = ", ".join(f"{key}={value}" for key, value in self.params.items())
        return f"{self.type}({shown})" if shown else self.type


def flat_memory(n: int, d: int) -> int:
    return 4 * n * d


def hnsw_memory(n: int, d: int, M: int) -> int:
    # vectors + links (2M at level 0, about 1 more on the levels above) as int32
    # + per-vector offset (int64), level (int32) and id (int64)
    return n * (4 * d + 4 * (2 * M + 1) + 12 + ID_BYTES)


def ivfpq_memory(n: int, d: int, nlist: int, m: int, nbits: int, rotated_dims: int) -> int:
    codes = n * (math.ceil(m * nbits / 8) + ID_BYTES)
    centroids = 4 * rotated_dims * (nlist + 2**nbits)
    rotation = 4 * d * rotated_dims
    return codes + centroids + rotation + 48 * nlist  # two std::vectors per inverted list


def default_nlist(n: int) -> int:
    """A power of two near 4·sqrt(n), with at least 39 training rows per list."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return nlist


def default_nbits(n: int) -> int:
    """8 bits per sub-quantizer when there are 39 training rows per centroid, fewer otherwise."""
    return int(min(8, max(4, math.floor(math.log2(max(n, 1) / 39)))))


def ivfpq_candidate(n: int, d: int, budget: int | None, *, nlist: int | None = None, m: int | None = None,
                    nbits: int | None = None, trainable: int | None = None) -> Candidate | None:
    """IVF-PQ with the largest code that fits ``budget``, or with ``m`` sub-quantizers.

    Each sub-quantizer codes s = floor(d/m) ≥ 2 dimensions of the rotated vector (d' = s·m
    dimensions, at most d). With neither ``budget`` nor ``m``, m = d/4 (a code 16 times
    smaller than the float32 vector). ``trainable``: rows available for training (default n),
    which bound ``nlist`` and ``nbits``. None when no code fits.
    """
    trainable = n if trainable is None else trainable
    nlist = nlist or default_nlist(trainable)
    nbits = nbits or default_nbits(trainable)
    if m is None:
        if budget is None:
            m = max(1, d // 4)
        else:
            fixed = ivfpq_memory(0, d, nlist, 0, nbits, d)
            per_vector = (budget - fixed) // max(n, 1) - ID_BYTES
            m = min(d // 2, int(per_vector * 8 // nbits))
            m = m // 4 * 4 if m >= 8 else m  # multiples of 4 keep the rotated dimension tidy
            if m < 1:
                return None
    if not 1 <= m <= d // 2:
        raise InputError(f"--pq-m {m}: use 1 to {d // 2} sub-quantizers for {d} dimensions (at least 2 dimensions each)")
    params = {"nlist": nlist, "m": m, "nbits": nbits, "rotated_dims": d // m * m}
    memory = ivfpq_memory(n, d, nlist, m, nbits, params["rotated_dims"])
    if budget is not None and memory > budget:
        return None
    return Candidate("ivfpq", params, memory)


def plan(n: int, d: int, *, index_type: str = "auto", memory_budget: int | None = None, exact_max_rows: int = 100_000,
         nlist: int | None = None, pq_m: int | None = None, nbits: int | None = None, hnsw_m: int = 32,
         trainable: int | None = None) -> list[Candidate]:
    """The index types to try, in order (see the module docstring); ``trainable``: rows not held out."""
    if index_type not in TYPES:
        raise InputError(f"index type {index_type!r} unknown: use one of {', '.join(TYPES)}")
    flat = Candidate("flat", {}, flat_memory(n, d))
    hnsw = Candidate("hnsw", {"M": hnsw_m, "efConstruction": 40}, hnsw_memory(n, d, hnsw_m))
    if index_type == "flat":
        return [flat]
    if index_type == "hnsw":
        return [hnsw]
    ivfpq = ivfpq_candidate(n, d, None if pq_m else memory_budget, nlist=nlist, m=pq_m, nbits=nbits, trainable=trainable)
    if index_type == "ivfpq":
        if ivfpq is None:
            raise InputError(
                f"no IVF-PQ code fits {format_size(memory_budget)} for {n} vectors: raise --memory "
                f"(about {format_size(n * (ID_BYTES + 8))} gives 8-byte codes)"
            )
        if n < max(MIN_IVFPQ_ROWS, 39 * ivfpq.params["nlist"]):
            raise InputError(f"{n} vectors are too few to train IVF-PQ (at least {max(MIN_IVFPQ_ROWS, 39 * ivfpq.params['nlist'])}); "
                             "use --type flat")
        return [ivfpq]

    def fits(candidate: Candidate | None) -> bool:
        return candidate is not None and (memory_budget is None or candidate.memory <= memory_budget)

    if n <= exact_max_rows and fits(flat):
        return [flat]
    chosen = [c for c in (hnsw, ivfpq if n >= MIN_IVFPQ_ROWS else None, flat) if fits(c)]
    if not chosen:
        raise InputError(
            f"no index type fits {format_size(memory_budget)} for {n} vectors of {d} dimensions "
            f"(exact: {format_size(flat.memory)}); raise --memory or index fewer --dims"
        )
    return chosen


def train_rows(candidate: Candidate) -> int:
    """Rows sampled to train ``candidate``'s quantizers (0: nothing to train)."""
    if candidate.type != "ivfpq":
        return 0
    return max(50 * candidate.params["nlist"], 64 * 2 ** candidate.params["nbits"])


def search_steps(candidate: Candidate, k: int) -> list[dict]:
    """The search parameters :func:`tune` tries, in order (``{}`` for the exact index)."""
    if candidate.type == "ivfpq":
        return [{"nprobe": p} for p in NPROBE_STEPS if p <= candidate.params["nlist"]]
    if candidate.type == "hnsw":
        return [{"efSearch": e} for e in EF_SEARCH_STEPS if e >= k]
    return [{}]


def tune(search: Callable[[dict], np.ndarray], candidate: Candidate, truth: np.ndarray, k: int,
         target: float) -> tuple[dict, float, list[dict]]:
    """The smallest search parameter whose recall@k on the held-out queries reaches ``target``.

    ``search(parameter)`` returns the ids int (Q, k) that the index (holding every row but
    the held-out ones) finds for the held-out queries with that parameter; ``truth`` (Q, k)
    are their exact neighbours among those rows. Returns (search parameter, its recall,
    every step measured: parameter, recall, queries/s); without a step reaching the target,
    the best step.
    """
    if candidate.type == "flat":
        return {}, 1.0, []
    steps = []
    for parameter in search_steps(candidate, k):
        start = time.perf_counter()
        ids = search(parameter)
        seconds = time.perf_counter() - start
        recall = recall_at_k(ids, truth)
        steps.append({**parameter, "recall": round(recall, 4), "queries_per_s": round(len(truth) / max(seconds, 1e-9), 1)})
        logger.info("%s %s: recall@%d %.4f", candidate.describe(), parameter, k, recall)
        if recall >= target:
            return parameter, recall, steps
    best = max(steps, key=lambda step: step["recall"])
    return {key: best[key] for key in ("nprobe", "efSearch") if key in best}, best["recall"], steps


# --------------------------------------------------------------------------- the held-out sample


def choose_heldout(rng: np.random.Generator, first_id: int, rows: int, count: int) -> np.ndarray:
    """``count`` ids drawn without replacement from ``first_id .. first_id + rows``, sorted int64."""
    return np.sort(rng.choice(rows, size=min(count, rows), replace=False).astype(np.int64) + first_id)


def heldout_size(n: int, heldout: int) -> int:
    """Rows of ``n`` to hold out when ``heldout`` are asked for."""
    # at most a tenth of a small collection, so the quantizers still see most of it
    return int(min(heldout, max(1, n // 10))) if n > 1 else 0

