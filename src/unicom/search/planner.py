"""The memory planner: which faiss index to build for N vectors of d dimensions.

Index types (their structure in faiss' factory notation; the metric is the inner product):

* ``flat``  exact search, ``Flat``: 4·d bytes per vector.
* ``hnsw``  a graph, ``HNSW{M}``: the vectors plus about 4·(2M+1) bytes of links and an
  8-byte id per vector; the fastest at high recall, but larger than ``flat``.
* ``ivfsq`` inverted lists of scalar-quantised residuals, ``PR{d'},IVF{nlist},SQ{bits}``:
  d'·bits/8 bytes of code (8 bits, or 16 for ``SQfp16``) plus an 8-byte id per vector.
* ``ivfpq`` inverted lists of product-quantised residuals, ``PR{d'},IVF{nlist},PQ{m}x{nbits}``:
  m·nbits/8 bytes of code plus an 8-byte id per vector (s = d'/m ≥ 2 dimensions per
  sub-quantizer).

``PR{d'}`` (a principal rotation, :func:`unicom.search.index.principal_rotation`) projects
the vectors on their d' principal axes and rotates them randomly, spreading the variance
over the code's dimensions. For a code of b bytes per vector (:func:`compressed_candidate`),
``ivfsq`` keeps d' ≈ b principal axes (a multiple of 8) at 8 bits each when b ≥ d/4
(:data:`SQ_MIN_FRACTION`), ``SQfp16`` of all d axes when b ≥ 2·d; below d/4 bytes,
``ivfpq`` codes more axes more coarsely. (Measured on a clustered 500k × 256 collection, recall@10 at nprobe 256 of 2048
lists and equal bytes: SQ8 of 112 axes 0.958 against PQ112 0.922; at 64 bytes 0.835 against
0.795; at 48 bytes PQ48 0.776 against SQ8 of 48 axes 0.725.)

:func:`plan` lists the candidates, with one of three objectives:

* ``speed`` (no budget, no target): the exact index for small collections, else
  ``hnsw``, tuned to recall :data:`DEFAULT_RECALL`;
* ``recall`` (a memory budget, no target): spend the budget on recall: the exact index for
  small collections, else the first that fits of ``hnsw``, the largest compressed code,
  ``flat``; its search parameter is raised while a doubling still adds
  :data:`KNEE_GAIN` of recall;
* ``size`` (a recall target): the smallest index (within the budget, if any) that reaches
  the target: compressed codes of growing size (:func:`code_ladder`), then ``flat``.

Each candidate is built and :func:`tune` raises its search parameter on a held-out sample
(see below); with a target, the first candidate that reaches it is kept.

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

TYPES = ("auto", "flat", "hnsw", "ivfsq", "ivfpq")
ID_BYTES = 8  # faiss keeps one int64 id per vector in inverted lists
MIN_IVF_ROWS = 39 * 16  # 39 training rows for each of 16 centroids: the smallest inverted-list index worth training
NPROBE_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
EF_SEARCH_STEPS = (16, 32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_RECALL = 0.9  # the recall the ``speed`` objective tunes to
KNEE_GAIN = 0.01  # the ``recall`` objective doubles the search parameter while that adds this much recall@k
SCAN_DIVISOR = 8  # --type auto: an IVF index searches at most 1/8 of its lists (else it is hardly faster than exact)
SQ_MIN_FRACTION = 0.25  # codes of at least d/4 bytes are 8-bit scalar codes of the leading axes, smaller ones PQ
SQ_AXES_STEP = 8  # faiss computes scalar-code distances with SIMD only for multiples of 8 axes (16x faster)
# the build options' ranges: (least, what it is, most or None, what it is and why)
BUILD_RANGES = {
    # the most inverted lists is set by the training rows (39 per list), checked with them
    "--nlist": (1, "1 inverted list", None, None),
    "--nbits": (1, "1 bit per code", 24, "24 bits per code (faiss refuses more: 2^24 centroids per sub-quantizer)"),
    "--hnsw-m": (2, "2 links per vector and layer",  # faiss crashes below 2
                 100, "100 links per vector and layer (faiss' guide uses 4 to 64, hnswlib's 2 to 100: each link costs "
                      "8 bytes per vector, and more add little recall)"),
}
LADDER = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2)  # code bytes per vector, as fractions of d, that ``size`` tries


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
        if self.type == "ivfsq":
            return f"PR{p['rotated_dims']},IVF{p['nlist']},SQ{'fp16' if p['bits'] == 16 else p['bits']}"
        return f"PR{p['rotated_dims']},IVF{p['nlist']},PQ{p['m']}x{p['nbits']}"

    def describe(self) -> str:
        shown = ", ".join(f"{key}={value}" for key, value in self.params.items())
        return f"{self.type}({shown})" if shown else self.type

    @property
    def code_bytes(self) -> float:
        """Bytes of code per vector (the ids and centroids aside)."""
        p = self.params
        if self.type == "ivfsq":
            return p["rotated_dims"] * p["bits"] / 8
        if self.type == "ivfpq":
            return p["m"] * p["nbits"] / 8
        return 0.0


def objective(memory_budget: int | None, recall_target: float | None) -> str:
    """``size`` with a recall target, ``recall`` with a budget alone, else ``speed`` (module docstring)."""
    if recall_target is not None:
        return "size"
    return "recall" if memory_budget is not None else "speed"


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


def ivfsq_memory(n: int, d: int, nlist: int, rotated_dims: int, bits: int) -> int:
    codes = n * (math.ceil(rotated_dims * bits / 8) + ID_BYTES)
    centroids = 4 * rotated_dims * (nlist + 2)  # the coarse centroids and the per-dimension ranges
    rotation = 4 * d * rotated_dims
    return codes + centroids + rotation + 48 * nlist


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
    # refused only above the default, which is at least 4 bits however few the rows (faiss then only warns)
    if nbits is not None and nbits > default_nbits(trainable) and 39 * 2**nbits > trainable:
        raise InputError(f"--nbits {nbits}: the {2**nbits:,} centroids of each sub-quantizer need {39 * 2**nbits:,} training "
                         f"rows (39 each), there are {trainable:,}; use --nbits {default_nbits(trainable)} or leave it out")
    nbits = nbits or default_nbits(trainable)
    if m is None:
        if budget is None:
            m = max(1, d // 4)
        else:
            per_vector = (budget - ivfpq_memory(0, d, nlist, 0, nbits, d)) // max(n, 1) - ID_BYTES
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


def ivfsq_candidate(n: int, d: int, budget: int | None, *, nlist: int | None = None, rotated_dims: int | None = None,
                    bits: int | None = None, trainable: int | None = None) -> Candidate | None:
    """IVF-SQ with the largest code that fits ``budget``, or of ``rotated_dims`` axes at ``bits`` bits.

    The largest code: 16-bit floats of all d axes when they fit, else 8 bits for each of the
    d' ≤ d leading axes that fit (a multiple of :data:`SQ_AXES_STEP`). With neither, 8 bits
    of all d axes. None when fewer than 8 axes fit.
    """
    trainable = n if trainable is None else trainable
    nlist = nlist or default_nlist(trainable)
    if rotated_dims is None and budget is not None:
        if bits in (None, 16) and ivfsq_memory(n, d, nlist, d, 16) <= budget:
            rotated_dims, bits = d, 16
        else:
            bits = 8 if bits is None else bits
            most = max(0, budget // max(n, 1) - ID_BYTES) * 8 // bits  # ignores the fixed costs
            rotated_dims = d if most >= d else most // SQ_AXES_STEP * SQ_AXES_STEP
            while rotated_dims >= SQ_AXES_STEP and ivfsq_memory(n, d, nlist, rotated_dims, bits) > budget:
                rotated_dims = (rotated_dims - 1) // SQ_AXES_STEP * SQ_AXES_STEP
            if rotated_dims < SQ_AXES_STEP:
                return None
    rotated_dims = d if rotated_dims is None else rotated_dims
    bits = bits or 8
    if bits not in (8, 16) or not 1 <= rotated_dims <= d:
        raise InputError(f"IVF-SQ of {rotated_dims} axes at {bits} bits: use 8 or 16 bits and 1 to {d} axes")
    params = {"nlist": nlist, "rotated_dims": rotated_dims, "bits": bits}
    memory = ivfsq_memory(n, d, nlist, rotated_dims, bits)
    if budget is not None and memory > budget:
        return None
    return Candidate("ivfsq", params, memory)


def compressed_candidate(n: int, d: int, code_bytes: int, *, nlist: int | None = None, nbits: int | None = None,
                         trainable: int | None = None) -> Candidate | None:
    """The compressed index for a code of ``code_bytes`` bytes per vector (module docstring):
    ``SQfp16`` of all axes from 2·d bytes, ``SQ8`` of the leading axes from d/4 bytes, else PQ."""
    trainable = n if trainable is None else trainable
    if code_bytes >= 2 * d:
        return ivfsq_candidate(n, d, None, nlist=nlist, rotated_dims=d, bits=16, trainable=trainable)
    if code_bytes >= SQ_MIN_FRACTION * d and (code_bytes >= d or code_bytes >= SQ_AXES_STEP):
        axes = d if code_bytes >= d else code_bytes // SQ_AXES_STEP * SQ_AXES_STEP
        return ivfsq_candidate(n, d, None, nlist=nlist, rotated_dims=axes, bits=8, trainable=trainable)
    nbits = nbits or default_nbits(trainable)
    m = min(d // 2, code_bytes * 8 // nbits)
    if m < 1:
        return None
    return ivfpq_candidate(n, d, None, nlist=nlist, m=m, nbits=nbits, trainable=trainable)


def largest_compressed(n: int, d: int, budget: int | None, *, nlist: int | None = None, nbits: int | None = None,
                       trainable: int | None = None) -> Candidate | None:
    """The compressed index with the largest code that fits ``budget`` (no budget: d bytes, SQ8)."""
    if budget is None:
        return compressed_candidate(n, d, d, nlist=nlist, nbits=nbits, trainable=trainable)
    nlist = nlist or default_nlist(n if trainable is None else trainable)
    code_bytes = min(2 * d, budget // max(n, 1) - ID_BYTES)  # an upper bound: the fixed costs aside
    while code_bytes >= 1:
        candidate = compressed_candidate(n, d, code_bytes, nlist=nlist, nbits=nbits, trainable=trainable)
        if candidate is not None and candidate.memory <= budget:
            return candidate
        code_bytes -= 1
    return None


def code_ladder(n: int, d: int, budget: int | None, *, nlist: int | None = None, nbits: int | None = None,
                trainable: int | None = None) -> list[Candidate]:
    """Compressed candidates of growing memory, codes of :data:`LADDER` · d bytes, up to the
    largest code that fits ``budget``."""
    ladder: dict[str, Candidate] = {}
    for fraction in LADDER:
        candidate = compressed_candidate(n, d, max(1, int(fraction * d)), nlist=nlist, nbits=nbits, trainable=trainable)
        if candidate is not None and (budget is None or candidate.memory <= budget):
            ladder.setdefault(candidate.structure(), candidate)
    largest = largest_compressed(n, d, budget, nlist=nlist, nbits=nbits, trainable=trainable) if budget else None
    if largest is not None:
        ladder.setdefault(largest.structure(), largest)
    return sorted(ladder.values(), key=lambda candidate: candidate.memory)


def plan(n: int, d: int, *, index_type: str = "auto", memory_budget: int | None = None, recall_target: float | None = None,
         exact_max_rows: int = 100_000, nlist: int | None = None, pq_m: int | None = None, nbits: int | None = None,
         hnsw_m: int = 32, trainable: int | None = None) -> list[Candidate]:
    """The index types to try, in order (see the module docstring); ``trainable``: rows not held out."""
    if index_type not in TYPES:
        raise InputError(f"index type {index_type!r} unknown: use one of {', '.join(TYPES)}")
    flat = Candidate("flat", {}, flat_memory(n, d))
    hnsw = Candidate("hnsw", {"M": hnsw_m, "efConstruction": 40}, hnsw_memory(n, d, hnsw_m))
    if index_type in ("flat", "hnsw"):
        return [_within(flat if index_type == "flat" else hnsw, memory_budget, n)]
    trainable = n if trainable is None else trainable
    if index_type in ("ivfpq", "ivfsq"):
        _check_nlist(nlist, n)
        if index_type == "ivfpq":
            chosen = ivfpq_candidate(n, d, None if pq_m else memory_budget, nlist=nlist, m=pq_m, nbits=nbits,
                                     trainable=trainable)
        else:
            chosen = ivfsq_candidate(n, d, memory_budget, nlist=nlist, trainable=trainable)
        if chosen is None:
            raise InputError(
                f"no {index_type} code fits {format_size(memory_budget)} for {n} vectors: raise --memory "
                f"(about {format_size(n * (ID_BYTES + 8))} gives 8-byte codes)"
            )
        _check_trainable(chosen, n)
        return [_within(chosen, memory_budget, n)]

    def fits(candidate: Candidate | None) -> bool:
        return candidate is not None and (memory_budget is None or candidate.memory <= memory_budget)

    if n <= exact_max_rows and fits(flat):
        return [flat]
    goal = objective(memory_budget, recall_target)
    compressed: list[Candidate] = []
    if n >= MIN_IVF_ROWS:
        _check_nlist(nlist, n)
        if pq_m:
            compressed = [c for c in [ivfpq_candidate(n, d, None, nlist=nlist, m=pq_m, nbits=nbits, trainable=trainable)] if fits(c)]
        elif goal == "size":
            compressed = code_ladder(n, d, memory_budget, nlist=nlist, nbits=nbits, trainable=trainable)
        else:
            compressed = [c for c in [largest_compressed(n, d, memory_budget, nlist=nlist, nbits=nbits, trainable=trainable)] if c]
    if goal == "size":
        chosen = compressed + [c for c in (flat,) if fits(c)]
    else:
        chosen = [c for c in (hnsw, *compressed, flat) if fits(c)]
    if not chosen:
        raise InputError(
            f"no index type fits {format_size(memory_budget)} for {n} vectors of {d} dimensions "
            f"(exact: {format_size(flat.memory)}); raise --memory or index fewer --dims"
        )
    return chosen


def _within(candidate: Candidate, memory_budget: int | None, n: int) -> Candidate:
    """``candidate``, the type asked for, unless it takes more than the memory budget."""
    if memory_budget is not None and candidate.memory > memory_budget:
        raise InputError(f"{candidate.structure()} takes about {format_size(candidate.memory)} for {n} vectors, more than "
                         f"the budget of {format_size(memory_budget)} (--memory); raise it, or leave --type (and --pq-m) to choose one that fits")
    return candidate


def _check_nlist(nlist: int | None, n: int) -> None:
    """Refuse an ``--nlist`` with fewer than 39 rows to train each list, where fewer lists would
    do (below MIN_IVF_ROWS no inverted-list index is built: :func:`_check_trainable`)."""
    if nlist is not None and 39 * nlist > n >= MIN_IVF_ROWS:
        raise InputError(f"--nlist {nlist}: {n:,} vectors train at most {n // 39:,} inverted lists (39 rows each); "
                         "give a smaller --nlist or leave it out")


def _check_trainable(candidate: Candidate, n: int) -> None:
    needed = max(MIN_IVF_ROWS, 39 * candidate.params["nlist"])
    if n < needed:
        raise InputError(f"{n} vectors are too few to train {candidate.type} (at least {needed}); use --type flat")


def train_rows(candidate: Candidate) -> int:
    """Rows sampled to train ``candidate``'s quantizers (0: nothing to train)."""
    if candidate.type == "ivfpq":
        return max(50 * candidate.params["nlist"], 64 * 2 ** candidate.params["nbits"])
    if candidate.type == "ivfsq":
        return max(50 * candidate.params["nlist"], 16_384)
    return 0


