"""UniFEx head training: an epoch from the feature cache vs an epoch in direct mode, in one run.

Writes N JPEG images (default 2,000 of 256x256 in 100 classes) and a CSV list, saves a
random-weight timm ``vit_base_patch16_224`` (ViT-B/16 sized: 86M parameters, 768
features) as a checkpoint file, then runs ``unicom probe``'s library call twice on the same
list, seed and recipe (linear neck 768 -> 64, ArcFace, batch 128, augmentation off):

* cache mode: the one-off cache build (decode, transform, backbone forward, write the
  ``unicom embed`` layout) is timed, then every epoch reads features from memory;
* direct mode: every epoch decodes, transforms and runs the frozen backbone.

Per-epoch times are the trainer's own (``history[i]["seconds"]``: batches and steps).

    flock /tmp/unicom-heavy.lock python benchmarks/unifex_cache.py --write
    python benchmarks/unifex_cache.py --images 200 --classes 20     # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "unifex_cache.txt"
BACKBONE = "vit_base_patch16_224"


def photo(label: int, index: int, size: int):
    """A photo-like JPEG payload: a class colour field, smooth waves and noise."""
    from PIL import Image

    rng = np.random.default_rng([label, index])
    yy, xx = np.mgrid[0:size, 0:size] / size
    colour = np.random.default_rng(label).uniform(40, 215, 3)
    waves = np.stack([np.sin(xx * rng.uniform(1, 9) + rng.uniform(0, 6)) for _ in range(3)], -1) * 40
    pixels = colour + waves + rng.normal(0, 15, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_collection(root: Path, images: int, classes: int, size: int) -> Path:
    rows = []
    for i in range(images):
        label = i % classes
        path = root / "images" / f"{label:03d}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(label, i, size).save(path, format="JPEG", quality=90)
        rows.append(("bench", path.relative_to(root).as_posix(), label))
    listing = root / "train.csv"
    with open(listing, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "path", "class"])
        writer.writerows(rows)
    return listing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cache-epochs", type=int, default=5, help="cache-mode epochs (median reported)")
    parser.add_argument("--direct-epochs", type=int, default=1)
    parser.add_argument("--write", action="store_true", help=f"write {RESULT.relative_to(ROOT)}")
    args = parser.parse_args()

    import timm

    from unicom.unifex.config import load_probe_config
    from unicom.unifex.trainer import probe

    os.environ.setdefault("UNICOM_PROGRESS", "0")
    with tempfile.TemporaryDirectory(prefix="unifex-bench-") as tmp:
        root = Path(tmp)
        listing = write_collection(root, args.images, args.classes, args.size)
        torch.manual_seed(0)
        model = timm.create_model(BACKBONE, num_classes=0)
        parameters = sum(p.numel() for p in model.parameters())
        weights = root / "vit_b16.pth"
        torch.save(model.state_dict(), weights)
        del model

        def recipe(mode: str, epochs: int):
            return load_probe_config(None, [
                f"out={root / mode}", f"data.train=[{listing}]", f"backbone.model=timm/{BACKBONE}",
                f"backbone.pretrained={weights}", "neck.embedding_dim=64", "neck.dropout=0.2", "data.batch_size=128",
                "loss.head=arcface", "loss.scale=30", "loss.margin=0.5", "optim.lr=0.02", "optim.weight_decay=1e-4",
                f"train.mode={mode}", f"train.epochs={epochs}", "train.device=cpu", "eval.holdout_classes=0",
            ])

        silent = open(os.devnull, "w")
        began = time.perf_counter()
        cached = probe(recipe("cache", args.cache_epochs), console=silent)
        cache_total = time.perf_counter() - began
        events = [json.loads(line) for line in (root / "cache" / "log.jsonl").read_text().splitlines()]
        build = next(e for e in events if e["event"] == "cache")["seconds"]
        direct = probe(recipe("direct", args.direct_epochs), console=silent)

    cache_epochs = [r["seconds"] for r in cached["history"]]
    direct_epochs = [r["seconds"] for r in direct["history"]]
    cache_epoch = statistics.median(cache_epochs)
    direct_epoch = statistics.median(direct_epochs)
    ratio = direct_epoch / cache_epoch
    # epochs after which the cache (build + cached epochs) has paid for itself
    break_even = build / max(direct_epoch - cache_epoch, 1e-9)
    lines = [
        f"unifex_cache: {args.images} JPEG {args.size}x{args.size} in {args.classes} classes, timm {BACKBONE} "
        f"(random weights, {parameters / 1e6:.1f}M parameters, 768 features), linear neck 768 -> 64 (dropout 0.2), "
        f"ArcFace, batch 128, augmentation off, CPU fp32",
        f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)",
        f"  cache build, one-off (decode, transform, ViT-B/16 forward, write)   {build:10.2f} s   "
        f"({args.images / build:.2f} images/s)",
        f"  head epoch from the cache      (median of {len(cache_epochs)}: "
        f"{', '.join(f'{s:.4f}' for s in cache_epochs)} s)   {cache_epoch:10.4f} s",
        f"  head epoch in direct mode      (median of {len(direct_epochs)})"
        f"{'':>{max(0, 33 - len(str(len(direct_epochs))))}}{direct_epoch:10.2f} s",
        f"per-epoch speed-up of the cache: {ratio:,.0f}x (target >= 50x)",
        f"the cache pays for itself after {break_even:.2f} epochs (build time / epoch time saved); "
        f"cache-mode run in all: {cache_total:.1f} s for {args.cache_epochs} epochs",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(f"# benchmarks/unifex_cache.py\n\n{text}\n")
        print(f"wrote {RESULT}", file=sys.stderr)
    return 0 if ratio >= 50 else 1


if __name__ == "__main__":
    raise SystemExit(main())
