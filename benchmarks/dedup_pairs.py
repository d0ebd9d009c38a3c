"""Near-duplicate pairs of a collection (``unicom dedup``), against faiss' exact range search.

On N 512-d unit rows (a mixture of clusters, with 1% of the rows planted as near copies of
others), side by side in one run:

* ``pairs_above(x, threshold=0.95)``: the exact blockwise search ``unicom dedup`` runs;
* faiss: ``IndexFlatIP.range_search(x, 0.95)`` over the same float32 rows (the pairs i < j
  kept), the reference the pairs must equal;
* the whole command, ``unicom dedup --emb FOLDER`` on the rows written as a float16
  embedding folder: reading, the search, the groups, the four files;
* the command through an index of the folder (``unicom index --emb FOLDER --type TYPE``, its
  build timed apart; then ``unicom dedup --emb FOLDER --index INDEX``): the folder read a block
  at a time and each block range-searched in the index, for a flat index (exact) and an IVF
  one (8-bit codes, the ``nprobe`` its build tuned), with the share of the exact pairs each
  finds; and through the IVF index with ``--check-sample 1000`` (1,000 rows also searched
  exactly), what the check costs and the share it measures. Each command runs in a process of
  its own, whose peak resident memory is given.

Run ``python benchmarks/dedup_pairs.py [--rows N]``; it writes ``benchmarks/results/dedup_pairs.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
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


def run_command(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak resident MiB) of ``unicom ARGV`` in a process of its own (its output discarded)."""
    # the high-water mark of the process' own memory (VmHWM; getrusage's would count this process' from before exec)
    code = ("import re, sys, time\n"
            "from unicom.cli import main\n"
            "started = time.perf_counter()\n"
            "assert main(sys.argv[1:]) == 0\n"
            "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
            "print(time.perf_counter() - started, int(peak) / 1024)\n")
    done = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, text=True,
                          env={**os.environ, "UNICOM_PROGRESS": "0"})
    seconds, mib = done.stdout.split()[-2:]
    return float(seconds), float(mib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dims", type=int, default=512)
    args = parser.parse_args()

    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

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
        out = Path(scratch) / "out"
        command, command_mib = run_command(["dedup", "--emb", str(folder), "--out", str(out), "--threshold", str(THRESHOLD)])
        summary = json.loads((out / "summary.json").read_text())
        exact_pairs = pq.read_table(out / "pairs.parquet", columns=["row", "match_row"]).to_pydict()
        exact_pairs = set(zip(exact_pairs["row"], exact_pairs["match_row"]))
        indexed = []
        for index_type in ("flat", "ivfsq"):
            index = Path(scratch) / f"index_{index_type}"
            build, _ = run_command(["index", "--emb", str(folder), "--out", str(index), "--type", index_type])
            out = Path(scratch) / f"out_{index_type}"
            seconds, mib = run_command(["dedup", "--emb", str(folder), "--index", str(index), "--out", str(out),
                                        "--threshold", str(THRESHOLD)])
            search = json.loads((out / "summary.json").read_text())["search"]
            pairs = pq.read_table(out / "pairs.parquet", columns=["row", "match_row"]).to_pydict()
            pairs = set(zip(pairs["row"], pairs["match_row"]))
            indexed.append((search, build, seconds, mib, len(pairs), len(pairs & exact_pairs) / max(len(exact_pairs), 1),
                            len(pairs - exact_pairs)))
        # the same through the ivfsq index, with 1,000 rows checked exactly: what the check costs and says
        checked_out = Path(scratch) / "out_checked"
        checked_seconds, _ = run_command(["dedup", "--emb", str(folder), "--index", str(index), "--out",
                                          str(checked_out), "--threshold", str(THRESHOLD), "--check-sample", "1000"])
        check = json.loads((checked_out / "summary.json").read_text())["sample_check"]

    lines = [
        f"# unicom dedup: {args.rows:,} x {args.dims}-d rows, cosine >= {THRESHOLD}, all pairs (N^2/2)",
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)",
        "",
        "| search | seconds | rows/s | pairs | peak memory |",
        "|---|---|---|---|---|",
        f"| pairs_above (unicom dedup's search) | {ours:.2f} | {args.rows / ours:,.0f} | {len(found):,} | |",
        f"| faiss IndexFlatIP.range_search (i < j kept) | {theirs:.2f} | {args.rows / theirs:,.0f} | {len(reference):,} | |",
        f"| unicom dedup, the whole command (float16 folder in 5 parts) | {command:.2f} | {args.rows / command:,.0f} | "
        f"{summary['pairs']:,} | {command_mib:,.0f} MiB |",
    ]
    for search, build, seconds, mib, count, recall, extra in indexed:
        parameter = f", nprobe {search['nprobe']}" if search.get("nprobe") else ""
        lines.append(f"| unicom dedup --index ({search['type']}{parameter}; its build {build:.1f} s apart) | {seconds:.2f} | "
                     f"{args.rows / seconds:,.0f} | {count:,} | {mib:,.0f} MiB |")
    lines += [
        "",
        f"pairs_above / faiss time: {ours / theirs:.2f}",
        f"pairs found by one search only: {len(found ^ reference)} (of {len(found | reference):,}; similarities within "
        "float32 rounding of the threshold)",
        f"the command (float16 rows): {summary['groups']:,} groups, {summary['left_out']:,} rows left out, "
        f"{summary['kept']:,} kept",
    ]
    for search, build, seconds, mib, count, recall, extra in indexed:
        lines.append(f"through the {search['type']} index: {recall:.1%} of the command's exact pairs found and {extra} "
                     f"pairs more, in {seconds / command:.2f}x the exact command's time")
    measured = "no pair to measure" if check["recall"] is None else f"{check['recall']:.1%}"
    lines.append(f"through the ivfsq index with --check-sample 1000: {checked_seconds:.2f} s ({checked_seconds - indexed[-1][2]:.2f} s "
                 f"more); the sample's {check['exact_pairs']} exact pairs, {check['found']} found ({measured}), "
                 f"{check['extra']} more")
    text = "\n".join(lines) + "\n"
    RESULT.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
