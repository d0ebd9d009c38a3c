"""Near-duplicate pairs of a collection (``unicom dedup``), against faiss' exact range search.

On N 512-d unit rows (a mixture of clusters, with 1% of the rows planted as near copies of
others), side by side in one run:

* ``pairs_above(x, threshold=0.95)``: the exact blockwise search ``unicom dedup`` runs;
* faiss: ``IndexFlatIP.range_search(x, 0.95)`` over the same float32 rows (the pairs i < j
  kept), the reference the pairs must equal;
* the whole command, ``unicom dedup --emb FOLDER`` on the rows written as a float16
  embedding folder: reading, the search, the groups, the four files.

Run ``python benchmarks/dedup_pairs.py [--rows N]``; it writes ``benchmarks/results/dedup_pairs.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

RESULT = Path(__file__).parent / "results" / "dedup_pairs.txt"
THRESHOLD = 0.95


def collection(rows: int, dims: int, seed: int = 0) -> np.ndarray:
    """Unit rows around 1,000 cluster centres; 1% of them copies of another row plus a little noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dims)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), rows)] + 1.2 * rng.standard_normal((rows, dims), dtype=np.float32)
    copies = rng.choice(rows, rows // 100, replace=False)
    x[copies] = x[rng.integers(0, rows, len(copies))] + 0.05 * rng.standard_normal((len(copies), dims), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_pairs(x: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    limits, _, ids = index.range_search(x, threshold)
    rows = np.repeat(np.arange(len(x)), np.diff(limits).astype(np.int64))
    keep = rows < ids
    return set(zip(rows[keep].tolist(), ids[keep].tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dims", type=int, default=512)
    args = parser.parse_args()

    import faiss
    import pyarrow as pa
    import torch

    from unicom.cli import main as unicom
    from unicom.evaluate.metrics import pairs_above
    from unicom.formats.embeddings import write_part

    x = collection(args.rows, args.dims)
    started = time.perf_counter()
    rows, matches, _ = pairs_above(x, threshold=THRESHOLD)
    ours = time.perf_counter() - started
    started = time.perf_counter()
    reference = faiss_pairs(x, THRESHOLD)
    theirs = time.perf_counter() - started
    found = set(zip(rows.tolist(), matches.tolist()))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "emb"
        for number, part in enumerate(np.array_split(np.arange(args.rows), 5)):
            write_part(folder, number, image=x[part].astype(np.float16),
                       metadata=pa.table({"key": [f"{i:09d}" for i in part]}))
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # its summary.md, read below
            assert unicom(["dedup", "--emb", str(folder), "--out", str(Path(scratch) / "out"), "--threshold",
                           str(THRESHOLD)]) == 0
        command = time.perf_counter() - started
        summary = (Path(scratch) / "out" / "summary.json").read_text()

    summary = json.loads(summary)
    lines = [
        f"# unicom dedup: {args.rows:,} x {args.dims}-d rows, cosine >= {THRESHOLD}, all pairs (N^2/2)",
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)",
        "",
        "| search | seconds | rows/s | pairs |",
        "|---|---|---|---|",
        f"| pairs_above (unicom dedup's search) | {ours:.2f} | {args.rows / ours:,.0f} | {len(found):,} |",
        f"| faiss IndexFlatIP.range_search (i < j kept) | {theirs:.2f} | {args.rows / theirs:,.0f} | {len(reference):,} |",
        f"| unicom dedup, the whole command (float16 folder in 5 parts) | {command:.2f} | {args.rows / command:,.0f} | "
        f"{summary['pairs']:,} |",
        "",
        f"pairs_above / faiss time: {ours / theirs:.2f}",
        f"pairs found by one search only: {len(found ^ reference)} (of {len(found | reference):,}; similarities within "
        "float32 rounding of the threshold)",
        f"the command (float16 rows): {summary['groups']:,} groups, {summary['left_out']:,} rows left out, "
        f"{summary['kept']:,} kept",
    ]
    text = "\n".join(lines) + "\n"
    RESULT.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
