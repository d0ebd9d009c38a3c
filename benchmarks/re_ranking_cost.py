"""The cost of re-scoring a search: ``unicom evaluate --k-reciprocal`` and ``--diffusion``
against their reference computations.

k-reciprocal re-ranking (k1 = 20, k2 = 6, λ = 0.3), on a gallery searched by queries apart
from it (Market-1501's shape: about a fifth of the items are queries) and on a leave-one-out
set (SOP's shape), 512-d unit vectors in classes of 2 to 9 (centres plus noise):

* unicom: ``score(..., expansion=Expansion(k_reciprocal=KReciprocal(20)))``, Recall@1 and
  MAP@R of the re-ranked search (its neighbour search, the sparse encodings, every query's
  overlap and the metrics), beside the plain search of the same data;
* the authors' code as torchreid ships it (``re_ranking(q_g_dist, q_q_dist, g_g_dist)``,
  dense N x N arrays of numpy) on the same distances, up to the size where its matrices fit
  in memory, its distances compared with ours (the largest difference).

Diffusion (k = 50, γ = 3, α = 0.99), 70 queries (Revisited Oxford's number) against galleries
of 5,000 to 100,000 in classes of 20 to 100 (landmarks photographed many times):

* unicom: ``score(..., expansion=Expansion(diffusion=Diffusion(50)))`` (the gallery's
  neighbour graph, conjugate gradients for every query, the metrics);
* the same system, (I - α S) f = y, built dense and solved by ``numpy.linalg.solve`` where
  its gallery x gallery matrix fits, its f compared with ours.

Each run is a process of its own, its peak memory the high-water mark of its resident set
(``VmHWM``). Run ``python benchmarks/re_ranking_cost.py``; it prints the tables and writes
``benchmarks/results/re_ranking_cost.txt``.
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

RESULT = Path(__file__).parent / "results" / "re_ranking_cost.txt"
DIM = 512
# (queries, gallery; 0: leave-one-out over the queries), the references run up to REFERENCE_ITEMS items
K_RECIPROCAL_SIZES = [(1_000, 4_000), (3_000, 12_000), (60_000, 0)]
DIFFUSION_SIZES = [(70, 5_000), (70, 12_000), (70, 100_000)]
REFERENCE_ITEMS = 15_000
NOISE = 2.4  # per coordinate, against class centres of unit variance: Recall@1 about 80% at 5,000 items

UNICOM = """
import json, re, sys, time
import numpy as np
import torch
from unicom.evaluate import Diffusion, Expansion, KReciprocal
from unicom.evaluate.diffusion import DiffusionScores
from unicom.evaluate.dims import score
from unicom.evaluate.kreciprocal import KReciprocalScores
method, data = sys.argv[1], np.load(sys.argv[2])
query, labels = data["query"], data["query_labels"]
gallery = data["gallery"] if len(data["gallery"]) else None
gallery_labels = data["gallery_labels"] if gallery is not None else None
settings = Expansion(k_reciprocal=KReciprocal(20)) if method == "k-reciprocal" else Expansion(diffusion=Diffusion(50))
began = time.perf_counter()
plain = score(query, labels, gallery, gallery_labels, ks=(1,))
plain_seconds = time.perf_counter() - began
began = time.perf_counter()
re_ranked = score(query, labels, gallery, gallery_labels, ks=(1,), expansion=settings)
seconds = time.perf_counter() - began
difference = None
if len(sys.argv) > 3:  # the reference's scores of the first queries
    reference = np.load(sys.argv[3])
    if method == "k-reciprocal":
        scores, sign = KReciprocalScores(query, gallery, settings.k_reciprocal), -1
    else:
        scores, sign = DiffusionScores(query, gallery, settings.diffusion), 1
    rows = torch.arange(len(reference))
    ours = sign * scores(rows, torch.from_numpy(query[:len(reference)] @ gallery.T)).numpy()
    difference = float(np.abs(ours - reference).max())
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
print(json.dumps({"plain_seconds": plain_seconds, "seconds": seconds, "peak_mib": peak, "difference": difference,
                  "plain": plain, "re_ranked": re_ranked}))
