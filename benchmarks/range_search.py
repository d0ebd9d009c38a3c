"""Every result above a score (``Index.search_range``, ``unicom search --min-score``) and the
subset written as parquet (``--out``), on a million 512-d embeddings with LAION-like metadata.

Side by side on one exact (flat) index, for queries whose thresholds give about 100, 10,000
and 100,000 results each:

* ``index.search(q, 10)``: the usual top-10 search, one pass over the index;
* ``index.search_range(q, S)``: faiss' range search of the same index;
* numpy: ``x @ q >= S`` over the same float32 rows, the reference the results must equal.

Then the subset of the largest threshold written with ``unicom.search.subset.write`` (what
``--out`` runs): rows per second, file size, and a check that the file holds those ids.
An HNSW graph over a smaller sample is searched the same way (it asks for ever more
results): its recall against the exact results, beside the recall of the graph's own top-k
search asked for exactly as many, and how long it took.

Run ``python benchmarks/range_search.py``; it writes ``benchmarks/results/range_search.txt``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULT = Path(__file__).parent / "results" / "range_search.txt"
WORDS = ("a", "photo", "of", "the", "red", "car", "dog", "on", "beach", "at", "sunset", "vintage", "poster", "with",
         "white", "background", "wooden", "table", "mountain", "lake", "city", "street", "night", "portrait")
TARGETS = (100, 10_000, 100_000)  # results per query the thresholds are chosen for


def embeddings(rows: int, dims: int, seed: int) -> np.ndarray:
    """Unit rows from a mixture of 2,000 clusters (scores spread as a real collection's are)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, dims)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), rows)] + 1.2 * rng.standard_normal((rows, dims), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def write_collection(root: Path, x: np.ndarray, parts: int, seed: int) -> None:
    import pyarrow as pa

    from unicom.formats.embeddings import write_part

    rng = np.random.default_rng(seed)
    for number, rows in enumerate(np.array_split(np.arange(len(x)), parts)):
        words = np.asarray(WORDS)[rng.integers(0, len(WORDS), (len(rows), 10))]
        table = pa.table({
            "url": [f"https://images.example.com/{i % 9973:04d}/{i:010d}.jpg" for i in rows.tolist()],
            "caption": [" ".join(row) for row in words.tolist()],
            "key": [f"{i:09d}" for i in rows.tolist()],
            "width": rng.integers(64, 4096, len(rows)),
            "height": rng.integers(64, 4096, len(rows)),
        })
        write_part(root, number, image=x[rows].astype(np.float16), metadata=table)


def timed(call, repeat: int = 3):
    """(the result, the median seconds of ``repeat`` calls)."""
    seconds, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - start)
    return result, statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, default=512)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--hnsw-rows", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from unicom.search import subset
    from unicom.search.index import Index

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        x = embeddings(args.rows, args.dims, seed=0)
        x = x.astype(np.float16).astype(np.float32)  # the values the index holds (the folder keeps float16)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        write_collection(root / "emb", x, args.parts, seed=1)
        start = time.perf_counter()
        index = Index.build(root / "emb", root / "flat", index_type="flat")
        built = time.perf_counter() - start
        queries = x[np.random.default_rng(2).choice(len(x), args.queries, replace=False)]
        scores = queries @ x.T
        lines += [
            f"range search: {args.rows:,} x {args.dims}-d unit embeddings (float16 on disk) with LAION-like metadata in "
            f"{args.parts} parts, an exact (flat) index built in {built:.1f} s; {args.queries} queries (rows of the collection)",
            f"machine: {platform.machine()}, python {platform.python_version()}, {len(__import__('os').sched_getaffinity(0))} cores",
            "",
            f"{'results per query':>18}  {'top-10 search':>14}  {'search_range':>13}  {'numpy x @ q >= S':>17}  same ids",
        ]
        (_, top), top_seconds = timed(lambda: index.search(queries, 10))
        thresholds = {}
        for target in TARGETS:
            threshold = np.float32([np.sort(row)[-target - 1:-target + 1].mean() for row in scores])  # between two rows
            thresholds[target] = threshold
            found, range_seconds = timed(lambda: [index.search_range(q[None, :], s)[0] for q, s in zip(queries, threshold)])
            reference, numpy_seconds = timed(lambda: [np.flatnonzero(x @ q >= s) for q, s in zip(queries, threshold)])
            # faiss and numpy sum in other orders: a row within float32 rounding of S may fall either side
            differ = [np.setxor1d(ids, want) for (_, ids), want in zip(found, reference)]
            near = max((float(np.abs(x[d] @ q - s).max()) for d, q, s in zip(differ, queries, threshold) if len(d)),
                       default=0.0)
            same = "yes" if not any(len(d) for d in differ) else \
                f"{sum(map(len, differ))} rows differ, each within {near:.1e} of S"
            counts = [len(ids) for _, ids in found]
            lines.append(f"{f'{min(counts):,}-{max(counts):,}':>18}  {top_seconds / len(queries) * 1000:11.1f} ms  "
                         f"{range_seconds / len(queries) * 1000:10.1f} ms  {numpy_seconds / len(queries) * 1000:14.1f} ms  "
                         f"{same}")
        lines.append("(milliseconds per query; the same index and queries; numpy scores the float32 rows in memory)")

        largest = thresholds[TARGETS[-1]]
        found = [index.search_range(q[None, :], s)[0] for q, s in zip(queries, largest)]
        items = subset.merge(found)
        out = root / "subset.parquet"
        start = time.perf_counter()
        subset.write(index, items, [f"query {i}" for i in range(len(queries))], str(out))
        seconds = time.perf_counter() - start
        written = pq.read_table(out, columns=["id", "score", "url"])
        right = np.array_equal(written.column("id").to_numpy(), items.ids) and \
            written.column("url").to_pylist()[:3] == [row["url"] for row in index.metadata(items.ids[:3])]
        lines += [
            "",
            f"--out: {len(items):,} items (the union of the {args.queries} queries' ~{TARGETS[-1]:,} results) written in "
            f"{seconds:.1f} s ({len(items) / seconds:,.0f} rows/s), {out.stat().st_size / 2**20:.1f} MiB of parquet; "
            f"the file holds those ids and their metadata: {right}",
        ]

        hnsw_x = x[: args.hnsw_rows]
        write_collection(root / "emb_small", hnsw_x, 1, seed=1)
        start = time.perf_counter()
        graph = Index.build(root / "emb_small", root / "hnsw", index_type="hnsw", heldout=1000)
        built = time.perf_counter() - start
        small_scores = queries @ hnsw_x.T
        lines += ["", f"HNSW over the first {args.hnsw_rows:,} rows (built in {built:.1f} s, "
                      f"{graph.config['params']}, efSearch {graph.config['search'].get('efSearch')}):",
                  f"{'results per query':>18}  {'search_range':>13}  {'its recall':>10}  "
                  "recall of a top-k search with k = the exact count"]
        for target in (100, 1_000, 10_000):
            threshold = np.float32([np.sort(row)[-target - 1:-target + 1].mean() for row in small_scores])
            found, range_seconds = timed(lambda: [graph.search_range(q[None, :], s)[0] for q, s in zip(queries, threshold)],
                                         repeat=1)
            exact = [set(np.flatnonzero(hnsw_x @ q >= s).tolist()) for q, s in zip(queries, threshold)]
            recall = sum(len(set(ids.tolist()) & want) for (_, ids), want in zip(found, exact)) / sum(map(len, exact))
            top = [set(graph.search(q[None, :], len(want))[1][0].tolist()) for q, want in zip(queries, exact)]
            top_recall = sum(len(found_ids & want) for found_ids, want in zip(top, exact)) / sum(map(len, exact))
            counts = [len(ids) for _, ids in found]
            lines.append(f"{f'{min(counts):,}-{max(counts):,}':>18}  {range_seconds / len(queries) * 1000:10.1f} ms  "
                         f"{recall:10.4f}  {top_recall:.4f}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
