"""How many steps a small from-scratch run needs: held-out Recall@1 against training steps.

The demo's data (``unicom.demo``: about 290 characters drawn in matplotlib's 21 fonts, a
third of the characters held out), its clustering features (16x16 pixels) and its k-means
pseudo-labels (k = the number of training characters, about 190, on about 3,300 images)
are made once; then ``unicom train`` runs the recipe ``scratch_small`` and variants of it
(:data:`RUNS`) for several numbers of steps (each run its own cosine schedule, so a row is
what a run of that length gives). Every trained network is scored by ``unicom evaluate`` on the
held-out characters, clean and varied queries against clean gallery glyphs (the demo's
protocol), beside the pixels and the untrained network.

Usage: python benchmarks/scratch_small.py [--runs all] [--steps 400,800] [--work runs/scratch_small] [--threads 1]
Writes benchmarks/results/scratch_small.txt, benchmarks/results/scratch_small.json and
benchmarks/results/scratch_small.png. Runs already in --work are read back, not repeated.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

from unicom.engine.recipe import recipe_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = recipe_file("scratch_small")
RESULTS = ROOT / "benchmarks" / "results"

# The recipe tried first: patches of 4 pixels (64 tokens), timm's RandAugment with all its operations at
# magnitude 9, crops down to half the area, s 32.
FIRST = ["model.patch_size=4", "augment.crop_scale=[0.5,1.0]", "augment.crop_ratio=[0.75,1.33]",
         "augment.randaugment=rand-m9-mstd0.5", "loss.scale=32"]
GEOMETRIC = ["augment.crop_scale=[0.7,1.0]", "augment.crop_ratio=[0.85,1.18]",
             "augment.randaugment=rand-m4-n2-p0.8-mstd0.5-tweights"]  # rotation, shear, translation weighted up
# name: (overrides of the recipe scratch_small, run lengths measured)
RUNS = {
    "scratch_small.yaml": ([], (100, 200, 400, 800, 1600, 2400)),
    "first try: patch 4, RandAugment m9 (all ops), crops 0.5-1, s 32": (FIRST, (100, 200, 400, 800, 1600)),
    "first try, lr 5e-3": ([*FIRST, "optim.lr=0.005"], (400,)),
    "first try, s 16": ([*FIRST, "loss.scale=16"], (400,)),
    "patch 4 (64 tokens), crops 0.85-1": (["model.patch_size=4", "augment.crop_scale=[0.85,1.0]"], (400,)),
    "patch 4, RandAugment weighted to geometry (m4), crops 0.7-1": (["model.patch_size=4", *GEOMETRIC], (400, 800)),
    "RandAugment weighted to geometry (m4), crops 0.7-1": (GEOMETRIC, (800,)),
    "RandAugment weighted to geometry (m3, one op), crops 0.85-1": (
        ["augment.crop_scale=[0.85,1.0]", "augment.randaugment=rand-m3-n1-mstd0.5-tweights"], (800,)),
    "crops 0.85-1": (["augment.crop_scale=[0.85,1.0]"], (400, 800, 1600)),
    "crops 0.6-1": (["augment.crop_scale=[0.6,1.0]", "augment.crop_ratio=[0.75,1.33]"], (800,)),
    "s 32": (["loss.scale=32"], (800,)),
    "sample_rate 0.1, batch 32": (["loss.sample_rate=0.1", "data.batch_size=32"], (800,)),
}


def unicom(arguments: list[str], quiet: bool = True) -> None:
    from unicom.cli import main

    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        code = main(arguments)
    if code != 0:
        raise SystemExit(f"unicom {arguments[0]} failed: {' '.join(arguments)}")


def prepare(work: Path, k: int | None = None) -> dict:
    """The demo's dataset, clustering features and pseudo-labels under ``work`` (made once);
    ``k`` pseudo-classes (default: as many as training characters)."""
    from unicom.demo import write_clustering_features, write_dataset

    data = work / "data"
    if not (work / "dataset.json").is_file():
        sizes = write_dataset(data)
        write_clustering_features(data / "shards", work / "features")
        unicom(["cluster", "--embeddings", str(work / "features"), "--fusion", "image", "--k", str(k or sizes["train_classes"]),
                "--init", "kmeans++", "--out", str(work / "clusters")])
        (work / "dataset.json").write_text(json.dumps({**sizes, "k": k or sizes["train_classes"]}))
    return json.loads((work / "dataset.json").read_text())


def evaluate(work: Path, name: str, source: list[str]) -> dict[str, float]:
    """Recall@1 of clean and varied held-out queries for a model (or the pixel folders)."""
    scores = {}
    for protocol in ("clean", "varied"):
        folder = work / "evaluate" / name / protocol
        if not (folder / "metrics.json").is_file():
            table = work / "data" / "held_out" / f"{protocol}.csv"
            if source[0] == "pixels":
                from unicom.demo import write_pixel_layouts

                pixels = write_pixel_layouts(table, work / "pixels" / protocol)
                arguments = ["--embeddings", str(pixels["query"]), "--gallery-embeddings", str(pixels["gallery"])]
            else:
                arguments = [*source, "--dataset", "csv", "--root", str(table)]
            unicom(["evaluate", *arguments, "--ks", "1", "--dims", "none", "--no-pca", "--num-workers", "0",
                    "--out", str(folder)])
        scores[protocol] = json.loads((folder / "metrics.json").read_text())["metrics"]["recall@1"]
    return scores


def train(work: Path, name: str, steps: int, overrides: list[str]) -> dict:
    """One ``unicom train`` run of the recipe (skipped when its model exists) and its scores."""
    out = work / "runs" / name
    if not (out / "model" / "unicom_model.json").is_file():
        began = time.perf_counter()
        unicom(["train", "--config", str(RECIPE), f"out={out}", f"data.shards={work / 'data' / 'shards'}",
                f"data.labels={work / 'clusters'}", f"train.steps={steps}", "checkpoint.every=100000", "log.every=100",
                *overrides], quiet=False)
        (out / "seconds.txt").write_text(f"{time.perf_counter() - began:.1f}")
    summary = json.loads((out / "summary.json").read_text())
    return {"steps": steps, "final_loss": summary["final_loss"], "seconds": float((out / "seconds.txt").read_text()),
            **evaluate(work, name, ["--model", str(out / "model")])}


def untrained(work: Path) -> dict[str, float]:
    from unicom.demo import untrained_model
    from unicom.train.config import load_config

    folder = work / "untrained_model"
    if not (folder / "unicom_model.json").is_file():
        config = load_config(RECIPE, [f"out={work / 'unused'}", f"data.shards={work / 'data' / 'shards'}",
                                      f"data.labels={work / 'clusters'}"])
        untrained_model(config, folder)
    return evaluate(work, "untrained", ["--model", str(folder)])


def plot(curves: dict[str, list[dict]], baselines: dict[str, dict[str, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for axis, protocol in zip(axes, ("clean", "varied")):
        for name, runs in curves.items():
            axis.plot([r["steps"] for r in runs], [100 * r[protocol] for r in runs], marker="o", label=name)
        for (name, scores), style in zip(baselines.items(), (":", "--")):
            axis.axhline(100 * scores[protocol], color="grey", linestyle=style, linewidth=1, label=name)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("training steps (each a run with its own cosine schedule)")
        axis.set_title(f"{protocol} queries")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("Recall@1, held-out characters (%)")
    axes[1].legend(fontsize=7)
    figure.suptitle("the recipe scratch_small on the demo's glyphs (batch 64)", fontsize=10)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="all", help="'all' or names of RUNS joined by ';'")
    parser.add_argument("--steps", default=None, help="run lengths, e.g. 400,800 (default: each run's own in RUNS)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "scratch_small")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--k", type=int, default=None, help="pseudo-classes (default: the number of training characters)")
    args = parser.parse_args()
    os.environ.setdefault("UNICOM_PROGRESS", "0")
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = prepare(args.work, args.k)
    baselines = {"pixels (clustering features)": evaluate(args.work, "pixels", ["pixels"]),
                 "untrained network": untrained(args.work)}
    names = list(RUNS) if args.runs == "all" else args.runs.split(";")
    results = {}
    for name in names:
        overrides, lengths = RUNS[name]
        for steps in (lengths if args.steps is None else [int(v) for v in args.steps.split(",")]):
            tag = "".join(c if c.isalnum() else "_" for c in name) + f"_{steps}"
            results.setdefault(name, []).append(train(args.work, tag, steps, overrides))
            print(f"{name}, {steps} steps: {results[name][-1]}", flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    header = [
        "# the recipe scratch_small: held-out Recall@1 against training steps",
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads (the machine was shared: seconds are indicative)",
        f"data: {sizes['train_images']} training glyphs of {sizes['train_classes']} characters (k-means k = "
        f"{sizes['k']} on 16x16 pixels), {sizes['queries']} queries and {sizes['gallery']} gallery glyphs of "
        f"{sizes['held_out_classes']} held-out characters",
        "",
        "| features | overrides of scratch_small.yaml | steps | clean queries R@1 | varied queries R@1 | final loss | s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    rows = [f"| {name} | | 0 | {100 * v['clean']:.1f} | {100 * v['varied']:.1f} | | |" for name, v in baselines.items()]
    rows += [f"| {name} | `{' '.join(RUNS[name][0])}` | {r['steps']} | {100 * r['clean']:.1f} | {100 * r['varied']:.1f} | "
             f"{r['final_loss']:.3f} | {r['seconds']:.0f} |" for name, runs in results.items() for r in runs]
    (RESULTS / "scratch_small.txt").write_text("\n".join(header + rows) + "\n")
    (RESULTS / "scratch_small.json").write_text(json.dumps(
        {"dataset": sizes, "baselines": baselines, "runs": results}, indent=1) + "\n")
    curves = {name: runs for name, runs in results.items() if len(runs) > 1}
    if curves:
        plot(curves, baselines, RESULTS / "scratch_small.png")
    print("\n".join(header + rows))


if __name__ == "__main__":
    main()
