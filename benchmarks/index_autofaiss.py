"""unicom's automatic index against autofaiss at 1/8 and 1/4 of the exact index's memory.

Run (about an hour on 2 loaded cores)::

    flock /tmp/unicom-heavy.lock python benchmarks/index_autofaiss.py

Writes ``benchmarks/results/index_autofaiss.txt``. The collection: 500,000 x 256 float32
unit vectors from the clustered generator of ``index_1m.py`` (same settings), written as an
embedding folder (its ``write_collection``) under ``--data`` (default ``/tmp/unicom-bench-autofaiss``, reused). For
each budget B (1/8 and 1/4 of 4 x 500,000 x 256 bytes):

* ``unicom``      ``Index.build(memory_budget=B)``: the budget spent on recall;
* ``unicom-pq``   (with ``--runs``) ``Index.build(memory_budget=B, index_type="ivfpq")``: the
  largest PQ code that fits, tuned by the recall objective (the code chosen before IVF-SQ);
* ``unicom-0.95`` ``Index.build(memory_budget=B, recall_target=0.95)``: the smallest index
  within B that reaches recall@10 0.95 on the held-out sample (at 1/4 only);
* ``autofaiss``   ``autofaiss.build_index(max_index_memory_usage=B, metric_type="ip")`` on the
  same ``img_emb/`` folder, with its default speed bound (10 ms per query), and the metadata
  copied beside it: the folder ``clip-retrieval index`` writes.

autofaiss needs numpy < 2, so it runs in its own virtual environment, created by this
script under ``--data`` (``pip install autofaiss``); it is never a dependency of unicom.
Every index, autofaiss' included, is then opened with ``unicom.Index.load`` in a fresh
process (``index_1m.py --measure``), which measures its resident memory, the queries/s of
a batch of 1,000 new queries and their recall@10 against exact search. autofaiss' folder
is also searched with faiss itself, to check that ``Index.load`` answers exactly as faiss
does (ids equal, scores equal). Each run's measurements are kept beside its index
(``--data/{run}-{fraction}.json``) and reused by the next run of the script (``--again``
redoes them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from index_1m import DIMS, GENERATOR, PARTS, clustered_collection, exact_neighbours, write_collection  # noqa: E402

ROWS = 500_000  # DIMS and PARTS as index_1m.py
QUERIES, K = 1000, 10
# autofaiss needs numpy < 2, so pyarrow < 18; it calls faiss.OPQMatrix(M=...), a keyword faiss dropped after 1.7
AUTOFAISS = ("autofaiss>=2.17,<3", "faiss-cpu>=1.7.3,<1.8", "pyarrow<18")

AUTOFAISS_BUILD = """
import json, shutil, sys, time
from autofaiss import build_index
emb, out, budget, cores = sys.argv[1:5]
start = time.perf_counter()
_, infos = build_index(embeddings=emb + "/img_emb", index_path=out + "/image.index", index_infos_path=out + "/image.json",
                       max_index_memory_usage=budget + "B", current_memory_available="12G", nb_cores=int(cores),
                       metric_type="ip", verbose=30)