def search_steps(candidate: Candidate, k: int, capped: bool = False) -> list[dict]:
    """The search parameters :func:`tune` tries, in order (``{}`` for the exact index).

    capped: an IVF index probes at most 1/:data:`SCAN_DIVISOR` of its lists (at least 8).
    """
    if candidate.type in ("ivfpq", "ivfsq"):
        nlist = candidate.params["nlist"]
        most = min(nlist, max(8, nlist // SCAN_DIVISOR)) if capped else nlist
        return [{"nprobe": p} for p in NPROBE_STEPS if p <= most]
    if candidate.type == "hnsw":  # the graph walk needs at least k candidates to find k results
        return [{"efSearch": e} for e in EF_SEARCH_STEPS if e >= k] or [{"efSearch": k}]
    return [{}]


def tune(search: Callable[[dict], np.ndarray], candidate: Candidate, truth: np.ndarray, k: int,
         target: float | None, capped: bool = False) -> tuple[dict, float, list[dict]]:
    """The search parameter: the smallest whose recall@k on the held-out queries reaches
    ``target``, or with ``target`` None the knee: the parameter is doubled while that adds
    at least :data:`KNEE_GAIN` of recall@k.

    ``search(parameter)`` returns the ids int (Q, k) that the index (holding every row but
    the held-out ones) finds for the held-out queries with that parameter; ``truth`` (Q, k)
    are their exact neighbours among those rows. ``capped``: see :func:`search_steps`.
    Returns (search parameter, its recall, every step measured: parameter, recall,
    queries/s); without a step reaching the target, the best step.
    """
    if candidate.type == "flat":
        return {}, 1.0, []
    steps: list[dict] = []
    chosen = None
    for parameter in search_steps(candidate, k, capped):
        start = time.perf_counter()
        ids = search(parameter)
        seconds = time.perf_counter() - start
        recall = recall_at_k(ids, truth)
        steps.append({**parameter, "recall": round(recall, 4), "queries_per_s": round(len(truth) / max(seconds, 1e-9), 1)})
        logger.info("%s %s: recall@%d %.4f", candidate.describe(), parameter, k, recall)
        if target is not None and recall >= target:
            chosen = steps[-1]
            break
        if target is None and len(steps) > 1 and steps[-1]["recall"] - steps[-2]["recall"] < KNEE_GAIN:
            chosen = steps[-2]
            break
    if chosen is None:
        chosen = steps[-1] if target is None else max(steps, key=lambda step: step["recall"])
    return {key: chosen[key] for key in ("nprobe", "efSearch") if key in chosen}, chosen["recall"], steps


# --------------------------------------------------------------------------- the held-out sample


def choose_heldout(rng: np.random.Generator, first_id: int, rows: int, count: int) -> np.ndarray:
    """``count`` ids drawn without replacement from ``first_id .. first_id + rows``, sorted int64."""
    return np.sort(rng.choice(rows, size=min(count, rows), replace=False).astype(np.int64) + first_id)


def heldout_size(n: int, heldout: int) -> int:
    """Rows of ``n`` to hold out when ``heldout`` are asked for."""
    # at most a tenth of a small collection, so the quantizers still see most of it
    return int(min(heldout, max(1, n // 10))) if n > 1 else 0

