"""Spectral diffusion (``unicom evaluate --diffusion K --diffusion-rank R``) against the exact solve of each query.

Diffusion (k = 50, γ = 3, α = 0.99) on 512-d unit rows in classes of 20 to 100 (the data of
``benchmarks/re_ranking_cost.py``): ``score(..., expansion=Expansion(diffusion=Diffusion(50,
rank=R)))``, its eigenvectors timed apart (``DiffusionScores``), beside the exact form
(conjugate gradients for every query) where it runs in minutes: tens of queries against a
gallery, thousands, and a set searched leave-one-out, where the exact form would solve one
system per item. Each run is a process of its own, its peak memory the high-water mark of its
resident set (``VmHWM``).

Run ``python benchmarks/spectral_diffusion.py``; it prints the table and writes
``benchmarks/results/spectral_diffusion.txt``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from re_ranking_cost import change, machine, make_data, parsed_arguments, published, run  # noqa: E402

RESULT = Path(__file__).parent / "results" / "spectral_diffusion.txt"
# (queries, gallery; 0: leave-one-out), rank, whether the exact form runs too
SIZES = [(70, 12_000, 500, True), (3_000, 12_000, 500, True), (3_000, 12_000, 100, False),
         (20_000, 0, 500, False)]
SMOKE_SIZES = [(10, 400, 20, True), (300, 0, 20, True)]

SPECTRAL = """
import json, re, sys, time
import numpy as np
from unicom.evaluate import Diffusion, Expansion
from unicom.evaluate.diffusion import DiffusionScores
from unicom.evaluate.dims import score
data, rank = np.load(sys.argv[1]), sys.argv[2]
query, labels = data["query"], data["query_labels"]
gallery = data["gallery"] if len(data["gallery"]) else None
gallery_labels = data["gallery_labels"] if gallery is not None else None
settings = Diffusion(50, rank=None if rank == "exact" else int(rank))
began = time.perf_counter()
plain = score(query, labels, gallery, gallery_labels, ks=(1,))
plain_seconds = time.perf_counter() - began
began = time.perf_counter()
DiffusionScores(query, gallery, settings)
graph_seconds = time.perf_counter() - began
began = time.perf_counter()
re_ranked = score(query, labels, gallery, gallery_labels, ks=(1,), expansion=Expansion(diffusion=settings))
seconds = time.perf_counter() - began
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
print(json.dumps({"plain_seconds": plain_seconds, "graph_seconds": graph_seconds, "seconds": seconds,
                  "peak_mib": peak, "plain": plain, "re_ranked": re_ranked}))
"""


def main() -> int:
    args = parsed_arguments(__doc__.split("\n\n")[0], RESULT)
    lines = ["# Spectral diffusion against the exact solve of each query", "",
             f"{machine()} in classes of 20 to 100 (class centres plus noise); diffusion k = 50, γ = 3, α = 0.99; seconds and peak",
             "resident MiB of a process each; graph s: the neighbour graph and, for the spectral form, its eigenvectors "
             "(DiffusionScores), once; re-ranked s: the whole re-ranked evaluation (graph included).", "",
             "| queries | gallery | form | graph s | re-ranked s | MiB | Recall@1 plain → re-ranked | "
             "MAP@R plain → re-ranked |",
             "|---:|---:|---|---:|---:|---:|---|---|"]
    with tempfile.TemporaryDirectory() as scratch:
        for number, (queries, gallery_size, rank, exact) in enumerate(SMOKE_SIZES if args.smoke else SIZES):
            x, labels = make_data(queries + gallery_size, 100 + number, 20, 100)
            data = Path(scratch) / f"data{number}.npz"
            np.savez(data, query=x[:queries], query_labels=labels[:queries], gallery=x[queries:],
                     gallery_labels=labels[queries:])
            for form in [str(rank)] + (["exact"] if exact else []):
                result = run(SPECTRAL, str(data), form)
                lines.append(
                    f"| {queries:,} | {f'{gallery_size:,}' if gallery_size else 'leave-one-out'} | "
                    f"{'exact solve' if form == 'exact' else f'spectral, rank {form}'} | {result['graph_seconds']:.2f} | "
                    f"{result['seconds']:.2f} | {result['peak_mib']:,.0f} | " + change(result["plain"], result["re_ranked"]))
                print(lines[-1], file=sys.stderr, flush=True)
    return published(lines, args)


if __name__ == "__main__":
    raise SystemExit(main())
