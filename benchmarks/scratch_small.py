"""How many steps a small from-scratch run needs: held-out Recall@1 against training steps.

The demo's data (``unicom.demo``: about 290 characters drawn in matplotlib's 21 fonts, a
third of the characters held out), its clustering features (16x16 pixels) and its k-means
pseudo-labels (k = the number of training characters, about 190, on about 3,300 images)
are made once; then ``unicom train`` runs ``configs/scratch_small.yaml`` for each number of
steps (each run its own cosine schedule, so a row is what a run of that length gives), and
variants of it at one length. Every trained network is scored by ``unicom evaluate`` on the
held-out characters, clean and varied queries against clean gallery glyphs (the demo's
protocol), beside the pixels and the untrained network.

Usage: python benchmarks/scratch_small.py [--steps 100,200,400,800,1600] [--variants all] [--work runs/scratch_small]
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

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "scratch_small.yaml"
RESULTS = ROOT / "benchmarks" / "results"

# name: (overrides of the recipe, what it tests); each runs at --variant-steps
VARIANTS = {
    "old demo recipe (s 16, 20-class settings)": (
        ["loss.scale=16", "augment.crop_scale=[0.85,1.0]", "augment.crop_ratio=[0.8,1.25]", "augment.randaugment=null"],
        "the digits demo's recipe: mild crops, no RandAugment, s 16"),
    "sample_rate 0.1, batch 32": (["loss.sample_rate=0.1", "data.batch_size=32"], "r1 of the paper at small k"),
    "scale 64": (["loss.scale=64"], "the paper's s"),
    "no warm-up": (["schedule.warmup_fraction=0"], "lr at its peak from step 1"),
    "no RandAugment": (["augment.randaugment=null"], "crops only"),
    "lr 5e-4": (["optim.lr=0.0005"], "a quarter of the recipe's lr"),
}


def unicom(arguments: list[str], quiet: bool = True) -> None:
    from unicom.cli import main

    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        code = main(arguments)
    if code != 0:
        raise SystemExit(f"unicom {arguments[0]} failed: {' '.join(arguments)}")


def prepare(work: Path) -> dict:
    """The demo's dataset, clustering features and pseudo-labels under ``work`` (made once)."""
    from unicom.demo import write_clustering_features, write_dataset

    data = work / "data"
    if not (work / "dataset.json").is_file():
        sizes = write_dataset(data)
        write_clustering_features(data / "shards", work / "features")
        unicom(["cluster", "--embeddings", str(work / "features"), "--fusion", "image", "--k", str(sizes["train_classes"]),
                "--init", "kmeans++", "--out", str(work / "clusters")])
        (work / "dataset.json").write_text(json.dumps(sizes))
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


def plot(curve: list[dict], baselines: dict[str, dict[str, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6))
    steps = [row["steps"] for row in curve]
    for protocol, marker in (("varied", "o"), ("clean", "s")):
        line, = axis.plot(steps, [100 * row[protocol] for row in curve], marker=marker, label=f"trained, {protocol} queries")
        for (name, scores), style in zip(baselines.items(), (":", "--")):
            axis.axhline(100 * scores[protocol], color=line.get_color(), linestyle=style, linewidth=1,
                         label=f"{name}, {protocol} queries")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("training steps (each a run with its own cosine schedule)")
    axis.set_ylabel("Recall@1, held-out characters (%)")
    axis.set_title("configs/scratch_small.yaml on the demo's glyphs")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="100,200,400,800,1600", help="run lengths of the curve")
    parser.add_argument("--variants", default="all", help="'all', 'none' or names of VARIANTS joined by ';'")
    parser.add_argument("--variant-steps", type=int, default=800)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "scratch_small")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("UNICOM_PROGRESS", "0")
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = prepare(args.work)
    baselines = {"pixels (clustering features)": evaluate(args.work, "pixels", ["pixels"]),
                 "untrained network": untrained(args.work)}
    curve = []
    for steps in (int(s) for s in args.steps.split(",")):
        curve.append(train(args.work, f"recipe_{steps}", steps, []))
        print(f"{steps} steps: {curve[-1]}", flush=True)
    names = list(VARIANTS) if args.variants == "all" else [] if args.variants == "none" else args.variants.split(";")
    variants = {}
    for name in names:
        overrides, _ = VARIANTS[name]
        tag = "variant_" + "".join(c if c.isalnum() else "_" for c in name)
        variants[name] = train(args.work, tag, args.variant_steps, overrides)
        print(f"{name}: {variants[name]}", flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    header = [
        "# configs/scratch_small.yaml: held-out Recall@1 against training steps",
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads (the machine was shared: seconds are indicative)",
        f"data: {sizes['train_images']} training glyphs of {sizes['train_classes']} characters (k-means k = "
        f"{sizes['train_classes']} on 16x16 pixels), {sizes['queries']} queries and {sizes['gallery']} gallery glyphs of "
        f"{sizes['held_out_classes']} held-out characters",
        "",
        "| features | steps | clean queries R@1 | varied queries R@1 | final loss | s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [f"| {name} | 0 | {100 * s['clean']:.1f} | {100 * s['varied']:.1f} | | |" for name, s in baselines.items()]
    rows += [f"| scratch_small.yaml | {r['steps']} | {100 * r['clean']:.1f} | {100 * r['varied']:.1f} | "
             f"{r['final_loss']:.3f} | {r['seconds']:.0f} |" for r in curve]
    rows += ["", f"## Variants at {args.variant_steps} steps", "",
             "| variant | overrides | clean queries R@1 | varied queries R@1 | final loss | s |", "|---|---|---:|---:|---:|---:|"]
    rows += [f"| {name} | `{' '.join(VARIANTS[name][0])}` | {100 * r['clean']:.1f} | {100 * r['varied']:.1f} | "
             f"{r['final_loss']:.3f} | {r['seconds']:.0f} |" for name, r in variants.items()]
    (RESULTS / "scratch_small.txt").write_text("\n".join(header + rows) + "\n")
    (RESULTS / "scratch_small.json").write_text(json.dumps(
        {"dataset": sizes, "baselines": baselines, "curve": curve, "variants": variants}, indent=1) + "\n")
    plot(curve, baselines, RESULTS / "scratch_small.png")
    print("\n".join(header + rows))


if __name__ == "__main__":
    main()
