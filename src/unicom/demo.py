"""The whole pipeline on a laptop CPU in a few minutes: ``python -m unicom.demo --out runs/demo``.

Data: scikit-learn's handwritten digits (1,797 real 8x8 scans of 10 digits, shipped inside
the package, no download), written as 32x32 PNG images. Digits 0-4 are the training
collection, written as webdataset shards *without* their labels; digits 5-9 are held out
for evaluation only. The stages are the real ones, meeting through their files:

1. clustering features in the embedding layout (``img_emb/`` + ``metadata/``): with no
   pretrained network available offline, the 64 pixel intensities of each image (8x8
   grey levels, centred, L2-normalised) play CLIP's part;
2. ``unicom cluster``: k-means pseudo-labels of the training images;
3. ``unicom train`` (``configs/demo.yaml``): a small CLIP-shaped ViT trained from scratch
   on the pseudo-labels with PartialFC (sample_rate < 1, ArcFace), then a shorter compact
   epoch from that run with feature_rate 0.5;
4. ``unicom evaluate`` on the held-out digits (classes never seen in training, leave-one-out
   Recall@1 at several embedding dimensions) of the clustering features, the network at
   its random initialisation (the run's starting weights), the trained network, and the
   trained network after the compact epoch.

Writes ``OUT/report.md``, ``OUT/metrics.json`` and plots (``loss.png``,
``recall_vs_dimension.png``, and the clustering's ``cluster_sizes.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

SEEN = (0, 1, 2, 3, 4)
HELD_OUT = (5, 6, 7, 8, 9)
IMAGE_SIZE = 32
SHARDS = 4
COMPACT_FRACTION = 4  # the compact epoch runs a quarter of the main run's steps
DIMENSIONS = (8, 16, 32, 64)


def repository_config() -> Path:
    """``configs/demo.yaml`` of the source tree this module belongs to."""
    path = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    if not path.is_file():
        from unicom.errors import InputError

        raise InputError(f"{path}: the demo recipe is missing; run the demo from a checkout of the repository")
    return path


def digit_image(pixels: np.ndarray):
    """An 8x8 scan (values 0..16, ink high) as a 32x32 RGB image, dark ink on white."""
    from PIL import Image

    grey = (255 - np.asarray(pixels, dtype=np.float64) * (255 / 16)).round().astype(np.uint8)
    return Image.fromarray(grey, "L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC).convert("RGB")


def write_dataset(root: Path) -> dict:
    """``root/shards/{00000..}.tar`` (seen digits, no labels inside) and ``root/held_out/<digit>/``."""
    import tarfile

    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    seen = [i for i in order if digits.target[i] in SEEN]
    held = [i for i in order if digits.target[i] in HELD_OUT]
    (root / "shards").mkdir(parents=True, exist_ok=True)
    truth = {}
    for shard in range(SHARDS):
        path = root / "shards" / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in seen[shard::SHARDS]:
                key = f"digit{index:05d}"
                buffer = io.BytesIO()
                digit_image(digits.images[index]).save(buffer, format="PNG")
                info = tarfile.TarInfo(f"{key}.png")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)
                truth[key] = int(digits.target[index])
    for index in held:
        folder = root / "held_out" / f"digit_{digits.target[index]}"
        folder.mkdir(parents=True, exist_ok=True)
        digit_image(digits.images[index]).save(folder / f"{index:05d}.png")
    (root / "seen_digits.json").write_text(json.dumps(truth))  # for the report's cluster purity only
    return {"seen": len(seen), "held_out": len(held)}


def pixel_features(images) -> np.ndarray:
    """(N, 64) float32: each image as 8x8 grey levels, mean removed, L2-normalised."""
    from PIL import Image

    rows = np.stack([np.asarray(image.convert("L").resize((8, 8), Image.BOX), dtype=np.float32).ravel() for image in images])
    rows -= rows.mean(axis=1, keepdims=True)
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-6)
    return rows


def write_clustering_features(shards: Path, out: Path) -> int:
    """The pixel features of every shard in the embedding layout (one part per shard)."""
    import pyarrow as pa
    from PIL import Image

    from unicom.data.shards import expand_shards, read_tar_samples
    from unicom.files import part_number
    from unicom.formats.embeddings import write_part

    rows = 0
    for path in expand_shards(str(shards)):
        samples = list(read_tar_samples(path))
        images = [Image.open(io.BytesIO(sample.image_bytes())) for sample in samples]
        keys = [sample.key for sample in samples]
        write_part(out, part_number(path), image=pixel_features(images).astype(np.float16),
                   metadata=pa.table({"key": pa.array(keys, pa.string())}))
        rows += len(keys)
    return rows


def cluster_purity(labels_folder: Path, truth: dict) -> float:
    """Fraction of training images whose pseudo-class's majority digit is their own digit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p, columns=["key", "label"]) for p in sorted(labels_folder.glob("labels_*.parquet"))])
    pseudo = np.asarray(table.column("label").to_pylist())
    digit = np.asarray([truth[k] for k in table.column("key").to_pylist()])
    agree = sum(np.bincount(digit[pseudo == c]).max() for c in np.unique(pseudo))
    return float(agree / len(pseudo))


