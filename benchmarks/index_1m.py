"""1,000,000 x 256 float32 embeddings: build time, memory, queries/s and recall@10 of each index type.

Run (heavy: about 1 GiB of vectors, half an hour on 2 cores)::

    flock /tmp/unicom-heavy.lock python benchmarks/index_1m.py

Writes ``benchmarks/results/index_1m.txt``. The collection is synthetic and written to
``--data`` (default ``/tmp/unicom-bench-index``, reused by later runs). Random Gaussian
vectors are the worst case for product quantization and unlike real embeddings, so the
collection is a clustered one with low-rank structure (see ``clustered_collection``); its
local intrinsic dimensionality is measured and printed beside that of Gaussian vectors.

Each index is built by ``unicom.Index.build`` (the library path of ``unicom index``):

* ``flat``  exact search;
* ``hnsw``  HNSW32, efSearch tuned to recall@10 >= 0.9 on the held-out sample;
* ``auto``  ``--memory`` = 1/8 of the exact index and ``--target-recall 0.9``: the smallest
  index within the budget that reaches it, with its parameters and nprobe.

Each is then loaded in a fresh process that measures its resident memory (RSS growth while
``Index.load`` runs), queries/s for a batch of 1,000 queries and for one query at a time,
and recall@10 of 1,000 new queries (drawn from the same distribution, not in the
collection) against the exact neighbours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROWS, DIMS, PARTS = 1_000_000, 256, 10
QUERIES, K = 1000, 10
GENERATOR = dict(clusters=20_000, rank=96, decay=0.5, within=0.6, noise=0.03)


def clustered_collection(n: int, d: int, seed: int, *, block: int = 100_000, clusters: int, rank: int, decay: float,
                         within: float, noise: float):
    """Unit vectors from a Gaussian mixture in a rank-``rank`` subspace, in blocks of ``block`` rows.

    ``clusters`` centres ~ N(0, I_rank) with log-normal weights (sigma 1); a sample is its
    centre plus N(0, within^2 I_rank), mapped to d dimensions by an orthonormal basis whose
    axis i is scaled by i^-decay (a decaying spectrum, as in real embeddings), plus isotropic
    N(0, noise^2 I_d), then L2-normalised. The generator state depends only on ``seed``
    (``seed`` 0 for the collection, other seeds for queries from the same mixture).
    """
    structure = np.random.default_rng(12345)  # the mixture itself: shared by collection and queries
    spectrum = np.arange(1, rank + 1, dtype=np.float64) ** -decay
    basis = np.linalg.qr(structure.standard_normal((d, rank)))[0]
    mixing = (basis * spectrum).T.astype(np.float32)  # (rank, d)
    centres = structure.standard_normal((clusters, rank)).astype(np.float32)
    weights = structure.lognormal(0.0, 1.0, clusters)
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    for start in range(0, n, block):
        rows = min(block, n - start)
        labels = rng.choice(clusters, rows, p=weights)
        latent = centres[labels] + within * rng.standard_normal((rows, rank), dtype=np.float32)
        x = latent @ mixing + noise * rng.standard_normal((rows, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x


def write_collection(root: Path, rows: int) -> None:
    import pyarrow as pa

    from unicom.formats.embeddings import part_complete, write_part

    marker = root / "generator.json"
    settings = {"rows": rows, "dims": DIMS, "parts": PARTS, **GENERATOR}
    if marker.is_file() and json.loads(marker.read_text()) == settings and all(
        part_complete(root, i, ["image", "metadata"]) for i in range(PARTS)
    ):
        return
    per_part = rows // PARTS
    blocks = clustered_collection(per_part * PARTS, DIMS, 0, block=per_part, **GENERATOR)
    for number in range(PARTS):
        x = next(blocks)
        keys = [f"{number:02d}-{row:06d}" for row in range(per_part)]
        write_part(root, number, image=x, metadata=pa.table({"key": keys}))
        print(f"  wrote part {number}", flush=True)
    marker.write_text(json.dumps(settings))


def local_intrinsic_dimension(distances: np.ndarray) -> float:
    """Mean maximum-likelihood estimate (Levina and Bickel 2004) from (Q, k) sorted Euclidean distances."""
    d = np.maximum(distances, 1e-12)
    return float(np.mean(-1.0 / np.mean(np.log(d[:, :-1] / d[:, -1:]), axis=1)))


def exact_neighbours(vectors_blocks, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the exact k nearest by inner product, over blocks of the collection."""
    import faiss

    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    offset = 0
    for block in vectors_blocks:
        s, i = faiss.knn(queries, np.ascontiguousarray(block, dtype=np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)
        s, i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + offset], 1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
        offset += len(block)
    return best_s, best_i


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(index_path: str, queries_path: str, truth_path: str) -> dict:
    """In a fresh process: load the index, measure memory, speed and recall."""
    import faiss  # noqa: F401  (imported before the baseline, like every other library)

    from unicom.search.index import Index
    from unicom.search.planner import recall_at_k

    queries = np.load(queries_path)
    truth = np.load(truth_path)
    baseline = rss_bytes()
    start = time.perf_counter()
    index = Index.load(index_path)
    load_seconds = time.perf_counter() - start
    resident = rss_bytes() - baseline
    index.search(queries[:10], K)  # warm-up
    start = time.perf_counter()
    _, ids = index.search(queries, K)
    batch_seconds = time.perf_counter() - start
    singles = 200
    start = time.perf_counter()
    for row in queries[:singles]:
        index.search(row, K)
    single_seconds = time.perf_counter() - start
    return {
        "resident_bytes": resident,
        "file_bytes": index.config["bytes"],
        "load_seconds": load_seconds,
        "batch_qps": len(queries) / batch_seconds,
        "single_qps": singles / single_seconds,
        "recall": recall_at_k(ids, truth),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/tmp/unicom-bench-index", help="where the collection and indexes go")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "index_1m.txt"))
    parser.add_argument("--types", default="flat,hnsw,auto", help="comma-separated: flat, hnsw, auto")
    parser.add_argument("--rows", type=int, default=ROWS, help=f"collection size (default {ROWS:,}; smaller for a trial run)")
    parser.add_argument("--measure", nargs=3, metavar=("INDEX", "QUERIES", "TRUTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("UNICOM_PROGRESS", "0")
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    rows = args.rows // PARTS * PARTS

    import faiss

    from unicom.errors import InputError
    from unicom.formats.embeddings import EmbeddingFolders
    from unicom.search.index import Index
    from unicom.search.planner import flat_memory

    data = Path(args.data)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"# index_1m: {rows:,} x {DIMS} float32, recall@{K} against exact search")
    say(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, faiss {faiss.__version__} "
        f"({faiss.omp_get_max_threads()} threads), python {platform.python_version()}")
    say(f"# collection: clustered synthetic, {', '.join(f'{k}={v}' for k, v in GENERATOR.items())} "
        "(see clustered_collection in this file)")
    start = time.perf_counter()
    write_collection(data / "emb", rows)
    folders = EmbeddingFolders.from_root(data / "emb")

    def blocks():
        for number in range(PARTS):
            yield folders.load("image", number)

    queries = next(clustered_collection(QUERIES, DIMS, 1, **GENERATOR))
    truth_scores, truth = exact_neighbours(blocks(), queries, 20)
    np.save(data / "queries.npy", queries)
    np.save(data / "truth.npy", truth[:, :K])
    lid = local_intrinsic_dimension(np.sqrt(np.maximum(2 - 2 * truth_scores, 0)))
    g = np.random.default_rng(7).standard_normal((rows, DIMS), dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    gq = np.random.default_rng(8).standard_normal((QUERIES, DIMS), dtype=np.float32)
    gq /= np.linalg.norm(gq, axis=1, keepdims=True)
    g_scores, _ = exact_neighbours([g], gq, 20)
    del g
    lid_gaussian = local_intrinsic_dimension(np.sqrt(np.maximum(2 - 2 * g_scores, 0)))
    say(f"# local intrinsic dimensionality (MLE, 20 neighbours) of {QUERIES} queries: {lid:.1f} "
        f"(isotropic Gaussian of the same size: {lid_gaussian:.1f}); cosine of the 1st/10th neighbour: "
        f"{truth_scores[:, 0].mean():.3f}/{truth_scores[:, 9].mean():.3f}")
    say(f"# data ready in {time.perf_counter() - start:.0f} s")
    exact_bytes = flat_memory(rows, DIMS)
    settings = {
        "flat": dict(index_type="flat"),
        "hnsw": dict(index_type="hnsw", recall_target=0.9),
        "auto": dict(index_type="auto", memory_budget=exact_bytes // 8, recall_target=0.9),
    }
    results = []
    for name in args.types.split(","):
        out = data / f"index-{name}"
        say(f"# building {name} ...")
        start = time.perf_counter()
        try:
            index = Index.build(data / "emb", out, overwrite=True, **settings[name])
        except InputError as error:
            if name != "auto":
                raise
            say(f"#   auto: {error}")
            say("#   so: --type ivfpq within the same budget, which keeps the best it reaches")
            index = Index.build(data / "emb", out, overwrite=True, **{**settings[name], "index_type": "ivfpq"})
        build_seconds = time.perf_counter() - start
        config = index.config
        del index
        result = subprocess.run(
            [sys.executable, __file__, "--measure", str(out), str(data / "queries.npy"), str(data / "truth.npy")],
            check=True, capture_output=True, text=True,
        )
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        search = ",".join(f"{k}={v}" for k, v in config["search"].items()) or "-"
        results.append((name, config, build_seconds, measured, search))
        say(f"#   {config['structure']} {search}: built in {build_seconds:.0f} s, recall@{K} {measured['recall']:.4f}")

    say()
    header = (f"{'index':<6} {'structure':<28} {'search':<12} {'build s':>8} {'file MiB':>9} {'RSS MiB':>8} "
              f"{'mem/exact':>9} {'batch q/s':>10} {'1-query q/s':>11} {'recall@10':>9} {'held-out':>9}")
    say(header)
    say("-" * len(header))
    exact = next((r for r in results if r[0] == "flat"), None)
    for name, config, build_seconds, m, search in results:
        say(f"{name:<6} {config['structure']:<28} {search:<12} {build_seconds:>8.0f} {m['file_bytes'] / 2**20:>9.1f} "
            f"{m['resident_bytes'] / 2**20:>8.1f} {m['file_bytes'] / exact_bytes:>9.3f} {m['batch_qps']:>10.0f} "
            f"{m['single_qps']:>11.0f} {m['recall']:>9.4f} {config['selection']['recall']:>9.4f}")
    say()
    say(f"mem/exact: index file bytes / {exact_bytes:,} ({rows:,} x {DIMS} float32). RSS: resident growth while loading. "
        "held-out: recall@10 the build measured on 1,000 held-out rows of the collection (searched before they "
        "joined the index), which chose the search parameter.")
    if exact is not None:
        for name, config, _, m, _ in results:
            if name == "flat":
                continue
            em = exact[3]
            say(f"{name} vs exact: {m['file_bytes'] / em['file_bytes']:.3f}x the memory (1/{em['file_bytes'] / m['file_bytes']:.1f}), "
                f"{m['batch_qps'] / em['batch_qps']:.2f}x batch queries/s, {m['single_qps'] / em['single_qps']:.2f}x "
                f"single-query queries/s, recall@10 {m['recall']:.4f}")
    target = [r for r in results if r[0] != "flat" and r[3]["recall"] >= 0.9 and r[3]["file_bytes"] * 8 <= exact_bytes]
    say(f"target (a compressed index with recall@10 >= 0.9 in <= 1/8 of the exact memory): "
        f"{'met by ' + ', '.join(r[0] + ' (' + r[1]['structure'] + ')' for r in target) if target else 'NOT met'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