seconds = time.perf_counter() - start
shutil.copytree(emb + "/metadata", out + "/metadata", dirs_exist_ok=True)
print(json.dumps({"seconds": seconds, "infos": infos}))
"""


def autofaiss_python(data: Path) -> Path:
    """The Python of a virtual environment with autofaiss, created on first use."""
    venv = data / "autofaiss-venv"
    python = venv / "bin" / "python"
    probe = "import autofaiss, faiss; faiss.OPQMatrix(8, M=2, d2=8)"
    if not python.is_file() or subprocess.run([str(python), "-c", probe], capture_output=True).returncode:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *AUTOFAISS], check=True)
    return python


def measure(index: Path, data: Path) -> dict:
    """Open ``index`` with unicom.Index.load in a fresh process (index_1m.py --measure)."""
    script = Path(__file__).parent / "index_1m.py"
    result = subprocess.run([sys.executable, str(script), "--measure", str(index), str(data / "queries.npy"),
                             str(data / "truth.npy")], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def same_as_faiss(folder: Path, queries: np.ndarray) -> dict:
    """Index.load's answers for the autofaiss folder against faiss' own search of image.index."""
    import faiss

    from unicom.search.index import Index

    ours_scores, ours_ids = Index.load(folder).search(queries, K)
    unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores, ids = faiss.read_index(str(folder / "image.index")).search(np.ascontiguousarray(unit, dtype=np.float32), K)
    return {"ids_equal": bool(np.array_equal(ids, ours_ids)), "max_score_difference": float(np.abs(scores - ours_scores).max())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/tmp/unicom-bench-autofaiss", help="where the collection and indexes go")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "index_autofaiss.txt"))
    parser.add_argument("--rows", type=int, default=ROWS, help=f"collection size (default {ROWS:,}; smaller for a trial run)")
    parser.add_argument("--runs", default="unicom,autofaiss,unicom-0.95",
                        help="comma-separated builds: unicom, autofaiss, unicom-0.95, unicom-pq")
    parser.add_argument("--budgets", default="8,4", help="comma-separated fractions of the exact memory (default: 8,4)")
    parser.add_argument("--again", action="store_true", help="rebuild and measure runs measured before")
    args = parser.parse_args()
    os.environ.setdefault("UNICOM_PROGRESS", "0")
    rows = args.rows // PARTS * PARTS

    import faiss

    from unicom.search.index import Index
    from unicom.search.planner import flat_memory

    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    runs = args.runs.split(",")
    python = autofaiss_python(data) if "autofaiss" in runs else None
    version = subprocess.run([str(python), "-c", "import autofaiss, faiss, numpy; print(autofaiss.__version__ if hasattr("
                              "autofaiss, '__version__') else '?', faiss.__version__, numpy.__version__)"],
                             capture_output=True, text=True).stdout.split() if python else []
    say(f"# index_autofaiss: {rows:,} x {DIMS} float32, recall@{K} of {QUERIES} new queries against exact search")
    say(f"# machine: {platform.machine()}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at the start), faiss "
        f"{faiss.__version__}, python {platform.python_version()}"
        + (f"; autofaiss {version[0]} (faiss {version[1]}, numpy {version[2]}) in its own venv" if version else ""))
    say(f"# collection: clustered synthetic, {', '.join(f'{k}={v}' for k, v in GENERATOR.items())} (index_1m.py)")
    write_collection(data / "emb", rows)
    from unicom.formats.embeddings import EmbeddingFolders

    folders = EmbeddingFolders.from_root(data / "emb")
    queries = next(clustered_collection(QUERIES, DIMS, 1, **GENERATOR))
    _, truth = exact_neighbours((folders.load("image", number) for number in range(PARTS)), queries, K)
    np.save(data / "queries.npy", queries)
    np.save(data / "truth.npy", truth)
    exact_bytes = flat_memory(rows, DIMS)
    results = []
    fractions = [int(value) for value in args.budgets.split(",")]
    for fraction in fractions:
        budget = exact_bytes // fraction
        for run in runs:
            if run == "unicom-0.95" and fraction != 4:
                continue
            out = data / f"{run}-{fraction}"
            saved = out.parent / f"{out.name}.json"  # a finished run's measurements: kept, unless --again
            if saved.is_file() and not args.again:
                results.append(tuple(json.loads(saved.read_text())))
                say(f"# 1/{fraction}: {run} measured by an earlier run of this script (--again to redo)")
                continue
            shutil.rmtree(out, ignore_errors=True)
            say(f"# 1/{fraction} ({budget / 2**20:.1f} MiB): building {run} ...")
            start = time.perf_counter()
            check = None
            if run == "autofaiss":
                out.mkdir(parents=True)
                built = subprocess.run([str(python), "-c", AUTOFAISS_BUILD, str(data / "emb"), str(out), str(budget),
                                        str(os.cpu_count())], capture_output=True, text=True)
                if built.returncode:
                    say(f"#   autofaiss failed: {built.stderr.strip().splitlines()[-1]}")
                    continue
                report = json.loads(built.stdout.strip().splitlines()[-1])
                seconds = report["seconds"]
                structure, search = report["infos"]["index_key"], report["infos"]["index_param"]
                check = same_as_faiss(out, queries)
            else:
                options = {"unicom": {}, "unicom-pq": {"index_type": "ivfpq"},
                           "unicom-0.95": {"recall_target": 0.95}}[run]
                index = Index.build(data / "emb", out, memory_budget=budget, **options)
                seconds = time.perf_counter() - start
                structure = index.config["structure"]
                search = ",".join(f"{k}={v}" for k, v in index.config["search"].items())
                if run == "unicom-0.95":
                    tried = index.config["selection"]["tried"]
                    say("#   tried: " + "; ".join(f"{t['structure']} {t['search']} recall {t['recall']}" for t in tried))
                del index
            measured = measure(out, data)
            results.append((fraction, run, structure, search, seconds, measured, check))
            saved.write_text(json.dumps(results[-1]))
            say(f"#   {structure} {search}: built in {seconds:.0f} s, recall@{K} {measured['recall']:.4f}"
                + (f"; Index.load vs faiss itself: ids equal {check['ids_equal']}, largest score difference "
                   f"{check['max_score_difference']:.2g}" if check else ""))

    say()
    header = (f"{'budget':<7} {'index':<12} {'structure':<34} {'search':<24} {'build s':>8} {'file MiB':>9} "
              f"{'RSS MiB':>8} {'batch q/s':>10} {'recall@10':>9}")
    say(header)
    say("-" * len(header))
    for fraction, run, structure, search, seconds, m, _ in results:
        say(f"1/{fraction:<5} {run:<12} {structure[:34]:<34} {search[:24]:<24} {seconds:>8.0f} "
            f"{m['file_bytes'] / 2**20:>9.1f} {m['resident_bytes'] / 2**20:>8.1f} {m['batch_qps']:>10.0f} {m['recall']:>9.4f}")
    say()
    say(f"budget: a fraction of the exact index ({exact_bytes / 2**20:.1f} MiB). RSS: resident growth while Index.load "
        "opens the folder (autofaiss' too). batch q/s: 1,000 queries in one call.")
    say(f"Runs kept from earlier invocations (lines '# ... measured by an earlier run') were built and measured at "
        f"other times: on a shared machine build s and q/s then depend on its load (load average now "
        f"{os.getloadavg()[0]:.1f}); recall@10 does not.")
    for fraction in fractions:
        by_run = {run: m for f, run, _, _, _, m, _ in results if f == fraction}
        if "unicom" in by_run and "autofaiss" in by_run:
            ours, af = by_run["unicom"], by_run["autofaiss"]
            say(f"1/{fraction}: unicom recall@10 {ours['recall']:.4f} vs autofaiss {af['recall']:.4f}; "
                f"{ours['batch_qps'] / af['batch_qps']:.1f}x the batch queries/s, "
                f"{ours['file_bytes'] / af['file_bytes']:.2f}x the memory")
    for fraction, run, _, _, _, _, check in results:
        if check:
            say(f"1/{fraction}: Index.load on autofaiss' folder against faiss' own search of image.index: ids equal "
                f"{check['ids_equal']}, largest score difference {check['max_score_difference']:.2g}")
        if run == "unicom-0.95":
            tried = json.loads((data / f"{run}-{fraction}" / "index.json").read_text())["selection"]["tried"]
            say(f"1/{fraction}: unicom-0.95 tried, smallest first (held-out recall@10): "
                + "; ".join(f"{t['structure']} {t['search']} {t['recall']}" for t in tried))
    # the same autofaiss codes searched as widely as unicom's index is: the code, apart from the speed bound
    from unicom.search.planner import recall_at_k

    for fraction in fractions:
        ours = next((r for r in results if r[0] == fraction and r[1] == "unicom"), None)
        folder = data / f"autofaiss-{fraction}"
        if ours is None or "nprobe=" not in ours[3] or not (folder / "image.index").is_file():
            continue
        nprobe = int(ours[3].split("nprobe=")[1].split(",")[0])
        index = Index.load(folder)
        index.search(queries[:10], K, nprobe=nprobe)
        start = time.perf_counter()
        _, ids = index.search(queries, K, nprobe=nprobe)
        seconds = time.perf_counter() - start
        say(f"1/{fraction}: autofaiss' index searched with unicom's nprobe={nprobe}: recall@10 "
            f"{recall_at_k(ids, truth):.4f}, {QUERIES / seconds:.0f} batch queries/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