def untrained_model(config, folder: Path) -> Path:
    """The run's starting weights (the trainer seeds the same way before building), exported."""
    from unicom.models.export import save_model
    from unicom.models.vit import create_model
    from unicom.engine.seeding import seed_everything

    seed_everything(config.seed)
    created = create_model(config.model.name, init=config.model.init, overrides=config.model.overrides())
    return save_model(folder, created.module, created.architecture, created.settings, created.preprocess(),
                      provenance={"note": "random initialisation of the demo run"})


def write_pixel_layout(images, root: Path) -> None:
    """The held-out images' pixel features as an embedding folder with a label column."""
    import pyarrow as pa
    from PIL import Image

    from unicom.formats.embeddings import write_part

    features = pixel_features([Image.open(path) for path in images.paths])
    metadata = pa.table({"key": pa.array(images.keys, pa.string()), "label": pa.array(images.labels, pa.int64())})
    write_part(root, 0, image=features, metadata=metadata)


def plot_loss(log_file: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.plot([r["step"] for r in steps], [r["loss"] for r in steps])
    axis.set_xlabel("step")
    axis.set_ylabel("PartialFC loss (ArcFace)")
    axis.set_title("unicom train on pseudo-labels")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def plot_dimensions(curves: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.2))
    for name, rows in curves.items():
        first = [r for r in rows if r["method"] == "first"]
        axis.plot([r["dimension"] for r in first], [100 * r["recall@1"] for r in first], marker="o", label=name)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("embedding dimension (first d)")
    axis.set_ylabel("Recall@1 on held-out digits (%)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def run(out: Path, steps: int | None = None, threads: int | None = None) -> dict:
    import torch

    from unicom.cli import main as unicom
    from unicom.data.lists import read_image_folder
    from unicom.train.config import load_config

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str, began: float) -> None:
        timings[name] = round(time.perf_counter() - began, 1)
        print(f"[demo] {name}: {timings[name]} s", flush=True)

    if out.exists():
        if any(out.iterdir()) and not (out / "data" / "seen_digits.json").is_file():
            from unicom.errors import InputError

            raise InputError(f"{out} exists and is not a demo folder; give another --out (the demo replaces its folder)")
        shutil.rmtree(out)
    data = out / "data"
    began = time.perf_counter()
    sizes = write_dataset(data)
    stage("dataset", began)

    began = time.perf_counter()
    write_clustering_features(data / "shards", out / "features")
    k = 20  # about 45 training images per pseudo-class
    if unicom(["cluster", "--embeddings", str(out / "features"), "--fusion", "image", "--k", str(k), "--init", "kmeans++",
               "--out", str(out / "clusters")]) != 0:
        raise SystemExit("unicom cluster failed")
    truth = json.loads((data / "seen_digits.json").read_text())
    purity = cluster_purity(out / "clusters" / "labels", truth)
    stage("cluster", began)

    recipe = repository_config()
    overrides = [f"out={out / 'train'}", f"data.shards={data / 'shards'}", f"data.labels={out / 'clusters'}"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    config = load_config(recipe, overrides)
    began = time.perf_counter()
    if unicom(["train", "--config", str(recipe), *overrides]) != 0:
        raise SystemExit("unicom train failed")
    stage("train", began)

    # the compact epoch: the same pseudo-labels, half of the features per step, from the run above
    compact_steps = max(1, config.train.steps // COMPACT_FRACTION)
    compact = [f"out={out / 'compact'}", f"data.shards={data / 'shards'}", f"data.labels={out / 'clusters'}",
               "model.name=null", f"model.init={out / 'train'}", "loss.feature_rate=0.5", f"train.steps={compact_steps}",
               f"optim.lr={config.optim.lr / 4}", "schedule.warmup_fraction=0", "seed=1"]
    began = time.perf_counter()
    if unicom(["train", "--config", str(recipe), *compact]) != 0:
        raise SystemExit("unicom train (compact epoch) failed")
    stage("compact epoch", began)

    began = time.perf_counter()
    held = read_image_folder(data / "held_out")
    write_pixel_layout(held, out / "held_out_pixels")
    untrained = untrained_model(config, out / "untrained_model")
    dims = ",".join(map(str, DIMENSIONS))
    evaluations = {
        "clustering features (pixels)": ["--embeddings", str(out / "held_out_pixels")],
        "untrained network": ["--model", str(untrained), "--dataset", "folder", "--root", str(data / "held_out")],
        "trained network": ["--model", str(out / "train" / "model"), "--dataset", "folder", "--root", str(data / "held_out")],
        "trained network + compact epoch": ["--model", str(out / "compact" / "model"), "--dataset", "folder",
                                            "--root", str(data / "held_out")],
    }
    reports = {}
    for name, source in evaluations.items():
        folder = out / "evaluate" / name.split(" (")[0].replace(" + ", "_").replace(" ", "_")
        with contextlib.redirect_stdout(io.StringIO()):
            code = unicom(["evaluate", *source, "--ks", "1,2,4,8", "--dims", dims, "--no-pca", "--num-workers", "0",
                           "--out", str(folder)])
        if code != 0:
            raise SystemExit(f"unicom evaluate failed for the {name}")
        reports[name] = json.loads((folder / "metrics.json").read_text())
    stage("evaluate", began)

    plot_loss(out / "train" / "log.jsonl", out / "loss.png")
    curves = {name: report["dimensions"] for name, report in reports.items()}
    plot_dimensions(curves, out / "recall_vs_dimension.png")
    shutil.copy(out / "clusters" / "cluster_sizes.png", out / "cluster_sizes.png")
    summary = json.loads((out / "train" / "summary.json").read_text())
    recall = {name: report["metrics"]["recall@1"] for name, report in reports.items()}
    by_dimension = {
        name: {str(r["dimension"]): r["recall@1"] for r in report["dimensions"] if r["method"] == "first"}
        for name, report in reports.items()
    }
    timings["total"] = round(time.perf_counter() - started, 1)
    metrics = {
        "dataset": {"name": "scikit-learn digits", "train_digits": list(SEEN), "held_out_digits": list(HELD_OUT),
                    "train_images": sizes["seen"], "held_out_images": sizes["held_out"], "image_size": IMAGE_SIZE},
        "clustering": {"k": k, "features": "8x8 grey levels, centred, L2-normalised (64-d)", "purity": purity},
        "training": {"steps": summary["steps"], "final_loss": summary["final_loss"], "config": str(recipe),
                     "sample_rate": config.loss.sample_rate, "feature_rate": config.loss.feature_rate,
                     "embedding_dim": config.model.embedding_dim,
                     "compact_epoch": {"steps": compact_steps, "feature_rate": 0.5, "lr": config.optim.lr / 4}},
        "recall@1": {
            "clustering_features": recall["clustering features (pixels)"],
            "untrained_network": recall["untrained network"],
            "trained_network": recall["trained network"],
            "trained_network_compact_epoch": recall["trained network + compact epoch"],
        },
        "recall@1_by_dimension": by_dimension,
        "trained_beats_untrained": recall["trained network"] > recall["untrained network"],
        "seconds": timings,
    }
    from unicom.files import write_json_atomic, write_text_atomic

    write_json_atomic(out / "metrics.json", metrics)
    write_text_atomic(out / "report.md", report_markdown(metrics, reports))
    print(f"[demo] Recall@1 on held-out digits: clustering features {recall['clustering features (pixels)']:.3f}, "
          f"untrained network {recall['untrained network']:.3f}, trained network {recall['trained network']:.3f}")
    print(f"[demo] report: {out / 'report.md'} ({timings['total']} s)")
    return metrics


def report_markdown(metrics: dict, reports: dict) -> str:
    data, clustering, training, recall = metrics["dataset"], metrics["clustering"], metrics["training"], metrics["recall@1"]
    names = list(reports)
    dims = sorted({int(d) for rows in metrics["recall@1_by_dimension"].values() for d in rows})
    lines = [
        "# unicom demo: cluster discrimination on handwritten digits",
        "",
        f"Data: scikit-learn's digits (real 8x8 scans), shown as {data['image_size']}x{data['image_size']} images. "
        f"Training: {data['train_images']} images of digits {', '.join(map(str, data['train_digits']))}, without their labels. "
        f"Evaluation: {data['held_out_images']} images of digits {', '.join(map(str, data['held_out_digits']))}, classes the "
        "network never saw.",
        "",
        "## Pipeline",
        "",
        f"1. Clustering features: {clustering['features']}. No pretrained network is available offline, so raw pixels "
        "stand in for the CLIP embeddings of the paper.",
        f"2. `unicom cluster`: k-means into k = {clustering['k']} pseudo-classes; purity against the true digits "
        f"{100 * clustering['purity']:.1f}% (the share of images whose pseudo-class's majority digit is their own).",
        f"3. `unicom train` ({Path(training['config']).name}): a CLIP-shaped ViT from scratch, {training['steps']} steps, "
        f"PartialFC with sample_rate {training['sample_rate']}, feature_rate {training['feature_rate']}; final loss "
        f"{training['final_loss']:.3f} (loss.png).",
        "4. `unicom evaluate`: leave-one-out retrieval on the held-out digits (each image queries all the others), "
        "Recall@1.",
        "",
        "## Recall@1 on held-out digits",
        "",
        "| features | Recall@1 (%) |",
        "|---|---|",
        f"| clustering features (pixels, 64-d) | {100 * recall['clustering_features']:.2f} |",
        f"| untrained network (random initialisation) | {100 * recall['untrained_network']:.2f} |",
        f"| trained network | {100 * recall['trained_network']:.2f} |",
        f"| trained network + compact epoch | {100 * recall['trained_network_compact_epoch']:.2f} |",
        "",
        f"The trained network {'beats' if metrics['trained_beats_untrained'] else 'does NOT beat'} its random "
        "initialisation. Numbers are as measured by this run.",
        "",
        "## By embedding dimension (first d dimensions)",
        "",
        "| d | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for d in dims:
        cells = [f"{100 * metrics['recall@1_by_dimension'][n].get(str(d), float('nan')):.2f}" for n in names]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"The compact epoch continues the trained run (its backbone and prototypes) for {training['compact_epoch']['steps']} "
        "steps with random feature selection (feature_rate 0.5: every step uses a random half of the dimensions, the same "
        "for the whole batch), the paper's way of making the first dimensions carry the similarity; here it "
        f"{_compact_effect(metrics)}. The first d pixel features are merely the top rows of the 8x8 image "
        "(recall_vs_dimension.png).",
        "",
        "Plots: loss.png, recall_vs_dimension.png, cluster_sizes.png. Timings (s): "
        + ", ".join(f"{k} {v}" for k, v in metrics["seconds"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def _compact_effect(metrics: dict) -> str:
    """How the compact epoch changed Recall@1 at the smallest dimension, in words."""
    by = metrics["recall@1_by_dimension"]
    d = str(min(int(k) for k in by["trained network"]))
    before, after = by["trained network"][d], by["trained network + compact epoch"][d]
    change = "raised" if after > before else "did not raise"
    return f"{change} Recall@1 at d = {d} ({100 * before:.2f}% before, {100 * after:.2f}% after)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unicom.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (replaced)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("UNICOM_PROGRESS", "0")
    run(Path(args.out), args.steps, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
