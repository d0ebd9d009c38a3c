"""k-reciprocal re-ranking's cost: ``unicom evaluate --k-reciprocal`` against the authors' code.

A gallery searched by queries apart from it (Market-1501's shape: about a fifth of the items
are queries) and a leave-one-out set (SOP's shape), 512-d unit vectors in classes of 2 to 9
(centres plus noise), k1 = 20, k2 = 6, λ = 0.3:

* unicom: ``score(..., expansion=Expansion(k_reciprocal=KReciprocal(20)))``, Recall@1 and
  MAP@R of the re-ranked search (its neighbour search, the sparse encodings, every query's
  overlap and the metrics), beside the plain search of the same data;
* the authors' code as torchreid ships it (``re_ranking(q_g_dist, q_q_dist, g_g_dist)``,
  dense N x N arrays of numpy) on the same distances, up to the size where its matrices fit
  in memory, its distances compared with ours (the largest difference).

Each run is a process of its own, its peak memory the high-water mark of its resident set
(``VmHWM``). Run ``python benchmarks/k_reciprocal.py``; it prints the table and writes
``benchmarks/results/k_reciprocal.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RESULT = Path(__file__).parent / "results" / "k_reciprocal.txt"
DIM = 512
# (queries, gallery; 0: leave-one-out over the queries), the reference run up to REFERENCE_ITEMS items
SIZES = [(1_000, 4_000), (3_000, 12_000), (60_000, 0)]
REFERENCE_ITEMS = 15_000
NOISE = 2.4  # per coordinate, against class centres of unit variance: Recall@1 about 80% at 5,000 items

UNICOM = """
import json, re, sys, time
import numpy as np
from unicom.evaluate.dims import score
from unicom.evaluate.expansion import Expansion
from unicom.evaluate.kreciprocal import KReciprocal, KReciprocalScores
data = np.load(sys.argv[1])
query, labels = data["query"], data["query_labels"]
gallery = data["gallery"] if len(data["gallery"]) else None
gallery_labels = data["gallery_labels"] if gallery is not None else None
began = time.perf_counter()
plain = score(query, labels, gallery, gallery_labels, ks=(1,))
plain_seconds = time.perf_counter() - began
began = time.perf_counter()
re_ranked = score(query, labels, gallery, gallery_labels, ks=(1,), expansion=Expansion(k_reciprocal=KReciprocal(20)))
seconds = time.perf_counter() - began
difference = None
if len(sys.argv) > 2:  # the reference's distances of the first queries
    reference = np.load(sys.argv[2])
    import torch
    scores = KReciprocalScores(query, gallery, KReciprocal(20))
    rows = torch.arange(len(reference))
    ours = -scores(rows, torch.from_numpy(query[:len(reference)] @ gallery.T)).numpy()
    difference = float(np.abs(ours - reference).max())
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
print(json.dumps({"plain_seconds": plain_seconds, "seconds": seconds, "peak_mib": peak, "difference": difference,
                  "plain": plain, "re_ranked": re_ranked}))
"""

REFERENCE = """
import importlib.util, re, sys, time, json
from pathlib import Path
import numpy as np
folder = Path(importlib.util.find_spec("torchreid").submodule_search_locations[0])
spec = importlib.util.spec_from_file_location("rerank", folder / "reid" / "utils" / "rerank.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
data = np.load(sys.argv[1])
query, gallery = data["query"].astype(np.float32), data["gallery"].astype(np.float32)
began = time.perf_counter()
distance = lambda a, b: np.sqrt(np.maximum(2 - 2 * a @ b.T, 0))
final = module.re_ranking(distance(query, gallery), distance(query, query), distance(gallery, gallery),
                          k1=20, k2=6, lambda_value=0.3)
seconds = time.perf_counter() - began
np.save(sys.argv[2], final[:200])
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
print(json.dumps({"seconds": seconds, "peak_mib": peak}))
"""


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n unit rows in classes of 2 to 9 (class centres plus noise), shuffled: float32, labels."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 10, n)
    labels = np.repeat(np.arange(n), sizes)[:n]
    x = rng.standard_normal((labels.max() + 1, DIM))[labels] + NOISE * rng.standard_normal((n, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(n)
    return x[order].astype(np.float32), labels[order]


def run(code: str, *argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, text=True,
                          env={**os.environ, "UNICOM_PROGRESS": "0"})
    return json.loads(done.stdout.splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--smoke", action="store_true", help="small sizes only (a check that the script runs)")
    args = parser.parse_args()
    sizes = [(100, 400), (300, 0)] if args.smoke else SIZES
    lines = ["# k-reciprocal re-ranking (k1 = 20, k2 = 6, λ = 0.3): unicom against the authors' code", "",
             f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores; {DIM}-d unit rows "
             "in classes of 2 to 9; seconds and peak resident MiB of a process each (the libraries included);",
             "the reference (torchreid's re_ranking, dense numpy) on the same distances where its N x N arrays fit;",
             "difference: the largest |ours - its| re-ranked distance over the first 200 queries.", "",
             "| queries | gallery | plain search s | re-ranked s | MiB | reference s | reference MiB | difference | "
             "Recall@1 plain → re-ranked | MAP@R plain → re-ranked |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    with tempfile.TemporaryDirectory() as scratch:
        for number, (queries, gallery_size) in enumerate(sizes):
            x, labels = make_data(queries + gallery_size, seed=number)
            data = Path(scratch) / f"data{number}.npz"
            np.savez(data, query=x[:queries], query_labels=labels[:queries], gallery=x[queries:],
                     gallery_labels=labels[queries:])
            reference = None
            if gallery_size and queries + gallery_size <= REFERENCE_ITEMS:
                distances = Path(scratch) / f"reference{number}.npy"
                reference = run(REFERENCE, str(data), str(distances))
                ours = run(UNICOM, str(data), str(distances))
            else:
                ours = run(UNICOM, str(data))
            plain, re_ranked = ours["plain"], ours["re_ranked"]
            lines.append(
                f"| {queries:,} | {f'{gallery_size:,}' if gallery_size else 'leave-one-out'} | "
                f"{ours['plain_seconds']:.2f} | {ours['seconds']:.2f} | {ours['peak_mib']:,.0f} | "
                + (f"{reference['seconds']:.2f} | {reference['peak_mib']:,.0f} | {ours['difference']:.1e} | "
                   if reference else "not run | | | ")
                + f"{100 * plain['recall@1']:.2f} → {100 * re_ranked['recall@1']:.2f} | "
                f"{100 * plain['map@r']:.2f} → {100 * re_ranked['map@r']:.2f} |")
            print(lines[-1], file=sys.stderr, flush=True)  # progress; the table goes to stdout
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.smoke:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