"""

REFERENCE = """
import importlib.util, re, sys, time, json
from pathlib import Path
import numpy as np
method, data = sys.argv[1], np.load(sys.argv[2])
query, gallery = data["query"], data["gallery"]  # float32: neighbours ranked as unicom's search ranks them
began = time.perf_counter()
if method == "k-reciprocal":
    folder = Path(importlib.util.find_spec("torchreid").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("rerank", folder / "reid" / "utils" / "rerank.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    distance = lambda a, b: np.sqrt(np.maximum(2 - 2 * a @ b.T, 0))
    final = module.re_ranking(distance(query, gallery), distance(query, query), distance(gallery, gallery),
                              k1=20, k2=6, lambda_value=0.3)
else:  # the dense system of k = 50 reciprocal neighbours, gamma 3, alpha 0.99, and its solve
    k, n = 50, len(gallery)
    s = (gallery @ gallery.T).astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    nearest = np.argsort(-s, axis=1, kind="stable")[:, :k]
    among = np.zeros((n, n), dtype=bool)
    among[np.repeat(np.arange(n), k), nearest.reshape(-1)] = True
    np.fill_diagonal(s, 0)
    a = np.where(among & among.T, np.maximum(s, 0) ** 3, 0.0)
    del s, among
    degree = a.sum(axis=1)
    scale = np.where(degree > 0, 1 / np.sqrt(np.where(degree > 0, degree, 1)), 0)
    system = np.eye(n) - 0.99 * (scale[:, None] * a * scale[None, :])
    del a
    sq = (query @ gallery.T).astype(np.float64)
    start = np.zeros_like(sq)
    top = np.argsort(-sq, axis=1, kind="stable")[:, :k]
    rows = np.repeat(np.arange(len(query)), k)
    start[rows, top.reshape(-1)] = np.maximum(sq[rows, top.reshape(-1)], 0) ** 3
    f = np.linalg.solve(system, start.T).T
    final = np.where(f > 0, f, sq - 2)
seconds = time.perf_counter() - began
np.save(sys.argv[3], final[:200])
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
print(json.dumps({"seconds": seconds, "peak_mib": peak}))
"""


def make_data(n: int, seed: int, smallest: int, largest: int) -> tuple[np.ndarray, np.ndarray]:
    """n unit rows in classes of ``smallest`` to ``largest`` (class centres plus noise),
    shuffled: float32, labels."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(smallest, largest + 1, n)
    labels = np.repeat(np.arange(n), sizes)[:n]
    x = rng.standard_normal((labels.max() + 1, DIM))[labels] + NOISE * rng.standard_normal((n, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(n)
    return x[order].astype(np.float32), labels[order]


def run(code: str, *argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, text=True,
                          env={**os.environ, "UNICOM_PROGRESS": "0"})
    return json.loads(done.stdout.splitlines()[-1])


TABLES = {  # method: (title, sizes, class sizes, the reference's name)
    "k-reciprocal": ("k-reciprocal re-ranking (k1 = 20, k2 = 6, λ = 0.3) against the authors' code",
                     K_RECIPROCAL_SIZES, (2, 9), "torchreid's re_ranking, dense numpy, on the same distances"),
    "diffusion": ("diffusion (k = 50, γ = 3, α = 0.99) against a dense solve", DIFFUSION_SIZES, (20, 100),
                  "the same system built dense and solved by numpy.linalg.solve"),
}
SMOKE_SIZES = {"k-reciprocal": [(100, 400), (300, 0)], "diffusion": [(10, 400)]}


def parsed_arguments(description: str, result: Path) -> argparse.Namespace:
    """``--out`` (default ``result``) and ``--smoke`` of a benchmark of re-rankings."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=result)
    parser.add_argument("--smoke", action="store_true", help="small sizes only (a check that the script runs)")
    return parser.parse_args()


def machine() -> str:
    """The opening of a result file's line about where it ran and on what data."""
    return f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores; {DIM}-d unit rows"


def change(plain: dict, re_ranked: dict) -> str:
    """The table cells ``Recall@1 plain → re-ranked | MAP@R plain → re-ranked |`` in %."""
    return (f"{100 * plain['recall@1']:.2f} → {100 * re_ranked['recall@1']:.2f} | "
            f"{100 * plain['map@r']:.2f} → {100 * re_ranked['map@r']:.2f} |")


def published(lines: list[str], args: argparse.Namespace) -> int:
    """Print the result file's ``lines`` and write them to ``--out`` (not with ``--smoke``)."""
    text = "\n".join(lines).rstrip("\n") + "\n"
    print(text)
    if not args.smoke:
        args.out.write_text(text)
    return 0


def main() -> int:
    args = parsed_arguments(__doc__.split("\n\n")[0], RESULT)
    lines = ["# The cost of re-scoring a search: unicom against the reference computations", "",
             f"{machine()} (class centres plus noise); seconds and peak resident MiB of a process each (the libraries "
             "included);",
             "the references run where their gallery x gallery arrays fit; difference: the largest |ours - its| "
             "re-ranked score over the first 200 queries.", ""]
    with tempfile.TemporaryDirectory() as scratch:
        for method, (title, sizes, (smallest, largest), reference_name) in TABLES.items():
            lines += [f"## {title}", "", f"Classes of {smallest} to {largest}; the reference: {reference_name}.", "",
                      "| queries | gallery | plain search s | re-ranked s | MiB | reference s | reference MiB | "
                      "difference | Recall@1 plain → re-ranked | MAP@R plain → re-ranked |",
                      "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
            for number, (queries, gallery_size) in enumerate(SMOKE_SIZES[method] if args.smoke else sizes):
                x, labels = make_data(queries + gallery_size, number, smallest, largest)
                data = Path(scratch) / f"{method}{number}.npz"
                np.savez(data, query=x[:queries], query_labels=labels[:queries], gallery=x[queries:],
                         gallery_labels=labels[queries:])
                reference = None
                if gallery_size and queries + gallery_size <= REFERENCE_ITEMS:
                    scores = Path(scratch) / f"{method}{number}.npy"
                    reference = run(REFERENCE, method, str(data), str(scores))
                    ours = run(UNICOM, method, str(data), str(scores))
                else:
                    ours = run(UNICOM, method, str(data))
                plain, re_ranked = ours["plain"], ours["re_ranked"]
                lines.append(
                    f"| {queries:,} | {f'{gallery_size:,}' if gallery_size else 'leave-one-out'} | "
                    f"{ours['plain_seconds']:.2f} | {ours['seconds']:.2f} | {ours['peak_mib']:,.0f} | "
                    + (f"{reference['seconds']:.2f} | {reference['peak_mib']:,.0f} | {ours['difference']:.1e} | "
                       if reference else "not run | | | ")
                    + change(plain, re_ranked))
                print(lines[-1], file=sys.stderr, flush=True)  # progress; the tables go to stdout
            lines.append("")
    return published(lines, args)


if __name__ == "__main__":
    raise SystemExit(main())
