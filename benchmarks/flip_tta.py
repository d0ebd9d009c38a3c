"""Test-time mirroring (``unicom evaluate --flip``) on the demo's held-out glyphs: what it gains or loses, and what it costs.

`make demo` trains a small network on glyphs and evaluates it on held-out characters
(queries of half of the fonts against the other half's glyphs, clean and varied). This script
evaluates the same networks on the same lists again with ``unicom evaluate``'s
``--flip`` (each image embedding the mean of the image's features and its mirror image's)
and without it, each run embedding the images afresh and timed (after one run that warms
up), and counts the queries whose nearest gallery glyph the mirroring changes. A third set
of queries, the clean ones mirrored (written by this script), shows the other side: with
``--flip`` an image and its mirror have the same embedding, so mirrored queries score as the
clean ones do. Letters are not mirror-symmetric (a mirrored "b" is a
"d"): the table shows what mirroring does where the classes are not closed under it, which
is the case to know before using it on text, logos or digits.

Run ``make demo`` first, then ``python benchmarks/flip_tta.py [--demo runs/demo]``; it
prints the table and writes ``benchmarks/results/flip_tta.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULT = Path(__file__).parent / "results" / "flip_tta.txt"
PROTOCOLS = ("clean", "varied", "mirrored")
NETWORKS = {"train": "the trained network", "compact": "after the compact epoch", "untrained": "at its random initialisation"}


def mirrored_queries(listed: Path, folder: Path) -> Path:
    """A copy of the list ``listed`` (``path,label,split``) whose query images are mirrored
    left to right (written under ``folder``), its gallery the same files; returns its path."""
    import csv

    from PIL import Image, ImageOps

    rows = []
    with open(listed, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            source = (listed.parent / row["path"]).resolve()
            if row["split"] == "query":
                target = folder / row["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(source) as image:
                    ImageOps.mirror(image).save(target)
                source = target
            rows.append({**row, "path": str(source)})
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "mirrored.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "mirrored.csv"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="the folder make demo wrote")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    import numpy as np
    import torch

    from unicom.evaluate.benchmark import evaluate_benchmark
    from unicom.formats.embeddings import read_embedding_folder

    lists = {protocol: args.demo / "data" / "held_out" / f"{protocol}.csv" for protocol in PROTOCOLS[:2]}
    models = {network: args.demo / network / "model" for network in NETWORKS}
    missing = [str(p) for p in (*lists.values(), *models.values()) if not p.exists()]
    if missing:
        print(f"{args.demo}: no held-out lists or models of make demo ({missing[0]} missing); run make demo first",
              file=sys.stderr)
        return 1
    threads = torch.get_num_threads()
    lines = [
        "# Test-time mirroring (--flip) on the demo's held-out glyphs",
        "",
        f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, {threads} threads, "
        f"{os.cpu_count()} CPUs; the demo's networks ({args.demo});",
        "queries of half of the fonts against the other half's clean glyphs; metrics in %; seconds for the",
        "whole evaluation, the images embedded afresh (query and gallery); nearest changed: the share of",
        "queries whose nearest gallery glyph differs from the one without --flip. Mirrored: the clean",
        "queries mirrored left to right (the gallery as it is).",
        "",
        "| queries | network | flip | Recall@1 | Recall@4 | MAP@R | R-Precision | seconds | nearest changed |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        lists["mirrored"] = mirrored_queries(lists["clean"], Path(scratch) / "mirrored")
        with contextlib.redirect_stdout(io.StringIO()):  # the first run loads what every later one reuses
            evaluate_benchmark("csv", lists["clean"], out=Path(scratch) / "warm-up", model=str(models["train"]),
                               ks=(1, 4), dims=(), pca=False, num_workers=0)
        for protocol in PROTOCOLS:
            for network, title in NETWORKS.items():
                embedded = {}
                for flip in (False, True):
                    out = Path(scratch) / f"{protocol}-{network}-{flip}"
                    began = time.perf_counter()
                    with contextlib.redirect_stdout(io.StringIO()):
                        report = evaluate_benchmark("csv", lists[protocol], out=out, model=str(models[network]),
                                                    ks=(1, 4), dims=(), pca=False, num_workers=0, flip=flip)
                    seconds = time.perf_counter() - began
                    assert bool(report.get("flip")) == flip, "the report does not say how it embedded"
                    query = read_embedding_folder(out / "embeddings" / "query")[0]
                    gallery = read_embedding_folder(out / "embeddings" / "gallery")[0]
                    embedded[flip] = np.argmax(query @ gallery.T, axis=1)
                    m = report["metrics"]
                    changed = "" if not flip else f"{100 * float(np.mean(embedded[False] != embedded[True])):.2f}"
                    lines.append(f"| {protocol} | {title} | {'yes' if flip else 'no'} | {100 * m['recall@1']:.2f} | "
                                 f"{100 * m['recall@4']:.2f} | {100 * m['map@r']:.2f} | {100 * m['r_precision']:.2f} | "
                                 f"{seconds:.2f} | {changed} |")
                    print(lines[-1], file=sys.stderr)
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
